"""Demo assets: scikit-learn's 8x8 handwritten digits and a small CNN pretrained on 0-5.

``digits.npz`` (images as 0-255 grayscale, labels) and ``digits_0to5_dp.pt`` (the
pretrained checkpoint, saved through nn.DataParallel so its keys start with
``module.``) are made by ``scripts/make_demo_assets.py``.
"""

from __future__ import annotations

import os

from torch import nn

ASSETS = os.path.dirname(os.path.abspath(__file__))
DIGITS = os.path.join(ASSETS, "digits.npz")
PRETRAINED = os.path.join(ASSETS, "digits_0to5_dp.pt")
PRETRAINED_CLASSES = tuple(range(6))  # digits the checkpoint was trained on
TRANSFER_CLASSES = tuple(range(6, 10))  # digits the demo fine-tunes on


class DigitsNet(nn.Module):
    """A small CNN for 1x8x8 digit images: three conv-BN-ReLU blocks and a Linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: object) -> object:
        return self.fc(self.features(x))
