"""Benchmark: reading a ~2 GB checkpoint's metadata, ckptool versus loading it.

Makes a transformer-shaped checkpoint (~290 tensors, ~2 GB float32) as torch.save zip
and safetensors, then runs each contender in a fresh process, REPEATS times,
interleaved, and prints medians of whole-process wall time, in-process operation time
and peak RSS (from wait4), side by side in one run:

    python scripts/bench_read.py [--workdir DIR] [--repeats 5] [--gb 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

# Each child prints the seconds its operation took (excluding interpreter start-up).
TORCH_LOAD = (
    "import time, torch; t = time.perf_counter(); "
    "sd = torch.load({path!r}, weights_only=True, mmap={mmap}, map_location='cpu'); "
    "n = sum(v.numel() for v in sd['state_dict'].values()); print(time.perf_counter() - t)"
)
SAFE_OPEN = (
    "import time; from safetensors import safe_open; t = time.perf_counter()\n"
    "with safe_open({path!r}, framework='pt') as f: names = list(f.keys()); "
    "n = [f.get_slice(k).get_shape() for k in names]\n"
    "print(time.perf_counter() - t)"
)


def make_checkpoints(workdir: str, gigabytes: float) -> tuple[str, str]:
    """Write both files from a child process.

    The parent must stay small: a child forked from a large process reports that
    process's pages as its own peak RSS (ru_maxrss counts the pre-exec copy).
    """
    pt, st = os.path.join(workdir, "big.pt"), os.path.join(workdir, "big.safetensors")
    code = f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
    code += f"import bench_read; bench_read.write_checkpoints({pt!r}, {st!r}, {gigabytes!r})"
    subprocess.run([sys.executable, "-c", code], check=True)
    return pt, st


HIDDEN, VOCAB, HEAD = 1280, 32000, 1000


def transformer_state(gigabytes: float) -> dict[str, Any]:
    """~290 tensors for 2 GB: embedding, attention and MLP blocks, norms, a head."""
    import torch

    hidden, layers, vocab = HIDDEN, int(24 * gigabytes / 2), VOCAB
    state: dict[str, torch.Tensor] = {"embed.weight": torch.empty(vocab, hidden)}
    for i in range(layers):
        p = f"layers.{i}."
        for name in ("q", "k", "v", "o"):
            state[p + f"attn.{name}.weight"] = torch.empty(hidden, hidden)
            state[p + f"attn.{name}.bias"] = torch.zeros(hidden)
        state[p + "mlp.up.weight"] = torch.empty(4 * hidden, hidden)
        state[p + "mlp.down.weight"] = torch.empty(hidden, 4 * hidden)
        for norm in ("norm1", "norm2"):
            state[p + f"{norm}.weight"] = torch.ones(hidden)
            state[p + f"{norm}.bias"] = torch.zeros(hidden)
    state["head.weight"] = torch.empty(HEAD, hidden)
    return state


def write_checkpoints(pt: str, st: str, gigabytes: float) -> None:
    import torch
    from safetensors.torch import save_file

    state = transformer_state(gigabytes)
    torch.save({"state_dict": state, "epoch": 1}, pt)
    save_file(state, st)


def interleaved(contenders: dict[str, list[str]], repeats: int, *, width: int = 40) -> None:
    """Run each contender ``repeats`` times, interleaved, ``sync`` first; print medians
    of wall time and peak RSS (fresh processes, so each pays its own imports)."""
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, argv in contenders.items():
            subprocess.run(["sync"], check=True)
            wall, rss, _ = run(argv)
            results[name].append((wall, rss))
    for name, samples in results.items():
        wall = statistics.median(s[0] for s in samples)
        rss = statistics.median(s[1] for s in samples)
        print(f"  {name:{width}} {wall:7.2f} s  {rss:8.0f} MiB peak RSS", flush=True)


def run(argv: list[str]) -> tuple[float, float, float | None]:
    """(wall seconds, peak RSS MiB, in-process seconds or None) of one child process."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert child.stdout is not None
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    # diff exits 1 here on purpose: .pt and .safetensors key orders differ only.
    if os.waitstatus_to_exitcode(status) not in (0, 1):
        raise SystemExit(f"benchmark command failed: {' '.join(argv)}")
    try:
        inner: float | None = float(output.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        inner = None
    return wall, usage.ru_maxrss / 1024, inner


def from_tree(name: str, argv: list[str], tree: str) -> tuple[str, list[str]]:
    """(label, argv) of a ckptool command run from another checkout (a git worktree of
    an older commit, say): a change measured against the code before it in one run."""
    # PYTHONSAFEPATH: `python -m`/`-c` put the working directory first on sys.path, so
    # run from the repository root they imported its ckptool, not the tree's.
    label = f"{name} [{os.path.basename(tree.rstrip('/'))}]"
    return label, ["env", f"PYTHONPATH={tree}", "PYTHONSAFEPATH=1", *argv]


def contenders(pt: str, st: str) -> dict[str, list[str]]:
    py, ck = sys.executable, [sys.executable, "-m", "ckptool"]
    return {
        "ckptool --help": [*ck, "--help"],
        "ckptool inspect (.pt)": [*ck, "inspect", pt, "--json"],
        "ckptool inspect (.safetensors)": [*ck, "inspect", st, "--json"],
        "ckptool diff .pt vs .safetensors": [*ck, "diff", pt, st, "--json"],
        "torch.load (.pt, full)": [py, "-c", TORCH_LOAD.format(path=pt, mmap=False)],
        "torch.load (.pt, mmap=True)": [py, "-c", TORCH_LOAD.format(path=pt, mmap=True)],
        "safetensors safe_open (shapes)": [py, "-c", SAFE_OPEN.format(path=st)],
        "python -c 'import torch'": [py, "-c", "import torch"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", help="where to write the checkpoints (default: a temp dir)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gb", type=float, default=2.0)
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="ckptool-bench-")
    try:
        pt, st = make_checkpoints(workdir, args.gb)
        size = os.path.getsize(pt) / 2**30
        runs = contenders(pt, st)
        results: Samples = {name: [] for name in runs}
        for argv in runs.values():  # warm the page cache and imports once
            run(argv)
        for _ in range(args.repeats):
            for name, argv in runs.items():  # interleaved, so drift hits all alike
                results[name].append(run(argv))
        report(results, size, args.repeats)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


Samples = dict[str, list[tuple[float, float, float | None]]]


def report(results: Samples, size: float, repeats: int) -> None:
    base = statistics.median(r[0] for r in results["torch.load (.pt, full)"])
    print(f"checkpoint: {size:.2f} GiB, medians of {repeats} runs, each a fresh process")
    print("| command | wall (s) | in-process op (s) | peak RSS (MiB) | torch.load full / this |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, rows in results.items():
        wall = statistics.median(r[0] for r in rows)
        rss = statistics.median(r[1] for r in rows)
        inner = [r[2] for r in rows if r[2] is not None]
        op = f"{statistics.median(inner):.3f}" if inner else "-"
        print(f"| {name} | {wall:.3f} | {op} | {rss:.0f} | {base / wall:.1f}x |")


if __name__ == "__main__":
    sys.exit(main())
