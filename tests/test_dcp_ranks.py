"""A torch.distributed.checkpoint written by two ranks (gloo on CPU, DTensor shards).

Each rank writes its own ``.distcp`` file holding its shard of every tensor (rows for
``Shard(0)``, columns for ``Shard(1)``); ckptool must put the chunks back together:
inspect sees whole tensors, convert writes one safetensors file equal, bit for bit, to
the full tensors the ranks started from, and diff --values agrees.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ckptool
from ckptool.formats.dcp import chunk_assembly, chunk_index, dcp_name
from ckptool.formats.files import read_assembly

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


@pytest.fixture(scope="module")
def two_rank_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("dcp")
    script = folder / "write_dcp.py"
    script.write_text(WRITER)
    checkpoint = folder / "ckpt"
    subprocess.run([sys.executable, str(script), str(checkpoint)], check=True, timeout=120)
    return checkpoint


def test_two_rank_checkpoint_is_reassembled(
    run_cli, two_rank_checkpoint: Path, tmp_path: Path
) -> None:
    checkpoint = two_rank_checkpoint
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


def test_row_shards_are_copied_as_byte_ranges(two_rank_checkpoint: Path) -> None:
    """Shard(0) chunks are whole rows: the tensor is their storages' bytes in row order,
    copied without torch; Shard(1) chunks are not, and torch assembles them."""
    meta = ckptool.read_metadata(two_rank_checkpoint)
    index = chunk_index(meta.path)
    full = torch.load(f"{two_rank_checkpoint}.full.pt", weights_only=True)
    for name in ("layer.weight", "layer.bias"):
        fqn = dcp_name(meta, name)
        assembly = chunk_assembly(meta.path, fqn, meta.tensors[name], index)
        assert assembly is not None and len(assembly.pieces) == 2
        data = read_assembly(assembly, name)
        assert torch.equal(torch.frombuffer(data, dtype=torch.float32), full[name].flatten())
        reversed_index = {fqn: index[fqn][::-1]}  # ranks listed in any order
        again = chunk_assembly(meta.path, fqn, meta.tensors[name], reversed_index)
        assert again == assembly
        first, second = sorted(index[fqn], key=lambda c: c.offsets)
        wanted = meta.tensors[name]
        # Chunks that do not tile the rows exactly are left to torch, which checks them.
        for chunks in ([second], [first], [second, second], [first, first]):
            assert chunk_assembly(meta.path, fqn, wanted, {fqn: chunks}) is None
        if name == "layer.weight":  # a chunk placed off the first column is no row block
            moved = dataclasses.replace(second, offsets=(5, 1))
            assert chunk_assembly(meta.path, fqn, wanted, {fqn: [first, moved]}) is None
        double = wanted._replace(dtype="float64")  # bytes of another dtype
        assert chunk_assembly(meta.path, fqn, double, index) is None
    emb = dcp_name(meta, "emb")
    assert chunk_assembly(meta.path, emb, meta.tensors["emb"], index) is None


def test_convert_copies_row_shards_without_loading_them(
    two_rank_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """convert's bytes for a Shard(0) tensor come from the chunk records, not torch;
    a cast still goes through torch."""
    from contextlib import ExitStack

    from ckptool.surgery import SourceBytes

    meta = ckptool.read_metadata(two_rank_checkpoint)
    full = torch.load(f"{two_rank_checkpoint}.full.pt", weights_only=True)
    with ExitStack() as stack:
        sources = SourceBytes(meta, stack)

        def no_torch(name: str) -> torch.Tensor:
            raise AssertionError(f"{name} was loaded through torch")

        monkeypatch.setattr(sources, "tensor", no_torch)
        data, dtype = sources.data("layer.weight")
        assert dtype == "float32"
        written = torch.frombuffer(bytearray(data.materialize()), dtype=torch.float32)
        assert torch.equal(written, full["layer.weight"].flatten())
        cast, _ = sources.data("layer.weight", "bfloat16")
        with pytest.raises(AssertionError, match="loaded through torch"):
            cast.materialize()
