"""LoRA adapter files are recognised: inspect and diff say what they adapt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ckptool


def _adapter(folder: Path, config: object | None) -> Path:
    """What PEFT's save_pretrained writes for q/v LoRA on two layers plus a saved head."""
    folder.mkdir()
    tensors = {}
    for layer in range(2):
        for proj in ("q", "v"):
            base = f"base_model.model.layers.{layer}.{proj}"
            tensors[f"{base}.lora_A.weight"] = torch.randn(4, 16)
            tensors[f"{base}.lora_B.weight"] = torch.zeros(16, 4)
    tensors["base_model.model.head.weight"] = torch.randn(3, 16)
    save_file(tensors, folder / "adapter_model.safetensors")
    if config is not None:
        text = config if isinstance(config, str) else json.dumps(config)
        (folder / "adapter_config.json").write_text(text)
    return folder / "adapter_model.safetensors"


CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": True,
          "target_modules": ["q", "v"], "modules_to_save": ["head"],
          "base_model_name_or_path": "tiny-base"}  # fmt: skip


def test_inspect_says_what_an_adapter_adapts(run_cli, tmp_path: Path) -> None:
    path = _adapter(tmp_path / "adapter", CONFIG)
    result = run_cli("inspect", path)
    assert result.exit_code == 0, result.output
    assert "LoRA on 4 modules, r=4, alpha=8 (scale 4, rsLoRA), base tiny-base" in result.stdout
    assert "layers.{0,1}.{q,v}" in result.stdout or "layers.{0,1}" in result.stdout
    doc = json.loads(run_cli("inspect", path, "--json").stdout)["adapter"]
    assert doc["modules"] == ["layers.0.q", "layers.0.v", "layers.1.q", "layers.1.v"]
    assert doc["ranks"] == [4] and doc["modules_to_save"] == ["head.weight"]


def test_diff_of_an_adapter_against_a_model_says_so(run_cli, tmp_path: Path) -> None:
    path = _adapter(tmp_path / "adapter", None)  # no config: ranks from the shapes
    model = torch.nn.Linear(16, 3)
    report = ckptool.diff(path, model=model)
    assert not report.compatible
    assert "is an adapter (LoRA on 4 modules, r=4; 1 tensor saved whole" in report.notes[0]
    assert "merge it into its base model first" in report.notes[0]


@pytest.mark.parametrize("config", ["{not json", "[1, 2]"], ids=["not-json", "not-object"])
def test_a_broken_adapter_config_is_one_line_exit_3(run_cli, tmp_path: Path, config: str) -> None:
    path = _adapter(tmp_path / "adapter", config)
    result = run_cli("inspect", path)
    assert result.exit_code == 3 and "adapter_config.json" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_plain_checkpoints_are_not_adapters(run_cli, write_checkpoint) -> None:
    path = write_checkpoint(torch.nn.Linear(4, 2).state_dict(), "plain.safetensors")
    assert json.loads(run_cli("inspect", path, "--json").stdout)["adapter"] is None
