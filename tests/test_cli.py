"""The CLI as users and pipelines run it: click's runner and the real console script."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from conftest import MLP, WriteCheckpoint, seeded_state, wrap

RESNET = ("--model", "torchvision:resnet18", "--num-classes", "5")


@pytest.fixture
def dataparallel_resnet18(write_checkpoint: WriteCheckpoint) -> Path:
    """The classic download: DataParallel keys, 1000 classes, inside a training checkpoint."""
    torch.manual_seed(0)
    state = wrap(torchvision.models.resnet18(weights=None).state_dict(), "module.")
    return write_checkpoint(
        {"state_dict": state, "epoch": 90, "arch": "resnet18"}, "resnet18_dp.pth"
    )


def test_classic_case_names_exactly_the_two_fixes(run_cli, dataparallel_resnet18: Path) -> None:
    result = run_cli("diff", dataparallel_resnet18, *RESNET)
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert (
        "incompatible: strip 'module.': then 122/122 keys match; "
        "fc.{weight,bias} differ in shape: add --drop fc."
    ) in lines
    fix = next(line for line in lines if line.strip().startswith("fix:"))
    assert fix.strip().endswith(
        "--model torchvision:resnet18 --num-classes 5 --strip module. --drop fc. -o OUT"
    )


def test_classic_case_with_fixes_is_compatible(run_cli, dataparallel_resnet18: Path) -> None:
    result = run_cli("diff", dataparallel_resnet18, *RESNET, "--strip", "module.", "--drop", "fc.")
    assert result.exit_code == 0, result.stdout
    assert (
        "compatible: 120/122 keys match; fc.{weight,bias} filled from the model's init"
        in result.stdout
    )


def test_diff_json_schema(run_cli, dataparallel_resnet18: Path) -> None:
    result = run_cli("diff", dataparallel_resnet18, *RESNET, "--strip", "module.", "--json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    for key in (
        "missing",
        "unexpected",
        "shape_mismatch",
        "dtype_mismatch",
        "suggestions",
        "compatible",
    ):
        assert key in doc
    assert doc["compatible"] is False and doc["unexpected"] == [] and doc["missing"] == []
    assert doc["shape_mismatch"] == [
        {"key": "fc.weight", "source": [1000, 512], "target": [5, 512]},
        {"key": "fc.bias", "source": [1000], "target": [5]},
    ]
    assert doc["fix"] == ["--strip module.", "--drop fc."] and doc["source_key"] == "state_dict"


def test_diff_values_shows_only_the_head_moved(run_cli, write_checkpoint: WriteCheckpoint) -> None:
    before = seeded_state(MLP)
    after = {k: v.clone() for k, v in before.items()}
    after["head.weight"] += 0.25
    a = write_checkpoint(wrap(before, "module."), "before.pt")
    b = write_checkpoint(after, "after.safetensors")
    result = run_cli("diff", a, b, "--strip", "module.", "--values", "--json")
    assert result.exit_code == 0
    values = json.loads(result.stdout)["values"]
    assert [c["key"] for c in values["changed"]] == ["head.weight"]
    assert values["changed"][0]["changed"] == after["head.weight"].numel()
    assert values["changed"][0]["max_abs"] == pytest.approx(0.25)
    assert sorted(values["unchanged"]) == ["body.bias", "body.weight", "head.bias"]
    human = run_cli("diff", a, b, "--strip", "module.", "--values")
    assert "values: 1/4 compared tensors changed, 3 bit-identical" in human.stdout
    # Without the --strip no name matches: not "0/0 changed", but why, and the flags.
    unmatched = run_cli("diff", a, b, "--values")
    assert (
        "values: none compared, no tensor matches by name and shape; rerun with "
        "--strip module. --values"
    ) in unmatched.stdout, unmatched.stdout


def test_values_treats_nan_and_negative_zero_by_bits(
    run_cli, write_checkpoint: WriteCheckpoint
) -> None:
    a = write_checkpoint({"w": torch.tensor([float("nan"), 0.0, 1.0])}, "a.pt")
    b = write_checkpoint({"w": torch.tensor([float("nan"), -0.0, 1.0])}, "b.pt")
    doc = strict_json(run_cli("diff", a, b, "--values", "--json").stdout)
    # The NaN kept bit for bit is no change: the only one, 0.0 -> -0.0, is numerically 0.
    assert doc["values"]["changed"] == [
        {"key": "w", "changed": 1, "numel": 3, "max_abs": 0.0, "rel_l2": 0.0}
    ]
    same = strict_json(run_cli("diff", a, a, "--values", "--json").stdout)
    assert same["values"]["unchanged"] == ["w"]
    # A value that became NaN is an infinite change: inf on the terminal, null in JSON.
    c = write_checkpoint({"w": torch.tensor([float("nan"), 0.0, float("nan")])}, "c.pt")
    doc = strict_json(run_cli("diff", a, c, "--values", "--json").stdout)
    assert doc["values"]["changed"] == [
        {"key": "w", "changed": 1, "numel": 3, "max_abs": None, "rel_l2": None}
    ]
    assert re.search(r"w +\| 1/3 +\| inf +\| inf", run_cli("diff", a, c, "--values").stdout)


def test_values_of_complex_tensors_differ_by_the_distance_between_them(
    run_cli, write_checkpoint: WriteCheckpoint
) -> None:
    """A conjugate has the same magnitude: compared by magnitudes the change was 0."""
    a = write_checkpoint({"c": torch.tensor([1 + 1j, 2 + 0j], dtype=torch.complex64)}, "a.pt")
    b = write_checkpoint({"c": torch.tensor([1 - 1j, 2 + 0j], dtype=torch.complex64)}, "b.pt")
    (change,) = strict_json(run_cli("diff", a, b, "--values", "--json").stdout)["values"]["changed"]
    assert change["changed"] == 1 and change["max_abs"] == pytest.approx(2.0)
    assert change["rel_l2"] == pytest.approx(2 / 6**0.5)


def test_values_of_float4_tensors_are_decoded_not_a_crash(
    run_cli, write_checkpoint: WriteCheckpoint
) -> None:
    """torch converts float4_e2m1fn_x2 to nothing, so --values raised an internal error.
    Each byte holds two e2m1 codes: 0x21 is (0.5, 1.0); 0xA1 is (0.5, -1.0); 0x08 is
    (-0.0, 0.0)."""

    def fp4(*codes: int) -> torch.Tensor:
        return torch.tensor(codes, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)

    a = write_checkpoint({"x": fp4(0x21, 0x00)}, "a.pt")
    b = write_checkpoint({"x": fp4(0xA1, 0x08)}, "b.pt")
    (change,) = strict_json(run_cli("diff", a, b, "--values", "--json").stdout)["values"]["changed"]
    # Two of four 4-bit values changed: 1.0 -> -1.0 by 2, and 0.0 -> -0.0 by 0.
    assert (change["changed"], change["numel"], change["max_abs"]) == (2, 4, 2.0)
    assert change["rel_l2"] == pytest.approx(2 / (0.5**2 + 1.0**2) ** 0.5)
    assert strict_json(run_cli("diff", a, a, "--values", "--json").stdout)["values"]["unchanged"]
    other = write_checkpoint({"x": torch.zeros(2)}, "other.pt")  # same shape, other dtype
    (change,) = strict_json(run_cli("diff", a, other, "--values", "--json").stdout)["values"][
        "changed"
    ]
    assert change["changed"] == 2 and change["max_abs"] is None  # infinite: unknowable


def strict_json(text: str) -> Any:
    """json.loads that refuses NaN and Infinity, as jq and JavaScript do."""

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_inspect_human_and_json(run_cli, dataparallel_resnet18: Path) -> None:
    human = run_cli("inspect", dataparallel_resnet18)
    assert human.exit_code == 0
    assert "122 in 'state_dict', 11,699,132 elements, 44.6 MiB" in human.stdout
    assert (
        "container   epoch: 90" in human.stdout and "container   arch: 'resnet18'" in human.stdout
    )
    assert "module.layer{1..4}.{0,1}.bn{1,2}.num_batches_tracked | 16 " in human.stdout
    doc = json.loads(run_cli("inspect", dataparallel_resnet18, "--json").stdout)
    assert doc["num_tensors"] == 122 and doc["key"] == "state_dict" and doc["format"] == "torch-zip"
    assert doc["tensors"][0] == {
        "name": "module.conv1.weight",
        "shape": [64, 3, 7, 7],
        "dtype": "float32",
        "numel": 9408,
        "nbytes": 37632,
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("diff", "{ckpt}"), "either a TARGET checkpoint or --model"),
        (("diff", "{ckpt}", "{ckpt}", "--model", "torchvision:resnet18"), "not both"),
        (
            ("diff", "{ckpt}", "--model", "torchvision:resnet18", "--values"),
            "--values compares two checkpoints",
        ),
        (("diff", "{ckpt}", "--model", "resnet18"), "SOURCE:NAME"),
        (
            ("diff", "{ckpt}", "--model", "torchvision:resnet18", "--strip", "nope."),
            "stripping is all-or-nothing",
        ),
        (("diff", "{ckpt}", "--model", "torchvision:resnet18", "--rename", "(=x"), "invalid regex"),
        (("inspect", "{ckpt}", "--key", "nope"), "no entry 'nope'"),
        (
            ("diff", "{ckpt}", "--model", "torchvision:resnet18", "--num-classes", "0"),
            "'--num-classes': 0 is not in the range x>=1",
        ),
        (("diff", "{ckpt}", "--model", "{ckpt}:Net"), "as a Python module"),
        (("check", "{ckpt}"), "check needs --model SPEC"),
        (("adapt", "{ckpt}", "-o", "{ckpt}.out.pt"), "adapt needs --model SPEC"),
        (("finetune", "--data", "{ckpt}", "-o", "{ckpt}.ft"), "finetune needs --model SPEC"),
        (("adapt", "{ckpt}", "--model", "torchvision:resnet18"), "-o OUT is required"),
        (
            ("check", "{ckpt}", "--model", "torchvision:resnet18", "--input-shape", "3,0,8"),
            "--input-shape '3,0,8' must be positive integers",
        ),
        (
            ("convert", "{ckpt}", "-o", "{ckpt}.st", "--shard-size", "0GB"),
            "--shard-size '0GB': expected a size",
        ),
        (
            ("convert", "{ckpt}", "-o", "{ckpt}.st", "--shard-size", "2BB"),
            "--shard-size '2BB': expected a size",
        ),
    ],
    ids=[
        "no-target",
        "both-targets",
        "values-with-model",
        "bad-spec",
        "partial-strip",
        "bad-regex",
        "bad-key",
        "zero-classes",
        "model-file-not-python",
        "check-without-model",
        "adapt-without-model",
        "finetune-without-model",
        "adapt-without-output",
        "zero-input-shape",
        "zero-shard-size",
        "unknown-shard-unit",
    ],
)
def test_usage_errors_exit_2(
    run_cli, write_checkpoint: WriteCheckpoint, args: tuple[str, ...], message: str
) -> None:
    ckpt = write_checkpoint({"state_dict": seeded_state(MLP)}, "m.pt")
    result = run_cli(*(a.format(ckpt=ckpt) for a in args))
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_ambiguous_container_lists_candidates(run_cli, write_checkpoint: WriteCheckpoint) -> None:
    ckpt = write_checkpoint({"model": seeded_state(MLP), "ema": seeded_state(MLP)}, "two.pt")
    result = run_cli("inspect", ckpt)
    assert (
        result.exit_code == 2
        and "model (4 tensors), ema (4 tensors); pick one with --key model" in result.stderr
    )
    assert run_cli("inspect", ckpt, "--key", "ema").exit_code == 0


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys; from ckptool.cli import cli\n"
        "try: cli(['--help'])\n"
        "except SystemExit: pass\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("False")
    assert "inspect" in out.stdout and "diff" in out.stdout


def test_commands_that_load_torch_exit_without_teardown_but_with_exit_handlers(
    tmp_path: Path,
) -> None:
    """With torch loaded, the interpreter's teardown costs 0.5 s; ckptool ends the
    process once exit handlers ran and output is flushed, with the exit code kept."""
    code = (
        "import atexit, sys, torch\n"
        "from ckptool import cli\n"
        "atexit.register(lambda: print('handler ran'))  # flushed by ckptool\n"
        "sys.argv = ['ckptool'] + sys.argv[1:]\n"
        "real = cli._main\n"
        "def command():\n"
        "    print('output ' * 5000, end='')  # more than a pipe's buffer, unflushed\n"
        "    real()\n"
        "cli._main = command\n"
        "cli.main()\n"
        "print('never printed: main does not return')\n"
    )

    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-c", code, *args]
        return subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=buffered)

    missing = run("inspect", "missing.pt")
    assert missing.returncode == 3 and "no such file" in missing.stderr
    assert missing.stdout == "output " * 5000 + "handler ran\n"
    done = run("--version")
    assert done.returncode == 0 and "handler ran" in done.stdout
    assert "never printed" not in done.stdout and "ckptool" in done.stdout


def test_a_live_thread_keeps_the_ordinary_exit() -> None:
    """Teardown waits for threads that still run; a hard exit would cut them off."""
    from ckptool import cli

    assert "torch" in sys.modules and cli._teardown_is_slow()
    release = __import__("threading").Event()
    worker = __import__("threading").Thread(target=release.wait)
    daemon = __import__("threading").Thread(target=release.wait, daemon=True)
    daemon.start()
    try:
        assert cli._teardown_is_slow()  # teardown would not wait for a daemon thread
        worker.start()
        assert not cli._teardown_is_slow()
    finally:
        release.set()
        daemon.join()
        if worker.is_alive():
            worker.join()


def test_console_script_piped_output_is_plain(dataparallel_resnet18: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    # The console script of this interpreter's environment, not whatever is first on PATH.
    script = str(Path(sys.executable).parent / "ckptool")
    for command in ([script], [sys.executable, "-m", "ckptool"]):
        out = subprocess.run(
            [*command, "diff", str(dataparallel_resnet18), *RESNET],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        assert out.returncode == 1 and "\x1b[" not in out.stdout and out.stderr == ""
        assert "add --drop fc." in out.stdout


def test_json_stdout_is_one_document(dataparallel_resnet18: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ckptool", "inspect", str(dataparallel_resnet18), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout)["numel"] == 11_699_132  # parameters and buffers


def test_model_flags_against_a_target_checkpoint_are_refused(
    run_cli, dataparallel_resnet18: Path
) -> None:
    result = run_cli("diff", dataparallel_resnet18, dataparallel_resnet18, "--num-classes", "5")
    assert result.exit_code == 2 and "apply to --model SPEC" in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("inspect", "x.pt", "--bogus"), "No such option '--bogus'"),
        (("convert", "x.pt", "-o", "y.safetensors", "--dtype", "float7"), "'float7' is not one of"),
        (("adapt",), "Missing argument 'SOURCE'"),
        (("frobnicate",), "No such command 'frobnicate'"),
    ],
)
def test_click_usage_errors_are_one_line(run_cli, args: tuple[str, ...], message: str) -> None:
    """As every other error: one line, exit 2, where to look; never click's three lines."""
    result = run_cli(*args)
    lines = result.stderr.splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("ckptool: error: ") and message in lines[0], lines
    if args[0] != "frobnicate":
        assert f"ckptool {args[0]} --help" in lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("inspect", "{missing}", "--json"), 3),
        (("inspect", "{missing}", "--json", "--bogus"), 2),
        (("convert", "{missing}", "-o", "{out}", "--json"), 3),
    ],
)
def test_json_runs_that_fail_print_the_error_document(
    run_cli, tmp_path: Path, args: tuple[str, ...], code: int
) -> None:
    paths = {"missing": tmp_path / "missing.pt", "out": tmp_path / "out.safetensors"}
    result = run_cli(*(a.format(**paths) for a in args))
    assert result.exit_code == code
    document = json.loads(result.stdout)
    assert document["exit_code"] == code and document["error"], document
    assert result.stderr.startswith("ckptool: error: ")
    assert document["error"] in result.stderr


