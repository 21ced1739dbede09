"""Freezing for transfer learning: strategies, name patterns, honest BatchNorm, a summary."""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptool.choices import Strategy
from ckptool.errors import UsageError, option
from ckptool.guard import mark_intended_frozen, tied_parameters, user_model
from ckptool.keys import under_prefix

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class ModuleSummary:
    """One top-level module: parameter counts and whether it trains."""

    name: str
    trainable: int
    frozen: int
    frozen_buffers: int

    @property
    def status(self) -> str:
        if self.trainable and self.frozen:
            return "mixed"
        return "trainable" if self.trainable else ("frozen" if self.frozen else "-")


@dataclass(frozen=True)
class FreezeSummary:
    """Keras-style totals after freezing, and ties that cross the frozen/trainable line."""

    modules: tuple[ModuleSummary, ...]
    trainable_names: tuple[str, ...]
    frozen_names: tuple[str, ...]
    conflicts: tuple[tuple[str, ...], ...] = ()  # names of one tensor, some meant frozen
    held: HoldReport | None = None  # with freeze(..., optimizer=): what left the optimizer

    @property
    def trainable(self) -> int:
        return sum(m.trainable for m in self.modules)

    @property
    def frozen(self) -> int:
        return sum(m.frozen for m in self.modules)

    @property
    def frozen_buffers(self) -> int:
        return sum(m.frozen_buffers for m in self.modules)

    @property
    def total(self) -> int:
        return self.trainable + self.frozen

    def to_json(self) -> dict[str, Any]:
        """The summary as the --json documents and finetune's report.json give it."""
        return {
            "total": self.total,
            "trainable": self.trainable,
            "frozen": self.frozen,
            "frozen_buffers": self.frozen_buffers,
            "modules": [
                {
                    "name": m.name,
                    "trainable": m.trainable,
                    "frozen": m.frozen,
                    "frozen_buffers": m.frozen_buffers,
                    "status": m.status,
                }
                for m in self.modules
            ],
            "conflicts": [list(c) for c in self.conflicts],
        }


def freeze(
    model: nn.Module,
    *,
    train: Sequence[str] | None = None,
    freeze: Sequence[str] | None = None,
    strategy: Strategy | str | None = None,
    freeze_until: str | None = None,
    head: str | None = None,
    bn_eval: bool = True,
    optimizer: Any = None,
) -> FreezeSummary:
    """Set ``requires_grad`` by strategy or by name, and return a summary.

    With ``optimizer`` (one or a list), the freeze also holds against it: see
    :func:`hold_frozen`.

    Args:
        train: only parameters under these prefixes (or matching these globs) train.
        freeze: parameters under these prefixes/globs are frozen, the rest train.
        strategy: ``linear`` (only the head), ``partial`` (freeze the top-level stages up to
            and including ``freeze_until``; default: all but the last stage and the
            head), ``full``, ``scratch`` (re-initialise everything, train everything).
        head: the head module for ``linear`` (default: the last nn.Linear).
        bn_eval: keep fully frozen BatchNorm modules in eval mode even after
            ``model.train()``, so their running statistics stay put.
        optimizer: an optimizer already built over the model (or several): frozen
            parameters leave it, with their gradients and optimizer state.

    Raises:
        UsageError: more than one way to choose was given, a pattern matches nothing,
            or ``freeze_until`` names no top-level module.
    """
    model = user_model(model)  # names without torch.compile's or DDP's prefixes
    chosen = [x for x in (train, freeze, strategy) if x is not None]
    if len(chosen) > 1:
        raise UsageError(
            f"choose one of {option('strategy')}, {option('train')} or {option('freeze')}"
        )
    names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    trainable = _trainable_names(model, names, train, freeze, strategy, freeze_until, head)
    if Strategy(strategy) is Strategy.SCRATCH if strategy else False:
        _reinitialise(model)
    conflicts = _apply(model, trainable)
    mark_intended_frozen(model, (n for n in names if n not in trainable))
    if bn_eval:
        keep_frozen_bn_in_eval(model)
    held = hold_frozen(model, optimizer) if optimizer is not None else None
    return dataclasses.replace(summarize(model, conflicts=conflicts), held=held)


