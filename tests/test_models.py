"""Model specs, head detection and replacement, meta-device building."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import ckptool
from ckptool import ModelSpecError, UsageError, build_model, replace_head
from ckptool.models import Source, find_head, model_tensor_meta, parse_model_spec


@pytest.mark.parametrize(
    ("spec", "source", "target", "attr"),
    [
        ("torchvision:resnet18", Source.TORCHVISION, "torchvision", "resnet18"),
        ("timm:vit_base_patch16_224", Source.TIMM, "timm", "vit_base_patch16_224"),
        ("mypkg.models:Net", Source.MODULE, "mypkg.models", "Net"),
        ("path/to/model.py:Net", Source.FILE, "path/to/model.py", "Net"),
        ("model.py:build", Source.FILE, "model.py", "build"),
    ],
    ids=["torchvision", "timm", "module", "file-path", "file-bare"],
)
def test_parse_model_spec(spec: str, source: Source, target: str, attr: str) -> None:
    parsed = parse_model_spec(spec)
    assert (parsed.source, parsed.target, parsed.attr) == (source, target, attr)


@pytest.mark.parametrize(
    "spec", ["resnet18", ":resnet18", "torchvision:"], ids=["no-colon", "no-source", "no-name"]
)
def test_bad_spec_suggests_the_form(spec: str) -> None:
    with pytest.raises(ModelSpecError, match=r"SOURCE:NAME, e\.g\. torchvision:resnet18"):
        parse_model_spec(spec)


def test_model_args_are_literals_else_strings() -> None:
    parsed = parse_model_spec(
        "torch.nn:Linear", ["in_features=4", "out_features=2", "bias=False", "name=abc"]
    )
    assert dict(parsed.kwargs) == {
        "in_features": 4,
        "out_features": 2,
        "bias": False,
        "name": "abc",
    }
    with pytest.raises(ModelSpecError, match="key=value"):
        parse_model_spec("torch.nn:Linear", ["oops"])


@pytest.mark.parametrize(
    ("spec", "head", "in_features"),
    [
        ("torchvision:resnet18", "fc", 512),
        ("torchvision:vgg11", "classifier.6", 4096),
        ("torchvision:vit_b_16", "heads.head", 768),
        ("torchvision:mobilenet_v3_small", "classifier.3", 1024),
        ("torchvision:efficientnet_b0", "classifier.1", 1280),
        ("torchvision:densenet121", "classifier", 1024),
        ("torchvision:swin_t", "head", 768),
    ],
    ids=lambda v: str(v),
)
def test_head_found_and_replaced_on_meta(spec: str, head: str, in_features: int) -> None:
    model = build_model(spec, num_classes=5, device="meta")
    assert find_head(model) == head
    layer = model.get_submodule(head)
    assert isinstance(layer, nn.Linear) and (layer.out_features, layer.in_features) == (
        5,
        in_features,
    )
    assert all(p.is_meta for p in model.parameters())
    assert model_tensor_meta(model)[f"{head}.weight"].shape == (5, in_features)


def test_replace_head_keeps_bias_dtype_and_named_head() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3, bias=False)).to(torch.float64)
    replace_head(model, 7)
    assert (
        model[1].bias is None
        and model[1].weight.dtype == torch.float64
        and model[1].out_features == 7
    )
    replace_head(model, 2, head="0")
    assert model[0].out_features == 2


@pytest.mark.parametrize(("head", "message"), [("1", "not an nn.Linear"), ("nope", "is nothing")])
def test_replace_head_refuses_non_linear(head: str, message: str) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    with pytest.raises(UsageError, match=message):
        replace_head(model, 3, head=head)


def test_no_linear_head_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="name one with head="):
        find_head(nn.Sequential(nn.Conv2d(1, 1, 1)))


def test_file_and_module_specs(tmp_path: Path) -> None:
    source = tmp_path / "my_model.py"
    source.write_text(
        textwrap.dedent("""
        from torch import nn
        class Net(nn.Module):
            def __init__(self, width=4):
                super().__init__()
                self.body = nn.Linear(2, width)
                self.head = nn.Linear(width, 3)
        instance = Net(width=2)
        not_a_model = 42
    """)
    )
    model = build_model(f"{source}:Net", model_args=["width=6"], num_classes=9)
    assert model.head.in_features == 6 and model.head.out_features == 9
    assert isinstance(build_model(f"{source}:instance"), nn.Module)
    assert isinstance(build_model("torch.nn:Linear", in_features=3, out_features=1), nn.Linear)
    with pytest.raises(ModelSpecError, match=r"int, not a torch\.nn\.Module"):
        build_model(f"{source}:not_a_model")
    with pytest.raises(ModelSpecError, match="has no attribute 'Missing'"):
        build_model(f"{source}:Missing")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("torchvision:resnet19", "torchvision has no model 'resnet19'; did you mean resnet"),
        ("no_such_package_xyz:Net", "cannot import 'no_such_package_xyz'"),
        ("missing_file.py:Net", "does not exist"),
        ("torch.nn:Linear", "building torch.nn:Linear failed: TypeError"),
    ],
    ids=["typo", "no-module", "no-file", "constructor-error"],
)
def test_spec_errors_are_one_line(spec: str, message: str) -> None:
    with pytest.raises(ModelSpecError, match=message) as info:
        build_model(spec)
    assert "\n" not in str(info.value)


def test_seven_billion_parameters_cost_no_memory(tmp_path: Path) -> None:
    source = tmp_path / "big.py"
    source.write_text(
        textwrap.dedent("""
        from torch import nn
        def build():  # 100 x 8192^2 = 6.7B parameters, 27 GB in float32
            return nn.Sequential(*[nn.Linear(8192, 8192, bias=False) for _ in range(100)])
    """)
    )
    code = textwrap.dedent(f"""
        import resource, ckptool
        from ckptool.models import model_tensor_meta
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        model = ckptool.build_model({str(source) + ":build"!r}, num_classes=10, device="meta")
        params = sum(t.numel for t in model_tensor_meta(model).values())
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(params, grown)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    params, grown_kib = map(int, out.stdout.split())
    assert params > 6.6e9  # 99 layers of 8192^2 plus the 10-class head
    assert grown_kib < 200 * 1024


