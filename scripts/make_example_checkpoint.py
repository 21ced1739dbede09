"""Write the classic transfer-learning input: a DataParallel ResNet-18 training checkpoint.

Keys carry DataParallel's ``module.`` prefix, the head has 1000 ImageNet classes, and the
state dict sits inside ``{'state_dict', 'optimizer', 'epoch', 'arch'}`` like the ImageNet
example's checkpoints. Weights are randomly initialised (no download), seeded.

    python scripts/make_example_checkpoint.py OUT.pth
"""

from __future__ import annotations

import argparse
import sys

import torch
import torchvision


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", help="where to write the .pth file")
    out = parser.parse_args().out
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    wrapped = torch.nn.DataParallel(model)  # the source of every 'module.' prefix
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
    torch.save(
        {
            "epoch": 90,
            "arch": "resnet18",
            "state_dict": wrapped.state_dict(),
            "best_acc1": 69.76,
            "optimizer": optimizer.state_dict(),
        },
        out,
    )
    print(f"wrote {out}: DataParallel resnet18, 1000 classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
