"""Benchmark: consolidating a ~1 GiB sharded checkpoint into one file, ckptool versus
the engines' own tools.

Writes, with the engines themselves, a model of LAYERS Linear(4096, 4096) layers in
float32 (64 MiB each; 16 layers = 1 GiB) saved by two ranks (gloo, CPU):

- torch.distributed.checkpoint: every weight a DTensor sharded by rows, one
  ``.distcp`` file per rank; baseline ``dcp_to_torch_save`` (torch's own converter,
  which loads the whole state into memory and torch.saves it).
- DeepSpeed ZeRO stage 3 (needs deepspeed; skipped without it): saved right after
  ``deepspeed.initialize``; baseline DeepSpeed's
  ``convert_zero_checkpoint_to_fp32_state_dict(..., safe_serialization=True)``.

Then, each in a fresh process, REPEATS times, interleaved, with ``sync`` first, it
times ckptool convert (to .safetensors and to .pt) and the baseline, prints medians of
wall time and peak RSS (wait4), and checks every output holds the same tensors.

    python scripts/bench_consolidate.py [--workdir DIR] [--repeats 3] [--layers 16]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_read import interleaved

HIDDEN = 4096

MAKE_DCP = textwrap.dedent(
    f"""
    import sys, tempfile
    import torch, torch.distributed as dist, torch.multiprocessing as mp

    def worker(rank, layers, init, out):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
        mesh = init_device_mesh("cpu", (2,))
        torch.manual_seed(rank)
        state = {{}}
        for i in range(layers):
            local = torch.randn({HIDDEN} // 2, {HIDDEN})
            state[f"layers.{{i}}.weight"] = DTensor.from_local(local, mesh, [Shard(0)])
            state[f"layers.{{i}}.bias"] = DTensor.from_local(torch.randn({HIDDEN} // 2), mesh,
                                                             [Shard(0)])
        dcp.save({{"model": state}}, checkpoint_id=out)
        dist.destroy_process_group()

    if __name__ == "__main__":
        init = "file://" + tempfile.mktemp()
        mp.spawn(worker, args=(int(sys.argv[1]), init, sys.argv[2]), nprocs=2)
    """
)

MAKE_ZERO = textwrap.dedent(
    f"""
    import sys, torch, deepspeed
    from torch import nn
    layers, out = int(sys.argv[1]), sys.argv[2]
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear({HIDDEN}, {HIDDEN}) for _ in range(layers)))
    config = {{"train_batch_size": 2, "zero_optimization": {{"stage": 3}},
              "optimizer": {{"type": "AdamW", "params": {{"lr": 1e-3, "torch_adam": True}}}}}}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=config)
    engine.save_checkpoint(out, tag="step0")
    """
)

DCP_TO_TORCH = (
    "import sys; from torch.distributed.checkpoint.format_utils import dcp_to_torch_save; "
    "dcp_to_torch_save(sys.argv[1], sys.argv[2])"
)
ZERO_TO_FP32 = (
    "import sys; from deepspeed.utils.zero_to_fp32 import "
    "convert_zero_checkpoint_to_fp32_state_dict as c; "
    "c(sys.argv[1], sys.argv[2], safe_serialization=True)"
)
# Every output read back flat (DCP's nests under 'model'; DeepSpeed's is a folder).
SAME = textwrap.dedent(
    """
    import glob, os, sys, torch
    from safetensors.torch import load_file

    def flat(path):
        if os.path.isdir(path):
            files = glob.glob(path + "/*.safetensors")
            return {k: v for f in files for k, v in load_file(f).items()}
        if path.endswith(".safetensors"):
            return load_file(path)
        state = torch.load(path, weights_only=True, mmap=True)
        return state.get("model", state) if isinstance(state.get("model"), dict) else state

    first, *rest = (flat(p) for p in sys.argv[1:])
    print(all(first.keys() == r.keys() and all(torch.equal(first[k], r[k]) for k in first)
              for r in rest))
    """
)


def make_zero(workdir: str, layers: int) -> str | None:
    if importlib.util.find_spec("deepspeed") is None:
        print("deepspeed not installed: ZeRO part skipped")
        return None
    folder = os.path.join(workdir, "zero")
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    script = write_script(workdir, "make_zero.py", MAKE_ZERO)
    subprocess.run([*launch, script, str(layers), folder], check=True, env=env, capture_output=True)
    return folder


def write_script(workdir: str, name: str, text: str) -> str:
    """A file, not ``python -c``: spawned ranks import the worker from it."""
    path = os.path.join(workdir, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def print_same(outputs: list[str]) -> None:
    done = subprocess.run([sys.executable, "-c", SAME, *outputs], capture_output=True, text=True)
    print("  outputs identical:", done.stdout.strip())


def folder_gib(folder: str) -> float:
    return (
        sum(
            os.path.getsize(os.path.join(root, f))
            for root, _, files in os.walk(folder)
            for f in files
        )
        / 2**30
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=16)
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="ckptool-bench-consolidate-")
    py = sys.executable
    ck = [py, "-m", "ckptool", "convert"]

    def out(name: str) -> str:
        return os.path.join(workdir, name)

    dcp = out("dcp")
    make_dcp = write_script(workdir, "make_dcp.py", MAKE_DCP)
    subprocess.run([py, make_dcp, str(args.layers), dcp], check=True)
    print(f"DCP: {folder_gib(dcp):.2f} GiB in {len(os.listdir(dcp)) - 1} .distcp files (2 ranks)")
    interleaved(
        {
            "ckptool convert DCP -> .safetensors": [*ck, dcp, "-o", out("dcp.safetensors"),
                                                    "--force"],
            "ckptool convert DCP -> .pt": [*ck, dcp, "-o", out("dcp.pt"), "--force"],
            "torch dcp_to_torch_save -> .pt": [py, "-c", DCP_TO_TORCH, dcp, out("dcp_torch.pt")],
        },
        args.repeats,
        width=52,
    )  # fmt: skip
    print_same([out("dcp.safetensors"), out("dcp.pt"), out("dcp_torch.pt")])

    zero = make_zero(workdir, args.layers)
    if zero is not None:
        print(f"ZeRO stage 3: {folder_gib(zero):.2f} GiB, 2 ranks")
        ds_env = [
            py,
            "-c",
            f"import os; os.environ['DS_ACCELERATOR'] = 'cpu'; exec({ZERO_TO_FP32!r})",
        ]
        interleaved(
            {
                "ckptool convert ZeRO -> .safetensors": [*ck, zero, "-o",
                                                         out("zero.safetensors"), "--force"],
                "deepspeed zero_to_fp32 -> safetensors": [*ds_env, zero, out("zero_ds")],
            },
            args.repeats,
            width=52,
        )  # fmt: skip
        print_same([out("zero.safetensors"), out("zero_ds")])
    if not args.workdir:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