def test_bare_ckptool_shows_the_help(run_cli) -> None:
    result = run_cli()
    assert "Commands:" in result.stdout and "inspect" in result.stdout


def test_every_option_says_what_it_does() -> None:
    import click

    from ckptool.cli import cli

    silent = [
        f"{name} {param.opts[0]}"
        for name, command in cli.commands.items()
        for param in command.params
        if isinstance(param, click.Option) and not param.help
    ]
    assert silent == []


def test_values_do_not_count_a_dtype_change_that_keeps_every_value(
    run_cli, write_checkpoint: WriteCheckpoint
) -> None:
    exact = torch.tensor([1.0, 2.0, -0.5])
    a = write_checkpoint({"w": exact, "v": torch.tensor([0.1, 1.0])}, "a.pt")
    b = write_checkpoint({"w": exact.half(), "v": torch.tensor([0.1, 1.0]).half()}, "b.pt")
    doc = json.loads(run_cli("diff", a, b, "--values", "--json").stdout)
    # w: float16 holds every value exactly; v: 0.1 rounds in float16, 1.0 does not.
    assert doc["values"]["unchanged"] == ["w"], doc["values"]
    assert [(c["key"], c["changed"]) for c in doc["values"]["changed"]] == [("v", 1)]


MODEL_FLAGS = ("--model", "torchvision:resnet18")


