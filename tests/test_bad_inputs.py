"""Every file in fixtures/bad/ through every command and the Python API.

The corpus (``scripts/make_bad_fixtures.py``) holds corrupt, crafted and hostile files,
plus valid files with awkward contents. Each case names the exit code ``inspect`` must
give; every other command either gives the same refusal or, for a valid file, a normal
answer. Always: one line on stderr for an error, no traceback, no escape byte on the
terminal, nothing written on failure, a payload never runs, and an answer within seconds.
"""

from __future__ import annotations

import faulthandler
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import Result
from conftest import REPO

import ckptool
from ckptool.errors import CheckpointReadError, CkptError, UnsafeCheckpointError

BAD = REPO / "fixtures" / "bad"
MANIFEST = json.loads((BAD / "MANIFEST.json").read_text())
CASES = sorted(MANIFEST["cases"].items())
IDS = [name for name, _ in CASES]
REFERENCE = BAD / "crafted_valid.pt"
LINEAR = (
    "--model",
    "torch.nn:Linear",
    "--model-arg",
    "in_features=2",
    "--model-arg",
    "out_features=2",
)
# Seconds any command may take on any corpus file (all are small): hangs fail here.
TIME_LIMIT = 20


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    # The alarm's exception waits for the interpreter; a hang inside C (hashing a
    # tuple bomb) never returns to it. The watchdog thread then ends the whole run
    # (exit 1, no summary), so CI fails rather than hangs; its traceback of every
    # thread shows with pytest -s (output capture swallows it otherwise).
    faulthandler.dump_traceback_later(3 * seconds, exit=True, file=sys.__stderr__)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_corpus_covers_every_class() -> None:
    assert len(CASES) >= 100
    assert {case["exit"] for _, case in CASES} == {0, 3, 4}
    prefixes = (
        "build_", "hash_bomb", "laughs_", "memo_", "bytearray_", "stride0_", "deep_", "pid_",
        "zip_", "legacy_", "st_", "index_", "dcp_", "unsafe_", "st_flat_names", "st_escape",
        "st_markup", "st_aliases", "st_gap", "st_trailing", "zip_duplicate", "negative_",
    )  # fmt: skip
    for prefix in prefixes:
        assert any(name.startswith(prefix) for name, _ in CASES), prefix


def _commands(case_path: Path, out: Path) -> dict[str, tuple[str, ...]]:
    return {
        "inspect": ("inspect", str(case_path)),
        "inspect --json": ("inspect", str(case_path), "--json"),
        "diff --values": ("diff", str(case_path), str(REFERENCE), "--values"),
        "convert": ("convert", str(case_path), "-o", str(out / "converted.safetensors")),
        "adapt": ("adapt", str(case_path), *LINEAR, "-o", str(out / "adapted.pt")),
        "check": ("check", str(case_path), *LINEAR),
    }


def _assert_one_clean_line(result: Result, case: dict, what: str) -> None:
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptool: error: "), (what, result.stderr)
    assert re.search(case["match"], lines[0]), (what, lines[0])


