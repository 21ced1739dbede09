"""ckptool check: strict load, finite values, one guarded step; exit codes for pipelines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import WriteCheckpoint, wrap

import ckptool

RESNET = ("--model", "torchvision:resnet18", "--num-classes", "5")


@pytest.fixture
def dp_resnet(write_checkpoint: WriteCheckpoint) -> Path:
    torch.manual_seed(0)
    return write_checkpoint(
        wrap(torchvision.models.resnet18(weights=None).state_dict(), "module."), "dp.pth"
    )


def test_check_passes_for_the_classic_case(run_cli, dp_resnet: Path) -> None:
    result = run_cli("check", dp_resnet, *RESNET, "--strip", "module.", "--drop", "fc.", "--json")
    assert result.exit_code == 0, result.stdout
    doc = json.loads(result.stdout)
    assert doc["ok"] and doc["loadable"] and doc["non_finite"] == [] and doc["not_moved"] == []
    assert doc["guard"]["verdict"] == "ok" and doc["guard"]["steps_checked"] == 1
    assert doc["guard"]["parameters_watched"] == 60 and doc["input_shape"] == [3, 224, 224]
    assert doc["freeze"]["trainable"] == 512 * 5 + 5


def test_check_fails_when_not_loadable(run_cli, dp_resnet: Path) -> None:
    result = run_cli("check", dp_resnet, *RESNET, "--strip", "module.")
    assert result.exit_code == 1
    assert (
        "load       FAILED: incompatible: fc.{weight,bias} differ in shape: add --drop fc."
        in result.stdout
    )
    # The flags to rerun with, not a pointer to a fix printed nowhere.
    assert "rerun with --strip module. --drop fc." in result.stdout


def test_check_fails_on_non_finite_values(run_cli, write_checkpoint: WriteCheckpoint) -> None:
    state = torchvision.models.resnet18(weights=None, num_classes=5).state_dict()
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    result = run_cli("check", write_checkpoint(state, "nan.safetensors"), *RESNET, "--json")
    doc = json.loads(result.stdout)
    assert result.exit_code == 1 and doc["non_finite"] == ["layer2.0.conv1.weight"]


def test_check_with_partial_training_and_explicit_shape(run_cli, dp_resnet: Path) -> None:
    flags = (
        "--strip",
        "module.",
        "--drop",
        "fc.",
        "--strategy",
        "partial",
        "--freeze-until",
        "layer3",
    )
    result = run_cli("check", dp_resnet, *RESNET, *flags, "--input-shape", "3,64,64", "--json")
    assert result.exit_code == 0, result.stdout
    doc = json.loads(result.stdout)
    statuses = {m["name"]: m["status"] for m in doc["freeze"]["modules"]}
    assert statuses == {
        "conv1": "frozen",
        "bn1": "frozen",
        "layer1": "frozen",
        "layer2": "frozen",
        "layer3": "frozen",
        "layer4": "trainable",
        "fc": "trainable",
    }
    assert doc["input_shape"] == [3, 64, 64] and doc["guard"]["verdict"] == "ok"
    human = run_cli("check", dp_resnet, *RESNET, *flags, "--input-shape", "3,64,64")
    assert "guard: ok" in human.stdout and human.stdout.rstrip().endswith("check passed")


def test_check_reports_trainable_parameters_that_never_move(
    run_cli, write_checkpoint: WriteCheckpoint, tmp_path: Path
) -> None:
    model_file = tmp_path / "unused.py"
    model_file.write_text(
        "from torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.body = nn.Linear(4, 4)\n"
        "        self.unused = nn.Linear(4, 4)\n"
        "        self.head = nn.Linear(4, 2)\n"
        "    def forward(self, x):\n"
        "        return self.head(self.body(x))\n"
    )
    import importlib.util

    spec = importlib.util.spec_from_file_location("unused_model", model_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ckpt = write_checkpoint(module.Net().state_dict(), "net.pt")
    result = run_cli("check", ckpt, "--model", f"{model_file}:Net", "--strategy", "full", "--json")
    doc = json.loads(result.stdout)
    assert result.exit_code == 1 and doc["not_moved"] == ["unused.weight", "unused.bias"]


def test_check_needs_a_shape_it_cannot_infer(
    run_cli, write_checkpoint: WriteCheckpoint, tmp_path: Path
) -> None:
    model_file = tmp_path / "odd.py"
    model_file.write_text(
        "import torch\nfrom torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.scale = nn.Parameter(torch.ones(3))\n"
        "    def forward(self, x):\n"
        "        return x * self.scale\n"
    )
    ckpt = write_checkpoint({"scale": torch.ones(3)}, "odd.pt")
    result = run_cli("check", ckpt, "--model", f"{model_file}:Net", "--strategy", "full")
    assert result.exit_code == 2 and "add --input-shape" in result.stderr
    ok = run_cli(
        "check", ckpt, "--model", f"{model_file}:Net", "--strategy", "full", "--input-shape", "3"
    )
    assert ok.exit_code == 0, ok.stdout


def test_check_takes_a_live_model_and_leaves_it_alone(write_checkpoint) -> None:
    from torch import nn

    def net() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(4, 2),
        )  # fmt: skip

    torch.manual_seed(0)
    source = write_checkpoint(net().state_dict(), "net.pt")
    model = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = ckptool.check(source, model=model, input_shape=(3, 8, 8))
    assert result.ok and result.model == "Sequential (a live nn.Module)"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())  # not frozen by the check


NETS = '''
import torch
from torch import nn


class FaceNet(nn.Module):
    """48x48 crops only (a Linear after the flatten), three outputs like MTCNN's ONet:
    boxes, landmarks, face probabilities; the first output is not logits."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.PReLU(4), nn.MaxPool2d(2))
        self.dense = nn.Linear(4 * 11 * 11, 16)
        self.boxes = nn.Linear(16, 4)
        self.landmarks = nn.Linear(16, 10)
        self.faces = nn.Linear(16, 2)

    def forward(self, x):
        x = self.dense(self.features(x).flatten(1))
        return self.boxes(x), self.landmarks(x), torch.softmax(self.faces(x), dim=1)


