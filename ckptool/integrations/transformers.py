"""A Hugging Face ``TrainerCallback``: freeze by ckptool's specs, hold the freeze
against the Trainer's optimizer, and guard every optimizer step.

    from ckptool.integrations.transformers import FreezeGuardCallback
    trainer = Trainer(model=model, args=args, callbacks=[FreezeGuardCallback(train=["classifier"])])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import TrainerCallback

from ckptool.freezing import Strategy
from ckptool.guard import GuardReport
from ckptool.integrations.session import FreezeSpec, GuardSession


class FreezeGuardCallback(TrainerCallback):
    """Freeze when training begins (the optimizer exists by then), guard every step.

    Args:
        train, freeze, strategy, freeze_until, head, bn_eval: as :func:`ckptool.freeze`
            (none: nothing is frozen here, what is already frozen is guarded).
        on_violation: ``"raise"`` (``trainer.train()`` ends with FrozenParameterError
            and its report) or ``"stop"`` (training stops after the step; see
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
        spec = FreezeSpec(train, freeze, strategy, freeze_until, head, bn_eval)
        self.session = GuardSession(spec, on_violation=on_violation)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.session.begin(kwargs["model"], [kwargs["optimizer"]])

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.session.should_stop():
            control.should_training_stop = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.session.end()

    @property
    def report(self) -> GuardReport | None:
        return self.session.report()