def test_piped_tables_never_split_a_name(dataparallel_resnet18: Path) -> None:
    """A CI log or grep sees whole names: piped output is not cut at 80 columns."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    done = subprocess.run(
        [sys.executable, "-m", "ckptool", "diff", dataparallel_resnet18, *MODEL_FLAGS],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert "module.bn1.{weight,bias,running_mean,running_var,num_batches_tracked}" in done.stdout
    assert "bn1.{weight,bias,running_mean,running_var,num_batches_tracked}" in done.stdout


def test_every_choice_comes_from_its_enum() -> None:
    """One definition: the CLI's choices are the enums the library compares against."""
    import click

    from ckptool.choices import CastDtype, MismatchPolicy, Optimizer, OutputFormat, Strategy
    from ckptool.cli import cli

    expected = {
        "--strategy": Strategy,
        "--on-mismatch": MismatchPolicy,
        "--format": OutputFormat,
        "--optimizer": Optimizer,
        "--dtype": CastDtype,
    }
    seen = set()
    for command in cli.commands.values():
        for param in command.params:
            if isinstance(param.type, click.Choice) and param.opts[0] in expected:
                enum = expected[param.opts[0]]
                assert list(param.type.choices) == [m.value for m in enum], param.opts
                seen.add(param.opts[0])
    assert seen == set(expected)


