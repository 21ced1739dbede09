"""What a fine-tune run takes (options) and reports (epochs, changes, the result), and
the progress protocol the report layer draws."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ckptool.data import DataSplit
from ckptool.freezing import FreezeSummary
from ckptool.guard import GuardReport
from ckptool.keys import Transforms
from ckptool.surgery import SurgeryLog

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float | None
    val_acc: float | None
    seconds: float
    images_per_s: float


@dataclass(frozen=True)
class ModuleChange:
    """Whether a top-level module's tensors moved between the start and the end."""

    name: str
    changed: int
    unchanged: int
    frozen: bool


@dataclass(frozen=True)
class FinetuneResult:
    config: dict[str, Any]
    classes: tuple[str, ...]
    epochs: tuple[EpochMetrics, ...]
    best_epoch: int
    summary: FreezeSummary
    guard: GuardReport
    changes: tuple[ModuleChange, ...]
    weights: SurgeryLog | None
    cached_features: bool
    outputs: tuple[str, ...] = ()

    @property
    def frozen_unchanged(self) -> bool:
        return all(c.changed == 0 for c in self.changes if c.frozen)


class Progress(Protocol):
    """What the runner tells its caller; the report layer draws it."""

    def prepare(self, step: str) -> None: ...
    def data(self, split: DataSplit) -> None: ...
    def start_epoch(self, epoch: int, epochs: int, batches: int) -> None: ...
    def advance(self, loss: float, images: int) -> None: ...
    def end_epoch(self, metrics: EpochMetrics) -> None: ...
    def warn(self, message: str) -> None: ...


class Silent:
    """No display. Warnings still reach an API caller, as Python warnings."""

    def warn(self, message: str) -> None:
        import warnings

        warnings.warn(message, UserWarning, stacklevel=3)

    def prepare(self, step: str) -> None:
        pass

    def data(self, split: DataSplit) -> None:
        pass

    def start_epoch(self, epoch: int, epochs: int, batches: int) -> None:
        pass

    def advance(self, loss: float, images: int) -> None:
        pass

    def end_epoch(self, metrics: EpochMetrics) -> None:
        pass


@dataclass(frozen=True)
class TrainOptions:
    """Training hyperparameters (the CLI's flags)."""

    epochs: int = 5
    batch_size: int = 32
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    device: str = "auto"
    amp: bool = False
    image_size: int = 224
    augment: bool = True
    seed: int = 0
    workers: int = 0
    val_split: float = 0.4
    cache_features: bool = True  # linear + no augmentation: train the head on cached features


@dataclass(frozen=True)
class WeightOptions:
    """Where the starting weights come from and how they are adapted."""

    weights: str | None = None
    key: str | None = None
    transforms: Transforms = field(default_factory=Transforms)
    auto: bool = False
    on_mismatch: str = "error"


def module_changes(
    initial: dict[str, torch.Tensor], final: dict[str, torch.Tensor], summary: FreezeSummary
) -> tuple[ModuleChange, ...]:
    """Per top-level module: how many tensors changed bitwise between start and end."""
    import torch

    frozen_modules = {m.name for m in summary.modules if m.status == "frozen"}
    rows: dict[str, list[int]] = {}
    for name, before in initial.items():
        after = final[name]
        same = before.dtype == after.dtype and torch.equal(_bits(before), _bits(after))
        rows.setdefault(name.split(".", 1)[0], [0, 0])[0 if not same else 1] += 1
    return tuple(ModuleChange(n, c, u, n in frozen_modules) for n, (c, u) in rows.items())


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    from ckptool.guard import fingerprint_elementwise

    return fingerprint_elementwise(tensor)
