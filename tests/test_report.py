"""ckptool.report: what reaches the terminal is plain text, bounded, and still useful."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import WriteCheckpoint
from safetensors.torch import load_file, save_file

from ckptool.compare import diff_checkpoint
from ckptool.formats import read_metadata
from ckptool.keys import fold_names, fold_rows
from ckptool.report import (
    MAX_ROWS,
    fix_command,
    human_bytes,
    make_console,
    render_inspect,
    verdict,
)


def _rendered(meta) -> str:
    console = make_console()
    console.file = io.StringIO()
    render_inspect(meta, console)
    return console.file.getvalue()


def test_names_print_as_text_not_markup_or_escapes(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "m.safetensors"
    save_file({"[/b]": torch.zeros(1), "\x1b]0;title\x07": torch.zeros(2)}, path)
    shown = _rendered(read_metadata(path))
    assert "[/b]" in shown  # printed, not parsed as a closing tag
    assert "\x1b" not in shown and "\x07" not in shown
    assert "\\x1b]0;title\\x07" in shown


def test_the_tensors_table_counts_what_each_row_folds(tmp_path: Path) -> None:
    """A ResNet's folded rows count the tensors and elements that torch has: a row may
    fold merged leaves (``bn1.{bias,...,weight}``) across layers and blocks."""
    import torchvision

    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "r.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    meta = read_metadata(path)
    shown = _rendered(meta)
    rows = re.findall(r"^ (\S+) +\| (\d+) +\| \[[\d, ]*\] +\| \w+ +\| ([\d,]+) *$", shown, re.M)
    members = dict(fold_rows((name, (t.shape, t.dtype)) for name, t in meta.tensors.items()))
    assert len(rows) == len(members) > 1
    for label, count, params in rows:
        assert int(count) == len(members[label])
        assert int(params.replace(",", "")) == sum(state[n].numel() for n in members[label])
    assert sum(int(count) for _, count, _ in rows) == len(state)
    assert any(int(count) > 4 and "{" in label for label, count, _ in rows)  # merged leaves


def test_names_with_a_leading_dot_are_inspected(run_cli, tmp_path: Path) -> None:
    """A crafted header's ``.weight`` and ``.bias`` ended inspect in an internal error."""
    path = tmp_path / "dots.safetensors"
    save_file({".weight": torch.zeros(2), ".bias": torch.zeros(2), "x": torch.zeros(3)}, path)
    result = run_cli("inspect", path)
    assert result.exit_code == 0, result.output
    assert ".{bias,weight}" in result.output  # in natural order


def test_the_modules_table_sums_each_module_under_its_wrapper(tmp_path: Path) -> None:
    """A DataParallel ResNet's rows are module.conv1 .. module.fc, each with torch's own
    tensor count, element count and bytes; past MAX_ROWS modules, the rest are counted."""
    import torchvision

    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "dp.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    shown = _rendered(read_metadata(path))
    for module in ("conv1", "bn1", "layer1", "layer4", "fc"):
        members = [v for k, v in state.items() if k.split(".")[0] == module]
        params = sum(v.numel() for v in members)
        size = human_bytes(sum(v.numel() * v.element_size() for v in members))
        assert re.search(rf"module\.{module} +\| {len(members)} +\| {params:,} +\| {size}", shown)

    flat = tmp_path / "flat.safetensors"
    save_file({f"t{i}": torch.zeros(i % 3 + 1) for i in range(MAX_ROWS + 5)}, flat)
    shown = _rendered(read_metadata(flat))
    assert re.search(rf"t{MAX_ROWS - 1} +\| 1 +\| {(MAX_ROWS - 1) % 3 + 1} ", shown)
    assert f"t{MAX_ROWS} " not in shown and "... and 5 more" in shown


def test_flat_and_crafted_names_fold_without_recursing() -> None:
    assert fold_names([f"w{i}" for i in range(5000)]) == ["w{0..4999}"]
    crafted = ".".join(str(i) for i in range(2000))  # 2,000 numbers in one name
    assert fold_names([crafted]) == [crafted]
    assert fold_names(["fc.weight", "fc.bias", "blocks.0.w", "blocks.1.w"]) == [
        "fc.{weight,bias}",
        "blocks.{0,1}.w",
    ]


def test_verdict_and_fix_stay_one_readable_line(
    tmp_path: Path, write_checkpoint: WriteCheckpoint
) -> None:
    import torch

    # 300 extra flat names to drop one by one; the shared ones keep the fix worth giving.
    shared = {f"w{i}": torch.zeros(1) for i in range(300)}
    extra = {f"u{i}": torch.zeros(1) for i in range(300)}
    many = write_checkpoint({**shared, **extra}, "many.safetensors")
    other = write_checkpoint(shared, "other.safetensors")
    keys = diff_checkpoint(many, other).keys
    line = verdict(keys)
    assert len(line) < 400 and line.endswith("more steps (--json lists every flag)"), line
    assert keys.fix is not None
    assert "too many to print" in fix_command(keys.fix, str(many), [])


