"""FreezeGuard: every planted fault is caught with names and cause; clean runs never are."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import ConvBN, SmallNet, Tied
from torch import nn

import ckptool
from ckptool import FreezeGuard, FrozenParameterError
from ckptool.guard import Cause, fingerprint


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 8, 8, generator=generator), torch.randint(
        0, 4, (4,), generator=generator
    )


def train_steps(
    model: nn.Module,
    optimizer: Any,
    steps: int = 2,
    *,
    zero: bool = True,
    after: Callable[[], None] | None = None,
) -> None:
    x, y = batch()
    for _ in range(steps):
        if zero:
            optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if after:
            after()


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def stale_gradients(optimizer_factory: Callable[..., Any]) -> tuple[nn.Module, Any, dict]:
    """Gradients computed before freezing, optimizer over all parameters, no zero_grad."""
    torch.manual_seed(0)
    model = SmallNet()
    x, y = batch()
    nn.functional.cross_entropy(model(x), y).backward()
    ckptool.freeze(model, strategy="linear")
    return model, optimizer_factory(model.parameters()), {"zero": False}


def fault_bn_train_mode() -> tuple[nn.Module, Any, dict]:
    torch.manual_seed(0)
    model = SmallNet()
    ckptool.freeze(model, strategy="linear", bn_eval=False)
    model.train()
    return model, torch.optim.SGD(trainable(model), lr=0.1), {}


def fault_data_write_from_hook() -> tuple[nn.Module, Any, dict]:
    torch.manual_seed(0)
    model = SmallNet()
    ckptool.freeze(model, strategy="linear")
    optimizer = torch.optim.SGD(trainable(model), lr=0.1)
    optimizer.register_step_post_hook(lambda *_: model.backbone[0].weight.data.mul_(1.001))
    return model, optimizer, {}


def fault_autograd_inplace() -> tuple[nn.Module, Any, dict]:
    torch.manual_seed(0)
    model = SmallNet()
    ckptool.freeze(model, strategy="linear")
    optimizer = torch.optim.SGD(trainable(model), lr=0.1)

    def nudge() -> None:
        with torch.no_grad():
            model.backbone[0].bias.add_(1.0)  # bumps the autograd version counter

    return model, optimizer, {"after": nudge}


FAULTS = {
    "stale-grad-sgd-momentum": (
        lambda: stale_gradients(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
        "backbone.0.weight",
        "parameter",
        Cause.STALE_GRADIENT,
    ),
    "adamw-decay-stale-grad": (
        lambda: stale_gradients(lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1)),
        "backbone.0.weight",
        "parameter",
        Cause.STALE_GRADIENT,
    ),
    "fused-adamw": (
        lambda: stale_gradients(lambda p: torch.optim.AdamW(p, lr=0.1, fused=True)),
        "backbone.0.weight",
        "parameter",
        Cause.STALE_GRADIENT,
    ),
    "bn-train-mode": (fault_bn_train_mode, "backbone.1.running_mean", "buffer", Cause.TRAIN_MODE),
    "data-write-from-step-hook": (
        fault_data_write_from_hook,
        "backbone.0.weight",
        "parameter",
        Cause.BYPASSED_AUTOGRAD,
    ),
}


@pytest.mark.parametrize(("make", "name", "kind", "cause"), FAULTS.values(), ids=FAULTS.keys())
def test_planted_faults_are_caught(
    make: Callable[[], tuple], name: str, kind: str, cause: Cause
) -> None:
    model, optimizer, options = make()
    with (
        pytest.raises(
            FrozenParameterError, match="frozen tensors changed at optimizer step 1"
        ) as info,
        FreezeGuard(model, optimizer),
    ):
        train_steps(model, optimizer, **options)
    violation = next(v for v in info.value.violations if name in v.names)
    assert (violation.kind, violation.cause, violation.step) == (kind, cause, 1)
    assert isinstance(info.value, ckptool.CkptError)
    assert not info.value.report.ok and info.value.report.steps_checked == 1


def test_inplace_write_through_autograd_is_named() -> None:
    model, optimizer, options = fault_autograd_inplace()
    with pytest.raises(FrozenParameterError) as info, FreezeGuard(model, optimizer):
        train_steps(model, optimizer, steps=3, **options)
    assert [v.cause for v in info.value.violations] == [Cause.AUTOGRAD_WRITE]
    assert (
        info.value.violations[0].names == ("backbone.0.bias",)
        and info.value.violations[0].step == 2
    )


def test_tied_weights_frozen_by_name_but_trained_through_the_tie() -> None:
    model = Tied()
    summary = ckptool.freeze(model, train=["out"])
    assert summary.conflicts == (("embed.weight", "out.weight"),)
    optimizer = torch.optim.SGD(trainable(model), lr=0.1)
    tokens = torch.randint(0, 10, (4,))
    with pytest.raises(FrozenParameterError) as info, FreezeGuard(model, optimizer):
        optimizer.zero_grad()
        model.out(model.embed(tokens)).sum().backward()
        optimizer.step()
    assert info.value.violations[0].names == ("embed.weight", "out.weight")
    assert info.value.violations[0].cause is Cause.TIED_TRAINABLE


def test_lr_zero_group_rewritten_by_a_scheduler() -> None:
    torch.manual_seed(0)
    model = SmallNet()
    model.backbone[1].eval()
    groups = [
        {"params": list(model.backbone.parameters()), "lr": 0.0},
        {"params": list(model.head.parameters()), "lr": 0.1},
    ]
    optimizer = torch.optim.SGD(groups, lr=0.1)
    with pytest.raises(FrozenParameterError) as info, FreezeGuard(model, optimizer, snapshot=True):
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=0.1, total_steps=10
        )  # rewrites lr=0
        train_steps(model, optimizer, after=scheduler.step)
    violation = info.value.violations[0]
    assert violation.cause is Cause.LR_CHANGED and violation.names == ("backbone.0.weight",)
    assert violation.changed == model.backbone[0].weight.numel() and violation.max_abs > 0


CLEAN = {
    "optimizer-over-all-params-grad-none": lambda m: torch.optim.SGD(
        m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4
    ),
    "adamw-over-all-params": lambda m: torch.optim.AdamW(m.parameters(), lr=0.1, weight_decay=0.1),
    "only-trainable-in-optimizer": lambda m: torch.optim.SGD(trainable(m), lr=0.1, momentum=0.9),
}


@pytest.mark.parametrize("make_optimizer", CLEAN.values(), ids=CLEAN.keys())
@pytest.mark.parametrize("strategy", ["linear", "partial"])
def test_clean_freezes_are_never_flagged(make_optimizer: Callable, strategy: str) -> None:
    torch.manual_seed(0)
    model = SmallNet()
    ckptool.freeze(model, strategy=strategy)
    model.train()  # frozen BN stays in eval through freeze(bn_eval=True)
    optimizer = make_optimizer(model)
    head_before = model.head.weight.detach().clone()
    with FreezeGuard(model, optimizer) as guard:
        train_steps(model, optimizer, steps=3)
    report = guard.report()
    assert report.ok and report.steps_checked == 3 and report.parameters_watched >= 2
    # linear freezes the BatchNorm too (running_mean, running_var, num_batches_tracked);
    # partial freezes the first stage (the conv) and trains the BatchNorm after it.
    assert report.buffers_watched == (3 if strategy == "linear" else 0)
    assert not torch.equal(model.head.weight, head_before)


def test_warn_mode_reports_and_continues() -> None:
    model, optimizer, _ = fault_bn_train_mode()
    with (
        pytest.warns(UserWarning, match="module in train mode"),
        FreezeGuard(model, optimizer, on_violation="warn") as guard,
    ):
        train_steps(model, optimizer, steps=3)
    report = guard.report()
    assert report.steps_checked == 3 and {v.step for v in report.violations} == {1, 2, 3}
    # Printed, the report reads as the CLI's verdict, not a dataclass repr.
    text = str(report)
    assert text.startswith("guard: VIOLATED: ") and "GuardReport(" not in text
    assert text.count("\n  changed buffer ") == len(report.violations), text


def test_findings_before_the_step() -> None:
    torch.manual_seed(0)
    model = SmallNet()
    ckptool.freeze(model, strategy="linear")
    optimizer = torch.optim.SGD([model.head.weight], lr=0.1)  # the head's bias was forgotten
    with FreezeGuard(model, optimizer) as guard:
        train_steps(model, optimizer, steps=1)
    kinds = {f.kind: f.names for f in guard.report().findings}
    assert kinds["not in optimizer"] == ("head.bias",)


def test_guard_only_observes_and_unhooks() -> None:
    torch.manual_seed(0)
    model = ConvBN()
    ckptool.freeze(model, train=["fc"])
    optimizer = torch.optim.SGD(trainable(model), lr=0.1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with FreezeGuard(model, optimizer):
        pass
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    model.conv.weight.data.add_(1)  # after stop(): no hook may fire
    optimizer.step()


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(1001),
        torch.randn(3, 5).to(torch.bfloat16),
        torch.arange(7, dtype=torch.int64),
        torch.tensor([True, False, True]),
        torch.zeros(0),
        torch.tensor(3.5),
        torch.randn(64)[1:40],
    ],
    ids=["odd-float32", "bf16", "int64", "bool", "empty", "scalar", "unaligned-view"],
)
def test_fingerprint_sees_every_single_bit_flip(tensor: torch.Tensor) -> None:
    base = fingerprint(tensor)
    raw = tensor.contiguous().reshape(-1).view(torch.uint8)
    for position in range(0, raw.numel(), max(1, raw.numel() // 23)):
        for bit in (0, 3, 7):
            flipped = raw.clone()
            flipped[position] ^= 1 << bit
            assert not torch.equal(
                fingerprint(flipped.view(tensor.dtype).reshape(tensor.shape)), base
            )
    assert torch.equal(fingerprint(tensor.clone()), base)


def test_fingerprint_is_bitwise_not_numeric() -> None:
    values = torch.tensor([0.0, float("nan")])
    assert not torch.equal(fingerprint(values), fingerprint(torch.tensor([-0.0, float("nan")])))
    other_nan = values.clone().view(torch.int32)
    other_nan[1] += 1  # a NaN with another payload is still a change
    assert not torch.equal(fingerprint(values), fingerprint(other_nan.view(torch.float32)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_guard_on_cuda_catches_bn_train_mode() -> None:
    model, optimizer, _ = fault_bn_train_mode()
    model.cuda()
    optimizer = torch.optim.SGD(trainable(model), lr=0.1)
    x, y = (t.cuda() for t in batch())
    with (
        pytest.raises(FrozenParameterError, match="module in train mode"),
        FreezeGuard(model, optimizer),
    ):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


class Elsewhere(torch.Tensor):
    """A CPU tensor that reports another device: a second device where no GPU exists."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("meta")


