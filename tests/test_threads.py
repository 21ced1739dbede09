"""Threads from the CPUs a process may actually use: affinity and cgroup quota."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ckptool import threads


@pytest.fixture
def cgroup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the cgroup files at a temporary folder (none exist until a test writes them)."""
    monkeypatch.setattr(threads, "CGROUP_V2_MAX", str(tmp_path / "cpu.max"))
    monkeypatch.setattr(threads, "CGROUP_V1_QUOTA", str(tmp_path / "cfs_quota_us"))
    monkeypatch.setattr(threads, "CGROUP_V1_PERIOD", str(tmp_path / "cfs_period_us"))
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(8)))
    return tmp_path


def test_affinity_without_a_quota(cgroup: Path) -> None:
    assert threads.available_cpus() == 8
    (cgroup / "cpu.max").write_text("max 100000\n")
    assert threads.available_cpus() == 8


@pytest.mark.parametrize(
    ("content", "cpus"), [("200000 100000", 2), ("150000 100000", 2), ("50000 100000", 1)]
)
def test_cgroup_v2_quota_caps_the_affinity(cgroup: Path, content: str, cpus: int) -> None:
    (cgroup / "cpu.max").write_text(content)
    assert threads.available_cpus() == cpus


def test_cgroup_v1_quota(cgroup: Path) -> None:
    (cgroup / "cfs_quota_us").write_text("300000")
    (cgroup / "cfs_period_us").write_text("100000")
    assert threads.available_cpus() == 3
    (cgroup / "cfs_quota_us").write_text("-1")  # unlimited
    assert threads.available_cpus() == 8


def test_torchrun_processes_share_the_cpus(cgroup: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
        assert threads.configure_threads() == 2 and torch.get_num_threads() == 2
        assert threads.configure_threads(3) == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_threads_flag_reaches_torch(run_cli, tmp_path: Path) -> None:
    """``check --threads 1`` runs with one torch thread (and says nothing about it)."""
    import torchvision

    before = torch.get_num_threads()
    checkpoint = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=3).state_dict(), checkpoint)
    try:
        result = run_cli(
            "check", checkpoint, "--model", "torchvision:resnet18", "--num-classes", "3",
            "--threads", "1",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 1
        bad = run_cli("check", checkpoint, "--model", "torchvision:resnet18", "--threads", "0")
        assert bad.exit_code == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("running", "policy"), [("1", None), ("2", "PASSIVE"), ("5", "PASSIVE"), (None, None)]
)
def test_workers_sleep_only_when_others_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, running: str | None, policy: str | None
) -> None:
    """procs_running counts this process too: 1 means the machine is ours (spin, the
    faster), more means another process wants the cores (sleep). No /proc: spin."""
    stat = tmp_path / "stat"
    if running is not None:
        stat.write_text(f"cpu  1 2 3 4\nprocs_running {running}\nprocs_blocked 0\n")
    monkeypatch.setattr(threads, "PROC_STAT", str(stat))
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    threads.prefer_sleeping_workers()
    assert threads.os.environ.get("OMP_WAIT_POLICY") == policy


def test_a_wait_policy_the_user_set_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stat = tmp_path / "stat"
    stat.write_text("procs_running 4\n")
    monkeypatch.setattr(threads, "PROC_STAT", str(stat))
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    threads.prefer_sleeping_workers()
    assert threads.os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_a_real_busy_process_makes_workers_sleep() -> None:
    import subprocess
    import sys

    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        code = (
            "import os; from ckptool.threads import prefer_sleeping_workers; "
            "prefer_sleeping_workers(); print(os.environ.get('OMP_WAIT_POLICY'))"
        )
        env = {k: v for k, v in threads.os.environ.items() if k != "OMP_WAIT_POLICY"}
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
        )
    finally:
        hog.kill()
        hog.wait()
    assert done.stdout.strip() == "PASSIVE", done.stderr
