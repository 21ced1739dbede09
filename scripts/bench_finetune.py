"""Benchmark: the linear strategy's feature cache, cached vs uncached epochs in one run.

ResNet-18 (torchvision, weights=None) on a generated image folder (CLASSES x PER_CLASS
images), linear strategy, no augmentation, the guard on. The same run is made with and
without the feature cache; per-epoch wall times and images/s are printed, and the ratio
of the median epoch after the first.

    python scripts/bench_finetune.py [--epochs 5] [--image-size 112] [--per-class 40]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ckptool.finetune import TrainOptions, finetune

CLASSES = 4


def make_data(folder: Path, per_class: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    for label in range(CLASSES):
        (folder / f"c{label}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            pixels[..., label % 3] = 255 - label * 40  # a class colour the head can learn
            Image.fromarray(pixels).save(folder / f"c{label}" / f"{i}.png")
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--per-class", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp) / "data", args.per_class, args.image_size)
        rows = {}
        for cached in (False, True):
            options = TrainOptions(
                epochs=args.epochs,
                batch_size=16,
                image_size=args.image_size,
                augment=False,
                cache_features=cached,
                device="cpu",
            )
            result = finetune(
                "torchvision:resnet18",
                str(data),
                str(Path(tmp) / f"out-{cached}"),
                strategy="linear",
                options=options,
            )
            assert result.cached_features == cached and result.guard.ok
            rows["cached" if cached else "uncached"] = result.epochs
    images = CLASSES * args.per_class
    print(
        f"resnet18 linear, {images} images {args.image_size}x{args.image_size} (60% train), "
        f"CPU {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print("| run | epoch 1 (s) | later epochs, median (s) | later epochs img/s |")
    print("| --- | ---: | ---: | ---: |")
    later = {}
    for name, epochs in rows.items():
        later[name] = statistics.median(m.seconds for m in epochs[1:])
        speed = statistics.median(m.images_per_s for m in epochs[1:])
        print(f"| {name} | {epochs[0].seconds:.2f} | {later[name]:.3f} | {speed:,.0f} |")
    print(f"epochs after the first: cached is {later['uncached'] / later['cached']:.0f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
