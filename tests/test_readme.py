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


def fenced(language: str) -> list[str]:
    """The README's ```LANGUAGE blocks, in order."""
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def shell_commands() -> list[str]:
    """Every command of the ```sh blocks (continuation lines joined, `&&` split)."""
    commands = []
    for block in fenced("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            commands += [part.strip() for part in line.split("&&") if part.strip()]
    return commands


# What a README snippet leaves to the reader, made real: a training step (one SGD step
# on random images), and the objects the callback snippet hands to Lightning and to the
# Hugging Face Trainer (a tiny BERT and its arguments).
PRELUDES = {
    "train(model, optimizer)": (
        "import torch\n"
        "def train(model, optimizer):\n"
        "    model.train(); optimizer.zero_grad()\n"
        "    loss = model(torch.randn(2, 3, 64, 64)).logsumexp(1).mean()\n"
        "    loss.backward(); optimizer.step()\n"
    ),
    "Trainer(model=model": (
        "try:\n    import lightning.pytorch as pl\n"
        "except ImportError:\n    import pytorch_lightning as pl\n"
        "from transformers import BertConfig, BertForSequenceClassification, Trainer, "
        "TrainingArguments\n"
        "model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, "
        "num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))\n"
        "args = TrainingArguments(output_dir='hf', report_to=[], use_cpu=True)\n"
    ),
}


@pytest.mark.parametrize("snippet", fenced("python"), ids=lambda s: s.split("\n")[0][:50])
def test_readme_python_example_runs(workdir: Path, snippet: str) -> None:
    """Each ```python block runs as written (its own asserts included), with only what
    it leaves to the reader defined before it."""
    if "Trainer(" in snippet:
        pytest.importorskip("transformers")
    if not (workdir / "resnet18_5.safetensors").exists():  # the first snippet loads it
        _run_ckptool(workdir, "adapt", "resnet18_dp.pth", "--model", "torchvision:resnet18",
                     "--num-classes", "5", "--strip", "module.", "--drop", "fc.",
                     "-o", "resnet18_5.safetensors")  # fmt: skip
    prelude = "".join(code for marker, code in PRELUDES.items() if marker in snippet)
    done = subprocess.run(
        [sys.executable, "-c", prelude + snippet],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    if "guard.report()" in snippet:
        assert done.stdout.startswith("guard: ok: "), done.stdout  # a step ran, nothing moved


def test_readme_shell_commands_run_or_are_what_ci_runs(workdir: Path) -> None:
    """The README's install, test and demo commands are the ones .ci/run runs; the
    example-checkpoint script and the finetune command run here, on made-up images."""
    ci = (REPO / ".ci" / "run").read_text()
    commands = shell_commands()
    assert any(c.startswith("ckptool finetune") for c in commands)
    for command in commands:
        argv = shlex.split(command)
        if argv[0] == "pip":  # this checkout, with the test extra for the tests, as CI
            assert argv[1:3] == ["install", "-e"] and argv[3] in (".", ".[test]"), command
            assert "pip install -e '.[test]'" in ci
        elif argv[0] == "pytest" or argv[:2] == ["ckptool", "demo"]:
            assert " ".join(argv[:2]) in ci, command
        elif argv[0] == "python":
            out = workdir / "from_readme.pth"
            subprocess.run([sys.executable, *argv[1:-1], str(out)], cwd=REPO, check=True)
            assert out.stat().st_size > 40_000_000  # a whole ResNet-18
        else:
            _image_folder(workdir / "flowers", classes=3, per_class=5)
            done = _run_ckptool(workdir, *argv[1:])
            assert (workdir / "run1" / "report.json").exists(), done.stderr


def _run_ckptool(workdir: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "ckptool", *argv],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


def _image_folder(folder: Path, *, classes: int, per_class: int) -> None:
    """Small images, one sub-folder per class, each class a different colour."""
    from PIL import Image

    for c in range(classes):
        (folder / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            colour = (80 * c, 255 - 60 * c, 20 * i)
            Image.new("RGB", (32, 32), colour).save(folder / f"class{c}" / f"{i}.png")
