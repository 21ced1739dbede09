"""freeze(): the four strategies, name patterns, honest BatchNorm, the summary."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import ConvBN
from torch import nn

import ckptool
from ckptool import UsageError
from ckptool.freezing import body_stages


def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=5)


def trainable_modules(model: nn.Module) -> set[str]:
    return {name.split(".", 1)[0] for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"strategy": "linear"}, {"fc"}),
        ({"strategy": "partial"}, {"layer4", "fc"}),
        ({"strategy": "partial", "freeze_until": "layer2"}, {"layer3", "layer4", "fc"}),
        ({"strategy": "full"}, {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"}),
        ({"train": ["layer4", "fc."]}, {"layer4", "fc"}),
        ({"freeze": ["conv1", "bn1", "layer*"]}, {"fc"}),
    ],
    ids=[
        "linear",
        "partial-default",
        "partial-until-layer2",
        "full",
        "train-prefixes",
        "freeze-globs",
    ],
)
def test_strategies_and_patterns(options: dict, expected: set[str]) -> None:
    model = resnet()
    summary = ckptool.freeze(model, **options)
    assert trainable_modules(model) == expected
    assert summary.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert summary.total == sum(p.numel() for p in model.parameters())
    statuses = {m.name: m.status for m in summary.modules}
    assert statuses["fc"] == "trainable"


def test_scratch_reinitialises_and_trains_everything() -> None:
    model = resnet()
    before = model.conv1.weight.detach().clone()
    ckptool.freeze(model, strategy="scratch")
    assert all(p.requires_grad for p in model.parameters())
    assert not torch.equal(before, model.conv1.weight)


def test_summary_counts_frozen_buffers_and_mixed_modules() -> None:
    model = resnet()
    summary = ckptool.freeze(model, train=["layer4.1", "fc"])
    statuses = {m.name: m.status for m in summary.modules}
    assert statuses["layer4"] == "mixed" and statuses["layer1"] == "frozen"
    bn_buffers = sum(b.numel() for n, b in model.named_buffers() if n.startswith("bn1."))
    assert next(m for m in summary.modules if m.name == "bn1").frozen_buffers == bn_buffers


def test_frozen_batchnorm_stays_in_eval_after_model_train() -> None:
    model = ConvBN()
    ckptool.freeze(model, train=["fc"])
    model.train()
    before = model.bn.running_mean.clone()
    model.fc(model.bn(model.conv(torch.randn(2, 3, 8, 8))).mean((2, 3)))
    assert not model.bn.training and torch.equal(model.bn.running_mean, before)
    unfrozen = ConvBN()
    ckptool.freeze(unfrozen, bn_eval=True, strategy="full")
    unfrozen.train()
    unfrozen.bn(unfrozen.conv(torch.randn(2, 3, 8, 8)))
    assert unfrozen.bn.training  # trainable BatchNorm is left alone


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"train": ["nope"]}, "train='nope' matches no parameter"),
        (
            {"strategy": "partial", "freeze_until": "layer9"},
            "not a stage; stages: conv1, bn1, layer1",
        ),
        ({"strategy": "linear", "train": ["fc"]}, "choose one of"),
    ],
    ids=["no-match", "bad-stage", "two-ways"],
)
def test_freeze_errors(options: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        ckptool.freeze(resnet(), **options)


def test_body_stages_descend_into_a_lone_container() -> None:
    model = nn.Sequential()
    model.add_module("backbone", nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)))
    model.add_module("head", nn.Linear(4, 2))
    assert body_stages(model, "head") == ["backbone.0", "backbone.2"]
    ckptool.freeze(model, strategy="partial")
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == [
        "backbone.0.weight",
        "backbone.0.bias",
    ]


@pytest.mark.parametrize(
    ("norm", "shape"),
    [(nn.BatchNorm1d, (4, 6)), (nn.BatchNorm2d, (4, 6, 3, 3)), (nn.BatchNorm3d, (4, 6, 2, 3, 3))],
    ids=["1d", "2d", "3d"],
)
def test_frozen_batchnorm_of_every_rank_keeps_its_statistics(norm: type, shape: tuple) -> None:
    model = nn.Sequential(norm(6), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(*shape))  # materialise the lazy head
    ckptool.freeze(model, train=["2"], bn_eval=True)
    before = model[0].running_mean.clone()
    model.train()
    model(torch.randn(*shape) * 5 + 3)
    assert not model[0].training
    assert torch.equal(model[0].running_mean, before)


def test_freeze_until_without_partial_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="freeze_until='layer2': applies to strategy='partial'"):
        ckptool.freeze(resnet(), strategy="linear", freeze_until="layer2")
    ckptool.freeze(resnet(), strategy="partial", freeze_until="layer2")  # the spelling that works


@pytest.mark.parametrize(
    "choice",
    [{"strategy": "linear"}, {"strategy": "partial"}, {"strategy": "full"}, {"train": ["fc"]}],
    ids=["linear", "partial", "full", "train-names"],
)
def test_freezing_never_changes_a_weight_but_scratch_does(choice: dict) -> None:
    model = resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary = ckptool.freeze(model, **choice)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert summary.conflicts == ()  # no tie crosses the line in a ResNet
    ckptool.freeze(model, strategy="scratch")
    assert not torch.equal(model.conv1.weight, before["conv1.weight"])


def test_holding_clears_the_stale_grads_of_frozen_parameters_only() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    model(torch.ones(3, 2)).sum().backward()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    summary = ckptool.freeze(model, train=["1"], optimizer=optimizer)
    assert summary.held is not None
    assert summary.held.gradients_cleared == ("0.weight", "0.bias")
    assert model[0].weight.grad is None and model[1].weight.grad is not None


def test_the_strategy_a_fine_tune_runs() -> None:
    from ckptool.freezing import Strategy, chosen_strategy

    assert chosen_strategy("partial", None, None) is Strategy.PARTIAL
    assert chosen_strategy(None, None, None) is Strategy.LINEAR
    assert chosen_strategy(None, ["fc"], None) is None
    assert chosen_strategy(None, None, ["conv1"]) is None


def test_stages_of_flat_and_nested_bodies() -> None:
    """Top-level children with parameters; a lone body container is opened; a lone
    layer without children is a stage of its own (and partial then freezes nothing)."""
    assert body_stages(resnet(), "fc") == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
    nested = nn.Sequential()
    nested.add_module("backbone", nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)))
    nested.add_module("head", nn.Linear(2, 1))
    assert body_stages(nested, "head") == ["backbone.0", "backbone.2"]
    two = nn.Sequential()
    two.add_module("stem", nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    two.add_module("blocks", nn.Sequential(nn.Linear(4, 4)))
    two.add_module("head", nn.Linear(4, 1))
    assert body_stages(two, "head") == ["stem", "blocks"]  # not opened: two stages
    mlp = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    assert body_stages(mlp, "1") == ["0"]
    summary = ckptool.freeze(mlp, strategy="partial")
    assert summary.frozen_names == () and all(p.requires_grad for p in mlp.parameters())
