"""Benchmark: memory of streamed casts and of adapt, against their budget.

Issue 12's budgets: a cast (`convert --dtype`) peaks at most at `import torch` plus
twice the largest tensor; `adapt` at `import torch` plus twice the largest tensor plus
the tensors it fills from the model. Uses bench_write.py's ~2 GB transformer-shaped
checkpoint (largest tensor: the 32000x1280 float32 embedding, 156 MiB). Every command
runs in a fresh process after `sync`, REPEATS times, interleaved; prints medians of
wall time and peak RSS (wait4) beside the budget.

    python scripts/bench_cast.py [--workdir DIR] [--repeats 3] [--gb 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_read import HEAD, HIDDEN, VOCAB, run
from bench_write import make_inputs

LARGEST_MIB = VOCAB * HIDDEN * 4 / 2**20
FILLED_MIB = HEAD * HIDDEN * 4 / 2**20  # adapt fills the new head from the model


def contenders(pt: str, st: str, model: str, gigabytes: float, out: str) -> dict[str, list[str]]:
    ck = [sys.executable, "-m", "ckptool"]
    naive = (
        "import torch; from safetensors.torch import save_file; "
        f"s = torch.load({pt!r}, weights_only=True); "
        f"save_file({{k: v.half() for k, v in s.items()}}, {os.path.join(out, 'n.safetensors')!r})"
    )
    layers = f"layers={int(24 * gigabytes / 2)}"
    return {
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "ckptool convert .pt --dtype float16": [
            *ck, "convert", pt, "-o", os.path.join(out, "h.safetensors"), "--dtype", "float16",
        ],
        "ckptool convert .safetensors --dtype bfloat16": [
            *ck, "convert", st, "-o", os.path.join(out, "b.safetensors"), "--dtype", "bfloat16",
        ],
        "ckptool adapt (strip module., new head)": [
            *ck, "adapt", pt, "--model", f"{model}:Net", "--model-arg", layers,
            "--num-classes", "10", "--strip", "module.", "--drop", "head.",
            "-o", os.path.join(out, "a.safetensors"),
        ],
        "ckptool adapt ... --dtype float16": [
            *ck, "adapt", pt, "--model", f"{model}:Net", "--model-arg", layers,
            "--num-classes", "10", "--strip", "module.", "--drop", "head.",
            "--dtype", "float16", "-o", os.path.join(out, "ah.safetensors"),
        ],
        "torch.load + .half() + save_file (naive)": [sys.executable, "-c", naive],
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", help="where to write (default: a temp dir)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gb", type=float, default=2.0)
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="ckptool-bench-")
    outputs = os.path.join(workdir, "out")
    try:
        pt, st, model = make_inputs(workdir, args.gb)
        runs = contenders(pt, st, model, args.gb, outputs)
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, argv in runs.items():
                os.makedirs(outputs, exist_ok=True)
                subprocess.run(["sync"], check=True)
                wall, rss, _ = run(argv)
                samples[name].append((wall, rss))
                shutil.rmtree(outputs)
        report(samples, args.repeats)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def report(samples: dict[str, list[tuple[float, float]]], repeats: int) -> None:
    torch_rss = statistics.median(s[1] for s in samples["python -c 'import torch'"])
    cast_budget = torch_rss + 2 * LARGEST_MIB
    print(f"medians of {repeats} runs; largest tensor {LARGEST_MIB:.0f} MiB")
    print(f"budget: casts {cast_budget:.0f} MiB, adapt {cast_budget + FILLED_MIB:.0f} MiB")
    print("| command | wall (s) | peak RSS (MiB) | RSS / budget |")
    print("| --- | ---: | ---: | ---: |")
    for name, rows in samples.items():
        wall = statistics.median(r[0] for r in rows)
        rss = statistics.median(r[1] for r in rows)
        budget = cast_budget + (FILLED_MIB if "adapt" in name else 0)
        shown = "-" if "import torch" in name else f"{rss / budget:.2f}"
        print(f"| {name} | {wall:.2f} | {rss:.0f} | {shown} |")


if __name__ == "__main__":
    sys.exit(main())
