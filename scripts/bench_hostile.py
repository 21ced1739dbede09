"""Time and peak memory of every command on every file of the hostile corpus.

Each (file, command) runs as its own ``python -m ckptool`` process; wall time and the
child's peak RSS (``os.wait4``) are recorded beside the same command on a small valid
file (the baseline: interpreter, imports, torch where the command needs it). Some valid
files need torch where the baseline does not (sparse tensors, DCP chunks): for those
the baseline is ``import torch`` itself. The goal: every corpus file (all under 2 MB)
answered within 2 s and 200 MB of its baseline. Run with --jobs 1 for figures: two
torch imports at once on 2 cores double each other's time.

    python scripts/bench_hostile.py [--jobs 2] [--limit-s 2] [--limit-mb 200]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BAD = Path(__file__).resolve().parent.parent / "fixtures" / "bad"
REFERENCE = BAD / "crafted_valid.pt"
LINEAR = [
    *("--model", "torch.nn:Linear"),
    *("--model-arg", "in_features=2", "--model-arg", "out_features=2"),
]


def commands(path: Path, out: str) -> dict[str, list[str]]:
    return {
        "inspect": ["inspect", str(path)],
        "diff --values": ["diff", str(path), str(REFERENCE), "--values"],
        "convert": ["convert", str(path), "-o", f"{out}/c.safetensors", "--force"],
        "adapt": ["adapt", str(path), *LINEAR, "-o", f"{out}/a.pt", "--force"],
        "check": ["check", str(path), *LINEAR],
    }


def measure(args: list[str]) -> tuple[float, float, int]:
    """(seconds, peak RSS in MiB, exit code) of one ckptool process."""
    start = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", "ckptool", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - start, usage.ru_maxrss / 1024, child.returncode


def torch_import() -> tuple[float, float]:
    """Median (seconds, MiB) of a process that only imports torch."""
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-c", "import torch"])
        _, _, usage = os.wait4(child.pid, 0)
        runs.append((time.perf_counter() - start, usage.ru_maxrss / 1024))
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def run_case(name: str) -> dict[str, tuple[float, float, int]]:
    with tempfile.TemporaryDirectory() as out:
        return {what: measure(args) for what, args in commands(BAD / name, out).items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--limit-s", type=float, default=2.0)
    parser.add_argument("--limit-mb", type=float, default=200.0)
    options = parser.parse_args()
    names = sorted(json.loads((BAD / "MANIFEST.json").read_text())["cases"])
    base_runs = [run_case(REFERENCE.name) for _ in range(3)]
    base = {
        what: (
            statistics.median(r[what][0] for r in base_runs),
            statistics.median(r[what][1] for r in base_runs),
        )
        for what in base_runs[0]
    }
    torch_s, torch_mb = torch_import()
    with ThreadPoolExecutor(options.jobs) as pool:
        results = dict(zip(names, pool.map(run_case, names), strict=True))
    print(f"{len(names)} files x {len(base)} commands, {options.jobs} at a time")
    print(f"import torch alone: {torch_s:.2f} s, {torch_mb:.0f} MiB")
    print(f"{'command':14} {'baseline':>16} {'worst time':>28} {'worst RSS over baseline':>36}")
    over = []
    for what, (base_s, base_mb) in base.items():
        slowest = max(names, key=lambda n: results[n][what][0])
        biggest = max(names, key=lambda n: results[n][what][1])
        extra_s = results[slowest][what][0] - base_s
        extra_mb = results[biggest][what][1] - base_mb
        print(
            f"{what:14} {base_s:6.2f} s {base_mb:5.0f} MiB "
            f"{results[slowest][what][0]:6.2f} s (+{extra_s:4.2f}) {slowest[:14]:>14} "
            f"{results[biggest][what][1]:6.0f} MiB (+{extra_mb:4.0f}) {biggest[:20]:>20}"
        )
        for name in names:
            seconds, mib, _ = results[name][what]
            # A file that makes the command import torch is measured against torch.
            floor_s, floor_mb = (torch_s, torch_mb) if mib > torch_mb * 0.8 else (0.0, 0.0)
            if (
                seconds - max(base_s, floor_s) > options.limit_s
                or mib - max(base_mb, floor_mb) > options.limit_mb
            ):
                over.append(f"{name} {what}: {seconds:.2f} s, {mib:.0f} MiB")
    for line in over:
        print("OVER BUDGET", line)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
