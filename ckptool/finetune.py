"""The fine-tune runner: weights -> head -> freeze -> guarded training -> verified outputs.

Data and weights are checked before anything is written; outputs (model.safetensors,
report.json) are written atomically at the end, so a failed run leaves nothing behind.
With the ``linear`` strategy and no augmentation the frozen backbone is a fixed
function: its features are computed once and the head trains on the cached features.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptool.data import DataSplit, load_split
from ckptool.distributed import (
    DistContext,
    barrier,
    from_environment,
    shutdown,
)
from ckptool.errors import IncompatibleError, OutputError, UsageError, option
from ckptool.formats.bounded import listed
from ckptool.formats.load import holds_non_finite
from ckptool.freezing import (
    FreezeSummary,
    freeze_for_training,
)
from ckptool.surgery import SurgeryLog, adapt_into
from ckptool.training.loop import Run, score
from ckptool.training.outputs import OUTPUT_FILES, result_json, run_config, write_outputs
from ckptool.training.results import (
    EpochMetrics,
    FinetuneResult,
    ModuleChange,
    Progress,
    Silent,
    TrainOptions,
    WeightOptions,
    module_changes,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "EpochMetrics",
    "FinetuneResult",
    "ModuleChange",
    "Progress",
    "TrainOptions",
    "WeightOptions",
    "finetune",
    "result_json",
]


def finetune(
    model: str,
    data: str,
    out_dir: str,
    *,
    model_args: Sequence[str] = (),
    num_classes: int | None = None,
    head: str | None = None,
    weights: WeightOptions = WeightOptions(),
    strategy: str | None = None,
    train: Sequence[str] | None = None,
    freeze_names: Sequence[str] | None = None,
    freeze_until: str | None = None,
    options: TrainOptions = TrainOptions(),
    val_data: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` on ``data`` and write OUTDIR/model.safetensors and report.json.

    Raises:
        UsageError: bad data layout or options; DataError: unreadable images;
        FrozenParameterError: the guard saw a frozen tensor change (nothing written);
        TrainingDivergedError: trainable weights turned NaN or infinite (nothing written);
        OutputError: OUTDIR holds a previous run and ``force`` is false.
    """
    import torch

    _check_options(options, weights, strategy)
    _check_out_dir(out_dir, force)
    progress = progress or Silent()
    split = _read_data(data, val_data, options, num_classes, progress)
    torch.manual_seed(options.seed)
    progress.prepare("build the model" + (" and adapt the weights" if weights.weights else ""))
    net, log = _build(model, model_args, num_classes or len(split.classes), head, weights)
    summary = freeze_for_training(
        net,
        train=train,
        freeze_names=freeze_names,
        strategy=strategy,
        freeze_until=freeze_until,
        head=head,
    )
    prepared = _Prepared(
        net=net,
        split=split,
        summary=summary,
        weights_log=log,
        initial={k: v.detach().clone() for k, v in net.state_dict().items()},
        config=run_config(
            model,
            model_args,
            data,
            val_data,
            weights,
            strategy,
            train,
            freeze_names,
            freeze_until,
            options,
            num_classes or len(split.classes),
        ),
    )
    device = _device(options.device)
    prepared.config["device"] = device.type  # "auto" as it resolved
    context = from_environment(device.type)
    try:
        result, final = _train(prepared, options, device, head, progress, context)
        if context.is_main:  # one writer; the others wait so every rank ends together
            result = write_outputs(out_dir, final, result, model, weights)
        barrier(context)
        return result
    finally:
        shutdown(context)


# Fewer training images per class than this is a run that cannot learn much.
FEW_IMAGES_PER_CLASS = 5


def _thin_data(split: DataSplit) -> list[str]:
    """Warnings about a split that leaves training too little to learn from."""
    per_class = [sum(1 for s in split.train if s.label == i) for i in range(len(split.classes))]
    thin = [c for c, n in zip(split.classes, per_class, strict=True) if n < FEW_IMAGES_PER_CLASS]
    if not thin:
        return []
    shown = listed([f"{c} ({per_class[split.classes.index(c)]})" for c in thin], 6)
    return [
        f"only {len(split.train)} training images ({len(split.val)} held out for validation); "
        f"classes with fewer than {FEW_IMAGES_PER_CLASS}: {shown}; "
        f"lower {option('val_split')} or add images"
    ]


def _read_data(
    data: str,
    val_data: str | None,
    options: TrainOptions,
    num_classes: int | None,
    progress: Progress,
) -> DataSplit:
    """The train/val split, announced, checked against ``num_classes``, with a warning
    for classes too thin to learn from."""
    progress.prepare("read the data")
    split = load_split(data, val_data=val_data, val_split=options.val_split, seed=options.seed)
    progress.data(split)
    _check_num_classes(num_classes, split, data)
    for message in _thin_data(split):
        progress.warn(message)
    return split


