"""Progress on a terminal, silence elsewhere: the CLI run as a subprocess with its
stderr on a pseudo-terminal, as a user at a shell sees it, and with stderr piped."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_finetune import make_images, setup  # noqa: F401  (a fixture)

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


def _run(args: list[str | Path], *, stderr_tty: bool) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``ckptool ARGS``; stdout is always a pipe."""
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "160"}
    env.pop("NO_COLOR", None)
    command = [sys.executable, "-m", "ckptool", *map(str, args)]
    if not stderr_tty:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        return done.returncode, done.stdout, done.stderr
    leader, follower = pty.openpty()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=follower, env=env)
    os.close(follower)
    seen = _read_terminal(leader)
    assert child.stdout is not None
    stdout = child.stdout.read().decode()
    return child.wait(timeout=300), stdout, ANSI.sub("\n", seen)


def _read_terminal(leader: int) -> str:
    """Everything the child wrote to the terminal, until it closes it."""
    seen = bytearray()
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    return seen.decode(errors="replace")


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "source.safetensors"
    save_file({f"layer{i}.weight": torch.randn(512, 512) for i in range(8)}, path)
    return path


def test_convert_shows_phases_and_bytes_on_a_terminal(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.pt"
    code, stdout, stderr = _run(["convert", source, "-o", out], stderr_tty=True)
    assert code == 0, stderr
    assert "write out.pt" in stderr and "verify and sync to disk" in stderr, stderr
    assert "8.0/8.0 MiB" in stderr, stderr  # bytes done / total, at the end of the write
    # A phase that moves no counted bytes shows none (it showed the write's 0.0/8.0 MiB).
    # (Escape codes split each drawn line into pieces: rejoin them, cut at each redraw.)
    drawn = re.split(r"\d:\d\d:\d\d", stderr.replace("\n", ""))
    verify = [part for part in drawn if "verify and sync to disk" in part]
    assert verify and not any("MiB" in part or "bytes" in part for part in verify), verify
    assert f"wrote {out}" in stdout, stdout  # the report, on stdout
    assert "write out.pt" not in stdout and "\x1b" not in stdout  # no bar in the report


@pytest.mark.parametrize("flags", [["--json"], []])
def test_convert_is_silent_on_stderr_with_json_or_piped(
    source: Path, tmp_path: Path, flags: list[str]
) -> None:
    out = tmp_path / "out.safetensors"
    # --json on a terminal; without it, stderr piped.
    code, stdout, stderr = _run(["convert", source, "-o", out, *flags], stderr_tty=bool(flags))
    assert code == 0 and stderr.strip() == "", stderr
    assert stdout.strip(), "the result is still printed"


def test_adapt_names_its_phases(tmp_path: Path) -> None:
    from torchvision.models import resnet18

    weights = tmp_path / "r18.safetensors"
    save_file({f"module.{k}": v for k, v in resnet18(num_classes=10).state_dict().items()}, weights)
    out = tmp_path / "a.safetensors"
    args = ["adapt", weights, "--model", "torchvision:resnet18", "--num-classes", "10"]
    code, _, stderr = _run([*args, "--strip", "module.", "-o", out], stderr_tty=True)
    assert code == 0, stderr
    for phase in ("build the model", "plan the keys", "write a.safetensors"):
        assert phase in stderr, (phase, stderr)


def test_finetune_shows_the_data_and_a_bar_with_images_per_second(
    setup: dict[str, Path],  # noqa: F811
) -> None:
    args = [
        "finetune", "--model", f"{setup['model']}:Tiny", "--data", setup["data"],
        "-o", setup["out"], "--weights", setup["weights"], "--strip", "module.",
        "--drop", "fc.", "--image-size", "16", "--batch-size", "8", "--epochs", "2",
    ]  # fmt: skip
    code, stdout, stderr = _run(args, stderr_tty=True)
    assert code == 0, stderr
    assert "read the data" in stderr and "build the model and adapt the weights" in stderr
    assert re.search(r"data: 3 classes, 24 images \(train \d+, val \d+\)", stderr), stderr
    assert "epoch 1/2" in stderr and re.search(r"\b\d+ img/s", stderr), stderr
    assert "epoch 1:" in stderr and "epoch 2:" in stderr  # a line as each epoch ends
    assert "epoch 1:" not in stdout and "train loss" in stdout  # the report: the table
    piped = _run([*args, "--force"], stderr_tty=False)
    assert piped[0] == 0 and piped[2].strip() == "", piped[2]


def test_no_color_on_a_terminal_means_no_styling(source: Path) -> None:
    """NO_COLOR: tables keep their layout but lose bold and colour (headers included)."""
    leader, follower = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "NO_COLOR": "1", "COLUMNS": "160"}
    command = [sys.executable, "-m", "ckptool", "inspect", str(source)]
    child = subprocess.Popen(command, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    text = _read_terminal(leader)
    assert child.wait(timeout=60) == 0
    assert "layer0.weight" in text or "layer{0..7}" in text, text
    assert "\x1b[1m" not in text and "\x1b[3" not in text, repr(text[:400])
