"""A torch.distributed.checkpoint written by two ranks (gloo on CPU, DTensor shards).

Each rank writes its own ``.distcp`` file holding its shard of every tensor (rows for
``Shard(0)``, columns for ``Shard(1)``); ckptool must put the chunks back together:
inspect sees whole tensors, convert writes one safetensors file equal, bit for bit, to
the full tensors the ranks started from, and diff --values agrees.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

WRITER = textwrap.dedent(
    """
    import os, sys, tempfile
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp


    def worker(rank, world, init, out):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        mesh = init_device_mesh("cpu", (world,))
        torch.manual_seed(0)  # the same full tensors on every rank
        full = {"layer.weight": torch.randn(10, 6), "layer.bias": torch.randn(6),
                "emb": torch.randn(7, 3)}
        placements = {"layer.weight": Shard(0), "layer.bias": Shard(0), "emb": Shard(1)}
        state = {k: distribute_tensor(v, mesh, [placements[k]]) for k, v in full.items()}
        dcp.save({"model": state}, checkpoint_id=out)
        if rank == 0:
            torch.save(full, out + ".full.pt")
        dist.destroy_process_group()


    if __name__ == "__main__":
        init = "file://" + tempfile.mktemp()
        mp.spawn(worker, args=(2, init, sys.argv[1]), nprocs=2)
    """
)


def test_two_rank_checkpoint_is_reassembled(run_cli, tmp_path: Path) -> None:
    script = tmp_path / "write_dcp.py"
    script.write_text(WRITER)
    checkpoint = tmp_path / "ckpt"
    subprocess.run([sys.executable, str(script), str(checkpoint)], check=True, timeout=120)
    assert sorted(p.name for p in checkpoint.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    full = torch.load(f"{checkpoint}.full.pt", weights_only=True)

    doc = json.loads(run_cli("inspect", checkpoint, "--json").stdout)
    shapes = {t["name"]: t["shape"] for t in doc["tensors"]}
    assert doc["format"] == "torch-dcp" and doc["key"] == "model"
    assert shapes == {k: list(v.shape) for k, v in full.items()}

    out = tmp_path / "whole.safetensors"
    result = run_cli("convert", checkpoint, "-o", out)
    assert result.exit_code == 0, result.output
    written = load_file(out)
    assert written.keys() == full.keys()
    assert all(torch.equal(written[k], v) for k, v in full.items())
    values = run_cli("diff", checkpoint, f"{checkpoint}.full.pt", "--values")
    assert values.exit_code == 0 and "3 bit-identical" in values.stdout
