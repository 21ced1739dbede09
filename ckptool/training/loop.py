"""The guarded training loop: optimizer, loaders, epochs, passes, DDP and mixed
precision; every optimizer step is checked by the freeze guard."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ckptool.choices import Optimizer
from ckptool.data import DataSplit, ImageDataset
from ckptool.distributed import (
    DistContext,
    any_rank,
    sum_across,
)
from ckptool.errors import FrozenParameterError, TrainingDivergedError, UsageError, first_line
from ckptool.formats.bounded import listed
from ckptool.freezing import hold_frozen
from ckptool.guard import FreezeGuard, GuardReport, violation_error
from ckptool.training.cache import FeatureBatches
from ckptool.training.results import EpochMetrics, Progress, Silent, TrainOptions

if TYPE_CHECKING:
    import torch
    from torch import nn


def score(metrics: EpochMetrics) -> tuple[float, float]:
    """Best epoch: highest validation accuracy, then lowest validation loss."""
    if metrics.val_acc is None or metrics.val_loss is None:
        return (-metrics.train_loss, metrics.epoch)
    return (metrics.val_acc, -metrics.val_loss)


class Run:
    """One training run: loaders, optimizer, guard, epochs, best weights."""

    def __init__(
        self,
        net: nn.Module,
        split: DataSplit,
        options: TrainOptions,
        device: torch.device,
        head: str | None,
        progress: Progress,
        context: DistContext | None = None,
    ) -> None:
        from ckptool.models import find_head

        self.net, self.split, self.options, self.device = net, split, options, device
        self.head_name = head or find_head(net)
        self.context = context or DistContext()
        self.progress = progress if self.context.is_main else Silent()
        self.forward_model = _wrap_ddp(net, device, self.context)
        # fp16 autocast needs loss scaling; bf16 (the CPU's autocast type) does not.
        self.scaler = _grad_scaler(options.amp and device.type == "cuda")
        trainable = [name for name, p in net.named_parameters() if p.requires_grad]
        # The backbone is a fixed function only if nothing outside the head trains and
        # no augmentation changes its input between epochs.
        self.cached = (
            options.cache_features
            and not options.augment
            # under DDP the head would train outside the gradient sync
            and not self.context.active
            and bool(trainable)
            and all(name.startswith(self.head_name + ".") for name in trainable)
        )

    def train(self) -> tuple[list[EpochMetrics], dict[str, torch.Tensor], GuardReport]:

        optimizer = self._optimizer()
        # Gradients left on frozen parameters (by whatever loaded or built the model)
        # would otherwise ride along: the freeze holds from the first step.
        hold_frozen(self.net, optimizer)
        train_batches, val_batches = self._batches()
        epochs: list[EpochMetrics] = []
        best: dict[str, torch.Tensor] = {}
        # Distributed: every rank records; after each step the ranks agree on a verdict.
        mode = "record" if self.context.active else "raise"
        with FreezeGuard(self.net, optimizer, on_violation=mode) as guard:
            self.guard = guard
            for epoch in range(1, self.options.epochs + 1):
                if hasattr(train_batches, "sampler") and hasattr(
                    train_batches.sampler, "set_epoch"
                ):
                    train_batches.sampler.set_epoch(epoch)
                metrics = self._epoch(epoch, optimizer, train_batches, val_batches)
                if not epochs or score(metrics) > max(score(m) for m in epochs):
                    best = {
                        k: v.detach().to("cpu", copy=True) for k, v in self.net.state_dict().items()
                    }
                epochs.append(metrics)
                self.progress.end_epoch(metrics)
        return epochs, best, guard.report()

    def _optimizer(self) -> torch.optim.Optimizer:
        import torch

        params = [p for p in self.net.parameters() if p.requires_grad]
        if not params:
            raise UsageError("nothing to train: every parameter is frozen")
        if Optimizer(self.options.optimizer) is Optimizer.ADAMW:
            return torch.optim.AdamW(
                params, lr=self.options.lr, weight_decay=self.options.weight_decay
            )
        return torch.optim.SGD(
            params,
            lr=self.options.lr,
            momentum=self.options.momentum,
            weight_decay=self.options.weight_decay,
        )

    def _batches(self) -> tuple[Any, Any]:
        """Loaders of images, or (when cached) of backbone features computed once."""
        train = self._loader(self.split.train, augment=self.options.augment, shuffle=True)
        val = self._loader(self.split.val, augment=False, shuffle=False) if self.split.val else None
        if not self.cached:
            return train, val
        return FeatureBatches(self, train), (FeatureBatches(self, val) if val is not None else None)

    def _loader(self, samples: Sequence[Any], *, augment: bool, shuffle: bool) -> Any:
        import torch
        from torch.utils.data import DataLoader

        dataset = ImageDataset(
            samples,
            image_size=self.options.image_size,
            channels=input_channels(self.net),
            augment=augment,
        )
        generator = torch.Generator().manual_seed(self.options.seed)
        sampler: Any = None
        if self.context.active and shuffle:  # each rank trains on its own shard
            from torch.utils.data.distributed import DistributedSampler

            sampler = DistributedSampler(
                dataset,  # type: ignore[arg-type]
                num_replicas=self.context.world_size,
                rank=self.context.rank,
                seed=self.options.seed,
            )
        return DataLoader(
            dataset,  # type: ignore[arg-type]  # a map-style dataset, duck-typed
            batch_size=self.options.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            generator=generator,
            num_workers=self.options.workers,
            pin_memory=self.device.type == "cuda",
        )

    def _epoch(self, epoch: int, optimizer: Any, train: Any, val: Any) -> EpochMetrics:
        start = time.perf_counter()
        self.progress.start_epoch(epoch, self.options.epochs, len(train))
        train_loss, train_acc, seen = self._pass(train, optimizer)
        # Every rank holds the same weights (DDP syncs the gradients): all stop together.
        self._refuse_divergence(f"epoch {epoch}")
        val_loss, val_acc = (None, None)
        if val is not None:
            val_loss, val_acc, _ = self._pass(val, None)
        seconds = time.perf_counter() - start
        return EpochMetrics(
            epoch, train_loss, train_acc, val_loss, val_acc, seconds, seen / seconds
        )

    def _pass(self, batches: Any, optimizer: Any) -> tuple[float, float, int]:
        """One pass over ``batches``: training when an optimizer is given, else evaluation."""
        import torch
        from torch import nn

        training = optimizer is not None
        self.net.train(training)
        total_loss, correct, seen = 0.0, 0, 0
        forward = self._head_forward if self.cached else self.forward_model
        for inputs, labels in batches:
            inputs = inputs.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            with torch.set_grad_enabled(training), self._autocast():
                logits = forward(inputs)
                loss = nn.functional.cross_entropy(logits.float(), labels)
            value = float(loss.detach())
            if training:
                optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self._step(optimizer)
                self.scaler.update()
                self._agree_on_guard()
                self.progress.advance(value, len(labels))
                # A loss that is not finite is the first sign, and costs nothing to see;
                # under DDP the ranks' losses differ, so they check at the epoch's end.
                if not math.isfinite(value) and not self.context.active:
                    self._refuse_divergence(f"a step of loss {value}")
            total_loss += value * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
        if training:  # validation runs the whole set on every rank; training is sharded
            total_loss, correct_sum, seen_sum = sum_across(
                [total_loss, correct, seen], self.context
            )
            correct, seen = int(correct_sum), int(seen_sum)
        return total_loss / max(seen, 1), correct / max(seen, 1), seen

    def _step(self, optimizer: Any) -> None:
        """The optimizer step; a learning rate too large for float32 fails inside it
        (SGD's ``-lr``, AdamW's ``lr / (1 - beta1)``): that is divergence, not our bug."""
        try:
            self.scaler.step(optimizer)
        except RuntimeError as e:
            if "overflow" not in str(e):
                raise
            raise TrainingDivergedError(
                f"training diverged: an optimizer step overflowed float32 ({first_line(e)}); "
                f"nothing was written; lower --lr (it is {self.options.lr:g})"
            ) from e

    def _refuse_divergence(self, when: str) -> None:
        """Stop once a trainable weight is NaN or infinite: no later step recovers it,
        and the run would save it as its best epoch. (A step that fp16 loss scaling
        skips leaves the weights finite.)"""
        import torch

        broken = [
            name
            for name, p in self.net.named_parameters()
            if p.requires_grad and not bool(torch.isfinite(p).all())
        ]
        if broken:
            raise TrainingDivergedError(
                f"training diverged after {when}: {len(broken)} trainable tensors hold NaN "
                f"or infinite values ({listed(broken, 3)}); nothing was written; "
                f"lower --lr (it is {self.options.lr:g})"
            )

    def _agree_on_guard(self) -> None:
        if not self.context.active:
            return
        if any_rank(bool(self.guard.report().violations), self.context):
            report = self.guard.report()
            if report.violations:
                raise violation_error(report)
            raise FrozenParameterError(
                "a frozen tensor changed on another rank; see rank 0's report", (), report
            )

    def _head_forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net.get_submodule(self.head_name)(features)  # type: ignore[no-any-return]

    def _autocast(self) -> Any:

        import torch

        if not self.options.amp:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.device.type == "cpu" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)


def _wrap_ddp(net: nn.Module, device: torch.device, context: DistContext) -> Any:
    if not context.active:
        return net
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(net, device_ids=device_ids)


def _grad_scaler(enabled: bool) -> Any:
    import torch

    return torch.amp.GradScaler("cuda", enabled=enabled)


def input_channels(net: nn.Module) -> int:
    """Channels of the first Conv2d (1 for grayscale models), else 3."""
    from torch import nn

    first = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    return first.in_channels if first is not None else 3
