"""merge-lora against peft's own merge_and_unload, over the config variants that change
the arithmetic; and one clear line for broken inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TiedLM
from safetensors.torch import load_file, save_file
from torch import nn

import ckptool

peft = pytest.importorskip("peft")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.q = nn.Linear(8, 8)
        self.v = nn.Linear(8, 16)
        self.conv = nn.Conv2d(3, 4, 3)
        self.point = nn.Conv2d(4, 6, 1)
        self.signal = nn.Conv1d(3, 5, 4)
        self.taps = nn.Conv1d(5, 7, 1)
        # peft 0.21 cannot merge a 1x1x1 Conv3d (its 1x1 shortcut squeezes 2 dims, not 3).
        self.volume = nn.Conv3d(2, 3, (2, 3, 3))
        self.head = nn.Linear(16, 2)


class GptLike(nn.Module):
    """GPT-2 keeps its projections as Conv1D ([in, out] weights): fan_in_fan_out."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c_attn = Conv1D(24, 8)
        self.c_proj = Conv1D(8, 8)


VARIANTS = {
    "default": (Net, {"target_modules": ["q", "v"]}),
    "embedding and convs": (
        Net,
        {"target_modules": ["emb", "conv", "point", "signal", "taps", "volume", "q"]},
    ),
    "rslora": (Net, {"target_modules": ["q", "v"], "use_rslora": True}),
    "rank and alpha patterns": (
        Net,
        {"target_modules": ["q", "v", "conv"], "rank_pattern": {"v": 2, "conv": 6},
         "alpha_pattern": {"q": 3.0, "conv": 12}},
    ),
    "modules_to_save": (Net, {"target_modules": ["q"], "modules_to_save": ["head"]}),
    "fan_in_fan_out": (GptLike, {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True}),
    # peft's trainable tokens: new rows for tokens 1, 3 and 7 replace the embedding's
    "trainable tokens": (
        Net, {"target_modules": ["q"], "trainable_token_indices": {"emb": [1, 3, 7]}}
    ),
}  # fmt: skip


