"""The demo workflow: transfer a digits-0-5 CNN to digits 6-9 from ten images per class.

Each step is a call of the public API paired with the command line that does the
same, so a user can redo every step on their own files. Rendering is the CLI's job.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ckptool.demo import DIGITS, PRETRAINED, TRANSFER_CLASSES
from ckptool.errors import shell_word as q  # printed paths are pasted into a shell

MODEL = "ckptool.demo:DigitsNet"
SHOTS = 10  # training images per class: the few-sample regime where transfer should help
BATCH_SIZE = 8


@dataclass(frozen=True)
class Run:
    """One fine-tuning run of the comparison."""

    name: str
    strategy: str
    pretrained: bool
    epochs: int
    lr: float

    @property
    def description(self) -> str:
        if self.strategy == "linear":
            return "only the new head trains, on the pretrained features"
        if self.pretrained:
            return "every layer trains, starting from the pretrained weights"
        return "the same network from random initialisation"


# Cached features make linear epochs nearly free, so it gets more of them.
RUNS = (
    Run("transfer-linear", "linear", True, 60, 0.1),
    Run("transfer-full", "full", True, 30, 0.05),
    Run("scratch", "scratch", False, 30, 0.05),
)


@dataclass(frozen=True)
class Step:
    """One step: a title, the equivalent command line, and the API's result object."""

    title: str
    command: str
    result: Any


@dataclass(frozen=True)
class Comparison:
    """Each run's result on the same held-out digits."""

    rows: tuple[tuple[Run, Any], ...]  # (run, FinetuneResult)


def prepare(folder: str, *, seed: int = 0) -> tuple[str, str, str, int, int]:
    """Write digits 6-9 as PNG folders (SHOTS per class to train on, the rest to validate)
    and copy the pretrained checkpoint; returns (checkpoint, train dir, val dir, counts)."""
    import numpy as np
    from PIL import Image

    data = np.load(DIGITS)
    rng = np.random.default_rng(seed)
    train_dir = os.path.join(folder, "digits", "train")
    val_dir = os.path.join(folder, "digits", "val")
    shutil.rmtree(os.path.join(folder, "digits"), ignore_errors=True)
    counts = [0, 0]
    for digit in TRANSFER_CLASSES:
        indices = rng.permutation(np.flatnonzero(data["labels"] == digit))
        for split, (chosen, target) in enumerate(
            ((indices[:SHOTS], train_dir), (indices[SHOTS:], val_dir))
        ):
            os.makedirs(os.path.join(target, str(digit)), exist_ok=True)
            for index in chosen:
                image = Image.fromarray(data["images"][index], "L")
                image.save(os.path.join(target, str(digit), f"{index}.png"))
            counts[split] += len(chosen)
    checkpoint = os.path.join(folder, "digits_0to5_dp.pt")
    shutil.copyfile(PRETRAINED, checkpoint)
    return checkpoint, train_dir, val_dir, counts[0], counts[1]


def run(folder: str, *, seed: int = 0) -> Iterator[Step]:
    """Run the workflow in ``folder`` (created; earlier demo outputs are replaced)."""
    from ckptool.compare import diff_checkpoint
    from ckptool.formats import read_metadata
    from ckptool.keys import Transforms
    from ckptool.surgery import adapt

    os.makedirs(folder, exist_ok=True)
    checkpoint, train_dir, val_dir, shots, held_out = prepare(folder, seed=seed)
    yield Step(
        f"data: {shots} training images of digits 6-9 ({SHOTS} per class), {held_out} to validate",
        f"ls {q(train_dir)} {q(val_dir)}",
        None,
    )
    yield Step(
        "what is in the pretrained checkpoint",
        f"ckptool inspect {q(checkpoint)}",
        read_metadata(checkpoint),
    )
    classes = len(TRANSFER_CLASSES)
    target = f"--model {MODEL} --num-classes {classes}"
    yield Step(
        "why it does not fit a 4-class model",
        f"ckptool diff {q(checkpoint)} {target}",
        diff_checkpoint(checkpoint, model=MODEL, num_classes=classes),
    )
    adapted = os.path.join(folder, "digits_6to9_start.safetensors")
    fix = Transforms(strip=("module.",), drop=("fc.",))
    yield Step(
        "write a checkpoint that loads strictly",
        f"ckptool adapt {q(checkpoint)} {target} --strip module. --drop fc. "
        f"-o {q(adapted)} --force",
        adapt(
            checkpoint, model=MODEL, num_classes=classes, transforms=fix, out=adapted, force=True
        ),
    )
    results = []
    for spec in RUNS:
        step = _finetune_step(
            spec, folder, train_dir, val_dir, adapted if spec.pretrained else None, seed
        )
        results.append((spec, step.result))
        yield step
    yield Step(
        f"transfer against training from scratch, same {shots} images",
        "",
        Comparison(tuple(results)),
    )


def _finetune_step(
    spec: Run, folder: str, train_dir: str, val_dir: str, weights: str | None, seed: int
) -> Step:
    from ckptool.finetune import TrainOptions, WeightOptions, finetune

    out = os.path.join(folder, spec.name)
    options = TrainOptions(
        epochs=spec.epochs,
        batch_size=BATCH_SIZE,
        lr=spec.lr,
        image_size=8,
        augment=False,
        seed=seed,
        device="cpu",
    )
    flags = f"--weights {q(weights)} " if weights else ""
    command = (
        f"ckptool finetune --model {MODEL} {flags}--strategy {spec.strategy} "
        f"--data {q(train_dir)} --val-data {q(val_dir)} --image-size 8 --no-augment "
        f"--epochs {spec.epochs} --batch-size {BATCH_SIZE} --lr {spec.lr} --device cpu "
        f"-o {q(out)} --force"
    )
    result = finetune(
        MODEL,
        train_dir,
        out,
        weights=WeightOptions(weights=weights),
        strategy=spec.strategy,
        options=options,
        val_data=val_dir,
        force=True,
    )
    return Step(f"fine-tune ({spec.name}): {spec.description}", command, result)
