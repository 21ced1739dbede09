"""``ckptool check``: the pre-training sanity check a pipeline runs before spending GPU hours.

1. strict loadability after the transforms (the diff must be compatible);
2. every floating tensor of the checkpoint is finite;
3. one guarded training step on a synthetic batch: frozen tensors stay bit-identical
   and every trainable parameter moves.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptool.errors import UsageError
from ckptool.formats import read_metadata
from ckptool.freezing import FreezeSummary, freeze_for_training
from ckptool.guard import FreezeGuard, FrozenParameterError, GuardReport
from ckptool.keys import KeyDiff, Transforms, diff
from ckptool.surgery import load_matched

if TYPE_CHECKING:
    import torch
    from torch import nn

# Synthetic batch: two samples, so BatchNorm layers in train mode can compute statistics.
BATCH = 2
IMAGE_SIZE = 224
SEQUENCE_LENGTH = 16


@dataclass(frozen=True)
class CheckResult:
    """The three checks; ``guard`` is None when loading already failed."""

    source: str
    model: str
    keys: KeyDiff
    non_finite: tuple[str, ...] = ()
    guard: GuardReport | None = None
    summary: FreezeSummary | None = None
    not_moved: tuple[str, ...] = ()
    input_shape: tuple[int, ...] | None = None

    @property
    def ok(self) -> bool:
        guard_ok = self.guard is not None and self.guard.ok
        return self.keys.compatible and not self.non_finite and guard_ok and not self.not_moved


def check(
    source: str | os.PathLike[str],
    *,
    model: str | nn.Module,
    model_args: Sequence[str] = (),
    num_classes: int | None = None,
    head: str | None = None,
    key: str | None = None,
    transforms: Transforms | None = None,
    train: Sequence[str] | None = None,
    freeze_names: Sequence[str] | None = None,
    strategy: str | None = None,
    freeze_until: str | None = None,
    input_shape: Sequence[int] | None = None,
    seed: int = 0,
) -> CheckResult:
    """Run the three checks; never raises for a failed check (see ``CheckResult.ok``).

    Without ``train``, ``freeze_names`` or ``strategy`` the ``linear`` strategy is used:
    the head trains, everything else is frozen. ``model`` is a spec or a live
    ``nn.Module``; a live one is copied, never changed.

    Raises:
        UsageError: the input shape cannot be inferred, bad freeze patterns; and the
            usual read and model-spec errors.
    """
    import torch

    from ckptool.models import build_or_copy, model_label, model_tensor_meta

    meta = read_metadata(source, key=key)
    transforms = transforms or Transforms()
    torch.manual_seed(seed)
    net = build_or_copy(model, model_args=model_args, num_classes=num_classes, head=head)
    keys = diff(meta.tensors, model_tensor_meta(net), transforms)
    label = model_label(model)
    label += f" --num-classes {num_classes}" if num_classes is not None else ""
    if not keys.compatible:
        return CheckResult(meta.path, label, keys)
    non_finite = load_matched(net, meta, keys)
    summary = freeze_for_training(
        net,
        train=train,
        freeze_names=freeze_names,
        strategy=strategy,
        freeze_until=freeze_until,
        head=head,
    )
    shape = tuple(input_shape) if input_shape else infer_input_shape(net)
    report, not_moved = _guarded_step(net, shape, seed)
    return CheckResult(meta.path, label, keys, non_finite, report, summary, not_moved, shape)


def infer_input_shape(net: nn.Module) -> tuple[int, ...]:
    """From the first layer: images for Conv2d (C, 224, 224), features for Linear, tokens
    for Embedding.

    Raises:
        UsageError: the first layer tells nothing; pass --input-shape.
    """
    from torch import nn

    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            return (module.in_channels, IMAGE_SIZE, IMAGE_SIZE)
        if isinstance(module, nn.Conv1d):
            return (module.in_channels, IMAGE_SIZE)
        if isinstance(module, nn.Linear):
            return (module.in_features,)
        if isinstance(module, nn.Embedding):
            return (SEQUENCE_LENGTH,)
    raise UsageError(
        f"cannot infer the input shape of {type(net).__name__}; add --input-shape 3,224,224"
    )


def _synthetic_batch(net: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    import torch
    from torch import nn

    embedding = next(
        (m for m in net.modules() if isinstance(m, nn.Embedding | nn.Conv2d | nn.Linear)), None
    )
    if isinstance(embedding, nn.Embedding):
        return torch.randint(0, embedding.num_embeddings, (BATCH, *shape))
    return torch.randn(BATCH, *shape)


def _loss(output: Any) -> torch.Tensor:
    import torch
    from torch import nn

    if isinstance(output, tuple | list):  # e.g. Inception's (logits, aux)
        output = output[0]
    if isinstance(output, Mapping):  # e.g. {'logits': ...}
        output = next(iter(output.values()))
    tensor: torch.Tensor = output
    if tensor.dim() == 2 and tensor.is_floating_point():
        targets = torch.randint(0, tensor.shape[1], (tensor.shape[0],))
        return nn.functional.cross_entropy(tensor.float(), targets)
    return tensor.float().pow(2).mean()


def _guarded_step(
    net: nn.Module, shape: tuple[int, ...], seed: int
) -> tuple[GuardReport, tuple[str, ...]]:
    import torch

    torch.manual_seed(seed)
    trainable = {name: p for name, p in net.named_parameters() if p.requires_grad}
    before = {name: p.detach().clone() for name, p in trainable.items()}
    # Momentum and weight decay as in real fine-tuning: they are what moves frozen weights.
    optimizer = torch.optim.SGD(trainable.values(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    net.train()
    batch = _synthetic_batch(net, shape)
    guard = FreezeGuard(net, optimizer)
    try:
        with guard:
            optimizer.zero_grad(set_to_none=True)
            _loss(net(batch)).backward()  # type: ignore[no-untyped-call]
            optimizer.step()
    except FrozenParameterError as e:
        return e.report, ()
    not_moved = tuple(n for n, p in trainable.items() if torch.equal(p.detach(), before[n]))
    return guard.report(), not_moved
