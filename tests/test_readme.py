"""The README's command examples, run: each ```text block that shows `$ ckptool ...`
is executed as a user would (a subprocess, piped, in a scratch folder) and every line
the README shows under the command must appear in the output, in order ("..." marks
lines the README leaves out). A README that drifts from the tool fails here."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

README = REPO / "README.md"
EXAMPLE = "/tmp/resnet18_dp.pth"  # the README's path; rewritten to a scratch copy


def blocks() -> list[tuple[str, list[str]]]:
    """(command, lines shown) for every `$ ckptool` in a ```text block, in README order."""
    found: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```text\n(.*?)```", README.read_text(), flags=re.S):
        for chunk in re.split(r"^\$ ", block, flags=re.M)[1:]:
            command, *shown = chunk.rstrip("\n").split("\n")
            if command.startswith("ckptool "):
                found.append((command, [line for line in shown if line.strip()]))
    return found


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("readme")
    script = REPO / "scripts" / "make_example_checkpoint.py"
    subprocess.run([sys.executable, str(script), str(work / "resnet18_dp.pth")], check=True)
    return work


def _shown_in_order(shown: list[str], output: str) -> str | None:
    """The first shown line missing from the output (in order), or None."""
    lines = [line.rstrip() for line in output.splitlines()]
    position = 0
    for expected in shown:
        if expected.strip() == "...":
            continue
        want = expected.rstrip()
        while position < len(lines) and lines[position] != want:
            position += 1
        if position == len(lines):
            return want
        position += 1
    return None


def test_the_readme_has_examples_to_run() -> None:
    commands = [c for c, _ in blocks()]
    assert len(commands) >= 5 and any(c.startswith("ckptool adapt") for c in commands)


@pytest.mark.parametrize(("command", "shown"), blocks(), ids=[c[:60] for c, _ in blocks()])
def test_readme_example(workdir: Path, command: str, shown: list[str]) -> None:
    example = str(workdir / "resnet18_dp.pth")
    argv = shlex.split(command.replace(EXAMPLE, example))
    if argv[1] == "merge-lora" and not (workdir / "adapter").exists():
        _lora_pair(workdir)
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "NO_COLOR")}
    done = subprocess.run(
        [sys.executable, "-m", "ckptool", *argv[1:]],
        cwd=workdir,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    output = (done.stdout + done.stderr).replace(example, EXAMPLE)
    missing = _shown_in_order(shown, output)
    assert missing is None, f"README shows {missing!r}; the command printed:\n{output}"


def _lora_pair(folder: Path) -> None:
    """The merge-lora example's base.pt and adapter/: a small model, LoRA (r=4,
    alpha=8) on four of its modules and its head saved whole, made by peft itself."""
    peft = pytest.importorskip("peft")
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(12, 8)
            self.q = nn.Linear(8, 8)
            self.v = nn.Linear(8, 16)
            self.conv = nn.Conv2d(3, 4, 3)
            self.head = nn.Linear(16, 2)

    torch.manual_seed(0)
    base = Net()
    torch.save(base.state_dict(), folder / "base.pt")
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        init_lora_weights=False,
        target_modules=["q", "v", "conv", "emb"],
        modules_to_save=["head"],
    )
    peft.get_peft_model(base, config).save_pretrained(folder / "adapter")
