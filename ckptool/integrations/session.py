"""What every trainer integration does: freeze by the same specs as ``ckptool.freeze``,
hold the freeze against the trainer's optimizers, guard every optimizer step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ckptool.choices import Strategy
from ckptool.errors import UsageError
from ckptool.freezing import FreezeSummary, freeze
from ckptool.guard import FreezeGuard, GuardReport

ON_VIOLATION = ("raise", "stop")


@dataclass
class FreezeSpec:
    """How to freeze: the arguments of :func:`ckptool.freeze` (none given: freeze
    nothing, only guard what is already frozen)."""

    train: Sequence[str] | None = None
    freeze: Sequence[str] | None = None
    strategy: Strategy | str | None = None
    freeze_until: str | None = None
    head: str | None = None
    bn_eval: bool = True

    @property
    def chosen(self) -> bool:
        return any(x is not None for x in (self.train, self.freeze, self.strategy))


@dataclass
class GuardSession:
    """Freeze, hold and guard one training run.

    ``on_violation="raise"`` raises :class:`FrozenParameterError` from the optimizer
    step that changed a frozen tensor (the trainer stops with it); ``"stop"`` records
    it, and :meth:`should_stop` tells the trainer to stop after the step.
    """

    spec: FreezeSpec
    on_violation: str = "raise"
    summary: FreezeSummary | None = None
    guard: FreezeGuard | None = None
    _optimizers: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.on_violation not in ON_VIOLATION:
            raise UsageError(f"on_violation must be 'raise' or 'stop', got {self.on_violation!r}")

    def begin(self, model: Any, optimizers: Sequence[Any]) -> None:
        self._optimizers = [_unwrapped_optimizer(o) for o in optimizers]
        if self.spec.chosen:
            self.summary = freeze(
                model,
                train=self.spec.train,
                freeze=self.spec.freeze,
                strategy=self.spec.strategy,
                freeze_until=self.spec.freeze_until,
                head=self.spec.head,
                bn_eval=self.spec.bn_eval,
                optimizer=self._optimizers,
            )
        mode = "raise" if self.on_violation == "raise" else "record"
        self.guard = FreezeGuard(model, self._optimizers, on_violation=mode)
        self.guard.start()

    def should_stop(self) -> bool:
        """With ``on_violation="stop"``: a frozen tensor changed (the report says which)."""
        return self.guard is not None and not self.guard.report().ok

    def end(self) -> None:
        if self.guard is not None:
            self.guard.stop()

    def report(self) -> GuardReport | None:
        return self.guard.report() if self.guard is not None else None


def _unwrapped_optimizer(optimizer: Any) -> Any:
    """The torch optimizer under a trainer's wrapper (accelerate's AcceleratedOptimizer,
    Lightning's LightningOptimizer): its step hooks are the ones that fire."""
    for attribute in ("optimizer", "_optimizer"):
        inner = getattr(optimizer, attribute, None)
        if inner is not None and hasattr(inner, "register_step_post_hook"):
            return _unwrapped_optimizer(inner)
    return optimizer


class GuardCallbackMixin:
    """The constructor and report both trainer callbacks share.

    Args:
        train, freeze, strategy, freeze_until, head, bn_eval: as :func:`ckptool.freeze`
            (none: nothing is frozen here, what is already frozen is guarded).
        on_violation: ``"raise"`` (training ends with FrozenParameterError and its
            report) or ``"stop"`` (the trainer stops after the step; see :attr:`report`).
    """

    def __init__(
        self,
        *,
        train: Sequence[str] | None = None,
        freeze: Sequence[str] | None = None,
        strategy: Strategy | str | None = None,
        freeze_until: str | None = None,
        head: str | None = None,
        bn_eval: bool = True,
        on_violation: str = "raise",
    ) -> None:
        spec = FreezeSpec(train, freeze, strategy, freeze_until, head, bn_eval)
        self.session = GuardSession(spec, on_violation=on_violation)

    @property
    def report(self) -> GuardReport | None:
        return self.session.report()
