"""How many threads torch may use: the CPUs this process can actually run on.

torch sizes its intra-op pool from the machine's core count, which in a container or
under ``taskset`` is more than the process may use; the extra threads then fight for
the same cores (a fine-tune ran 3.4x faster with ``OMP_NUM_THREADS=1`` beside one busy
process). And OpenMP workers spin-wait between parallel regions, burning the cores
another process needs. So ckptool's long-running commands (finetune, check, demo) pick
the thread count from the affinity mask and the cgroup CPU quota, and ask OpenMP to
sleep rather than spin when other processes are running; ``--threads N`` overrides.
"""

from __future__ import annotations

import math
import os

CGROUP_V2_MAX = "/sys/fs/cgroup/cpu.max"
CGROUP_V1_QUOTA = "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"
CGROUP_V1_PERIOD = "/sys/fs/cgroup/cpu/cpu.cfs_period_us"


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        count = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def cgroup_cpu_quota() -> float | None:
    """CPUs' worth of time the cgroup grants per period (``2.5`` = 250%), or None."""
    v2 = _read(CGROUP_V2_MAX)
    if v2 is not None:
        parts = v2.split()  # "max 100000" (no limit; not a number) or "200000 100000"
        return _ratio(parts[0], parts[1]) if len(parts) == 2 else None
    quota, period = _read(CGROUP_V1_QUOTA), _read(CGROUP_V1_PERIOD)
    if quota is not None and period is not None:  # a quota of -1: unlimited
        return _ratio(quota, period)
    return None


def _ratio(quota: str, period: str) -> float | None:
    try:
        value, length = int(quota), int(period)
    except ValueError:
        return None
    return value / length if value > 0 and length > 0 else None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


PROC_STAT = "/proc/stat"


def prefer_sleeping_workers() -> None:
    """Ask OpenMP workers to sleep between parallel regions when other processes want
    the CPUs; let them spin (OpenMP's default, the fastest) when the machine is ours.

    Measured with the demo on 2 cores (docs/benchmarks.md): sleeping workers took it
    from 113 s to 44 s beside a busy process, but from 38 s to 59 s alone. So the
    choice follows what runs now: other runnable tasks at start-up mean sleep. It is
    read once, when the OpenMP runtime starts: call before torch is imported. A value
    the user set is kept."""
    if "OMP_WAIT_POLICY" not in os.environ and others_running() > 0:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def others_running() -> int:
    """Runnable tasks on the machine besides this one (``procs_running`` in /proc/stat);
    0 where that is unknown."""
    text = _read(PROC_STAT) or ""
    for line in text.splitlines():
        if line.startswith("procs_running "):
            return max(0, int(line.split()[1]) - 1)
    return 0


def configure_threads(requested: int | None = None) -> int:
    """Set torch's intra-op threads to ``requested`` or, by default, the CPUs available
    shared among the processes torchrun started on this machine; return the count."""
    import torch

    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    count = requested if requested is not None else max(1, available_cpus() // local_processes)
    torch.set_num_threads(count)
    return count
