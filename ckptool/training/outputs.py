"""What a run writes: model.safetensors with provenance, report.json and the learning
curves, atomically, removed again if anything fails; and the run's recorded config."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from ckptool import jsontext
from ckptool.choices import Strategy
from ckptool.formats.write import atomic_output, committed_outputs, forget_committed
from ckptool.freezing import chosen_strategy
from ckptool.surgery import tool_provenance
from ckptool.training.results import EpochMetrics, FinetuneResult, TrainOptions, WeightOptions

if TYPE_CHECKING:
    import torch

OUTPUT_FILES = ("model.safetensors", "report.json")


def run_config(
    model: str,
    model_args: Sequence[str],
    data: str,
    val_data: str | None,
    weights: WeightOptions,
    strategy: str | None,
    train: Sequence[str] | None,
    freeze_names: Sequence[str] | None,
    freeze_until: str | None,
    options: TrainOptions,
    classes: int,
) -> dict[str, Any]:
    return {
        "model": model,
        "model_args": list(model_args),
        "num_classes": classes,
        "data": data,
        "val_data": val_data,
        "weights": weights.weights,
        "transforms": weights.transforms.flags(),
        "strategy": _value(chosen_strategy(strategy, train, freeze_names)),
        "train": list(train or []),
        "freeze": list(freeze_names or []),
        "freeze_until": freeze_until,
        # What was asked for; report.json's top-level cached_features says what ran.
        **_renamed(asdict(options), cache_features="feature_cache_allowed"),
    }


def _value(strategy: Strategy | None) -> str | None:
    return strategy.value if strategy is not None else None


def _renamed(fields: dict[str, Any], **names: str) -> dict[str, Any]:
    return {names.get(key, key): value for key, value in fields.items()}


def write_outputs(
    out_dir: str,
    state: dict[str, torch.Tensor],
    result: FinetuneResult,
    model: str,
    weights: WeightOptions,
) -> FinetuneResult:
    """model.safetensors (with provenance) then report.json, each atomic."""
    import dataclasses

    from ckptool.formats.save import save_state_dict

    with _removed_on_failure(out_dir):
        model_path = os.path.join(out_dir, "model.safetensors")
        metadata = tool_provenance(
            "finetune",
            model=model,
            weights=os.path.basename(weights.weights or ""),
            classes=json.dumps(list(result.classes)),
            # Enough to build the model these weights fit: the head size and arguments.
            num_classes=str(result.config["num_classes"]),
            model_args=json.dumps(result.config["model_args"]),
        )
        save_state_dict(state, model_path, force=True, metadata=metadata)
        curves = _write_curves(out_dir, result.epochs)
        report_path = os.path.join(out_dir, "report.json")
        result = dataclasses.replace(result, outputs=(model_path, report_path, *curves))
        with atomic_output(report_path) as temp:
            temp.file.write(jsontext.dumps(result_json(result), indent=2).encode())
    return result


@contextlib.contextmanager
def _removed_on_failure(out_dir: str) -> Iterator[None]:
    """Create ``out_dir``; all or nothing: if this run created it, a failed or
    interrupted write does not leave it behind, half-filled or empty."""
    created = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    try:
        yield
    except BaseException:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
            for path in committed_outputs():
                if os.path.dirname(path) == out_dir:
                    forget_committed(path)
        raise


def _write_curves(out_dir: str, epochs: Sequence[EpochMetrics]) -> tuple[str, ...]:
    """OUTDIR/curves.png when matplotlib is installed (the CLI also draws them in text)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        return ()
    figure, (loss_axis, acc_axis) = pyplot.subplots(1, 2, figsize=(9, 3.5))
    numbers = [m.epoch for m in epochs]
    loss_axis.plot(numbers, [m.train_loss for m in epochs], label="train")
    acc_axis.plot(numbers, [m.train_acc for m in epochs], label="train")
    if all(m.val_loss is not None for m in epochs):
        loss_axis.plot(numbers, [m.val_loss for m in epochs], label="val")
        acc_axis.plot(numbers, [m.val_acc for m in epochs], label="val")
    loss_axis.set(title="loss", xlabel="epoch")
    acc_axis.set(title="accuracy", xlabel="epoch")
    loss_axis.legend()
    path = os.path.join(out_dir, "curves.png")
    figure.savefig(path, dpi=100, bbox_inches="tight")
    pyplot.close(figure)
    return (path,)


def result_json(result: FinetuneResult) -> dict[str, Any]:
    """The report.json document."""
    return {
        "config": result.config,
        "classes": list(result.classes),
        "epochs": [asdict(m) for m in result.epochs],
        "best_epoch": result.best_epoch,
        "cached_features": result.cached_features,
        "parameters": result.summary.to_json(),
        "guard": result.guard.to_json(),
        "changes": [asdict(c) for c in result.changes],
        "frozen_unchanged": result.frozen_unchanged,
        "weights": None
        if result.weights is None
        else {
            "renamed": len(result.weights.renamed),
            "kept": len(result.weights.kept),
            "filled": list(result.weights.filled),
            "dropped": list(result.weights.dropped),
            "left_out": list(result.weights.left_out),
        },
        "outputs": list(result.outputs),
    }
