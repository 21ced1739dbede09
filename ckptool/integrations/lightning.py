"""A Lightning callback: freeze by ckptool's specs, hold the freeze against the
trainer's optimizers, and guard every optimizer step.

    from ckptool.integrations.lightning import FreezeGuardCallback
    trainer = Trainer(callbacks=[FreezeGuardCallback(strategy="linear")])

Works with ``lightning`` (``lightning.pytorch``) or ``pytorch_lightning``, whichever is
installed (``lightning`` first).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ckptool.freezing import Strategy
from ckptool.guard import GuardReport
from ckptool.integrations.session import FreezeSpec, GuardSession

try:
    from lightning.pytorch import Callback  # type: ignore[import-not-found, unused-ignore]
except ImportError:  # the older package name
    from pytorch_lightning import Callback


class FreezeGuardCallback(Callback):  # type: ignore[misc, unused-ignore]
    """Freeze at the start of fit (after ``configure_optimizers``), guard every step.

    Args:
        train, freeze, strategy, freeze_until, head, bn_eval: as :func:`ckptool.freeze`
            (none: nothing is frozen here, what is already frozen is guarded).
        on_violation: ``"raise"`` (``trainer.fit`` ends with FrozenParameterError and
            its report) or ``"stop"`` (the trainer stops after the step; see
            :attr:`report`).
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
        super().__init__()
        spec = FreezeSpec(train, freeze, strategy, freeze_until, head, bn_eval)
        self.session = GuardSession(spec, on_violation=on_violation)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.session.begin(pl_module, trainer.optimizers)

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if self.session.should_stop():
            trainer.should_stop = True

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.session.end()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.session.end()

    @property
    def report(self) -> GuardReport | None:
        return self.session.report()