def _adapter(model_cls: type[nn.Module], options: dict, folder: Path) -> tuple[Path, Path, dict]:
    """Base weights, a trained-looking adapter (random A and B), and peft's merge."""
    torch.manual_seed(0)
    base = model_cls()
    base_path = folder / "base.pt"
    torch.save(base.state_dict(), base_path)
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **options)
    model = peft.get_peft_model(base, config)
    model.save_pretrained(folder / "adapter")
    merged = model.merge_and_unload().state_dict()
    return base_path, folder / "adapter", merged


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merge_equals_peft(run_cli, tmp_path: Path, variant: str) -> None:
    model_cls, options = VARIANTS[variant]
    base, adapter, expected = _adapter(model_cls, options, tmp_path)
    out = tmp_path / "merged.safetensors"
    result = run_cli("merge-lora", base, adapter, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    merged = load_file(out)
    assert merged.keys() == expected.keys()
    for name, value in expected.items():
        scale = value.abs().max().clamp_min(1e-12)
        assert (merged[name] - value).abs().max() / scale <= 1e-6, name
    doc = json.loads(result.stdout)
    changed = [k for k, v in expected.items() if not torch.equal(v, torch.load(base)[k])]
    # Everything that differs from the base is reported as merged or taken from the
    # adapter (modules_to_save copies may equal the base: they were not trained here).
    assert set(changed) <= set(doc["merged"]) | set(doc["taken"]) and doc["merged"]


def test_merge_streams_one_tensor_at_a_time_and_keeps_the_rest_as_bytes(tmp_path: Path) -> None:
    base, adapter, _ = _adapter(Net, {"target_modules": ["q"]}, tmp_path)
    out = tmp_path / "merged.safetensors"
    log = ckptool.merge_lora(base, adapter, str(out))
    untouched = load_file(out)
    original = torch.load(base)
    assert log.kept and all(torch.equal(untouched[k], original[k]) for k in log.kept)


def _train_tokens(adapter: Path, base: Path, ids: list[int]) -> None:
    """Add trained rows for ``ids`` of emb to an adapter, as peft saves them."""
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    width = torch.load(base, weights_only=True)["emb.weight"].shape[1]
    tensors["base_model.model.emb.token_adapter.trainable_tokens_delta"] = torch.ones(
        len(ids), width
    )
    save_file(tensors, weights)


def test_trainable_token_rows_replace_the_embeddings_rows(tmp_path: Path) -> None:
    """The rows are replaced, not added to (peft's index_copy); the others are kept."""
    base, adapter, _ = _adapter(
        Net, {"target_modules": ["q"], "trainable_token_indices": {"emb": [1, 3]}}, tmp_path
    )
    _train_tokens(adapter, base, ids=[1, 3])
    out = tmp_path / "merged.safetensors"
    log = ckptool.merge_lora(base, adapter, str(out))
    embedding, original = load_file(out)["emb.weight"], torch.load(base)["emb.weight"]
    assert torch.equal(embedding[[1, 3]], torch.ones(2, 8))
    assert torch.equal(embedding[[0, 2, 4]], original[[0, 2, 4]])
    assert "emb.weight" in log.merged and "emb.weight" not in log.kept
    summary = ckptool.read_metadata(adapter)
    from ckptool.formats.adapters import describe_adapter

    info = describe_adapter(summary.path, summary.tensors)
    assert info is not None and info.tokens == ("emb",) and info.saved == ()
    assert info.summary.endswith("; trainable tokens on emb")


@pytest.mark.parametrize(
    "options",
    [
        {"target_modules": ["emb"]},
        {"target_modules": ["body"], "trainable_token_indices": {"emb": [2]}},
    ],
    ids=["embedding lora", "trainable tokens"],
)
def test_a_tied_weight_is_merged_under_each_of_its_names(tmp_path: Path, options: dict) -> None:
    """Only emb.weight was merged: lm_head.weight kept the base's values, and loading
    the file into the tied model let whichever name loads last win."""
    base, adapter, expected = _adapter(TiedLM, options, tmp_path)
    if "trainable_token_indices" in options:
        _train_tokens(adapter, base, ids=[2])
        expected["emb.weight"] = expected["lm_head.weight"] = torch.load(base)["emb.weight"].clone()
        expected["emb.weight"][2] = 1.0
    out = tmp_path / "merged.pt"
    log = ckptool.merge_lora(base, adapter, str(out))
    merged = torch.load(out, weights_only=True)
    for name in ("emb.weight", "lm_head.weight"):
        assert torch.allclose(merged[name], expected[name], atol=1e-6), name
        assert name in log.merged
    model = TiedLM()
    model.load_state_dict(merged, strict=True)
    assert torch.allclose(model.lm_head.weight, expected["emb.weight"], atol=1e-6)


def test_updates_of_two_names_of_one_tied_tensor_are_refused(run_cli, tmp_path: Path) -> None:
    base, adapter, _ = _adapter(TiedLM, {"target_modules": ["emb", "lm_head"]}, tmp_path)
    result = run_cli("merge-lora", base, adapter, "-o", tmp_path / "merged.pt")
    assert result.exit_code == 2 and "updates emb.weight and lm_head.weight" in result.stderr
    assert "which are one tensor" in result.stderr and not (tmp_path / "merged.pt").exists()


def _broken(tmp_path: Path, case: str) -> tuple[Path, Path]:
    base, adapter, _ = _adapter(Net, {"target_modules": ["q", "v"]}, tmp_path)
    weights = adapter / "adapter_model.safetensors"
    if case == "truncated adapter":
        weights.write_bytes(weights.read_bytes()[:-10])
    elif case == "config missing":
        (adapter / "adapter_config.json").unlink()
    elif case == "config not json":
        (adapter / "adapter_config.json").write_text("{")
    elif case == "module the base lacks":
        tensors = load_file(weights)
        tensors["base_model.model.k.lora_A.weight"] = torch.zeros(4, 8)
        tensors["base_model.model.k.lora_B.weight"] = torch.zeros(8, 4)
        save_file(tensors, weights)
    elif case.startswith("dataparallel base"):
        state = torch.load(base, weights_only=True)
        if case.endswith("lacking v"):  # a prefix alone does not explain it
            del state["v.weight"]
        torch.save({f"module.{k}": v for k, v in state.items()}, base)
    elif case == "A without B":
        tensors = load_file(weights)
        del tensors["base_model.model.v.lora_B.weight"]
        save_file(tensors, weights)
    elif case.startswith("token ids"):
        _train_tokens(adapter, base, ids=[1, 3])
        config = json.loads((adapter / "adapter_config.json").read_text())
        config["trainable_token_indices"] = {"emb": [1, 99]} if "range" in case else None
        (adapter / "adapter_config.json").write_text(json.dumps(config))
    elif case in _CONFIG_EDITS:
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps(config | _CONFIG_EDITS[case]))
    elif case == "base of another shape":
        state = torch.load(base, weights_only=True)
        state["q.weight"] = torch.zeros(state["q.weight"].shape[0], 3)
        torch.save(state, base)
    elif case == "no lora tensors":
        save_file({"base_model.model.head.weight": torch.zeros(3, 8)}, weights)
    elif case == "tokens on a module the base lacks":
        _train_tokens(adapter, base, ids=[1, 3])
        state = torch.load(base, weights_only=True)
        del state["emb.weight"]
        torch.save(state, base)
        _edit_config(adapter, {"trainable_token_indices": {"emb": [1, 3]}})
    elif case == "tokens and lora on one weight":
        tensors = load_file(weights)
        tensors["base_model.model.q.token_adapter.trainable_tokens_delta"] = torch.ones(1, 8)
        save_file(tensors, weights)
        _edit_config(adapter, {"trainable_token_indices": {"q": [1]}})
    return base, adapter