@dataclass(frozen=True)
class HoldReport:
    """What :func:`hold_frozen` took away from frozen parameters (names, first name of
    each tensor)."""

    removed_from_optimizer: tuple[str, ...]
    gradients_cleared: tuple[str, ...]
    states_dropped: tuple[str, ...]


def hold_frozen(model: nn.Module, optimizers: Any) -> HoldReport:
    """Make a freeze hold against optimizers built before it, or over all parameters.

    ``requires_grad=False`` alone does not stop an optimizer: a gradient computed
    before the freeze is applied again at every step (with momentum and weight decay),
    and momentum or Adam moments from earlier steps keep moving a parameter whose
    gradient is zero. So every parameter with ``requires_grad=False`` loses its
    ``.grad``, its optimizer state (momentum buffers, moments, step counts), and its
    place in every param group; the groups themselves stay, so LR schedulers keep
    their per-group settings. Parameters frozen by name but trainable through a tie
    keep ``requires_grad=True`` and are left alone (the guard reports them). Save the
    optimizer's state dict after this, not before: its parameter indices change.
    """
    model = user_model(model)
    frozen = {
        id(p): name
        for name, p in reversed(list(model.named_parameters(remove_duplicate=False)))
        if not p.requires_grad
    }  # reversed: the first name of a tied tensor wins
    cleared = []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad and parameter.grad is not None:
            parameter.grad = None
            cleared.append(name)
    removed: list[str] = []
    dropped: list[str] = []
    for optimizer in optimizers if isinstance(optimizers, list | tuple) else [optimizers]:
        for group in optimizer.param_groups:
            removed += [frozen[id(p)] for p in group["params"] if id(p) in frozen]
            group["params"] = [p for p in group["params"] if id(p) not in frozen]
        for parameter in [p for p in optimizer.state if id(p) in frozen]:
            del optimizer.state[parameter]
            dropped.append(frozen[id(parameter)])
    return HoldReport(tuple(removed), tuple(cleared), tuple(dropped))


def freeze_for_training(
    model: nn.Module,
    *,
    train: Sequence[str] | None = None,
    freeze_names: Sequence[str] | None = None,
    strategy: Strategy | str | None = None,
    freeze_until: str | None = None,
    head: str | None = None,
) -> FreezeSummary:
    """:func:`freeze` with transfer learning's default: ``linear`` when nothing is chosen."""
    return freeze(
        model,
        train=train,
        freeze=freeze_names,
        strategy=chosen_strategy(strategy, train, freeze_names),
        freeze_until=freeze_until,
        head=head,
    )


def chosen_strategy(
    strategy: Strategy | str | None,
    train: Sequence[str] | None,
    freeze_names: Sequence[str] | None,
) -> Strategy | None:
    """The strategy a fine-tune runs: the one asked for, ``linear`` when nothing was
    chosen, None when explicit --train/--freeze names decide."""
    if strategy is not None:
        return Strategy(strategy)
    return Strategy.LINEAR if train is None and freeze_names is None else None


def _trainable_names(
    model: nn.Module,
    names: Sequence[str],
    train: Sequence[str] | None,
    freeze: Sequence[str] | None,
    strategy: Strategy | str | None,
    freeze_until: str | None,
    head: str | None,
) -> set[str]:
    if freeze_until is not None and strategy not in (Strategy.PARTIAL, "partial"):
        # Only the partial strategy freezes stages; anywhere else it would do nothing.
        raise UsageError(
            f"{option('freeze_until', freeze_until)}: applies to "
            f"{option('strategy', 'partial')} only; add it"
        )
    if train is not None:
        return set(_matching(names, train, "train"))
    if freeze is not None:
        return set(names) - set(_matching(names, freeze, "freeze"))
    plan = Strategy(strategy) if strategy is not None else Strategy.FULL
    if plan in (Strategy.FULL, Strategy.SCRATCH):
        return set(names)
    if plan is Strategy.LINEAR:
        from ckptool.models import find_head

        return set(_matching(names, [head or find_head(model)], "head"))
    return set(names) - _frozen_stages(model, names, freeze_until, head)