def test_every_error_class_lives_in_errors_and_is_public() -> None:
    """One place to find what ckptool raises; each is exported from the package."""
    import inspect

    import ckptool
    from ckptool import errors

    classes = {
        name
        for name, value in inspect.getmembers(errors, inspect.isclass)
        if issubclass(value, errors.CkptError) and value.__module__ == errors.__name__
    }
    assert {"FrozenParameterError", "VerificationError"} <= classes
    assert all(getattr(ckptool, name) is getattr(errors, name) for name in classes)


def test_top_level_help_shows_whole_summaries_exit_codes_and_torchrun(run_cli) -> None:
    text = run_cli("--help").stdout
    commands = text.split("Commands:")[1].split("Exit codes")[0]
    assert "..." not in commands  # no summary cut short
    assert "Transfer learning in one command: adapt weights, replace" in text
    assert "Exit codes: 0 ok" in text and "130 interrupted" in text and "torchrun" in text


def test_errors_speak_python_to_the_api_and_flags_to_the_command_line(
    run_cli, write_checkpoint: WriteCheckpoint, tmp_path: Path
) -> None:
    """One failure, two readers: a Python caller is told the parameter to pass, a
    command-line user the flag."""
    import ckptool

    source = write_checkpoint(wrap(MLP().state_dict(), "module."), "mlp.pt")
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"already here")
    with pytest.raises(ckptool.OutputError, match="exists; add force=True to replace it"):
        ckptool.convert(source, str(taken))
    result = run_cli("convert", source, "-o", taken)
    assert result.exit_code == 5 and "exists; add --force to replace it" in result.stderr

    # the hint of a refused adapt: the missing transforms, as Transforms arguments / flags
    with pytest.raises(ckptool.IncompatibleError, match=r"add strip=\('module\.',\)"):
        ckptool.adapt(source, model=MLP(), out=str(tmp_path / "a.safetensors"))
    # a parameter whose Python type is not the flag's text: --take P=N is take=[(P, N)]
    with pytest.raises(ckptool.UsageError, match=r"^take=\[\('nothing\.', 1\)\]: "):
        ckptool.merge([source, source], str(tmp_path / "m.pt"), take=[("nothing.", 1)])
    result = run_cli("merge", source, source, "-o", tmp_path / "m.pt", "--take", "nothing.=1")
    assert result.exit_code == 2 and "error: --take nothing.=1: " in result.stderr
    assert not (tmp_path / "m.pt").exists()

    model = "tests/conftest.py:MLP"
    result = run_cli("adapt", source, "--model", model, "-o", tmp_path / "a.safetensors")
    assert result.exit_code == 1 and "add --strip module." in result.stderr, result.stderr


def test_json_documents_write_non_finite_numbers_as_null() -> None:
    """report.json and every --json document go through jsontext.dumps."""
    from ckptool import jsontext

    document = {"a": [1.0, float("nan"), {"b": float("inf")}], "c": (2, -float("inf")), "d": "x"}
    assert jsontext.dumps(document) == '{"a": [1.0, null, {"b": null}], "c": [2, null], "d": "x"}'
    assert strict_json(jsontext.dumps(document, indent=2))["c"] == [2, None]
