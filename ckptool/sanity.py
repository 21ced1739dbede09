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

from ckptool.errors import FrozenParameterError, UsageError, first_line, option
from ckptool.formats import read_metadata
from ckptool.freezing import FreezeSummary, freeze_for_training
from ckptool.guard import FreezeGuard, GuardReport
from ckptool.keys import KeyDiff, Transforms, diff
from ckptool.surgery import load_matched

if TYPE_CHECKING:
    import torch
    from torch import nn

# Synthetic batch: two samples, so BatchNorm layers in train mode can compute statistics.
BATCH = 2
# Shapes tried in order when none is given: ImageNet, then the crops of small nets
# (MTCNN's 48/24/12, CIFAR's 32); signal lengths for 1-D convs and raw audio models.
IMAGE_SIZES = (224, 112, 64, 48, 32, 24, 12)
SIGNAL_LENGTHS = (16000, 1024, 224)
SEQUENCE_LENGTH = 16
# Output tensors a loss is built from (a model returning thousands is not a classifier).
MAX_OUTPUTS = 64


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
    torch_accepts: bool = False  # the model's own loading (its hooks) takes the file
    notes: tuple[str, ...] = ()

    @property
    def loadable(self) -> bool:
        """adapt with these transforms would write a strictly loadable file (tied names
        and names the model's load hooks place included)."""
        return self.keys.fits_after_adapt

    @property
    def ok(self) -> bool:
        guard_ok = self.guard is not None and self.guard.ok
        return self.loadable and not self.non_finite and guard_ok and not self.not_moved


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
    ``nn.Module``; a live one is copied, never changed. Without ``input_shape`` the
    shape is inferred from the first layer and tried on the model (no gradients), with
    the usual alternatives (48x48 faces, raw audio) when the first guess does not run.

    Raises:
        UsageError: no input shape runs through the model (pass one), bad freeze
            patterns; and the usual read and model-spec errors.
    """
    meta = read_metadata(source, key=key)  # a bad file fails before torch is imported

    import torch

    from ckptool.judge import hooks_note, with_hooks
    from ckptool.models import ShapeModel, build_or_copy, model_label, model_tensor_meta

    transforms = transforms or Transforms()
    torch.manual_seed(seed)
    net = build_or_copy(model, model_args=model_args, num_classes=num_classes, head=head)
    target = model_tensor_meta(net)
    keys = diff(meta.tensors, target, transforms)
    label = model_label(model)
    label += f" --num-classes {num_classes}" if num_classes is not None else ""
    # torch is the judge: names the model's load hooks place count as placed.
    keys, placement = with_hooks(ShapeModel(net, None, live=True), meta, target, keys)
    if not keys.fits_after_adapt:
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
    shape = tuple(input_shape) if input_shape else runnable_input_shape(net)
    report, not_moved = _guarded_step(net, shape, seed, given=input_shape is not None)
    hooked = placement is not None and keys.compatible
    notes = (hooks_note(keys),) if placement is not None else ()
    return CheckResult(
        meta.path, label, keys, non_finite, report, summary, not_moved, shape, hooked, notes
    )


def input_shape_candidates(net: nn.Module) -> list[tuple[int, ...]]:
    """Sample shapes to try, the first layer's guess first: images for Conv2d
    (C, 224, 224), then smaller crops (48x48 face nets); signals for Conv1d; features for
    Linear; tokens for Embedding; (steps, features) for an LSTM/GRU; raw 1-D audio
    frames last (models that reshape it)."""
    from torch import nn

    layers = nn.Conv2d | nn.Conv1d | nn.Linear | nn.Embedding | nn.RNNBase
    first = next((m for m in net.modules() if isinstance(m, layers)), None)
    shapes: list[tuple[int, ...]]
    if isinstance(first, nn.Conv2d):
        shapes = [(first.in_channels, size, size) for size in IMAGE_SIZES]
    elif isinstance(first, nn.Conv1d):
        shapes = [(first.in_channels, length) for length in SIGNAL_LENGTHS]
    elif isinstance(first, nn.Linear):
        shapes = [(first.in_features,)]
    elif isinstance(first, nn.Embedding):
        shapes = [(SEQUENCE_LENGTH,)]
    elif isinstance(first, nn.RNNBase):  # (steps, features): a voice encoder's mel frames
        shapes = [(SEQUENCE_LENGTH, first.input_size)]
    else:
        shapes = []
    return shapes + [(length,) for length in SIGNAL_LENGTHS if (length,) not in shapes]


def runnable_input_shape(net: nn.Module) -> tuple[int, ...]:
    """The first candidate shape the model's forward accepts (tried without gradients,
    in eval mode, so nothing about the model changes).

    Raises:
        UsageError: none runs; names the shapes tried and the first error.
    """
    import torch

    candidates = input_shape_candidates(net)
    first_error = ""
    was_training = net.training
    net.eval()
    try:
        for shape in candidates:
            try:
                with torch.no_grad():
                    _output_tensors(net(_synthetic_batch(net, shape)))
            except Exception as e:  # a wrong shape fails in whatever way the model fails
                first_error = first_error or first_line(e)
                continue
            return shape
    finally:
        net.train(was_training)
    tried = ", ".join("x".join(map(str, s)) for s in candidates[:6])
    raise UsageError(
        f"cannot find an input shape {type(net).__name__} accepts (tried {tried}; first "
        f"error: {first_error}); add {option('input_shape')}, e.g. "
        f"{option('input_shape', '3,224,224', python='(3, 224, 224)')}"
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


def _output_tensors(output: Any) -> list[torch.Tensor]:
    """Every floating tensor in a model's output: a tensor, a tuple (Inception's logits
    and aux; a face detector's boxes, landmarks and scores), a dict or ModelOutput.

    Raises:
        UsageError: the output holds no floating tensor to compute a loss from.
    """
    import torch

    found: list[torch.Tensor] = []
    pending = [output]
    while pending and len(found) < MAX_OUTPUTS:
        item = pending.pop(0)
        if isinstance(item, torch.Tensor):
            if item.is_floating_point():
                found.append(item)
        elif isinstance(item, Mapping):
            pending.extend(item.values())
        elif isinstance(item, tuple | list):
            pending.extend(item)
    if not found:
        raise UsageError(
            f"the model's output ({type(output).__name__}) holds no floating tensor to "
            "compute a loss from"
        )
    return found


def _loss(output: Any) -> torch.Tensor:
    """A loss every output contributes to, so every trainable parameter gets a gradient:
    cross-entropy for a single logits matrix, the mean square of each output otherwise
    (a multi-output model's first output is not necessarily its logits)."""
    import torch
    from torch import nn

    tensors = _output_tensors(output)
    if len(tensors) == 1 and tensors[0].dim() == 2:
        logits = tensors[0].float()
        targets = torch.randint(0, logits.shape[1], (logits.shape[0],))
        return nn.functional.cross_entropy(logits, targets)
    return torch.stack([t.float().pow(2).mean() for t in tensors]).sum()


def _guarded_step(
    net: nn.Module, shape: tuple[int, ...], seed: int, *, given: bool
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
            output = _forward(net, batch, shape, given=given)
            _loss(output).backward()  # type: ignore[no-untyped-call]
            optimizer.step()
    except FrozenParameterError as e:
        return e.report, ()
    not_moved = tuple(n for n, p in trainable.items() if torch.equal(p.detach(), before[n]))
    return guard.report(), not_moved


def _forward(net: nn.Module, batch: torch.Tensor, shape: tuple[int, ...], *, given: bool) -> Any:
    """The training forward pass; a failure is the user's shape (or the model), not ours."""
    try:
        return net(batch)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        where = option("input_shape") if given else "the inferred input shape"
        raise UsageError(
            f"{type(net).__name__} cannot run a batch of {BATCH}x{'x'.join(map(str, shape))} "
            f"({where}): {first_line(e)}; pass the sample shape with {option('input_shape')}"
        ) from e
