"""The fine-tune runner end to end on tiny generated image folders and list files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WriteCheckpoint, wrap
from PIL import Image

import ckptool

COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
MODEL_FILE = '''
from torch import nn

class Tiny(nn.Module):
    """conv-bn-relu backbone and a Linear head: small enough for CPU tests."""

    def __init__(self, num_classes=10, channels=3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


class Sabotage(Tiny):
    """Writes a frozen weight during forward, bypassing autograd: the guard must stop it."""

    def forward(self, x):
        self.features[0].weight.data.mul_(1.01)
        return super().forward(x)


class SabotageOnRank1(Tiny):
    """The same write on the second rank only: the first must stop too."""

    def forward(self, x):
        import os

        if os.environ.get("RANK") == "1":
            self.features[0].weight.data.mul_(1.01)
        return super().forward(x)
'''


def make_images(folder: Path, per_class: int = 8, size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for label, color in enumerate(COLORS):
        (folder / f"c{label}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = (
                (rng.normal(0, 20, (size, size, 3)) + np.array(color)).clip(0, 255).astype("uint8")
            )
            Image.fromarray(pixels).save(folder / f"c{label}" / f"{i}.png")
    return folder


@pytest.fixture
def setup(tmp_path: Path, write_checkpoint: WriteCheckpoint) -> dict[str, Path]:
    model_file = tmp_path / "tiny.py"
    model_file.write_text(MODEL_FILE)
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(MODEL_FILE, str(model_file), "exec"), namespace)
    pretrained = namespace["Tiny"](num_classes=10).state_dict()
    return {
        "model": model_file,
        "data": make_images(tmp_path / "data"),
        "weights": write_checkpoint(wrap(pretrained, "module."), "pretrained.pth"),
        "out": tmp_path / "run",
    }


def run_finetune(run_cli, setup: dict[str, Path], *extra: str):
    return run_cli(
        "finetune",
        "--model",
        f"{setup['model']}:Tiny",
        "--data",
        setup["data"],
        "-o",
        setup["out"],
        "--weights",
        setup["weights"],
        "--strip",
        "module.",
        "--drop",
        "fc.",
        "--image-size",
        "16",
        "--batch-size",
        "8",
        "--epochs",
        "3",
        *extra,
    )


@pytest.mark.parametrize("strategy", ["linear", "partial"])
def test_frozen_tensors_in_the_output_are_the_inputs_bits(
    run_cli, setup: dict[str, Path], strategy: str
) -> None:
    result = run_finetune(run_cli, setup, "--strategy", strategy, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert (
        report["guard"]["verdict"] == "ok" and report["guard"]["steps_checked"] == 3 * 2
    )  # 15 train images / 8
    assert report["frozen_unchanged"] and report["classes"] == ["c0", "c1", "c2"]
    # report.json carries the guard's and the freeze's whole documents, as --json has them
    assert json.loads((setup["out"] / "report.json").read_text())["guard"] == report["guard"]
    assert report["guard"]["violations"] == [] and report["guard"]["elements_watched"] > 0
    modules = report["parameters"]["modules"]
    assert report["parameters"]["frozen"] == sum(m["frozen"] for m in modules) > 0
    assert {m["status"] for m in modules} <= {"trainable", "frozen", "mixed", "-"}
    out = ckptool.load_state_dict(setup["out"] / "model.safetensors")
    source = {
        k.removeprefix("module."): v
        for k, v in torch.load(setup["weights"], weights_only=True).items()
    }
    frozen = ["features.0.weight", "features.1.running_mean", "features.1.num_batches_tracked"]
    if strategy == "linear":
        frozen += ["features.3.weight", "features.4.running_var"]
    assert all(torch.equal(out[name], source[name]) for name in frozen)
    assert out["fc.weight"].shape == (3, 8)
    moved = {c["name"] for c in report["changes"] if c["changed"]}
    assert moved == ({"fc"} if strategy == "linear" else {"features", "fc"})
    assert (
        json.loads((setup["out"] / "report.json").read_text())["best_epoch"] == report["best_epoch"]
    )


def test_linear_without_augmentation_caches_features(run_cli, setup: dict[str, Path]) -> None:
    cached = json.loads(run_finetune(run_cli, setup, "--no-augment", "--json").stdout)
    assert cached["cached_features"] is True
    uncached = json.loads(run_finetune(run_cli, setup, "--force", "--json").stdout)
    assert uncached["cached_features"] is False


def test_list_files_and_val_data(run_cli, setup: dict[str, Path], tmp_path: Path) -> None:
    lines = [f"data/c{label}/{i}.png\t{label}" for label in range(3) for i in range(8)]
    (tmp_path / "train.txt").write_text("\n".join(lines[::2]) + "\n")
    (tmp_path / "test.txt").write_text("\n".join(lines[1::2]) + "\n")
    result = run_cli(
        "finetune",
        "--model",
        f"{setup['model']}:Tiny",
        "--data",
        tmp_path / "train.txt",
        "--val-data",
        tmp_path / "test.txt",
        "-o",
        setup["out"],
        "--image-size",
        "16",
        "--epochs",
        "2",
        "--strategy",
        "full",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["classes"] == ["0", "1", "2"] and report["config"]["num_classes"] == 3
    assert all(m["val_acc"] is not None for m in report["epochs"])


def test_human_output_shows_curves_guard_and_what_moved(run_cli, setup: dict[str, Path]) -> None:
    result = run_finetune(run_cli, setup)
    assert result.exit_code == 0, result.stderr
    assert "train loss " in result.stdout and "val acc" in result.stdout  # the epoch table
    # Piped, each epoch is told once: in the final table, not also as a live line.
    assert "epoch 3: train loss" not in result.output
    assert "img/s" in result.stdout
    assert "guard: ok: " in result.stdout and "  moved      fc" in result.stdout
    assert "frozen tensors bit-identical; wrote" in result.stdout


def test_guard_violation_stops_the_run_and_writes_nothing(run_cli, setup: dict[str, Path]) -> None:
    result = run_cli(
        "finetune",
        "--model",
        f"{setup['model']}:Sabotage",
        "--data",
        setup["data"],
        "-o",
        setup["out"],
        "--image-size",
        "16",
        "--epochs",
        "1",
    )
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[0].startswith("guard: VIOLATED: ") and lines[-1].startswith(
        "ckptool: error: frozen tensors changed"
    )
    assert any("changed parameter features.0.weight at step 1" in line for line in lines)
    assert "write that bypassed autograd" in lines[-1]
    assert not setup["out"].exists()


def missing_folder(data: Path) -> Path:
    return data / "nope"


def empty_class(data: Path) -> Path:
    (data / "c3").mkdir()
    return data


def corrupt_image(data: Path) -> Path:
    (data / "c0" / "0.png").write_bytes(b"not a png")
    return data


@pytest.mark.parametrize(
    ("break_data", "code", "message"),
    [
        (missing_folder, 2, "no such data folder"),
        (empty_class, 2, "class 'c3' has no images"),
        (corrupt_image, 3, "not a readable image"),
    ],
    ids=["missing-folder", "empty-class", "corrupt-image"],
)
def test_bad_data_is_one_line_and_nothing_written(
    run_cli, setup: dict[str, Path], break_data, code: int, message: str
) -> None:
    data = break_data(setup["data"])
    result = run_cli(
        "finetune", "--model", f"{setup['model']}:Tiny", "--data", data, "-o", setup["out"]
    )
    assert (
        result.exit_code == code
        and message in result.stderr
        and len(result.stderr.splitlines()) == 1
    )
    assert not setup["out"].exists()


def test_previous_outputs_need_force(run_cli, setup: dict[str, Path]) -> None:
    assert run_finetune(run_cli, setup, "--epochs", "1").exit_code == 0
    again = run_finetune(run_cli, setup, "--epochs", "1")
    assert again.exit_code == 5 and "add --force" in again.stderr


def torchrun(*args: str | Path, cwd: Path):
    import subprocess
    import sys

    # torchrun of this interpreter, running ckptool as a module of it (not a PATH lookup).
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "ckptool",
        "finetune",
        *map(str, args),
    ]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_torchrun_two_cpu_processes(setup: dict[str, Path], tmp_path: Path) -> None:
    common = ("--data", setup["data"], "--image-size", "16", "--batch-size", "4", "--epochs", "2")
    done = torchrun(
        "--model",
        f"{setup['model']}:Tiny",
        "--strategy",
        "partial",
        *common,
        "-o",
        setup["out"],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((setup["out"] / "report.json").read_text())
    # 15 training images, 2 ranks x 4 per batch: 2 steps per epoch on every rank
    assert report["guard"]["verdict"] == "ok" and report["guard"]["steps_checked"] == 4
    assert report["frozen_unchanged"] and not report["cached_features"]
    assert done.stdout.count("best epoch") == 1  # rank 0 alone reports
    broken = torchrun(
        "--model", f"{setup['model']}:Sabotage", *common, "-o", tmp_path / "never", cwd=tmp_path
    )
    assert broken.returncode != 0
    assert (
        broken.stderr.count("frozen tensors changed at optimizer step 1") == 2
    )  # both ranks agree
    assert not (tmp_path / "never").exists()
    one_rank = torchrun(
        "--model", f"{setup['model']}:SabotageOnRank1", *common, "-o", tmp_path / "never",
        cwd=tmp_path,
    )  # fmt: skip
    assert one_rank.returncode != 0
    assert one_rank.stderr.count("frozen tensors changed at optimizer step 1") == 1
    assert "a frozen tensor changed on another rank" in one_rank.stderr
    assert not (tmp_path / "never").exists()
    # DDP: the ranks' losses differ, so they stop together at the end of an epoch
    diverged = torchrun(
        "--model", f"{setup['model']}:Tiny", "--strategy", "full", "--lr", "1e12", *common,
        "-o", tmp_path / "diverged", cwd=tmp_path,
    )  # fmt: skip
    assert diverged.returncode != 0
    assert diverged.stderr.count("training diverged after epoch ") == 2, diverged.stderr[-2000:]
    assert not (tmp_path / "diverged").exists()


def test_amp_on_cpu_uses_bf16_and_keeps_frozen_bits(run_cli, setup: dict[str, Path]) -> None:
    result = run_finetune(run_cli, setup, "--amp", "--strategy", "partial", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert (
        report["config"]["amp"]
        and report["guard"]["verdict"] == "ok"
        and report["frozen_unchanged"]
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_finetune_on_cuda_with_fp16_amp(run_cli, setup: dict[str, Path]) -> None:
    result = run_finetune(
        run_cli, setup, "--device", "cuda", "--amp", "--strategy", "partial", "--json"
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["guard"]["verdict"] == "ok"


def test_full_disk_while_writing_leaves_no_outdir(
    run_cli, setup: dict[str, Path], monkeypatch
) -> None:
    import errno

    from ckptool.formats import write

    def disk_full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(write, "_write", disk_full)
    result = run_finetune(run_cli, setup)
    assert result.exit_code == 5 and "no space left" in result.stderr, result.stderr
    assert not setup["out"].exists()


@pytest.mark.parametrize("count", ["2", "5"])
def test_num_classes_that_disagree_with_the_data_are_refused(
    run_cli, setup: dict[str, Path], count: str
) -> None:
    """Fewer ended in an IndexError on the first unscorable label; more went unnoticed."""
    result = run_finetune(run_cli, setup, "--num-classes", count)
    assert result.exit_code == 2, result.output
    assert f"--num-classes {count}, but" in result.stderr and "has 3 classes" in result.stderr
    assert not setup["out"].exists()
    assert run_finetune(run_cli, setup, "--num-classes", "3", "--epochs", "1").exit_code == 0


def test_report_json_says_what_ran(run_cli, setup: dict[str, Path]) -> None:
    """The default strategy by name, the device "auto" became, the feature cache as
    asked (config) apart from as it ran (top level); provenance enough to rebuild."""
    from safetensors import safe_open

    result = run_finetune(run_cli, setup, "--epochs", "1", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    config = report["config"]
    assert config["strategy"] == "linear" and config["device"] == "cpu"
    assert "cache_features" not in config and config["feature_cache_allowed"] is True
    assert isinstance(report["cached_features"], bool)
    with safe_open(setup["out"] / "model.safetensors", "pt") as f:
        metadata = f.metadata()
    assert metadata["ckptool.num_classes"] == "3" and metadata["ckptool.model_args"] == "[]"


def test_a_split_that_leaves_too_few_training_images_says_so(
    run_cli, setup: dict[str, Path]
) -> None:
    result = run_finetune(run_cli, setup, "--val-split", "0.9", "--epochs", "1")
    assert result.exit_code == 0, result.stderr
    warning = [line for line in result.stderr.splitlines() if line.startswith("ckptool: warning")]
    assert len(warning) == 1 and "only 3 training images (21 held out" in warning[0], warning
    assert "lower --val-split" in warning[0]
    quiet = run_finetune(run_cli, setup, "--epochs", "1", "--force")
    assert "warning" not in quiet.stderr


def test_the_api_warns_about_thin_data(setup: dict[str, Path]) -> None:
    from ckptool.finetune import TrainOptions, finetune

    options = TrainOptions(epochs=1, image_size=16, batch_size=8, val_split=0.9)
    with pytest.warns(UserWarning, match="only 3 training images"):
        finetune(f"{setup['model']}:Tiny", str(setup["data"]), str(setup["out"]), options=options)


def test_a_diverged_run_stops_and_writes_nothing(run_cli, setup: dict[str, Path]) -> None:
    """A step's loss overflows first, and the run stops there (under DDP the ranks check
    at the end of the epoch instead: test_torchrun_two_cpu_processes)."""
    result = run_finetune(run_cli, setup, "--strategy", "full", "--lr", "1e12")
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("ckptool: error: training diverged after a step of loss")
    assert "hold NaN or infinite values" in result.stderr and "(it is 1e+12)" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert not setup["out"].exists()


@pytest.mark.parametrize(("optimizer", "lr"), [("sgd", "1e39"), ("adamw", "1e38")])
def test_a_learning_rate_that_overflows_float32_is_divergence_not_a_crash(
    run_cli, setup: dict[str, Path], optimizer: str, lr: str
) -> None:
    """SGD steps by -lr, AdamW by lr / (1 - beta1): past float32's largest value torch
    raises inside the step (it was reported as an internal error)."""
    result = run_finetune(run_cli, setup, "--optimizer", optimizer, "--lr", lr)
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("ckptool: error: training diverged: an optimizer step")
    assert f"lower --lr (it is {float(lr):g})" in result.stderr
    assert len(result.stderr.splitlines()) == 1 and not setup["out"].exists()


def test_starting_weights_with_nan_are_refused_before_training(
    run_cli, setup: dict[str, Path]
) -> None:
    """Else every loss is NaN and the run stops as 'diverged', blaming the learning rate."""
    state = torch.load(setup["weights"], weights_only=True)
    state["module.features.3.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, setup["weights"])
    result = run_finetune(run_cli, setup)
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"ckptool: error: {setup['weights']}: the starting weights")
    assert "NaN or infinite values (features.3.weight)" in result.stderr
    assert "--lr" not in result.stderr and not setup["out"].exists()


@pytest.mark.parametrize("lr", ["nan", "inf", "0", "-1"])
def test_a_learning_rate_that_is_not_a_positive_number_is_refused(
    run_cli, setup: dict[str, Path], lr: str
) -> None:
    result = run_finetune(run_cli, setup, "--lr", lr)
    assert result.exit_code == 2 and "--lr positive and finite" in result.stderr
    assert not setup["out"].exists()


def test_sparklines_show_values_that_are_not_finite() -> None:
    from ckptool.report import sparkline

    assert sparkline([1.0, float("inf"), 0.0, float("nan")]) == "█?▁?"
    assert sparkline([float("nan")]) == "?"


def _list_file(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def _train_list(tmp_path: Path) -> Path:
    return _list_file(
        tmp_path / "train.txt",
        [f"data/c{label}/{i}.png\t{label}" for label in range(3) for i in range(8)],
    )


def _two_class_folder(tmp_path: Path) -> Path:
    folder = make_images(tmp_path / "val")
    for image in (folder / "c2").iterdir():
        image.unlink()
    (folder / "c2").rmdir()
    return folder


# Each: what replaces the default arguments, the exit code and the one line that says why.
REFUSED_BEFORE_TRAINING = {
    "val-split-of-one": (lambda t: {"--val-split": "1"}, 2, "--val-split 1.0 must be in [0, 1)"),
    "no-class-folders": (
        lambda t: {"--data": (t / "flat").mkdir() or t / "flat"},
        2,
        "no class sub-folders",
    ),
    "list-line-of-three": (
        lambda t: {"--data": _list_file(t / "l.txt", ["a.png 0 extra"])},
        2,
        "l.txt:1: expected 'path<TAB>label'",
    ),
    "empty-list": (lambda t: {"--data": _list_file(t / "l.txt", [])}, 2, "has no samples"),
    "val-label-unknown": (
        lambda t: {
            "--data": _train_list(t),
            "--val-data": _list_file(t / "v.txt", ["data/c0/0.png\t7"]),
        },
        2,
        "label '7' is not one of the classes",
    ),
    "val-classes-differ": (
        lambda t: {"--val-data": _two_class_folder(t)},
        2,
        "differ from",
    ),
    "scratch-with-weights": (
        lambda t: {"--strategy": "scratch"},
        2,
        "--strategy scratch re-initialises every weight",
    ),
    "output-is-a-file": (
        lambda t: {"-o": (t / "a-file").write_text("x") and t / "a-file"},
        5,
        "is a file; -o names an output directory",
    ),
    "output-parent-missing": (lambda t: {"-o": t / "no" / "run"}, 5, "does not exist"),
    "unknown-device": (lambda t: {"--device": "tpu"}, 2, "choose auto, cpu or cuda"),
    "cuda-without-cuda": (lambda t: {"--device": "cuda"}, 2, "no CUDA device is available"),
}


@pytest.mark.parametrize("case", REFUSED_BEFORE_TRAINING, ids=REFUSED_BEFORE_TRAINING)
def test_options_that_cannot_run_are_refused_before_training(
    run_cli, setup: dict[str, Path], tmp_path: Path, case: str
) -> None:
    replace, code, message = REFUSED_BEFORE_TRAINING[case]
    if case == "cuda-without-cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is available")
    arguments = {
        "--model": f"{setup['model']}:Tiny",
        "--data": setup["data"],
        "-o": setup["out"],
        "--weights": setup["weights"],
        "--strip": "module.",
        "--drop": "fc.",
        "--image-size": "16",
        "--epochs": "1",
        **replace(tmp_path),
    }
    result = run_cli("finetune", *[part for pair in arguments.items() for part in pair])
    assert result.exit_code == code, result.stderr
    assert message in result.stderr and len(result.stderr.splitlines()) == 1
    assert not setup["out"].exists()
    assert "epoch" not in result.stderr.lower()


def test_the_api_refuses_an_optimizer_it_does_not_know(setup: dict[str, Path]) -> None:
    from ckptool.finetune import TrainOptions, finetune

    options = TrainOptions(epochs=1, image_size=16, optimizer="adam")
    with pytest.raises(ckptool.UsageError, match="optimizer='adam': choose sgd or adamw"):
        finetune(f"{setup['model']}:Tiny", str(setup["data"]), str(setup["out"]), options=options)
    assert not setup["out"].exists()


def test_freezing_every_parameter_is_refused_before_training(
    run_cli, setup: dict[str, Path]
) -> None:
    result = run_cli(
        "finetune", "--model", f"{setup['model']}:Tiny", "--data", setup["data"],
        "-o", setup["out"], "--freeze", "features", "--freeze", "fc", "--image-size", "16",
    )  # fmt: skip
    assert result.exit_code == 2
    assert "nothing to train: every parameter is frozen" in result.stderr
    assert not setup["out"].exists()