@pytest.mark.parametrize(("name", "case"), CASES, ids=IDS)
def test_every_command_answers_safely(
    run_cli: Callable[..., Result], tmp_path: Path, name: str, case: dict
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for what, args in _commands(BAD / name, out).items():
        with time_limit(TIME_LIMIT):
            result = run_cli(*args)
        # Everything a terminal would show, stdout and stderr alike.
        shown = result.stdout + result.stderr
        assert "\x1b" not in shown and "Traceback" not in shown, (what, shown[-500:])
        assert "weights_only=False" not in shown
        if case["exit"] != 0:
            assert result.exit_code == case["exit"], (what, result.stderr)
            _assert_one_clean_line(result, case, what)
            assert list(out.iterdir()) == [], f"{what} left {list(out.iterdir())}"
        elif what.startswith("inspect"):
            assert result.exit_code == 0, (what, result.stderr)
        else:
            # A valid file may still not fit the model (1) or hold what a write cannot
            # copy (3), but the answer is one line, never a crash.
            assert result.exit_code in (0, 1, 3), (what, result.stderr)
            if result.exit_code == 3:
                assert len(result.stderr.splitlines()) == 1, (what, result.stderr)
        for leftover in out.iterdir():
            if result.exit_code != 0:
                pytest.fail(f"{what} failed with exit {result.exit_code} but wrote {leftover}")
            leftover.unlink()


@pytest.mark.parametrize(("name", "case"), CASES, ids=IDS)
def test_python_api_raises_only_ckpt_errors(name: str, case: dict) -> None:
    expected = {3: CheckpointReadError, 4: UnsafeCheckpointError}.get(case["exit"], CkptError)
    for read in (ckptool.read_metadata, ckptool.load_state_dict):
        with time_limit(TIME_LIMIT):
            if case["exit"] == 0 and read is ckptool.read_metadata:
                assert isinstance(read(BAD / name), ckptool.formats.CheckpointMeta)
                continue
            try:
                read(BAD / name)
            except CkptError as e:
                assert isinstance(e, expected), (read.__name__, e)
                assert "\n" not in str(e)
            else:
                assert case["exit"] == 0, f"{read.__name__} accepted {name}"


def test_hostile_pickles_never_run(tmp_path: Path) -> None:
    """The real console entry point over the unsafe cases; no payload leaves its marker."""
    marker = Path(MANIFEST["marker"])
    marker.unlink(missing_ok=True)
    unsafe = [str(BAD / name) for name, case in CASES if case["exit"] == 4]
    code = (
        "import sys, ckptool\n"
        "for p in sys.argv[1:]:\n"
        "    try: ckptool.load_state_dict(p)\n"
        "    except ckptool.UnsafeCheckpointError: pass\n"
        "    else: sys.exit('accepted ' + p)\n"
    )
    subprocess.run([sys.executable, "-c", code, *unsafe], check=True, cwd=tmp_path)
    for path in unsafe[:3]:
        done = subprocess.run(
            [sys.executable, "-m", "ckptool", "inspect", path],
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 4 and done.stderr.count("\n") == 1, done.stderr
    assert not marker.exists()
    assert list(tmp_path.iterdir()) == []  # nothing written next to the user either


# --- inputs git cannot hold: FIFOs, symlink loops, names with markup --------------------


def _refused(run_cli: Callable[..., Result], *args: object, match: str) -> None:
    with time_limit(TIME_LIMIT):
        result = run_cli(*args)
    assert result.exit_code == 3, result.stderr
    assert len(result.stderr.splitlines()) == 1 and re.search(match, result.stderr)


def test_fifo_is_refused_without_being_opened(run_cli, tmp_path: Path) -> None:
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    # Opening a FIFO for reading would block until a writer comes: the time limit catches it.
    _refused(run_cli, "inspect", fifo, match="FIFO")
    _refused(run_cli, "convert", fifo, "-o", tmp_path / "out.safetensors", match="FIFO")
    with time_limit(TIME_LIMIT), pytest.raises(CheckpointReadError, match="FIFO"):
        ckptool.load_state_dict(fifo)


def test_fifo_shard_behind_an_index_is_refused(run_cli, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "shard-1.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "shard-1.safetensors"}}))
    _refused(run_cli, "inspect", index, match="FIFO")


def test_fifo_chunk_in_a_dcp_folder_is_refused(run_cli, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "dcp"
    shutil.copytree(BAD / "dcp_valid", folder)
    for chunk in folder.glob("*.distcp"):
        chunk.unlink()
        os.mkfifo(chunk)
    _refused(run_cli, "convert", folder, "-o", tmp_path / "out.safetensors", match="FIFO")


def test_symlink_loop_is_refused(run_cli, tmp_path: Path) -> None:
    loop = tmp_path / "loop.pt"
    loop.symlink_to(loop)
    _refused(run_cli, "inspect", loop, match="symlink loop")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.pt").symlink_to(folder / "a.pt")
    _refused(run_cli, "inspect", folder, match="symlink loop")


def test_path_with_markup_and_escapes_is_printed_literally(run_cli, tmp_path: Path) -> None:
    (tmp_path / "m[").mkdir()
    path = tmp_path / "m[/b]\x1b[31m.safetensors"
    path.write_bytes((BAD / "st_zero_sized.safetensors").read_bytes())
    result = run_cli("inspect", path)
    assert result.exit_code == 0, result.stderr
    assert "m[/b]\\x1b[31m.safetensors" in result.stdout and "\x1b" not in result.stdout
    missing = run_cli("inspect", tmp_path / "gone[/b]\x1b[2J.pt")
    assert missing.exit_code == 3 and "\x1b" not in missing.stderr
    assert "gone[/b]\\x1b[2J.pt" in missing.stderr


def _header_bytes(path: Path, header: bytes, data: bytes = bytes(4)) -> Path:
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    return path


ENTRY = b'{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'


@pytest.mark.parametrize(
    ("header", "match"),
    [
        # UTF-16 decodes as JSON for json.loads(bytes); safetensors reads UTF-8 only
        (('{"a":' + ENTRY.decode() + "}").encode("utf-16-le"), "not valid JSON"),
        # a surrogate written as UTF-8 bytes: not UTF-8 (json.loads let it pass)
        (b'{"a\xed\xa0\x80":' + ENTRY + b"}", "not valid UTF-8 \\(byte 3\\)"),
        # escapes of half a character, in a name and in a metadata value
        (b'{"a\\ud800":' + ENTRY + b"}", r"'a\\ud800' holds the lone surrogate"),
        (b'{"a":' + ENTRY + b',"__metadata__":{"k":"\\udc00"}}', r"'\\udc00' holds"),
        # a number of 5,000 digits: over what Python's int() converts from text
        (b'{"a":' + ENTRY.replace(b"[0", b"[" + b"1" * 5000) + b"}", r"\(Exceeds the limit"),
    ],
    ids=["utf16", "utf8-surrogate", "escaped-name", "escaped-metadata", "5000-digits"],
)
def test_headers_safetensors_refuses_are_refused(
    run_cli, tmp_path: Path, header: bytes, match: str
) -> None:
    from safetensors import SafetensorError, safe_open

    path = _header_bytes(tmp_path / "crafted.safetensors", header)
    with pytest.raises(SafetensorError):
        safe_open(str(path), framework="np")
    result = run_cli("inspect", path)
    assert result.exit_code == 3, result.output
    assert len(result.stderr.splitlines()) == 1 and re.search(match, result.stderr)
    with pytest.raises(CheckpointReadError, match=match):
        ckptool.read_metadata(path)


def test_escaped_surrogate_pair_is_one_character(tmp_path: Path) -> None:
    """A pair of escapes is a whole character (safetensors reads it so): kept."""
    path = _header_bytes(tmp_path / "pair.safetensors", b'{"a\\ud83d\\ude00":' + ENTRY + b"}")
    assert list(ckptool.read_metadata(path).tensors) == ["a\U0001f600"]


def test_pickled_name_with_half_a_character(tmp_path: Path) -> None:
    """torch saves and loads a name holding a lone surrogate: ckptool shows it escaped,
    copies it into a .pt as it was, and refuses a .safetensors that could not hold it."""
    source = tmp_path / "sur.pt"
    torch.save({"w\ud800": torch.ones(2), "b": torch.zeros(1)}, source)

    def ckptool_cli(*args: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ckptool", *map(str, args)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONIOENCODING": "utf-8"},
        )

    shown = ckptool_cli("inspect", source)
    assert shown.returncode == 0, shown.stderr
    assert "w\\ud800" in shown.stdout
    out = tmp_path / "copy.pt"
    copied = ckptool_cli("convert", source, "-o", out)
    assert copied.returncode == 0, copied.stderr
    assert list(torch.load(out, weights_only=True)) == ["w\ud800", "b"]
    for target in (tmp_path / "out.safetensors", tmp_path / "sharded.safetensors"):
        flags = ["--shard-size", "1KB"] if "sharded" in target.name else []
        refused = ckptool_cli("convert", source, "-o", target, *flags)
        assert refused.returncode == 5, refused.stderr
        assert "safetensors cannot store the name 'w\\ud800'" in refused.stderr
        # sharded: refused before the first shard is written, naming the index
        assert refused.stderr.startswith(
            f"ckptool: error: {target}{'.index.json' if flags else ':'}"
        )
        assert len(refused.stderr.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.pt", "sur.pt"]


def test_a_newline_in_a_name_or_metadata_prints_no_line_of_its_own(run_cli, tmp_path: Path) -> None:
    """A crafted name ending in a fake table row must not show as a tensor of its own."""
    from safetensors.torch import save_file

    fake = "evil\n fake.weight | 1 | [1000] | float32 | 1000"
    path = tmp_path / "rows.safetensors"
    save_file({"w": torch.zeros(2), fake: torch.zeros(1)}, path, metadata={"m": "a\n| x |"})
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, other)
    shown = run_cli("inspect", path).stdout
    compared = run_cli("diff", path, other).stdout
    assert " evil\\x0a fake.weight" in shown and "m = a\\x0a| x |" in shown
    assert "| evil\\x0a fake.weight" in compared  # the key cell: lines of names
    assert "incompatible: evil\\x0a fake.weight" in compared  # the verdict
    shown += compared
    assert not any(line.startswith(" fake.weight") for line in shown.splitlines())
    # the diff's key cells still list one name per line
    many = {name: torch.zeros(1) for name in ("alpha.weight", "beta.x.bias", "gamma.mean")}
    save_file(many, tmp_path / "many.safetensors")
    table = run_cli("diff", tmp_path / "many.safetensors", other).stdout
    assert re.search(r"\| alpha.weight *\n.*\| beta.x.bias *\n.*\| gamma.mean", table), table


def test_quantized_tensors_are_read_compared_and_never_written_half(
    run_cli, tmp_path: Path
) -> None:
    """A quantized state dict (torch.ao) loads with weights_only=True. Written as plain
    integers its scale and zero point were lost and torch could not load the 'verified'
    file; viewing its bits as another dtype crashed the interpreter (SIGSEGV)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates making quantized tensors
        q = torch.quantize_per_tensor(torch.linspace(-1, 1, 16).reshape(4, 4), 0.1, 3, torch.qint8)
    source = tmp_path / "quantized.pt"
    torch.save({"q": q, "w": torch.ones(2)}, source)

    def ckptool_cli(*args: object) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "ckptool", *map(str, args)]
        return subprocess.run(command, capture_output=True, text=True)  # pytest shows no warnings

    shown = ckptool_cli("inspect", source)
    assert shown.returncode == 0 and "qint8" in shown.stdout
    assert shown.stderr == ""  # no deprecation note of torch's own
    compared = ckptool_cli("diff", source, source, "--values")
    assert compared.returncode == 0, compared.stderr
    assert "values: 0/2 compared tensors changed, 2 bit-identical" in compared.stdout
    for out in ("copy.pt", "copy.safetensors"):
        refused = run_cli("convert", source, "-o", tmp_path / out)
        assert refused.exit_code == 3, refused.output
        assert "'q' is a quantized tensor (qint8)" in refused.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quantized.pt"]


def test_dtypes_safetensors_lacks_are_refused_for_safetensors_only(run_cli, tmp_path: Path) -> None:
    source = tmp_path / "odd.pt"
    torch.save({"a": torch.ones(3).to(torch.complex32), "b": torch.ones(2)}, source)
    refused = run_cli("convert", source, "-o", tmp_path / "odd.safetensors")
    assert refused.exit_code == 5 and len(refused.stderr.splitlines()) == 1
    assert "safetensors has no complex32 dtype (tensor 'a'); write a .pt" in refused.stderr
    assert not (tmp_path / "odd.safetensors").exists()
    copied = run_cli("convert", source, "-o", tmp_path / "copy.pt")
    assert copied.exit_code == 0, copied.output
    before, after = torch.load(source), torch.load(tmp_path / "copy.pt")
    assert after["a"].dtype == torch.complex32
    assert torch.equal(before["a"].view(torch.uint8), after["a"].view(torch.uint8))


def test_a_torch_export_archive_is_named_as_such(run_cli, tmp_path: Path) -> None:
    """A .pt2 is a zip like torch.save's, without data.pkl: 'not a torch.save file' did
    not say what it is or how to get a state dict out of it."""
    program = torch.export.export(torch.nn.Linear(3, 2), (torch.ones(1, 3),))
    path = tmp_path / "model.pt2"
    torch.export.save(program, path)
    for command in (("inspect", path), ("convert", path, "-o", tmp_path / "out.safetensors")):
        refused = run_cli(*command)
        assert refused.exit_code == 3, refused.output
        assert "is a torch.export archive (.pt2)" in refused.stderr
        assert "torch.export.load" in refused.stderr and len(refused.stderr.splitlines()) == 1
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize(
    ("name", "head", "what"),
    [
        ("model.gguf", b"GGUF\x03\x00\x00\x00" + bytes(64), "is a GGUF file (llama.cpp)"),
        ("model.h5", b"\x89HDF\r\n\x1a\n" + bytes(64), "is an HDF5 file (Keras .h5 weights?)"),
        ("weights.npy", None, "is a NumPy .npy array"),
        ("weights.npz", None, "is a NumPy .npz archive"),
        ("model.onnx", b"\x08\x07\x12\x07pytorch" + bytes(32), "not a recognised checkpoint"),
    ],
)
def test_weights_of_other_frameworks_are_named(
    run_cli, tmp_path: Path, name: str, head: bytes | None, what: str
) -> None:
    """A GGUF, Keras or NumPy file handed to ckptool is named as what it is."""
    import numpy as np

    path = tmp_path / name
    if name.endswith(".npy"):
        np.save(path, np.ones(3))
    elif name.endswith(".npz"):
        np.savez(path, w=np.ones(3))
    else:
        path.write_bytes(head or b"")
    refused = run_cli("inspect", path)
    assert refused.exit_code == 3 and f"{path}: {what}" in refused.stderr
    assert len(refused.stderr.splitlines()) == 1


def test_a_byteorder_record_of_megabytes_is_refused_before_it_is_read(
    run_cli, tmp_path: Path
) -> None:
    """torch writes 'little' or 'big'; the record was read whole, so a crafted one could
    make inspect read gigabytes into memory."""
    import io
    import zipfile

    import torch

    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buffer)
    crafted = io.BytesIO()
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(crafted, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(
                info, b"little" + b" " * (1 << 20) if info.filename.endswith("byteorder") else data
            )
    path = tmp_path / "big_byteorder.pt"
    path.write_bytes(crafted.getvalue())
    refused = run_cli("inspect", path)
    assert refused.exit_code == 3 and "byteorder' is 1048582 bytes" in refused.stderr


def test_a_data_pkl_over_the_pickle_budget_is_refused_before_it_is_read(
    run_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its size comes from the zip directory: a crafted 64 MiB+ pickle is never read."""
    from ckptool.formats import torch_pickle

    path = tmp_path / "state.pt"
    torch.save({"w": torch.ones(2)}, path)
    with torch_pickle.zipfile.ZipFile(path) as archive:
        pickle_size = archive.getinfo("state/data.pkl").file_size
    monkeypatch.setattr(torch_pickle, "MAX_PICKLE_BYTES", pickle_size - 1)
    refused = run_cli("inspect", path)
    assert refused.exit_code == 3
    assert f"data.pkl is over the pickle size budget of {pickle_size - 1} bytes" in refused.stderr
    monkeypatch.setattr(torch_pickle, "MAX_PICKLE_BYTES", pickle_size)
    assert run_cli("inspect", path).exit_code == 0


def _safetensors_header_size(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


def _budget_case(tmp_path: Path, budget: str) -> tuple[Path, str, int, str]:
    """A real file for ``budget`` (module, constant): (file to inspect, module, the
    smallest budget that passes, the message over it)."""
    from safetensors.torch import save_file

    tensors = {"a.weight": torch.ones(2), "b.weight": torch.ones(3), "c.bias": torch.ones(1)}
    if budget in ("MAX_HEADER_BYTES", "MAX_TENSORS"):
        path = tmp_path / "model.safetensors"
        save_file(tensors, path)
        if budget == "MAX_TENSORS":
            return path, "safetensors_header", 3, "lists 3 entries, over the budget of 2 tensors"
        size = _safetensors_header_size(path)
        return path, "safetensors_header", size, f"header is {size} bytes, over the header budget"
    if budget == "MAX_INDEX_BYTES":
        save_file({"a.weight": tensors["a.weight"]}, tmp_path / "one.safetensors")
        save_file({"b.weight": tensors["b.weight"]}, tmp_path / "two.safetensors")
        index = tmp_path / "model.safetensors.index.json"
        weight_map = {"a.weight": "one.safetensors", "b.weight": "two.safetensors"}
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        size = index.stat().st_size
        return index, "sharded", size, f"shard index is {size} bytes, over the index budget"
    # MAX_CONFIG_BYTES: a LoRA adapter's config beside its weights
    adapter = tmp_path / "adapter.safetensors"
    save_file({"base_model.model.q.lora_A.weight": torch.ones(4, 16)}, adapter)
    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    size = config.stat().st_size
    return adapter, "adapters", size, f"{size} bytes; an adapter config"


@pytest.mark.parametrize(
    "budget", ["MAX_HEADER_BYTES", "MAX_TENSORS", "MAX_INDEX_BYTES", "MAX_CONFIG_BYTES"]
)
def test_every_json_budget_refuses_a_file_just_over_it(
    run_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget: str
) -> None:
    """Budgets that bound what is read into memory: one byte (or tensor) over refuses the
    file in one line, exit 3; at the budget it is read."""
    import importlib

    path, module_name, fits, message = _budget_case(tmp_path, budget)
    module = importlib.import_module(f"ckptool.formats.{module_name}")
    monkeypatch.setattr(module, budget, fits - 1)
    refused = run_cli("inspect", path)
    assert refused.exit_code == 3 and message in refused.stderr, refused.output
    assert len(refused.stderr.strip().splitlines()) == 1
    monkeypatch.setattr(module, budget, fits)
    assert run_cli("inspect", path).exit_code == 0


def _legacy_edit(data: bytes, count_at: int, edit: str) -> bytes:
    if edit == "protocol":  # the second pickle: torch's legacy protocol number, 1001
        protocol = b"\x80\x02M\xe9\x03."
        assert data.count(protocol) == 1
        return data.replace(protocol, b"\x80\x02M\xea\x03.")
    if edit == "count":  # the first storage's element count, an int64 before its bytes
        count = int.from_bytes(data[count_at : count_at + 8], "little")
        return data[:count_at] + (count + 1).to_bytes(8, "little") + data[count_at + 8 :]
    return data[: count_at + 3]  # cut inside the first storage's count


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("protocol", "unsupported legacy torch protocol 1002"),
        ("count", "records 7 elements, its tensors expect 6"),
        ("cut", "truncated before storage"),
    ],
)
def test_legacy_files_whose_records_disagree_are_refused(
    run_cli, tmp_path: Path, edit: str, message: str
) -> None:
    """A pre-1.6 torch.save file: pickles, then each storage as its element count and
    bytes. A count that is not the tensors', or a file cut in one, is refused in one line."""
    plain = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2, 3)}, plain, _use_new_zipfile_serialization=False)
    offset = ckptool.read_metadata(plain).tensors["w"].file_offset
    assert offset is not None
    path = tmp_path / f"{edit}.pt"
    path.write_bytes(_legacy_edit(plain.read_bytes(), offset - 8, edit))
    refused = run_cli("inspect", path)
    assert refused.exit_code == 3 and message in refused.stderr, refused.output
    assert len(refused.stderr.strip().splitlines()) == 1