def _matching(names: Sequence[str], patterns: Sequence[str], flag: str) -> list[str]:
    """Names under a prefix (``layer4``, ``fc.``) or matching a glob (``*.bn*``)."""
    matched = []
    for pattern in patterns:
        is_glob = any(c in pattern for c in "*?[")
        hits = [
            n
            for n in names
            if (fnmatch.fnmatchcase(n, pattern) if is_glob else under_prefix(n, pattern))
        ]
        if not hits:
            raise UsageError(
                f"{option(flag, pattern, quoted=True)} matches no parameter; names look "
                f"like {names[0]!r}"
            )
        matched.extend(hits)
    return matched


def _frozen_stages(
    model: nn.Module, names: Sequence[str], freeze_until: str | None, head: str | None
) -> set[str]:
    """Names in the stages up to and including ``freeze_until`` (default: all but the last)."""
    from ckptool.models import find_head

    head_name = head or find_head(model)
    stages = body_stages(model, head_name)
    if freeze_until is None:
        until = stages[-2] if len(stages) >= 2 else None
    elif freeze_until in stages:
        until = freeze_until
    else:
        raise UsageError(
            f"{option('freeze_until', freeze_until, quoted=True)} is not a stage; "
            f"stages: {', '.join(stages)}"
        )
    if until is None:
        return set()
    frozen_stages = stages[: stages.index(until) + 1]
    return {n for n in names if any(under_prefix(n, s) for s in frozen_stages)}


def body_stages(model: nn.Module, head: str) -> list[str]:
    """The model's stages in order, without the head: top-level children holding
    parameters, or the children of a lone body container (``backbone.0``, ``backbone.1``)."""
    prefix, module = "", model
    while True:
        stages = [
            f"{prefix}{name}"
            for name, child in module.named_children()
            if any(True for _ in child.parameters()) and not under_prefix(head, f"{prefix}{name}")
        ]
        if len(stages) != 1:
            return stages
        only = stages[0]
        children = list(module.get_submodule(only.removeprefix(prefix)).named_children())
        if not children:
            return stages
        prefix, module = f"{only}.", module.get_submodule(only.removeprefix(prefix))


def _apply(model: nn.Module, trainable: set[str]) -> tuple[tuple[str, ...], ...]:
    """Set requires_grad; report tensors whose names disagree (tied across the line)."""
    conflicts = []
    for param, names in tied_parameters(model):
        wanted = [n in trainable for n in names]
        # A tied tensor trains if any of its names should: freezing it would silently
        # stop the trainable name; the guard then watches the frozen name.
        param.requires_grad_(any(wanted))
        if any(wanted) and not all(wanted):
            conflicts.append(names)
    return tuple(conflicts)


def _reinitialise(model: nn.Module) -> None:
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()


def keep_frozen_bn_in_eval(model: nn.Module) -> list[Any]:
    """Keep BatchNorm modules whose parameters are all frozen in eval mode.

    A forward pre-hook puts them back in eval mode whenever ``model.train()`` set them
    to train mode, so frozen statistics stay frozen. Returns the hook handles.
    """
    from torch import nn

    handles = []
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if (
            isinstance(module, nn.modules.batchnorm._BatchNorm)
            and params
            and not any(p.requires_grad for p in params)
        ):
            module.eval()
            handles.append(module.register_forward_pre_hook(_stay_in_eval))
    return handles


def _stay_in_eval(module: Any, args: Any) -> None:
    if module.training:
        module.eval()


def summarize(model: nn.Module, *, conflicts: tuple[tuple[str, ...], ...] = ()) -> FreezeSummary:
    """Total, trainable and frozen parameters and frozen buffers per top-level module."""
    model = user_model(model)
    rows: dict[str, list[int]] = {}
    trainable_names: list[str] = []
    frozen_names: list[str] = []
    for name, param in model.named_parameters():
        row = rows.setdefault(name.split(".", 1)[0], [0, 0, 0])
        row[0 if param.requires_grad else 1] += param.numel()
        (trainable_names if param.requires_grad else frozen_names).append(name)
    for module_name, module in model.named_modules():
        params = list(module.parameters(recurse=False))
        if params and not any(p.requires_grad for p in params):
            for buffer in module.buffers(recurse=False):
                rows.setdefault(module_name.split(".", 1)[0] or module_name, [0, 0, 0])[2] += (
                    buffer.numel()
                )
    modules = tuple(ModuleSummary(name, *counts) for name, counts in rows.items())
    return FreezeSummary(modules, tuple(trainable_names), tuple(frozen_names), conflicts)
