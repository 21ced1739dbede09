"""Benchmark: FreezeGuard overhead per optimizer step, guarded vs unguarded in one process.

ResNet-18 and ResNet-50 (torchvision, weights=None, 10 classes), SGD with momentum and weight decay,
synthetic 224x224 batches. For each strategy, blocks of unguarded and guarded steps
alternate on the same model, so drift hits both alike; per-step medians and the
overhead ratio are printed. The guard checks every step.

    python scripts/bench_guard.py [--device cpu|cuda] [--models resnet18,resnet50]
                                  [--batch 16] [--steps 8] [--rounds 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torchvision
from torch import nn

import ckptool


def timed_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(batch), labels).backward()
        optimizer.step()
        if batch.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def measure(
    architecture: str, strategy: str, args: argparse.Namespace
) -> tuple[float, float, int, float]:
    torch.manual_seed(0)
    build = getattr(torchvision.models, architecture)
    model = build(weights=None, num_classes=10).to(args.device)
    ckptool.freeze(
        model, strategy=strategy, freeze_until="layer3" if strategy == "partial" else None
    )
    model.train()
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9, weight_decay=1e-4
    )
    batch = torch.randn(args.batch, 3, 224, 224, device=args.device)
    labels = torch.randint(0, 10, (args.batch,), device=args.device)
    timed_steps(model, optimizer, batch, labels, 2)  # warm-up
    plain: list[float] = []
    guarded: list[float] = []
    watched = 0
    for _ in range(args.rounds):
        plain += timed_steps(model, optimizer, batch, labels, args.steps)
        with ckptool.FreezeGuard(model, optimizer) as guard:
            guarded += timed_steps(model, optimizer, batch, labels, args.steps)
        watched = guard.report().elements_watched
    return statistics.median(plain), statistics.median(guarded), watched, check_cost(model)


def check_cost(model: nn.Module) -> float:
    """Median seconds to fingerprint every frozen tensor once: the guard's work per step."""
    from ckptool.guard import fingerprint

    frozen = [p for p in model.parameters() if not p.requires_grad]
    frozen += [
        b
        for m in model.modules()
        for b in m.buffers(recurse=False)
        if list(m.parameters(recurse=False))
        and not any(p.requires_grad for p in m.parameters(recurse=False))
    ]
    costs = []
    for _ in range(20):
        start = time.perf_counter()
        prints = torch.stack([fingerprint(t) for t in frozen])
        bool(prints.any())  # the one host sync per step
        costs.append(time.perf_counter() - start)
    return statistics.median(costs)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    print(
        f"batch {args.batch}x3x224x224 on {args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; medians of {args.steps * args.rounds} steps each"
    )
    print(
        "| model | strategy | frozen values watched | step unguarded (ms) | step guarded (ms) "
        "| overhead | one check (ms) | check / step |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for architecture in args.models.split(","):
        for strategy in ("partial", "linear"):
            plain, guarded, watched, check = measure(architecture, strategy, args)
            overhead = 100 * (guarded / plain - 1)
            print(
                f"| {architecture} | {strategy} | {watched:,} | {plain * 1000:.1f} "
                f"| {guarded * 1000:.1f} | {overhead:+.2f}% | {check * 1000:.2f} "
                f"| {100 * check / plain:.2f}% |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