class PitchNet(nn.Module):
    """Raw 1024-sample audio frames, reshaped inside (as torchcrepe does)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, (64, 1), stride=(16, 1))
        self.out = nn.Linear(4 * 61, 8)

    def forward(self, audio):
        x = self.conv(audio[:, None, :, None])
        return self.out(x.flatten(1))
'''


@pytest.fixture
def nets(tmp_path: Path) -> Path:
    path = tmp_path / "nets.py"
    path.write_text(NETS)
    return path


@pytest.mark.parametrize(("name", "shape"), [("FaceNet", [3, 48, 48]), ("PitchNet", [1024])])
def test_check_finds_the_input_shape_and_trains_every_output(
    run_cli, write_checkpoint: WriteCheckpoint, nets: Path, name: str, shape: list[int]
) -> None:
    """The first layer's guess (3x224x224, 1x224x224) does not run; the shape that does is
    found, and the loss uses every output, so every trainable parameter moves."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("nets", nets)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ckpt = write_checkpoint(getattr(module, name)().state_dict(), f"{name}.pt")
    result = run_cli("check", ckpt, "--model", f"{nets}:{name}", "--strategy", "full", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["input_shape"] == shape and doc["not_moved"] == [] and doc["ok"]


def test_a_shape_that_does_not_run_is_explained(
    run_cli, write_checkpoint: WriteCheckpoint, nets: Path
) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("nets", nets)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ckpt = write_checkpoint(module.FaceNet().state_dict(), "face.pt")
    result = run_cli("check", ckpt, "--model", f"{nets}:FaceNet", "--input-shape", "3,64,64")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "cannot run a batch of 2x3x64x64 (--input-shape)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_model_without_a_floating_output_is_explained(
    run_cli, write_checkpoint: WriteCheckpoint, tmp_path: Path
) -> None:
    """A classifier that returns its argmax: no loss can be computed from integers."""
    model_file = tmp_path / "argmax.py"
    model_file.write_text(
        "import torch\nfrom torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(4, 3)\n"
        "    def forward(self, x):\n"
        "        return {'label': self.fc(x).argmax(1)}\n"
    )
    torch.manual_seed(0)
    ckpt = write_checkpoint(wrap(torch.nn.Linear(4, 3).state_dict(), "fc."), "net.pt")
    result = run_cli(
        "check", ckpt, "--model", f"{model_file}:Net", "--strategy", "full", "--input-shape", "4"
    )
    assert result.exit_code == 2, result.output
    assert "the model's output (dict) holds no floating tensor to compute a loss" in result.stderr


def test_the_first_layer_chooses_the_sample_shape() -> None:
    from torch import nn

    from ckptool.sanity import SEQUENCE_LENGTH, SIGNAL_LENGTHS, input_shape_candidates

    assert input_shape_candidates(nn.Sequential(nn.Conv1d(2, 4, 3)))[0] == (2, SIGNAL_LENGTHS[0])
    assert input_shape_candidates(nn.Sequential(nn.Embedding(10, 4)))[0] == (SEQUENCE_LENGTH,)
    assert input_shape_candidates(nn.LSTM(5, 8))[0] == (SEQUENCE_LENGTH, 5)


def test_a_token_model_with_a_dict_output_is_checked_without_a_shape(
    run_cli, write_checkpoint: WriteCheckpoint, tmp_path: Path
) -> None:
    """Token ids for an Embedding (random floats cannot index it), and the logits found
    inside a dict that also holds None."""
    model_file = tmp_path / "tokens.py"
    model_file.write_text(
        "from torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.embed = nn.Embedding(10, 4)\n"
        "        self.fc = nn.Linear(4, 3)\n"
        "    def forward(self, ids):\n"
        "        return {'logits': self.fc(self.embed(ids).mean(1)), 'aux': None}\n"
    )
    torch.manual_seed(0)
    state = {"embed.weight": torch.randn(10, 4), **wrap(torch.nn.Linear(4, 3).state_dict(), "fc.")}
    ckpt = write_checkpoint(state, "tokens.pt")
    result = run_cli("check", ckpt, "--model", f"{model_file}:Net", "--strategy", "full")
    assert result.exit_code == 0, result.output
