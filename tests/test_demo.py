"""ckptool demo: the README's main job, end to end on the shipped data."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import torch

import ckptool
from ckptool.demo import DIGITS, PRETRAINED


def test_shipped_assets_are_real_digits_and_a_dataparallel_checkpoint() -> None:
    data = np.load(DIGITS)
    assert data["images"].shape == (1797, 8, 8) and set(data["labels"].tolist()) == set(range(10))
    meta = ckptool.read_metadata(PRETRAINED)
    assert meta.key == "state_dict" and all(name.startswith("module.") for name in meta.tensors)
    assert meta.tensors["module.fc.weight"].shape == (6, 64)


def test_demo_runs_the_whole_workflow(run_cli, tmp_path: Path) -> None:
    """Into a folder whose name has a space: each printed command is still one command
    line a shell splits into the paths the demo used."""
    folder = tmp_path / "my demo"
    result = run_cli("demo", folder)
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    for command in ("$ ckptool inspect", "$ ckptool diff", "$ ckptool adapt", "$ ckptool finetune"):
        assert command in out
    adapt_line = next(line for line in out.splitlines() if "$ ckptool adapt" in line)
    words = shlex.split(adapt_line.split("$ ", 1)[1])
    assert words[words.index("-o") + 1] == str(folder / "digits_6to9_start.safetensors"), words
    verdict = (
        "incompatible: strip 'module.': then 23/23 keys match; fc.{weight,bias} differ in shape"
    )
    assert f"{verdict}: add --drop fc." in out
    assert out.count("guard: ok") == 3 and "transfer-linear" in out and "scratch" in out
    report = json.loads((folder / "transfer-linear" / "report.json").read_text())
    assert report["cached_features"] and report["frozen_unchanged"]
    start = ckptool.load_state_dict(folder / "digits_6to9_start.safetensors")
    trained = ckptool.load_state_dict(folder / "transfer-linear" / "model.safetensors")
    assert all(torch.equal(trained[k], v) for k, v in start.items() if k.startswith("features."))
    assert not torch.equal(trained["fc.weight"], start["fc.weight"])
    accuracies = {
        Path(p).parent.name: max(e["val_acc"] for e in json.loads(Path(p).read_text())["epochs"])
        for p in (folder).glob("*/report.json")
    }
    assert set(accuracies) == {"transfer-linear", "transfer-full", "scratch"}
    assert min(accuracies.values()) > 0.5  # four classes: chance is 0.25
