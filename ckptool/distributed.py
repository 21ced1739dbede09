"""torchrun support: one process per device, DistributedDataParallel, agreed verdicts.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; without them everything here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class DistContext:
    """This process's place in a distributed run (a single process by default)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment(device_type: str) -> DistContext:
    """Join the process group torchrun prepared: nccl on CUDA, gloo on the CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def any_rank(flag: bool, context: DistContext) -> bool:
    """True on every rank if ``flag`` is true on any: one tiny all-reduce."""
    if not context.active:
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([1 if flag else 0], dtype=torch.int64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def sum_across(values: Sequence[float], context: DistContext) -> list[float]:
    """Element-wise sums over all ranks (loss, correct, seen)."""
    if not context.active:
        return list(values)
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(list(values), dtype=torch.float64)
    dist.all_reduce(tensor)
    return [float(v) for v in tensor.tolist()]


def barrier(context: DistContext) -> None:
    if context.active:
        import torch.distributed as dist

        dist.barrier()


def shutdown(context: DistContext) -> None:
    if context.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