def test_key_is_refused_for_safetensors(run_cli, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(2)}, path)
    result = run_cli("inspect", path, "--key", "model")
    assert result.exit_code == 3, result.output
    assert "safetensors files are flat; --key does not apply" in result.stderr


def test_a_shard_holding_a_tensor_the_index_does_not_place_there_is_refused(
    run_cli, tmp_path: Path
) -> None:
    """Loaders take each tensor from the shard the index names: a shard that holds
    another (not indexed, or indexed elsewhere) means the two disagree."""
    from safetensors.torch import save_file

    save_file({"a.weight": torch.ones(2)}, tmp_path / "one.safetensors")
    save_file({"b.weight": torch.ones(3), "c.bias": torch.ones(1)}, tmp_path / "two.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    weight_map = {"a.weight": "one.safetensors", "b.weight": "two.safetensors"}
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    result = run_cli("inspect", index)
    assert result.exit_code == 3, result.output
    assert "tensor 'c.bias' is in 'two.safetensors' but the index says" in result.stderr


def test_bytes_cut_after_the_file_was_read_are_refused_not_returned_short(
    tmp_path: Path,
) -> None:
    """The file shrinks between reading its metadata and its bytes (another process
    rewrote it): both byte readers refuse the short read."""
    from ckptool.formats.files import read_assembly
    from ckptool.formats.load import read_storage
    from ckptool.formats.meta import Assembly, Piece

    path = tmp_path / "state.pt"
    torch.save({"w": torch.ones(64)}, path)
    meta = ckptool.read_metadata(path).tensors["w"]
    assert meta.file_offset is not None
    with open(path, "r+b") as f:
        f.truncate(meta.file_offset + 100)  # 100 of the 256 bytes left
    with pytest.raises(CheckpointReadError, match="the storage of 'w' is cut short"):
        read_storage(meta, str(path), "w")
    pieces = (Piece(str(path), 0, 8), Piece(str(path), meta.file_offset, 256))
    with pytest.raises(CheckpointReadError, match="cut short inside 'w'"):
        read_assembly(Assembly(pieces, "float32"), "w")


def test_a_folder_without_weights_says_so(run_cli, tmp_path: Path) -> None:
    """Training state beside no weights (an optimizer file, a trainer's state) is not a
    checkpoint of the model: the folder is said to hold none, not several."""
    folder = tmp_path / "run"
    folder.mkdir()
    torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")
    result = run_cli("inspect", folder)
    assert result.exit_code == 3, result.output
    assert "directory holds no checkpoint file" in result.stderr


@pytest.mark.parametrize("name", ["model.safetensors", "model.pt"])
def test_an_empty_file_is_called_empty(run_cli, tmp_path: Path, name: str) -> None:
    """A download or copy that never wrote a byte: the first thing a user needs to know."""
    path = tmp_path / name
    path.write_bytes(b"")
    result = run_cli("inspect", path)
    assert result.exit_code == 3, result.output
    assert result.stderr.strip() == f"ckptool: error: {path}: file is empty"


def _storage_entries_of(metadata: Any, fqn: str) -> list[Any]:
    return [k for k in metadata.storage_data if k.fqn == fqn]


def _drop_storage_of(fqn: str) -> Callable[[Any, str], None]:
    def edit(metadata: Any, folder: str) -> None:
        for key in _storage_entries_of(metadata, fqn):
            del metadata.storage_data[key]

    return edit


def _set_on_storage_of(fqn: str, value: Callable[[Any], Any]) -> Callable[[Any, str], None]:
    def edit(metadata: Any, folder: str) -> None:
        for key in _storage_entries_of(metadata, fqn):
            metadata.storage_data[key] = value(metadata.storage_data[key])

    return edit


def _with_transforms(info: Any) -> Any:
    info.transform_descriptors = ["zstd"]  # a compressed chunk (newer torch writes these)
    return info


DCP_EDITS: dict[str, tuple[Callable[[Any, str], None], str]] = {
    "no-entries": (
        lambda metadata, folder: delattr(metadata, "state_dict_metadata"),
        "not torch.distributed.checkpoint metadata",
    ),
    "entries": (
        lambda metadata, folder: setattr(metadata, "state_dict_metadata", [1]),
        "DCP state_dict_metadata is not a dict of names",
    ),
    "size": (
        lambda metadata, folder: setattr(
            metadata.state_dict_metadata["model.weight"], "size", [3, 4]
        ),
        "DCP entry 'model.weight' has a malformed size [3, 4]",
    ),
    "storage": (
        lambda metadata, folder: setattr(metadata, "storage_data", [1]),
        "DCP storage_data is not a dict",
    ),
    "storage-entry": (
        _set_on_storage_of("model.weight", lambda info: 5),
        "DCP storage entry for 'model.weight' is malformed",
    ),
    "transforms": (
        _set_on_storage_of("model.weight", _with_transforms),
        "'model.weight' is stored with transforms (compression)",
    ),
    "no-chunks": (_drop_storage_of("model.weight"), "no stored data for 'model.weight'"),
}


@pytest.mark.parametrize("case", list(DCP_EDITS))
def test_dcp_metadata_that_disagrees_with_torch_s_format_is_refused(
    tmp_path: Path, case: str
) -> None:
    """A real DCP save whose metadata has one field changed: reading its tensors is
    refused, naming what is wrong (the metadata is our own pickle, edited here)."""
    sys.path.insert(0, str(REPO / "scripts"))
    import make_bad_fixtures

    edit, message = DCP_EDITS[case]
    make_bad_fixtures.write_dcp(str(tmp_path / "valid"), lambda metadata, folder: None)
    assert set(ckptool.load_state_dict(tmp_path / "valid")) == {"weight", "bias"}  # "model" found
    make_bad_fixtures.write_dcp(str(tmp_path / "dcp"), edit)
    with pytest.raises(CheckpointReadError, match=re.escape(message)):
        ckptool.load_state_dict(tmp_path / "dcp")