def test_timm_specs_when_timm_is_installed() -> None:
    pytest.importorskip("timm")
    model = build_model("timm:resnet18", num_classes=5, device="meta")
    assert find_head(model) == "fc" and model.fc.out_features == 5
    assert (
        find_head(build_model("timm:vit_tiny_patch16_224", num_classes=3, device="meta")) == "head"
    )
    with pytest.raises(
        ModelSpecError, match="timm has no model 'resnet_18'; did you mean resnet18"
    ):
        build_model("timm:resnet_18")


META_HOSTILE = '''
import torch
from torch import nn


class Net(nn.Module):
    """Reads a value while building: fine on the CPU, impossible on the meta device."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.scale = float(torch.ones(2).sum().item())
        self.body = nn.Linear(16, 32)
        self.fc = nn.Linear(32, num_classes)
'''


def test_model_that_cannot_be_built_on_meta_is_built_on_cpu(run_cli, tmp_path: Path) -> None:
    import json

    (tmp_path / "net.py").write_text(META_HOSTILE)
    spec = f"{tmp_path / 'net.py'}:Net"
    ckpt = tmp_path / "net.pt"
    torch.save(ckptool.build_model(spec).state_dict(), ckpt)
    result = run_cli("diff", ckpt, "--model", spec, "--num-classes", "5", "--json")
    document = json.loads(result.stdout)
    assert result.exit_code == 1 and document["shape_mismatch"], result.stderr
    assert "cannot be built on the meta device" in document["notes"][0]
    out = tmp_path / "net5.safetensors"
    adapted = run_cli(
        "adapt", ckpt, "--model", spec, "--num-classes", "5", "--drop", "fc.", "-o", out
    )
    assert adapted.exit_code == 0 and "built on the CPU instead" in adapted.stdout, adapted.stderr
    assert set(ckptool.load_state_dict(out)) == {"body.weight", "body.bias", "fc.weight", "fc.bias"}


EXTRA_STATE_MODELS = '''
import torch
from torch import nn


class DictState(nn.Linear):
    """Extra state as an object: torch's strict load needs it back."""

    def get_extra_state(self):
        return {"calls": 3}

    def set_extra_state(self, state):
        self.calls = state["calls"]


class TensorState(nn.Linear):
    """Extra state as a tensor, as transformer_engine keeps its FP8 metadata."""

    def get_extra_state(self):
        return torch.tensor([7.0])

    def set_extra_state(self, state):
        self.extra = state


def with_dict_state():
    return nn.Sequential(DictState(64, 64), nn.Linear(64, 3))


def with_tensor_state():
    return nn.Sequential(TensorState(64, 64), nn.Linear(64, 3))
'''


def test_extra_state_that_is_not_a_tensor_is_refused_not_a_crash(run_cli, tmp_path: Path) -> None:
    """model.state_dict() then holds a dict: the key logic crashed on its .shape."""
    models = tmp_path / "extra.py"
    models.write_text(EXTRA_STATE_MODELS)
    source = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file({"0.weight": torch.ones(64, 64), "0.bias": torch.ones(64)}, source)
    for command in ("diff", "check"):
        result = run_cli(command, source, "--model", f"{models}:with_dict_state")
        assert result.exit_code == 2, result.output
        assert "holds 0._extra_state: extra state its modules keep as dict" in result.stderr
        assert len(result.stderr.splitlines()) == 1
    meta = model_tensor_meta(build_model(f"{models}:with_tensor_state"))
    assert meta["0._extra_state"].shape == (1,) and not meta["0._extra_state"].learned


def test_a_head_for_no_classes_is_refused() -> None:
    with pytest.raises(UsageError, match="must be at least 1, got 0"):
        replace_head(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3)), 0)


def test_a_spec_that_fails_before_construction_is_not_retried_on_the_cpu(
    run_cli, tmp_path: Path
) -> None:
    """Only a constructor that fails on the meta device is retried on the CPU: a class
    the file lacks fails the same way twice, and the file would run twice."""
    runs = tmp_path / "runs.txt"
    (tmp_path / "net.py").write_text(
        f"with open({str(runs)!r}, 'a') as log:\n    log.write('ran\\n')\n" + META_HOSTILE
    )
    ckpt = tmp_path / "w.pt"
    torch.save({"w": torch.ones(2)}, ckpt)
    result = run_cli("diff", ckpt, "--model", f"{tmp_path / 'net.py'}:Missing")
    assert result.exit_code == 2 and "Missing" in result.stderr, result.stderr
    assert runs.read_text() == "ran\n"
