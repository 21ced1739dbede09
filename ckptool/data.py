"""Training data: an image folder (one sub-folder per class) or list files (path<TAB>label).

Everything is checked before training starts, so bad data costs one line and no output:
a missing folder or an empty class is a usage error, an unreadable image a DataError.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptool.errors import DataError, UsageError, option

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# ImageNet statistics, what torchvision's pretrained models expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Sample:
    path: str
    label: int


@dataclass(frozen=True)
class DataSplit:
    """Train and validation samples and the class names (index = label)."""

    classes: tuple[str, ...]
    train: tuple[Sample, ...]
    val: tuple[Sample, ...]


def load_split(
    data: str, *, val_data: str | None = None, val_split: float = 0.4, seed: int = 0
) -> DataSplit:
    """Read ``data`` (folder or list file) and split off validation samples.

    The split is stratified and seeded: the same seed gives the same split. With
    ``val_data`` no split is made.

    Raises:
        UsageError: a missing path, no classes, a class with no images, a bad split.
        DataError: an unreadable image or a list file naming a missing file.
    """
    if not 0.0 <= val_split < 1.0:
        raise UsageError(f"{option('val_split', val_split)} must be in [0, 1)")
    classes, samples = read_samples(data)
    if val_data is not None:
        val_classes, val_samples = read_samples(val_data, classes=classes)
        if val_classes != classes:
            raise UsageError(
                f"{val_data}: classes {list(val_classes)} differ from {data}'s {list(classes)}"
            )
        return DataSplit(classes, tuple(samples), tuple(val_samples))
    train, val = _stratified_split(samples, val_split, seed)
    return DataSplit(classes, tuple(train), tuple(val))


def read_samples(
    path: str, *, classes: Sequence[str] | None = None
) -> tuple[tuple[str, ...], list[Sample]]:
    """Samples from an image folder or a list file; every image is opened once to check it."""
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such data folder or list file")
    if os.path.isdir(path):
        found_classes, samples = _read_folder(path)
    else:
        found_classes, samples = _read_list(path, classes)
    _check_images(samples)
    return found_classes, samples


def _read_folder(folder: str) -> tuple[tuple[str, ...], list[Sample]]:
    classes = tuple(
        sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    )
    if not classes:
        raise UsageError(f"{folder}: no class sub-folders; expected {folder}/<class>/<image files>")
    samples: list[Sample] = []
    for label, name in enumerate(classes):
        files = sorted(
            os.path.join(folder, name, f)
            for f in os.listdir(os.path.join(folder, name))
            if f.lower().endswith(IMAGE_SUFFIXES)
        )
        if not files:
            kinds = ", ".join(IMAGE_SUFFIXES[:4])
            raise UsageError(f"{folder}/{name}: class {name!r} has no images ({kinds}, ...)")
        samples.extend(Sample(f, label) for f in files)
    return classes, samples


def _read_list(path: str, classes: Sequence[str] | None) -> tuple[tuple[str, ...], list[Sample]]:
    """``path<TAB>label`` per line; labels are integers or class names; paths are
    relative to the list file's folder."""
    base = os.path.dirname(os.path.abspath(path))
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.rstrip("\n").split("\t") if "\t" in line else line.split()
            if len(parts) != 2:
                raise UsageError(
                    f"{path}:{number}: expected 'path<TAB>label', got {line.strip()!r}"
                )
            rows.append((os.path.join(base, parts[0].strip()), parts[1].strip()))
    if not rows:
        raise UsageError(f"{path}: list file has no samples")
    names = tuple(classes) if classes is not None else _class_names([label for _, label in rows])
    index = {name: i for i, name in enumerate(names)}
    samples = []
    for file, label in rows:
        if label not in index:
            raise UsageError(
                f"{path}: label {label!r} is not one of the classes {list(names)[:10]}"
            )
        samples.append(Sample(file, index[label]))
    return names, samples


def _class_names(labels: Sequence[str]) -> tuple[str, ...]:
    unique = set(labels)
    if all(label.isdigit() for label in unique):
        return tuple(str(i) for i in range(max(int(x) for x in unique) + 1))
    return tuple(sorted(unique))


def _check_images(samples: Sequence[Sample]) -> None:
    from PIL import Image, UnidentifiedImageError

    for sample in samples:
        try:
            with Image.open(sample.path) as image:
                image.verify()
        except FileNotFoundError as e:
            raise DataError(f"{sample.path}: image file is missing") from e
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise DataError(f"{sample.path}: not a readable image ({e})") from e


def _stratified_split(
    samples: Sequence[Sample], fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    rng = random.Random(seed)
    by_label: dict[int, list[Sample]] = {}
    for sample in samples:
        by_label.setdefault(sample.label, []).append(sample)
    train, val = [], []
    for group in by_label.values():
        shuffled = group[:]
        rng.shuffle(shuffled)
        count = round(len(shuffled) * fraction) if fraction else 0
        if fraction and len(shuffled) > 1:
            count = min(max(count, 1), len(shuffled) - 1)  # keep one of each for both sides
        val.extend(shuffled[:count])
        train.extend(shuffled[count:])
    return train, val


class ImageDataset:
    """A torch Dataset over samples: load, resize, (augment), normalise."""

    def __init__(
        self, samples: Sequence[Sample], *, image_size: int, channels: int, augment: bool
    ) -> None:
        self.samples = list(samples)
        self.transform = build_transform(image_size, channels, augment)
        self.mode = "L" if channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        sample = self.samples[index]
        with Image.open(sample.path) as image:
            tensor = self.transform(image.convert(self.mode))
        return tensor, sample.label


def build_transform(image_size: int, channels: int, augment: bool) -> Any:
    """Resize, light augmentation (flip, crop jitter), ImageNet normalisation."""
    from torchvision import transforms

    mean = IMAGENET_MEAN if channels == 3 else (sum(IMAGENET_MEAN) / 3,) * channels
    std = IMAGENET_STD if channels == 3 else (sum(IMAGENET_STD) / 3,) * channels
    steps: list[Any] = []
    if augment:
        steps += [
            transforms.RandomResizedCrop(image_size, scale=(0.8, 1.0), antialias=True),
            transforms.RandomHorizontalFlip(),
        ]
    else:
        steps += [transforms.Resize((image_size, image_size), antialias=True)]
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)
