"""Tied parameters: one tensor under two names in the model.

A checkpoint that provides one name of a tie provides both: adapt must write the other
name with the same values (re-initialising it would overwrite the trained tensor when
torch loads the names in order), and the fix must never re-initialise it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import plain_load, torch_accepts
from safetensors.torch import load_file, save_file
from torch import nn

import ckptool

MODELS = '''
import torch
from torch import nn


class TwoPaths(nn.Module):
    """Layers as attributes and again in a ModuleList (as lpips.LPIPS keeps lin0..lin4)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.lin0 = nn.Linear(8, 8)
        self.lin1 = nn.Linear(8, 3)
        self.lins = nn.ModuleList([self.lin0, self.lin1])


class TiedBias(nn.Module):
    """A decoder whose bias is the head's bias (as BERT's prediction head ties them)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.bias = nn.Parameter(torch.zeros(5))
        self.decoder = nn.Linear(6, 5)
        self.decoder.bias = self.bias


class TiedEmbedding(nn.Module):
    """Input embedding tied to the output projection; the file keeps one name."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.mix = nn.Linear(6, 6)
        self.out = nn.Linear(6, 10, bias=False)
        self.out.weight = self.embed.weight
'''

# (model, the tied names a checkpoint leaves out, the name of each one's partner)
CASES = {
    "TwoPaths": {"lins.0.weight": "lin0.weight", "lins.0.bias": "lin0.bias",
                 "lins.1.weight": "lin1.weight", "lins.1.bias": "lin1.bias"},
    "TiedBias": {"decoder.bias": "bias"},
    "TiedEmbedding": {"out.weight": "embed.weight"},
}  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, str]:
    import importlib.util

    path = tmp_path_factory.mktemp("ties") / "tied_models.py"
    path.write_text(MODELS)
    spec = importlib.util.spec_from_file_location("tied_models", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, str(path)


def _trained(models: tuple[object, str], name: str) -> nn.Module:
    torch.manual_seed(1)
    model = getattr(models[0], name)()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # unlike any fresh initialisation
    return model


def _one_name_per_tie(model: nn.Module, left_out: dict[str, str], folder: Path) -> list[Path]:
    state = {k: v for k, v in model.state_dict().items() if k not in left_out}
    pt, st = folder / "one-name.pt", folder / "one-name.safetensors"
    torch.save(state, pt)
    save_file({k: v.clone() for k, v in state.items()}, st)
    return [pt, st]


@pytest.mark.parametrize("name", list(CASES))
def test_verdict_is_torchs_and_adapt_keeps_tied_values(models, name: str, tmp_path: Path) -> None:
    trained = _trained(models, name)
    for source in _one_name_per_tie(trained, CASES[name], tmp_path):
        fresh = getattr(models[0], name)()
        report = ckptool.diff(source, model=fresh)
        assert report.compatible == torch_accepts(fresh, plain_load(source)) is False
        assert dict(report.keys.through_tie) == CASES[name]
        fix = report.keys.fix
        assert fix is not None and not fix.keeps_little
        assert not fix.transforms.reinit and not fix.transforms.drop  # nothing to throw away

        out = tmp_path / f"{name}-{source.suffix[1:]}.safetensors"
        log = ckptool.adapt(source, model=getattr(models[0], name)(), out=str(out))
        assert dict(log.aliases) == CASES[name] and not log.filled
        assert log.from_checkpoint == log.model_numel
        loaded = getattr(models[0], name)()
        loaded.load_state_dict(load_file(out), strict=True)  # plain safetensors, strict
        for key, value in loaded.state_dict().items():
            # Every name, tied ones included, holds the trained values bit for bit.
            assert torch.equal(value, trained.state_dict()[key]), key


def test_load_into_fills_a_tie_in_place(models, tmp_path: Path) -> None:
    trained = _trained(models, "TiedBias")
    source = _one_name_per_tie(trained, CASES["TiedBias"], tmp_path)[1]
    model = models[0].TiedBias()
    log = ckptool.load_into(model, source)
    assert dict(log.aliases) == {"decoder.bias": "bias"}
    assert torch.equal(model.decoder.bias, trained.bias)


def test_reinit_of_one_tied_name_is_refused(models, run_cli, tmp_path: Path) -> None:
    """Re-initialising lins.0 would re-initialise lin0, which the checkpoint provides."""
    trained = _trained(models, "TwoPaths")
    source = _one_name_per_tie(trained, CASES["TwoPaths"], tmp_path)[0]
    spec = f"{models[1]}:TwoPaths"
    out = tmp_path / "out.safetensors"
    result = run_cli("adapt", source, "--model", spec, "--reinit", "lins.0.", "-o", out)
    assert result.exit_code == 2, result.output
    assert "ties to 'lin0.weight'" in result.stderr and not out.exists()
    # Both names of the tie re-initialised is a consistent request.
    both = run_cli(
        "adapt", source, "--model", spec, "--reinit", "lins.0.", "--reinit", "lin0.",
        "--drop", "lin0.", "-o", out, "--allow-mostly-init",
    )  # fmt: skip
    assert both.exit_code == 0, both.output
    written = load_file(out)
    assert torch.equal(written["lins.0.weight"], written["lin0.weight"])
    assert not torch.equal(written["lin0.weight"], trained.lin0.weight)


def test_diff_cli_offers_adapt_without_flags_for_a_tie(models, run_cli, tmp_path: Path) -> None:
    trained = _trained(models, "TiedEmbedding")
    source = _one_name_per_tie(trained, CASES["TiedEmbedding"], tmp_path)[1]
    result = run_cli("diff", source, "--model", f"{models[1]}:TiedEmbedding")
    assert result.exit_code == 1
    assert "tied in the model" in result.stdout and "--reinit" not in result.stdout


def _buffer_saved_shards(tmp_path: Path, shards: list[dict[str, torch.Tensor]]) -> Path:
    """A sharded .bin checkpoint whose shards were saved through a buffer: every
    torch.save zip then names its storages archive/data/0, archive/data/1, ..."""
    import io
    import json

    weight_map = {}
    for i, shard in enumerate(shards, 1):
        buffer = io.BytesIO()
        torch.save(shard, buffer)
        name = f"model-{i:05d}-of-{len(shards):05d}.bin"
        (tmp_path / name).write_bytes(buffer.getvalue())
        weight_map.update(dict.fromkeys(shard, name))
    index = tmp_path / "model.bin.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def test_shards_with_the_same_storage_keys_are_not_tied(tmp_path: Path, run_cli) -> None:
    shared = torch.full((3,), 2.0)
    index = _buffer_saved_shards(
        tmp_path,
        [{"a.weight": torch.ones(3)}, {"b.weight": shared, "c.weight": shared}],
    )
    meta = ckptool.read_metadata(index)
    # b and c are one tensor in their shard; a (another file, same record name) is not
    assert meta.shared_groups() == [["b.weight", "c.weight"]]
    assert meta.nbytes == 24  # a's 12 bytes and the 12 that b and c share
    torch.save({"a.weight": torch.ones(3)}, tmp_path / "one.pt")
    result = run_cli("diff", tmp_path / "one.pt", index)
    assert result.exit_code == 1
    assert "tied to a provided key" not in result.stdout
    assert re.search(r"missing +\| 2 ", result.stdout), result.stdout  # b and c


def test_empty_safetensors_tensors_at_one_offset_are_not_tied(tmp_path: Path) -> None:
    """Two empty tensors start at the same byte: that makes them neither one tensor
    nor a tie for diff to fill a missing name from."""
    path = tmp_path / "empty.safetensors"
    save_file({"a.bias": torch.zeros(0), "b.bias": torch.zeros(0), "c": torch.ones(2)}, path)
    assert ckptool.read_metadata(path).shared_groups() == []


def test_a_sharded_output_keeps_ties(tmp_path: Path, run_cli) -> None:
    """convert --shard-size stored both names of a tie in full and lost the tie: a later
    merge-lora or merge --take of one name then left the other stale. Each alias now
    goes with its target into that shard's ckptool.aliases; the index lists stored
    names only, as transformers writes tied weights."""
    import json

    embed = torch.randn(10, 6)
    state = {"embed.weight": embed, "mix.weight": torch.randn(6, 6), "out.weight": embed}
    source = tmp_path / "tied.pt"
    torch.save(state, source)
    out = tmp_path / "sharded" / "model.safetensors"
    out.parent.mkdir()
    assert run_cli("convert", source, "-o", out, "--shard-size", "200B").exit_code == 0
    index = json.loads((out.parent / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {"embed.weight", "mix.weight"}
    meta = ckptool.read_metadata(out.parent)
    assert meta.shared_groups() == [["embed.weight", "out.weight"]]
    loaded = ckptool.load_state_dict(out.parent)
    assert loaded["out.weight"] is loaded["embed.weight"]
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    model = nn.Module()
    model.embed, model.out = nn.Embedding(10, 6), nn.Linear(6, 10, bias=False)
    model.mix = nn.Linear(6, 6, bias=False)
    model.out.weight = model.embed.weight
    model.load_state_dict(dict(loaded), strict=True)
    assert torch.equal(model.out.weight, embed)