def _check_num_classes(num_classes: int | None, split: DataSplit, data: str) -> None:
    """A head with fewer outputs than the data has classes fails on the first label it
    cannot score; one with more trains outputs no image ever asks for."""
    if num_classes is not None and num_classes != len(split.classes):
        raise UsageError(
            f"{option('num_classes', num_classes)}, but {data} has {len(split.classes)} classes "
            f"({', '.join(split.classes[:6])}{', ...' if len(split.classes) > 6 else ''}); "
            f"leave {option('num_classes')} out to take it from the data"
        )


@dataclass(frozen=True)
class _Prepared:
    """Everything fixed before training: the model with its weights and freeze, the data."""

    net: nn.Module
    split: DataSplit
    summary: FreezeSummary
    weights_log: SurgeryLog | None
    initial: dict[str, torch.Tensor]
    config: dict[str, Any]


def _train(
    prepared: _Prepared,
    options: TrainOptions,
    device: torch.device,
    head: str | None,
    progress: Progress | None,
    context: DistContext,
) -> tuple[FinetuneResult, dict[str, torch.Tensor]]:
    """Train with the guard on; return the result and the best epoch's weights (CPU)."""
    import torch

    net = prepared.net
    if context.active and device.type == "cuda":
        device = torch.device("cuda", context.local_rank)
    net.to(device)
    run = Run(net, prepared.split, options, device, head, progress or Silent(), context)
    epochs, best_state, guard = run.train()
    net.load_state_dict(best_state)
    final = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    result = FinetuneResult(
        config=prepared.config,
        classes=prepared.split.classes,
        epochs=tuple(epochs),
        best_epoch=max(epochs, key=score).epoch,
        summary=prepared.summary,
        guard=guard,
        changes=module_changes(prepared.initial, final, prepared.summary),
        weights=prepared.weights_log,
        cached_features=run.cached,
    )
    return result, final


def _check_options(options: TrainOptions, weights: WeightOptions, strategy: str | None) -> None:
    # (a NaN learning rate passes "lr <= 0" and turns every weight NaN at the first step)
    if options.epochs < 1 or options.batch_size < 1 or not 0 < options.lr < math.inf:
        raise UsageError(
            f"{option('epochs')} and {option('batch_size')} must be at least 1 and "
            f"{option('lr')} positive and finite"
        )
    if options.optimizer not in ("sgd", "adamw"):
        raise UsageError(
            f"{option('optimizer', options.optimizer, quoted=True)}: choose sgd or adamw"
        )
    if strategy == "scratch" and weights.weights:
        raise UsageError(
            f"{option('strategy', 'scratch')} re-initialises every weight; drop {option('weights')}"
        )


def _check_out_dir(out_dir: str, force: bool) -> None:
    if os.path.isfile(out_dir):
        raise OutputError(f"{out_dir}: is a file; -o names an output directory")
    existing = [f for f in OUTPUT_FILES if os.path.exists(os.path.join(out_dir, f))]
    if existing and not force:
        raise OutputError(
            f"{out_dir}: holds {', '.join(existing)} from an earlier run; add "
            f"{option('force', True)} to replace"
        )
    parent = os.path.dirname(os.path.abspath(out_dir))
    if not os.path.isdir(parent):
        raise OutputError(f"{out_dir}: directory {parent} does not exist")


def _build(
    spec: str, model_args: Sequence[str], classes: int, head: str | None, weights: WeightOptions
) -> tuple[nn.Module, SurgeryLog | None]:
    from ckptool.models import build_model

    net = build_model(spec, model_args=model_args, num_classes=classes, head=head)
    if not weights.weights:
        return net, None
    log = adapt_into(
        net,
        weights.weights,
        key=weights.key,
        transforms=weights.transforms,
        auto=weights.auto,
        on_mismatch=weights.on_mismatch,
    )
    _refuse_non_finite_weights(net, weights.weights)
    return net, log


def _refuse_non_finite_weights(net: nn.Module, source: str) -> None:
    """A NaN in the starting parameters makes every loss NaN: the run would stop as
    "diverged" and blame the learning rate. (Buffers may hold -inf masks on purpose.)"""
    broken = [name for name, p in net.named_parameters() if holds_non_finite(p)]
    if broken:
        raise IncompatibleError(
            f"{source}: the starting weights hold NaN or infinite values "
            f"({listed(broken, 3)}); training cannot repair them; nothing was written "
            "(ckptool check shows them too)"
        )


def _device(requested: str) -> torch.device:
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{option('device', 'cuda')}: no CUDA device is available")
    if requested not in ("cpu", "cuda") and not requested.startswith("cuda:"):
        raise UsageError(f"{option('device', requested, quoted=True)}: choose auto, cpu or cuda")
    return torch.device(requested)
