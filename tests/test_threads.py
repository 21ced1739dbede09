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
