"""--remap: a checkpoint of another implementation of the same network, matched by structure.

The test's second implementation of torchvision's SqueezeNet 1.1 is one flat
``nn.Sequential`` with differently named Fire modules; adapt --remap maps the
torchvision checkpoint onto it, and both networks give identical outputs on one batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision

import ckptool
from ckptool.formats.meta import TensorMeta
from ckptool.remap import structural_remap

REIMPLEMENTATION = '''
import torch
from torch import nn


class Fire(nn.Module):
    """torchvision's Fire, renamed: s/e1/e3 for squeeze/expand1x1/expand3x3."""

    def __init__(self, cin, squeeze, e1, e3):
        super().__init__()
        self.s = nn.Conv2d(cin, squeeze, 1)
        self.e1 = nn.Conv2d(squeeze, e1, 1)
        self.e3 = nn.Conv2d(squeeze, e3, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.s(x))
        return torch.cat([torch.relu(self.e1(x)), torch.relu(self.e3(x))], 1)


def Squeeze11(num_classes=1000):
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, stride=2), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
        Fire(64, 16, 64, 64), Fire(128, 16, 64, 64), nn.MaxPool2d(3, 2, ceil_mode=True),
        Fire(128, 32, 128, 128), Fire(256, 32, 128, 128), nn.MaxPool2d(3, 2, ceil_mode=True),
        Fire(256, 48, 192, 192), Fire(384, 48, 192, 192), Fire(384, 64, 256, 256),
        Fire(512, 64, 256, 256),
        nn.Dropout(0.5), nn.Conv2d(512, num_classes, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
'''


@pytest.fixture
def reimplementation(tmp_path: Path) -> tuple[object, str]:
    import importlib.util

    path = tmp_path / "squeeze_reimpl.py"
    path.write_text(REIMPLEMENTATION)
    spec = importlib.util.spec_from_file_location("squeeze_reimpl", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, f"{path}:Squeeze11"


def test_remap_loads_another_implementation_with_identical_outputs(
    run_cli, reimplementation, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    original = torchvision.models.squeezenet1_1(weights=None).eval()
    source = tmp_path / "squeezenet.pt"
    torch.save(original.state_dict(), source)
    plain = run_cli("diff", source, "--model", reimplementation[1])
    assert plain.exit_code == 1  # by names nothing fits
    out = tmp_path / "remapped.safetensors"
    result = run_cli("adapt", source, "--model", reimplementation[1], "--remap", "-o", out)
    assert result.exit_code == 0, result.output
    assert "remap: 26 modules matched in order" in result.stdout
    assert "with        --remap" in result.stdout and "features.0 -> 0" in result.stdout
    shown = run_cli(
        "adapt", source, "--model", reimplementation[1], "--remap", "--dry-run", "--json"
    )
    renamed = json.loads(shown.stdout)["renamed"]
    assert renamed["classifier.1.weight"] == "14.weight" and len(renamed) == 52
    from safetensors.torch import load_file

    model = reimplementation[0].Squeeze11().eval()
    model.load_state_dict(load_file(out), strict=True)
    batch = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(batch), original(batch))


def _metas(shapes: list[tuple[str, tuple[int, ...]]]) -> dict[str, TensorMeta]:
    return {name: TensorMeta(shape, "float32") for name, shape in shapes}


def test_two_possible_assignments_are_refused() -> None:
    """The checkpoint has one extra block of the same shape: which one is the model's?"""
    block = [("weight", (8, 8)), ("bias", (8,))]
    source = _metas([(f"{m}.{leaf}", s) for m in ("a", "b", "c") for leaf, s in block])
    target = _metas([(f"{m}.{leaf}", s) for m in ("x", "y") for leaf, s in block])
    with pytest.raises(ckptool.IncompatibleError, match=r"ambiguous.*could be the checkpoint's"):
        structural_remap(source, target)
    distinct = dict(source)
    distinct["b.weight"] = TensorMeta((8, 4), "float32")  # now only a -> x, c -> y fits
    target["y.weight"] = TensorMeta((8, 8), "float32")
    assert structural_remap(_metas([(k, v.shape) for k, v in distinct.items()]), target) == {
        "a.weight": "x.weight", "a.bias": "x.bias", "c.weight": "y.weight", "c.bias": "y.bias",
    }  # fmt: skip


def test_structures_that_differ_are_refused(run_cli, reimplementation, tmp_path: Path) -> None:
    source = tmp_path / "resnet.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), source)
    result = run_cli(
        "adapt", source, "--model", reimplementation[1], "--remap", "-o", tmp_path / "o.pt"
    )
    assert result.exit_code == 1 and "has no counterpart, in order" in result.stderr
    st = tmp_path / "s.safetensors"
    ckptool.convert(source, str(st))
    refused = run_cli(
        "adapt", st, "--model", reimplementation[1], "--remap", "-o", tmp_path / "o.pt"
    )
    assert refused.exit_code == 2 and "module order" in refused.stderr


@pytest.mark.parametrize("flags", [["--auto"], ["--strip", "module."], ["--rename", "a=b"]])
def test_remap_takes_no_other_renames(
    run_cli, reimplementation, tmp_path: Path, flags: list[str]
) -> None:
    """--remap pairs modules by structure: a rename on top would rename its renames."""
    source = tmp_path / "squeezenet.pt"
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), source)
    out = tmp_path / "o.pt"
    refused = run_cli("adapt", source, "--model", reimplementation[1], "--remap", *flags, "-o", out)
    assert refused.exit_code == 2, refused.output
    assert "--remap matches names by structure; it takes no --auto or renames" in refused.stderr
    assert not out.exists()


def test_structures_too_large_to_align_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Aligning is quadratic in the modules: over the budget it is refused, not run."""
    from ckptool import remap

    block = [("weight", (8, 8)), ("bias", (8,))]
    source = _metas([(f"{m}.{leaf}", s) for m in ("a", "b") for leaf, s in block])
    target = _metas([(f"{m}.{leaf}", s) for m in ("x", "y") for leaf, s in block])
    monkeypatch.setattr(remap, "MAX_MODULES", 10)  # 2 x 2 modules is over 10 x 10 // 100
    with pytest.raises(ckptool.IncompatibleError, match="2 x 2 modules is too many to align"):
        structural_remap(source, target)
    monkeypatch.setattr(remap, "MAX_MODULES", 20)  # 4 is at 20 x 20 // 100: aligned
    assert structural_remap(source, target)["b.bias"] == "y.bias"