def test_a_fix_that_keeps_little_is_not_offered(
    run_cli, tmp_path: Path, write_checkpoint: WriteCheckpoint
) -> None:
    """A checkpoint of another model: dropping and re-initialising everything is no fix."""
    import json

    import torch

    state = {"conv.kernel": torch.zeros(8, 3, 3, 3), "conv.offset": torch.zeros(8)}
    source = write_checkpoint(state, "cnn.safetensors")
    spec = f"{Path(__file__).parent / 'conftest.py'}:MLP"
    result = run_cli("diff", source, "--model", spec)
    assert result.exit_code == 1 and "this checkpoint is not for this model" in result.stdout
    assert "fix:" not in result.stdout
    document = json.loads(run_cli("diff", source, "--model", spec, "--json").stdout)
    assert document["fix"] is None and document["fix_keeps_little"] is True


def test_a_verdict_with_many_fix_steps_stays_one_readable_line(
    run_cli, write_checkpoint: WriteCheckpoint
) -> None:
    """Twelve modules to drop: the verdict names three and counts the rest; --json has all."""
    ours = {f"m{i}.weight": torch.zeros(2, 2) for i in range(12)}
    theirs = {f"m{i}.weight": torch.zeros(3, 3) for i in range(12)}
    for state in (ours, theirs):
        state.update({f"k{i}.weight": torch.zeros(100) for i in range(30)})
    a, b = write_checkpoint(ours, "a.pt"), write_checkpoint(theirs, "b.pt")
    line = run_cli("diff", a, b).stdout.splitlines()[-1]
    assert line.startswith("incompatible: ") and len(line) < 300, line
    assert "... and 9 more steps (--json lists every flag)" in line
    fix = json.loads(run_cli("diff", a, b, "--json").stdout)["fix"]
    assert sum(flag.startswith("--drop m") for flag in fix) == 12, fix


@pytest.mark.parametrize(
    "prefix",
    ["my 'module$(touch pwned).", "tab\there.", "new\nline\x1b.", "it's\t\\$(touch pwned)."],
    ids=["quotes", "tab", "newline", "tab-quote-backslash"],
)
def test_a_prefix_with_spaces_and_quotes_is_described_and_pasted(
    run_cli, tmp_path: Path, prefix: str
) -> None:
    """A prefix holding a space or a quote crashed the verdict (its flags were split on
    spaces); a tab or a newline printed inside plain quotes pasted as something else
    ($'...' now). Described, and pasted into bash, the fix runs."""
    import subprocess

    from conftest import MLP, seeded_state

    state = seeded_state(MLP)
    source = tmp_path / "ckpt.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in state.items()}, source)
    spec = f"{Path(__file__).parent / 'conftest.py'}:MLP"
    shown = run_cli("diff", source, "--model", spec)
    assert shown.exit_code == 1, shown.output
    assert f"incompatible: strip {prefix!r}: then 4/4 keys match" in shown.stdout, shown.stdout
    line = next(x for x in shown.stdout.splitlines() if x.startswith("  fix: "))
    command = line.removeprefix("  fix: ").replace(" -o OUT", " -o out.safetensors")
    done = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(load_file(tmp_path / "out.safetensors")) == sorted(state)
    assert not list(tmp_path.glob("pwned*")) and not list(Path.cwd().glob("pwned*"))


def test_a_printed_fix_pasted_into_a_shell_runs_nothing_but_adapt(run_cli, tmp_path: Path) -> None:
    """A crafted file's names (and a path with spaces and $) go into the printed fix as
    shell words: pasted into bash it runs adapt with exactly those names, no command
    hidden in them."""
    import shlex
    import subprocess

    from conftest import MLP, seeded_state

    state = seeded_state(MLP)
    state["x; touch pwned1 #.weight"] = torch.zeros(3)
    state["y'$(touch pwned2)'.bias"] = torch.zeros(1)
    state["head.bias'$(touch pwned3)"] = head_bias = state.pop("head.bias")  # a --rename
    source = tmp_path / "my $HOME ckpt.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, source)
    spec = f"{Path(__file__).parent / 'conftest.py'}:MLP"
    shown = run_cli("diff", source, "--model", spec)
    line = next(x for x in shown.stdout.splitlines() if x.startswith("  fix: "))
    command = line.removeprefix("  fix: ").replace(" -o OUT", " -o out.safetensors")
    words = shlex.split(command)
    assert words[2] == str(source) and words[-2:] == ["-o", "out.safetensors"], words
    assert {"x; touch pwned1 #.", "y'$(touch pwned2)'."} <= set(words), words
    done = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert torch.equal(load_file(tmp_path / "out.safetensors")["head.bias"], head_bias)
    assert not list(tmp_path.glob("pwned*")) and not list(Path.cwd().glob("pwned*"))


@pytest.mark.parametrize(
    ("part", "whole", "text"),
    [
        (22_713_216, 22_714_371, ">99.9%"),  # MiniLM with a 3-class head reinitialised
        (5, 5, "100.0%"),
        (1, 1_000_000, "<0.1%"),
        (0, 7, "0.0%"),
        (1, 8, "12.5%"),
    ],
)
def test_a_share_reads_100_or_0_percent_only_when_it_is(part: int, whole: int, text: str) -> None:
    from ckptool.report import share_text

    assert share_text(part, whole) == text
