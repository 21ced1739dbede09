"""A Hugging Face ``TrainerCallback``: freeze by ckptool's specs, hold the freeze
against the Trainer's optimizer, and guard every optimizer step.

    from ckptool.integrations.transformers import FreezeGuardCallback
    trainer = Trainer(model=model, args=args, callbacks=[FreezeGuardCallback(train=["classifier"])])
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from ckptool.integrations.session import GuardCallbackMixin


class FreezeGuardCallback(GuardCallbackMixin, TrainerCallback):
    """Freeze when training begins (the optimizer exists by then), guard every step.

    Arguments as :class:`~ckptool.integrations.session.GuardCallbackMixin`; with
    ``on_violation="raise"``, ``trainer.train()`` ends with the FrozenParameterError.
    """

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.session.begin(kwargs["model"], [kwargs["optimizer"]])

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.session.should_stop():
            control.should_training_stop = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.session.end()
