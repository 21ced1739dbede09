"""A Lightning callback: freeze by ckptool's specs, hold the freeze against the
trainer's optimizers, and guard every optimizer step.

    from ckptool.integrations.lightning import FreezeGuardCallback
    trainer = Trainer(callbacks=[FreezeGuardCallback(strategy="linear")])

Works with ``lightning`` (``lightning.pytorch``) or ``pytorch_lightning``, whichever is
installed (``lightning`` first).
"""

from __future__ import annotations

from typing import Any

from ckptool.integrations.session import GuardCallbackMixin

try:
    from lightning.pytorch import Callback  # type: ignore[import-not-found, unused-ignore]
except ImportError:  # the older package name
    from pytorch_lightning import Callback


class FreezeGuardCallback(GuardCallbackMixin, Callback):  # type: ignore[misc, unused-ignore]
    """Freeze at the start of fit (after ``configure_optimizers``), guard every step.

    Arguments as :class:`~ckptool.integrations.session.GuardCallbackMixin`; with
    ``on_violation="raise"``, ``trainer.fit`` ends with the FrozenParameterError.
    """

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.session.begin(pl_module, trainer.optimizers)

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if self.session.should_stop():
            trainer.should_stop = True

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.session.end()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.session.end()