def test_frozen_tensors_on_alternating_devices_are_named_right() -> None:
    """Fingerprints are stacked per device; a change must be reported under the name of
    the tensor that changed, however the devices alternate in the model."""
    model = nn.Sequential(*(nn.Linear(3, 3) for _ in range(4)), nn.Linear(3, 2))
    for layer in (model[1], model[3]):
        layer.weight = nn.Parameter(layer.weight.detach().as_subclass(Elsewhere))
        layer.bias = nn.Parameter(layer.bias.detach().as_subclass(Elsewhere))
    assert model[1].weight.device != model[0].weight.device
    ckptool.freeze(model, train=["4"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for layer, name in ((model[1], "1.weight"), (model[2], "2.bias"), (model[3], "3.bias")):
        target = layer.weight if name.endswith("weight") else layer.bias
        with FreezeGuard(model, optimizer, on_violation="record") as guard:
            with torch.no_grad():
                target.add_(1.0)  # a write the optimizer step does not explain
            model(torch.randn(2, 3)).sum().backward()
            optimizer.step()
        assert [v.names for v in guard.report().violations] == [(name,)]


@pytest.mark.parametrize("wrap", ["compile", "data-parallel", "both"])
def test_wrapped_models_are_frozen_and_reported_by_the_users_names(wrap: str) -> None:
    """torch.compile adds ``_orig_mod.``, DDP/DataParallel ``module.``: specs and reports
    speak the names of the module the user wrote."""
    torch.manual_seed(0)
    model = SmallNet()
    wrapped: nn.Module = model
    if wrap in ("data-parallel", "both"):
        wrapped = nn.DataParallel(wrapped)
    if wrap in ("compile", "both"):
        wrapped = torch.compile(wrapped, backend="eager")  # type: ignore[assignment]
    assert any(n.startswith(("_orig_mod.", "module.")) for n, _ in wrapped.named_parameters())
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    summary = ckptool.freeze(wrapped, train=["head"], optimizer=optimizer)
    assert summary.trainable_names == ("head.weight", "head.bias")
    assert summary.held is not None and "backbone.0.weight" in summary.held.removed_from_optimizer

    def write() -> None:
        model.backbone[0].weight.data.mul_(1.5)

    with pytest.raises(FrozenParameterError) as info, FreezeGuard(wrapped, optimizer):
        train_steps(wrapped, optimizer, after=write)
    assert info.value.violations[0].names == ("backbone.0.weight",)


def test_names_meant_frozen_can_be_recorded_without_ckptool_freeze() -> None:
    """The public record the guard reads: a user who freezes by hand marks the names,
    and a tie that keeps one of them training is still caught."""
    from ckptool.guard import intended_frozen, mark_intended_frozen

    model = Tied()  # embed.weight is out.weight: freezing it by hand cannot hold
    mark_intended_frozen(model, ["embed.weight"])
    assert intended_frozen(model) == {"embed.weight"}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens = torch.randint(0, 10, (4,))
    with pytest.raises(FrozenParameterError) as info, FreezeGuard(model, optimizer):
        optimizer.zero_grad()
        model.out(model.embed(tokens)).sum().backward()
        optimizer.step()
    assert info.value.violations[0].cause is Cause.TIED_TRAINABLE
    assert intended_frozen(Tied()) == frozenset()


def test_an_unknown_violation_mode_is_refused() -> None:
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="on_violation must be 'raise', 'warn' or 'record', got"):
        FreezeGuard(model, optimizer, on_violation="ignore")


def test_a_change_only_one_of_the_fingerprint_sums_sees_is_caught() -> None:
    """Word 1 of a frozen float64 tensor is in the whole sum but in neither strided sum
    (every 2nd word from 0, every 3rd from 0): the guard must flag a tensor when any
    sum moved, not only when all did. Written through .data: no version counter moves."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)).double()
    model[0].requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(FrozenParameterError) as info, FreezeGuard(model, optimizer):
        model(torch.ones(3, 2, dtype=torch.float64)).sum().backward()
        model[0].weight.data.view(-1)[1] += 1.0
        optimizer.step()
    assert [v.names for v in info.value.violations] == [("0.weight",)]


class _StateStep(torch.optim.Optimizer):
    """Adds each parameter's state buffer to it at every step, grad or not (as some
    custom optimizers apply momentum): a frozen parameter with state still moves."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, {"lr": 0.1})

    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if "buf" in self.state[p]:
                    p.data.add_(self.state[p]["buf"])


