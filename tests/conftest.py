"""Tiny models and a factory that writes real checkpoint files into tmp_path."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir
from torch import nn

from ckptool.cli import cli

REPO = Path(__file__).resolve().parent.parent

# Tests must not write into the working tree: no example database, and hypothesis's
# other caches (.hypothesis/constants) go to a temp directory.
HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="ckptool-hypothesis-")
set_hypothesis_home_dir(HYPOTHESIS_HOME)
atexit.register(shutil.rmtree, HYPOTHESIS_HOME, ignore_errors=True)  # else one left per run
# derandomize: CI sees the same examples on every run; a new failure is a new bug, not a draw.
settings.register_profile("ckptool", database=None, derandomize=True)
settings.load_profile("ckptool")


class MLP(nn.Module):
    """A 2-layer MLP with a classifier head named ``head``."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Linear(8, 16)
        self.head = nn.Linear(16, num_classes)


class ConvBN(nn.Module):
    """A CNN with BatchNorm (buffers) and an ``fc`` head."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)


class Tied(nn.Module):
    """An embedding tied to the output projection."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.out = nn.Linear(6, 10, bias=False)
        self.out.weight = self.embed.weight


class TiedLM(nn.Module):
    """An LM's embedding and output head as one tensor (torch.save stores it once), with
    a layer of its own between them; ``tied=False`` for the same names untied."""

    def __init__(self, tied: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.body = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 12, bias=False)
        if tied:
            self.lm_head.weight = self.emb.weight


class SmallNet(nn.Module):
    """A CNN with BatchNorm in the backbone and a Linear head: the transfer-learning shape."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def seeded_state(model_cls: type[nn.Module], **kwargs: Any) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return model_cls(**kwargs).state_dict()


def wrap(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


WriteCheckpoint = Callable[..., Path]


@pytest.fixture
def write_checkpoint(tmp_path: Path) -> WriteCheckpoint:
    """write_checkpoint(obj, name) -> path; the format follows the suffix (.safetensors,
    .legacy.pt for pre-1.6 torch.save, anything else torch.save zip)."""

    def write(obj: Any, name: str) -> Path:
        path = tmp_path / name
        if name.endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
        elif name.endswith(".legacy.pt"):
            torch.save(obj, path, _use_new_zipfile_serialization=False)
        else:
            torch.save(obj, path)
        return path

    return write


@pytest.fixture
def run_cli() -> Callable[..., Result]:
    """Invoke the click CLI as a user would, plain text, 100 columns."""
    runner = CliRunner()

    def run(*args: str | os.PathLike[str]) -> Result:
        env = {"NO_COLOR": "1", "COLUMNS": "100"}
        return runner.invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False)

    return run


def plain_load(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint as plain torch/safetensors read it, without ckptool."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, weights_only=True)  # type: ignore[no-any-return]


def torch_accepts(model: nn.Module, state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``model.load_state_dict(state, strict=True)`` succeeds: torch's verdict."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        return False
    return True