_CONFIG_EDITS = {
    "dora": {"use_dora": True},
    "not lora": {"peft_type": "IA3"},
    "alpha not a number": {"lora_alpha": "8"},
}


def _edit_config(adapter: Path, changes: dict[str, object]) -> None:
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | changes))


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("truncated adapter", 3, "adapter_model.safetensors"),
        ("config missing", 3, "no adapter_config.json"),
        ("config not json", 3, "not valid JSON"),
        ("module the base lacks", 1, "adapts k, which .* lacks .*is this the adapter's base"),
        (
            "dataparallel base",
            1,
            "adapts q, which .* lacks .*the adapter's match after --strip module.\\): rename them "
            "first \\(ckptool adapt .*base.pt --model SPEC --strip module. -o OUT\\)",
        ),
        ("dataparallel base lacking v", 1, "adapts q, which .* lacks .*is this the adapter's base"),
        ("A without B", 3, "not both lora_A and lora_B"),
        ("dora", 2, "use_dora adapters are not supported"),
        ("token ids out of range", 3, "2 trainable token ids for emb \\(up to 99\\) do not fit"),
        ("token ids missing", 3, "trainable tokens on emb without their token ids"),
        ("not lora", 2, "a 'IA3' adapter; merge-lora merges LoRA"),
        ("alpha not a number", 3, "needs a positive integer r, a number lora_alpha"),
        ("no lora tensors", 2, "holds no lora_A/lora_B tensors; not an adapter"),
        (
            "base of another shape",
            1,
            "the update for q is \\[8, 8\\], the base's weight \\[8, 3\\]",
        ),
        ("tokens on a module the base lacks", 1, "trains token rows of emb, which .* lacks"),
        ("tokens and lora on one weight", 2, "q has both LoRA and trainable tokens"),
    ],
)
def test_broken_inputs_get_one_line(
    run_cli, tmp_path: Path, case: str, code: int, message: str
) -> None:
    import re

    base, adapter = _broken(tmp_path, case)
    out = tmp_path / "merged.safetensors"
    result = run_cli("merge-lora", base, adapter, "-o", out)
    assert result.exit_code == code, result.output
    assert re.search(message, result.stderr) and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()