def _head_only_frozen_body() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    model[0].requires_grad_(False)
    return model


def _one_step(model: nn.Module, optimizer: Any, guard: FreezeGuard) -> None:
    with guard:
        model(torch.ones(3, 2)).sum().backward()
        optimizer.step()


def test_a_clean_freeze_has_no_findings() -> None:
    model = _head_only_frozen_body()
    optimizer = torch.optim.SGD(trainable(model), lr=0.1, momentum=0.9)
    guard = FreezeGuard(model, optimizer)
    _one_step(model, optimizer, guard)
    report = guard.report()
    assert report.ok and report.findings == () and report.parameters_watched == 2


def test_findings_name_what_a_frozen_parameter_left_in_the_optimizer_carries() -> None:
    """In the optimizer: a stale .grad and optimizer state are named, each only where
    present. Out of it, a stale .grad is harmless and not named."""
    model = _head_only_frozen_body()
    model[0].weight.grad = torch.ones(2, 2)  # stale, and in the optimizer
    model[0].bias.grad = torch.ones(2)  # stale, but the optimizer does not hold it
    optimizer = torch.optim.SGD([model[0].weight, *trainable(model)], lr=0.1)
    guard = FreezeGuard(model, optimizer, on_violation="record")
    _one_step(model, optimizer, guard)
    assert {(f.kind, f.names) for f in guard.report().findings} == {("grad", ("0.weight",))}
    assert [v.cause for v in guard.report().violations] == [Cause.STALE_GRADIENT]
    model = _head_only_frozen_body()
    optimizer = _StateStep([model[0].weight, *trainable(model)])
    optimizer.state[model[0].weight]["buf"] = torch.full((2, 2), 0.5)
    guard = FreezeGuard(model, optimizer, on_violation="record", snapshot=True)
    _one_step(model, optimizer, guard)
    report = guard.report()
    assert {(f.kind, f.names) for f in report.findings} == {("optimizer state", ("0.weight",))}
    assert [(v.names, v.cause, v.changed) for v in report.violations] == [
        (("0.weight",), Cause.OPTIMIZER_STATE, 4)
    ]
    assert report.violations[0].max_abs == 0.5


