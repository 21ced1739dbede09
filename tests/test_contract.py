"""The contract over a zoo: ckptool's verdict is torch's, and what adapt keeps is kept.

Models whose loading does more than match names (weight-norm hooks, BatchNorm without
``num_batches_tracked``, tied weights, a module under two paths, an LSTM saved as slices
of one buffer) and a torchvision ResNet, each saved as the everyday variants (as-is,
DataParallel, a Lightning sub-tree, a key missing, a key extra), against the model as
it is and with a new head:

- ``ckptool.diff(file, model=m).compatible`` equals ``m.load_state_dict(file, strict=True)``
  succeeding (torch.load / safetensors, no ckptool);
- where a fix is offered, ``adapt --auto`` writes a file that plain safetensors and
  ``load_state_dict(strict=True)`` load, and every tensor the report says it kept is the
  source's, bit for bit — read back through the loaded model, so ties count.
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import plain_load, torch_accepts
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

import ckptool


class WeightNormNet(nn.Module):
    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.conv = weight_norm(nn.Conv1d(2, 4, 3))
        self.bn = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, num_classes)


class OldWeightNormNet(WeightNormNet):
    """The same network saved by code of the torch.nn.utils.weight_norm era."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__(num_classes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.conv = nn.utils.weight_norm(nn.Conv1d(2, 4, 3))


class TiedNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(num_classes, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, num_classes, bias=False)
        self.head.weight = self.embed.weight


class TwoPathNet(nn.Module):
    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.lin0 = nn.Linear(8, 8)
        self.lin1 = nn.Linear(8, 8)
        self.lins = nn.ModuleList([self.lin0, self.lin1])
        self.fc = nn.Linear(8, num_classes)


class LstmNet(nn.Module):
    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 8, num_layers=2)
        self.fc = nn.Linear(8, num_classes)


def _resnet(num_classes: int = 1000) -> nn.Module:
    return torchvision.models.resnet18(weights=None, num_classes=num_classes)


ZOO: dict[str, tuple[Callable[..., nn.Module], Callable[..., nn.Module], str]] = {
    # name: (the model that saved the file, the model it is loaded into, its head)
    "weight-norm hook": (OldWeightNormNet, WeightNormNet, "fc"),
    "tied weights": (TiedNet, TiedNet, "mix"),
    "module under two paths": (TwoPathNet, TwoPathNet, "fc"),
    "lstm flat buffer": (LstmNet, LstmNet, "fc"),
    "resnet18": (_resnet, _resnet, "fc"),
}


def _saved_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = model.state_dict()
    if name == "lstm flat buffer":  # as cuDNN's flatten_parameters() leaves them
        flat = torch.cat([v.reshape(-1) for k, v in state.items() if k.startswith("lstm.")])
        offset = 0
        for key in [k for k in state if k.startswith("lstm.")]:
            n = state[key].numel()
            state[key] = flat[offset : offset + n].view_as(state[key])
            offset += n
    if name == "tied weights":
        del state["head.weight"]  # saved once, as Hugging Face does for tied weights
    return state


def _variants(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    first = next(iter(state))
    return {
        "as-is": dict(state),
        "dataparallel": {f"module.{k}": v for k, v in state.items()},
        "lightning sub-tree": {f"model.net.{k}": v for k, v in state.items()}
        | {"model.loss.weight": torch.ones(3)},
        "missing key": {k: v for k, v in state.items() if k != first},
        "extra key": {**state, "extra.step": torch.zeros(1)},
        "no num_batches_tracked": {
            k: v for k, v in state.items() if not k.endswith("num_batches_tracked")
        },
    }


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.clone() for k, v in state.items()}, path)  # no views in safetensors
    else:
        torch.save(collections.OrderedDict(state), path)
    return path


def _with_new_head(factory: Callable[..., nn.Module], head: str) -> nn.Module:
    model = factory()
    old = model.get_submodule(head)
    assert isinstance(old, nn.Linear)
    new = nn.Linear(old.in_features, old.out_features + 2, bias=old.bias is not None)
    setattr(model, head, new)
    return model


CASES = [
    (zoo, variant, suffix, headed)
    for zoo in ZOO
    for variant in ("as-is", "dataparallel", "lightning sub-tree", "missing key", "extra key",
                    "no num_batches_tracked")
    for suffix in (".pt", ".safetensors")
    for headed in (False, True)
    if not (variant == "no num_batches_tracked" and zoo != "resnet18")
]  # fmt: skip


@pytest.mark.parametrize(("zoo", "variant", "suffix", "headed"), CASES)
def test_verdict_is_torchs_and_adapt_keeps_what_it_says(
    zoo: str, variant: str, suffix: str, headed: bool, tmp_path: Path
) -> None:
    saver, loader, head = ZOO[zoo]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = _saved_state(saver(), zoo)
    source = _save(_variants(state)[variant], tmp_path / f"ckpt{suffix}")

    def target() -> nn.Module:
        return _with_new_head(loader, head) if headed else loader()

    report = ckptool.diff(source, model=target())
    assert report.compatible == torch_accepts(target(), plain_load(source)), report.keys

    fix = report.keys.fix
    if report.compatible:
        return
    if variant != "missing key":  # every other variant holds all the model's weights
        assert fix is not None and not fix.keeps_little, report.keys
    if fix is None or fix.keeps_little:
        return
    out = tmp_path / "out.safetensors"
    log = ckptool.adapt(source, model=target(), auto=True, out=str(out))
    model = target()
    model.load_state_dict(load_file(out), strict=True)  # plain tools, strict
    reference = plain_load(source)
    loaded = model.state_dict()
    kept = {n: n for n in log.kept} | {new: old for old, new in log.renamed.items()}
    by_new = {new: old for old, new in log.renamed.items()}
    kept |= {alias: by_new.get(partner, partner) for alias, partner in log.aliases.items()}
    written = load_file(out)
    for new, old in kept.items():
        value = loaded[new] if new in loaded else written[new]  # hook-consumed: as written
        assert torch.equal(value, reference[old]), (new, old)
    assert kept, "a fix that keeps nothing is no fix"
