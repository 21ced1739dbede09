"""Benchmark: writing a ~2 GB checkpoint with ckptool versus cp and torch.load+torch.save.

Makes the transformer-shaped checkpoint of bench_read.py with DataParallel 'module.'
keys, as a torch.save zip and as safetensors, then runs, each in a fresh process,
REPEATS times, interleaved, with `sync` before each run so one run's write-back does
not slow the next: cp (the floor), ckptool convert both ways and into four shards,
ckptool adapt (strip the prefix, replace the head: the 2 GB model is built on the meta
device), and the naive torch.load + torch.save; each round once on a quiet machine and
once beside a CPU-bound process. Prints medians of wall time and peak RSS (wait4).

    python scripts/bench_write.py [--workdir DIR] [--repeats 3] [--gb 2] [--quiet-only]
                                  [--baseline-tree DIR]

--baseline-tree DIR adds each ckptool row once more, run from another checkout (a git
worktree of an older commit), interleaved with the rest: a change measured against
the code before it in one run.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_read import HEAD, HIDDEN, VOCAB, from_tree, run

MODEL = textwrap.dedent(
    f"""
    from torch import nn

    class Block(nn.Module):
        def __init__(self, h):
            super().__init__()
            self.attn = nn.Module()
            for name in ("q", "k", "v", "o"):
                self.attn.add_module(name, nn.Linear(h, h))
            self.mlp = nn.Module()
            self.mlp.up = nn.Linear(h, 4 * h, bias=False)
            self.mlp.down = nn.Linear(4 * h, h, bias=False)
            self.norm1, self.norm2 = nn.LayerNorm(h), nn.LayerNorm(h)

    class Net(nn.Module):
        def __init__(self, layers=24):
            super().__init__()
            self.embed = nn.Embedding({VOCAB}, {HIDDEN})
            self.layers = nn.ModuleList(Block({HIDDEN}) for _ in range(layers))
            self.head = nn.Linear({HIDDEN}, {HEAD}, bias=False)
    """
)


def make_inputs(workdir: str, gigabytes: float) -> tuple[str, str, str]:
    pt, st = os.path.join(workdir, "big.pt"), os.path.join(workdir, "big.safetensors")
    code = (
        f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
        "import torch, bench_read\n"
        "from safetensors.torch import save_file\n"
        f"state = bench_read.transformer_state({gigabytes!r})\n"
        f"torch.save({{'module.' + k: v for k, v in state.items()}}, {pt!r})\n"
        f"save_file(state, {st!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)  # keeps this process small
    model = os.path.join(workdir, "bench_model.py")
    with open(model, "w", encoding="utf-8") as f:
        f.write(MODEL)
    return pt, st, model


IMPORT_TORCH = "python -c 'import torch'"
ADAPT = "ckptool adapt (strip module., new head)"


def contenders(
    pt: str, st: str, model: str, gigabytes: float, out_dir: str, baseline_tree: str | None = None
) -> dict[str, tuple[list[str], str | None]]:
    """name -> (argv, output file name inside out_dir, or a glob of its files)."""
    runs = _contenders(pt, st, model, gigabytes, out_dir)
    if baseline_tree is None:
        return runs
    # Each baseline runs right beside its command (see main): on this VM a write is
    # slowed by what ran before it (a 2 GB file just deleted, the disk's burst budget),
    # so running all baselines at the end of a round biased the comparison.
    paired = {}
    for name, (argv, output) in runs.items():
        paired[name] = (argv, output)
        if name.startswith("ckptool"):
            label, twin = from_tree(name, argv, baseline_tree)
            paired[label] = (twin, output)
    return paired


def _contenders(
    pt: str, st: str, model: str, gigabytes: float, out_dir: str
) -> dict[str, tuple[list[str], str | None]]:

    def out(name: str) -> str:
        return os.path.join(out_dir, name)

    ck = [sys.executable, "-m", "ckptool"]
    model_flags = ["--model", f"{model}:Net", "--model-arg", f"layers={int(24 * gigabytes / 2)}"]
    naive = f"import torch; torch.save(torch.load({pt!r}, weights_only=True), {out('n.pt')!r})"
    return {
        "cp .pt": (["cp", pt, out("cp.pt")], "cp.pt"),
        # ckptool fsyncs its output (durability); this is the like-for-like floor.
        "cp .pt && sync (fsync) it": (
            ["sh", "-c", 'cp "$0" "$1" && sync "$1"', pt, out("cs.pt")],
            "cs.pt",
        ),
        "ckptool convert .pt -> .safetensors": (
            [*ck, "convert", pt, "-o", out("c.safetensors")],
            "c.safetensors",
        ),
        "ckptool convert .safetensors -> .pt": ([*ck, "convert", st, "-o", out("c.pt")], "c.pt"),
        # Four shards and their index: the source's sha256 is taken in the copy pass.
        "ckptool convert .pt -> 4 shards (512MB)": (
            [*ck, "convert", pt, "-o", out("sh.safetensors"), "--shard-size", "512MB"],
            "sh[-.]*",
        ),
        ADAPT: (
            [
                *ck,
                "adapt",
                pt,
                *model_flags,
                "--num-classes",
                "10",
                "--strip",
                "module.",
                "--drop",
                "head.",
                "-o",
                out("a.safetensors"),
            ],
            "a.safetensors",
        ),
        "torch.load + torch.save (naive)": ([sys.executable, "-c", naive], "n.pt"),
        # adapt's goal is this plus two cp && sync.
        IMPORT_TORCH: ([sys.executable, "-c", "import torch"], None),
    }


def busy_process() -> subprocess.Popen[bytes]:
    """A CPU-bound competitor: on 2 cores it takes one, as a training job beside would."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def measure(argv: list[str], busy: bool) -> tuple[float, float]:
    subprocess.run(["sync"], check=True)
    hog = busy_process() if busy else None
    try:
        wall, rss, _ = run(argv)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    return wall, rss


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", help="where to write (default: a temp dir)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument(
        "--quiet-only", action="store_true", help="skip the runs beside a busy process"
    )
    parser.add_argument("--baseline-tree", help="also run ckptool from this checkout")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="ckptool-bench-")
    modes = (False,) if args.quiet_only else (False, True)
    try:
        pt, st, model = make_inputs(workdir, args.gb)
        runs = contenders(pt, st, model, args.gb, workdir, args.baseline_tree)
        samples: dict[tuple[str, bool], list[tuple[float, float]]] = {}
        for repeat in range(args.repeats):
            for busy in modes:
                for name, (argv, output) in _round(runs, swapped=repeat % 2 == 1):
                    samples.setdefault((name, busy), []).append(measure(argv, busy))
                    for written in glob.glob(os.path.join(workdir, output)) if output else ():
                        os.unlink(written)
        report(samples, os.path.getsize(pt) / 2**30, args.repeats, modes)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _round(
    runs: dict[str, tuple[list[str], str | None]], *, swapped: bool
) -> list[tuple[str, tuple[list[str], str | None]]]:
    """The runs in order, each baseline twin (``name [tree]``) beside its command; in
    every other round the twin goes first, so neither always follows the same run."""
    order = list(runs.items())
    if swapped:
        for i in range(len(order) - 1):
            if order[i + 1][0].startswith(order[i][0] + " ["):
                order[i], order[i + 1] = order[i + 1], order[i]
    return order


