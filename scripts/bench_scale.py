"""Benchmark: inspect, diff and convert as the tensor count grows (1k, 10k, 100k tensors).

Two naming schemes: MoE-like (`model.layers.L.mlp.experts.E.w1.weight`, deep dotted
paths, many siblings) and flat (`t123456`, no dots at all). Tensors are tiny (4
floats), so the cost measured is per tensor, not per byte. Each file is written as
safetensors, as a torch.save zip and in about 500 safetensors shards (an index beside
them). `diff` compares the safetensors file with a copy whose last tensor is renamed,
with a copy whose eight tensors are each renamed their own way (the fix tries a rename
for each), and the sharded copy with the file. inspect and diff of the safetensors file run with
--json and also as the text a person reads (folded tables, the verdict). Beside them,
in the same run, the baselines: `python -c pass`, safetensors' own reader listing every
shape, and `torch.load(mmap=True)` of the torch.save file. Writes: `convert` both
ways, beside safetensors' own `save_file(load_file(...))`. Every command runs in a
fresh process, REPEATS times; prints medians of wall time and peak RSS (wait4) and the
cost per tensor.

    python scripts/bench_scale.py [--counts 1000,10000,100000] [--repeats 3]
                                  [--baseline-tree DIR]

--baseline-tree DIR runs each ckptool command once more from another checkout.
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
from bench_read import from_tree, run

SHAPES = (
    "from safetensors import safe_open\n"
    "with safe_open({!r}, framework='np') as f: [f.get_slice(k).get_shape() for k in f.keys()]"
)
TORCH_MMAP = "import torch; torch.load({!r}, mmap=True, weights_only=True)"
COPY = "from safetensors.torch import load_file, save_file; save_file(load_file({!r}), {!r})"


def moe_names(count: int) -> list[str]:
    names = []
    layer = 0
    while len(names) < count:
        for expert in range(64):
            for w in ("w1", "w2", "w3"):
                names.append(f"model.layers.{layer}.mlp.experts.{expert}.{w}.weight")
        names.append(f"model.layers.{layer}.self_attn.q_proj.weight")
        layer += 1
    return names[:count]


def flat_names(count: int) -> list[str]:
    return [f"t{i}" for i in range(count)]


def make_files(workdir: str, scheme: str, count: int) -> dict[str, str]:
    stem = os.path.join(workdir, f"{scheme}{count}")
    code = (
        f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
        "import torch, bench_scale\n"
        "from safetensors.torch import save_file\n"
        f"names = bench_scale.{scheme}_names({count})\n"
        "state = {n: torch.full((4,), float(i)) for i, n in enumerate(names)}\n"
        f"save_file(state, {stem + '.safetensors'!r})\n"
        f"torch.save(state, {stem + '.pt'!r})\n"
        "state[names[-1] + '_renamed'] = state.pop(names[-1])\n"
        f"save_file(state, {stem + '.other.safetensors'!r})\n"
        "state[names[-1]] = state.pop(names[-1] + '_renamed')\n"
        # Eight tensors spread over the file, each renamed its own way: the fix tries a
        # rename for each (a port that renamed a few tensors by hand).
        "for k, i in enumerate(range(0, len(names), -(-len(names) // 8))):\n"
        "    state[f'{names[i]}_v{k}'] = state.pop(names[i])\n"
        f"save_file(state, {stem + '.ported.safetensors'!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    # The same tensors in about 500 shards (an index and its files), written by ckptool.
    shard_size = max(1000, count * 16 // 500)
    index = os.path.join(workdir, f"{scheme}{count}-shards", "model.safetensors")
    os.makedirs(os.path.dirname(index), exist_ok=True)
    convert = ["convert", stem + ".safetensors", "-o", index, "--shard-size", str(shard_size)]
    subprocess.run([sys.executable, "-m", "ckptool", *convert], check=True, capture_output=True)
    return {
        "st": stem + ".safetensors",
        "pt": stem + ".pt",
        "other": stem + ".other.safetensors",
        "ported": stem + ".ported.safetensors",
        "index": index + ".index.json",
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--counts", default="1000,10000,100000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-tree", help="also run ckptool from this checkout")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    workdir = tempfile.mkdtemp(prefix="ckptool-scale-")
    ck = [sys.executable, "-m", "ckptool"]
    rows = []
    try:
        for scheme in ("moe", "flat"):
            for count in counts:
                files = make_files(workdir, scheme, count)
                out_st, out_pt = (
                    os.path.join(workdir, f"written.{s}") for s in ("safetensors", "pt")
                )
                commands = {
                    "inspect .safetensors": [*ck, "inspect", files["st"], "--json"],
                    "inspect .pt": [*ck, "inspect", files["pt"], "--json"],
                    "diff .safetensors": [*ck, "diff", files["st"], files["other"], "--json"],
                    "diff .safetensors, 8 renamed": [
                        *ck,
                        "diff",
                        files["st"],
                        files["ported"],
                        "--json",
                    ],
                    # What a person reads: the folded tables and the verdict, as text.
                    "inspect .safetensors (text)": [*ck, "inspect", files["st"]],
                    "diff .safetensors (text)": [*ck, "diff", files["st"], files["other"]],
                    "inspect index (~500 shards)": [*ck, "inspect", files["index"], "--json"],
                    "diff index vs .safetensors": [
                        *ck,
                        "diff",
                        files["index"],
                        files["st"],
                        "--json",
                    ],
                    # Writes: per-tensor costs (a write, a read-back, a zip record each).
                    "convert .pt -> .safetensors": [
                        *ck,
                        "convert",
                        files["pt"],
                        "-o",
                        out_st,
                        "--force",
                    ],
                    "convert .safetensors -> .pt": [
                        *ck,
                        "convert",
                        files["st"],
                        "-o",
                        out_pt,
                        "--force",
                    ],
                    # Baselines: the interpreter alone, safetensors' own (Rust) header
                    # reader listing every shape, torch's loader without reading bytes.
                    "python -c pass": [sys.executable, "-c", "pass"],
                    "safe_open shapes (numpy)": [sys.executable, "-c", SHAPES.format(files["st"])],
                    "torch.load .pt (mmap)": [sys.executable, "-c", TORCH_MMAP.format(files["pt"])],
                    "load_file + save_file": [
                        sys.executable,
                        "-c",
                        COPY.format(files["st"], out_st),
                    ],
                }
                if args.baseline_tree:
                    ours = [(k, v) for k, v in commands.items() if v[:3] == ck]
                    commands.update(from_tree(k, v, args.baseline_tree) for k, v in ours)
                for label, argv in commands.items():
                    samples = [run(argv)[:2] for _ in range(args.repeats)]
                    wall = statistics.median(s[0] for s in samples)
                    rss = statistics.median(s[1] for s in samples)
                    rows.append((scheme, count, label, wall, rss))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"medians of {args.repeats} fresh processes")
    print("| names | tensors | command | wall (s) | peak RSS (MiB) | µs per tensor |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for scheme, count, label, wall, rss in rows:
        per_tensor = wall / count * 1e6
        print(f"| {scheme} | {count:,} | {label} | {wall:.2f} | {rss:.0f} | {per_tensor:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
