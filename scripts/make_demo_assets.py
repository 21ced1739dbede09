"""Make the demo's assets in ckptool/demo/: the digits data and a pretrained checkpoint.

- digits.npz: scikit-learn's 8x8 handwritten digits (1797 real images), scaled to
  0-255 grayscale, with labels.
- digits_0to5_dp.pt: DigitsNet trained on digits 0-5 and saved the way the ImageNet
  example saves checkpoints: {'epoch', 'arch', 'state_dict'} with DataParallel's
  'module.' keys and a 6-class head, so the demo has both problems to fix.

Needs scikit-learn (a development dependency only). Deterministic for a given torch.

    python scripts/make_demo_assets.py
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from ckptool.data import build_transform
from ckptool.demo import DIGITS, PRETRAINED, PRETRAINED_CLASSES, DigitsNet

EPOCHS = 30


def main() -> int:
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    np.savez_compressed(DIGITS, images=images, labels=digits.target.astype(np.uint8))
    keep = np.isin(digits.target, PRETRAINED_CLASSES)
    # The same normalisation the fine-tune runner applies (ToTensor, then 1-channel
    # ImageNet statistics), so the pretrained features transfer.
    transform = build_transform(8, 1, augment=False)
    from PIL import Image

    inputs = torch.stack([transform(Image.fromarray(image, "L")) for image in images[keep]])
    labels = torch.as_tensor(digits.target[keep], dtype=torch.long)
    torch.manual_seed(0)
    model = DigitsNet(num_classes=len(PRETRAINED_CLASSES))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(EPOCHS):
        order = torch.randperm(len(labels))
        for start in range(0, len(labels), 64):
            index = order[start : start + 64]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs[index]), labels[index]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(inputs).argmax(1) == labels).float().mean().item()
    wrapped = nn.DataParallel(model)  # the source of every 'module.' prefix
    torch.save(
        {
            "epoch": EPOCHS,
            "arch": "DigitsNet",
            "classes": list(PRETRAINED_CLASSES),
            "state_dict": wrapped.state_dict(),
        },
        PRETRAINED,
    )
    print(f"wrote {DIGITS} ({len(images)} images) and {PRETRAINED} (train accuracy {accuracy:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
