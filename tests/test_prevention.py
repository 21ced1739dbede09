"""The prevention matrix: fault x optimizer, prevented by ``freeze(..., optimizer=)`` or
caught by the guard.

Each fault is first shown to be real (without prevention the guard stops the run).
Then, with prevention, a fault prevention can stop runs STEPS steps under the guard
with every frozen tensor bit-identical while the head trains; a fault it cannot stop
(a ``.data`` write, a tie to a trainable name, BatchNorm in train mode without
``bn_eval``) is still caught by the guard.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import SmallNet, Tied
from torch import nn

import ckptool
from ckptool import FreezeGuard, FrozenParameterError

STEPS = 4

OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd-momentum-decay": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adamw-foreach": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, foreach=True),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, fused=True),
}


@dataclass
class Run:
    """A model and optimizer set up with a fault, and how its training loop behaves."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    zero_to_none: bool = True
    after_step: Callable[[], None] | None = None


def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 8, 8, generator=generator)
    return x, torch.randint(0, 4, (4,), generator=generator)


def one_full_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    x, y = data()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def stale_gradient(make: Callable, prevent: bool) -> Run:
    """A full step's gradients still on the backbone; the optimizer over all parameters."""
    torch.manual_seed(0)
    model = SmallNet()
    optimizer = make(model.parameters())
    one_full_step(model, optimizer)  # leaves .grad on every parameter, state too
    ckptool.freeze(model, strategy="linear", optimizer=optimizer if prevent else None)
    return Run(model, optimizer, zero_to_none=False)  # a loop that never clears grads


def momentum_with_zeroed_grads(make: Callable, prevent: bool) -> Run:
    """Momentum / Adam moments from an earlier full step; zero_grad(set_to_none=False)
    leaves zero gradients, so the optimizer keeps stepping frozen parameters."""
    torch.manual_seed(0)
    model = SmallNet()
    optimizer = make(model.parameters())
    one_full_step(model, optimizer)
    ckptool.freeze(model, strategy="linear", optimizer=optimizer if prevent else None)
    return Run(model, optimizer, zero_to_none=False)


def with_scheduler(make: Callable, prevent: bool) -> Run:
    """The stale-gradient fault under a OneCycle schedule (per-group LRs rewritten)."""
    run = stale_gradient(make, prevent)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        run.optimizer, max_lr=0.05, total_steps=STEPS + 1
    )
    run.after_step = scheduler.step
    return run


def data_write(make: Callable, prevent: bool) -> Run:
    torch.manual_seed(0)
    model = SmallNet()
    optimizer = make(model.parameters())
    ckptool.freeze(model, strategy="linear", optimizer=optimizer if prevent else None)

    def write() -> None:
        model.backbone[0].weight.data.mul_(1.001)  # bypasses autograd and the optimizer

    return Run(model, optimizer, after_step=write)


def bn_train_mode(make: Callable, prevent: bool) -> Run:
    torch.manual_seed(0)
    model = SmallNet()
    optimizer = make(model.parameters())
    ckptool.freeze(
        model, strategy="linear", bn_eval=False, optimizer=optimizer if prevent else None
    )
    model.train()  # running statistics update in the forward pass
    return Run(model, optimizer)


class TiedNet(Tied):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(x))


def tie_to_trainable(make: Callable, prevent: bool) -> Run:
    torch.manual_seed(0)
    model = TiedNet()
    optimizer = make(model.parameters())
    ckptool.freeze(model, train=["out"], optimizer=optimizer if prevent else None)
    return Run(model, optimizer)


# fault -> (setup, prevented by freeze(optimizer=)?)
FAULTS: dict[str, tuple[Callable[[Callable, bool], Run], bool]] = {
    "stale gradient": (stale_gradient, True),
    "momentum / moments, zeroed grads": (momentum_with_zeroed_grads, True),
    "stale gradient + OneCycleLR": (with_scheduler, True),
    ".data write after step": (data_write, False),
    "BatchNorm train mode, bn_eval=False": (bn_train_mode, False),
    "tied to a trainable name": (tie_to_trainable, False),
}


def train(run: Run) -> None:
    x, y = data()
    for _ in range(STEPS):
        run.optimizer.zero_grad(set_to_none=run.zero_to_none)
        if isinstance(run.model, TiedNet):
            run.model(torch.arange(10)).square().mean().backward()
        else:
            nn.functional.cross_entropy(run.model(x), y).backward()
        run.optimizer.step()
        if run.after_step:
            run.after_step()


def frozen_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())
    return {n: t.detach().clone() for n, t in {**frozen, **buffers}.items()}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("fault", list(FAULTS))
def test_prevention_matrix(fault: str, optimizer: str) -> None:
    setup, preventable = FAULTS[fault]
    make = OPTIMIZERS[optimizer]
    unprevented = setup(make, False)
    with pytest.raises(FrozenParameterError), FreezeGuard(unprevented.model, unprevented.optimizer):
        train(unprevented)  # the fault is real

    run = setup(make, True)
    before = frozen_tensors(run.model)
    head = [p.detach().clone() for p in run.model.parameters() if p.requires_grad]
    if not preventable:
        with pytest.raises(FrozenParameterError), FreezeGuard(run.model, run.optimizer):
            train(run)
        return
    with FreezeGuard(run.model, run.optimizer) as guard:
        train(run)
    assert guard.report().ok and guard.report().steps_checked == STEPS
    after = frozen_tensors(run.model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    trained = [p for p in run.model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(head, trained, strict=True))


def test_hold_report_names_what_left_the_optimizer() -> None:
    torch.manual_seed(0)
    model = SmallNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    one_full_step(model, optimizer)
    summary = ckptool.freeze(model, strategy="linear", optimizer=optimizer)
    backbone = ("backbone.0.weight", "backbone.0.bias", "backbone.1.weight", "backbone.1.bias")
    assert summary.held is not None
    assert summary.held.removed_from_optimizer == backbone
    assert summary.held.gradients_cleared == backbone
    assert summary.held.states_dropped == backbone
    kept = [p for group in optimizer.param_groups for p in group["params"]]
    assert kept == list(model.head.parameters())
    assert all(model.get_parameter(n).grad is None for n in backbone)
    assert set(optimizer.state) == set(model.head.parameters())  # momentum of the head only


def test_a_tie_to_a_trainable_name_stays_in_the_optimizer() -> None:
    model = TiedNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    summary = ckptool.freeze(model, train=["out"], optimizer=optimizer)
    assert summary.held is not None and summary.held.removed_from_optimizer == ()
    assert optimizer.param_groups[0]["params"] == [model.embed.weight]