def test_without_snapshot_no_copy_is_kept_and_no_count_is_given() -> None:
    model = _head_only_frozen_body()
    optimizer = _StateStep([model[0].weight, *trainable(model)])
    optimizer.state[model[0].weight]["buf"] = torch.full((2, 2), 0.5)
    guard = FreezeGuard(model, optimizer, on_violation="record")
    _one_step(model, optimizer, guard)
    violation = guard.report().violations[0]
    assert (violation.changed, violation.max_abs) == (None, None)


def test_a_count_of_changed_elements_ignores_nans_that_stayed_and_ints_have_no_size() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    model[0].requires_grad_(False)
    model[0].register_buffer("steps", torch.tensor([1, 2, 3]))
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    optimizer = torch.optim.SGD(trainable(model), lr=0.1)
    guard = FreezeGuard(model, optimizer, on_violation="record", snapshot=True)
    with guard:
        model(torch.ones(3, 2)).sum().backward()
        model[0].weight.data[1, 1] += 1.0
        model[0].steps.data[0] += 5
        optimizer.step()
    changes = {v.names: (v.changed, v.max_abs) for v in guard.report().violations}
    assert changes == {("0.weight",): (1, 1.0), ("0.steps",): (1, None)}


def test_buffers_none_watches_no_buffer_and_a_shared_buffer_is_one_tensor() -> None:
    model = ConvBN()
    model.requires_grad_(False)
    model.fc.requires_grad_(True)
    shared = torch.zeros(3)
    model.conv.register_buffer("shared", shared)
    model.bn.register_buffer("shared", shared)
    optimizer = torch.optim.SGD(model.fc.parameters(), lr=0.1)
    with FreezeGuard(model, optimizer, buffers="none") as unwatched:
        assert unwatched.report().buffers_watched == 0
    guard = FreezeGuard(model, optimizer, on_violation="record", buffers="all")
    with guard:
        shared.add_(1)
        optimizer.step()
    assert [v.names for v in guard.report().violations if v.kind == "buffer"] == [
        ("conv.shared", "bn.shared")
    ]


def test_a_frozen_name_trainable_through_a_tie_is_a_finding_before_any_step() -> None:
    model = Tied()
    freeze = ckptool.freeze(model, freeze=["embed"])
    assert freeze is not None
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    guard = FreezeGuard(model, optimizer, on_violation="record")
    guard.start()
    kinds = {f.kind for f in guard.report().findings}
    guard.stop()
    assert "tied" in kinds