def report(
    samples: dict[tuple[str, bool], list[tuple[float, float]]],
    size: float,
    repeats: int,
    modes: tuple[bool, ...],
) -> None:
    def median(name: str, busy: bool, field: int = 0) -> float:
        return statistics.median(s[field] for s in samples[(name, busy)])

    print(f"checkpoint: {size:.2f} GiB, medians of {repeats} runs, each a fresh process after sync")
    for busy in modes:
        floor = median("cp .pt", busy)
        synced = median("cp .pt && sync (fsync) it", busy)
        print("\nbeside a busy process" if busy else "\nquiet machine")
        print("| command | wall (s) | / cp | / cp+sync | peak RSS (MiB) |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name in dict.fromkeys(n for n, _ in samples):
            wall, rss = median(name, busy), median(name, busy, 1)
            print(
                f"| {name} | {wall:.2f} | {wall / floor:.2f}x | {wall / synced:.2f}x | {rss:.0f} |"
            )
        goal = median(IMPORT_TORCH, busy) + 2 * synced
        adapt = median(ADAPT, busy)
        print(
            f"\nadapt's goal (import torch + 2x cp && sync): {goal:.2f} s; adapt {adapt:.2f} s "
            f"({adapt / goal:.2f}x the goal)"
        )


if __name__ == "__main__":
    sys.exit(main())
