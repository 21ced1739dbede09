"""ckptool.formats.write and save: atomic, exclusive, verified outputs that leave nothing behind.

Signals are delivered at exact write events by tests/killpoints.py (every rename, link,
unlink and chunk written), so every window of a commit is visited, not a random sample.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO
from safetensors.torch import save_file

import ckptool
from ckptool.errors import OutputError
from ckptool.formats import save, write
from ckptool.formats.write import atomic_output, committed_outputs

KILLPOINTS = REPO / "tests" / "killpoints.py"
NOT_REACHED = 99


def _state(value: float, count: int = 4) -> dict[str, torch.Tensor]:
    return {f"layer{i}.weight": torch.full((128, 128), value + i) for i in range(count)}


def _run_until(event: int, signame: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(KILLPOINTS), str(event), signame, "--", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def _values(entry: Path) -> dict[str, float]:
    return {k: float(v[0, 0]) for k, v in ckptool.load_state_dict(entry).items()}


def _every_event(signame: str, args: list[str | Path], check) -> int:
    """Deliver ``signame`` before event 1, 2, ... until a run finishes first; check each."""
    event = 0
    while True:
        event += 1
        done = _run_until(event, signame, *args)
        if done.returncode == NOT_REACHED:
            return event - 1
        check(event, done)
        assert event < 500, "the write never finishes"


@pytest.mark.slow
@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "single-file"])
def test_kill_9_at_every_write_event_leaves_old_or_new(tmp_path: Path, sharded: bool) -> None:
    old, new = tmp_path / "old.safetensors", tmp_path / "new.safetensors"
    save_file(_state(1.0), old)
    save_file(_state(5.0), new)  # as many shards as old: the same plain names
    out = tmp_path / "out.safetensors"
    shard = ["--shard-size", "100KB"] if sharded else []
    entry = tmp_path / "out.safetensors.index.json" if sharded else out
    old_values, new_values = _values(old), _values(new)

    def write_old() -> None:
        ckptool.convert(old, str(out), shard_size=100_000 if sharded else None, force=True)

    def check(event: int, done: subprocess.CompletedProcess[str]) -> None:
        assert done.returncode == -9, (event, done.stderr)
        # A reader sees one whole checkpoint: never a mix of old and new shards.
        assert _values(entry) in (old_values, new_values), event
        if _values(entry) == new_values:
            write_old()

    write_old()
    events = _every_event("KILL", ["convert", new, "-o", out, "--force", *shard], check)
    assert events >= (16 if sharded else 4)
    # The finished run replaced the old output and removed the old shards.
    assert _values(entry) == new_values
    if sharded:
        listed = set(ckptool.read_metadata(entry).files)
        shards = {str(p) for p in tmp_path.glob("out-*.safetensors")}
        assert shards <= listed


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["INT", "TERM"])
def test_interrupt_at_every_event_leaves_nothing_or_says_complete(
    tmp_path: Path, signame: str
) -> None:
    source = tmp_path / "source.safetensors"
    save_file(_state(2.0), source)
    out = tmp_path / "out.safetensors"
    entry = tmp_path / "out.safetensors.index.json"

    def check(event: int, done: subprocess.CompletedProcess[str]) -> None:
        assert done.returncode == 130, (event, done.stderr)
        assert len(done.stderr.splitlines()) == 1, done.stderr
        left = sorted(p.name for p in tmp_path.iterdir())
        if "it is complete" in done.stderr:
            assert _values(entry) == _values(source)
            assert not [n for n in left if n.endswith((".tmp", ".partial"))], left
            for path in tmp_path.iterdir():
                if path != source:
                    path.unlink()
        else:
            assert "nothing was written" in done.stderr
            assert left == ["source.safetensors"], (event, left)

    args: list[str | Path] = ["convert", source, "-o", out, "--shard-size", "100KB"]
    assert _every_event(signame, args, check) >= 16  # 4 shards and the index


@pytest.mark.parametrize("groups", [False, True])
def test_disk_full_while_sharding_leaves_nothing(
    run_cli, tmp_path: Path, monkeypatch, groups: bool
) -> None:
    """The disk fills halfway through the shards' one pass; or, with shards written in
    groups, once a shard of the first group is committed: either way nothing is left,
    committed shards included, and the error names OUT."""
    source = tmp_path / "source.safetensors"
    save_file(_state(3.0), source)
    real = write._write
    calls: list[int] = []
    committed_before = len(write.committed_outputs())

    def fills_up(fd: int, data: memoryview, position: int) -> None:
        calls.append(position)
        late = len(write.committed_outputs()) > committed_before if groups else len(calls) > 20
        if late:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data, position)

    monkeypatch.setattr(write, "_write", fills_up)
    if groups:
        monkeypatch.setattr(save, "MAX_OPEN_SHARDS", 1)
    monkeypatch.setattr(write, "CHUNK", 4096)  # many writes per shard
    out = tmp_path / "out.safetensors"
    result = run_cli("convert", source, "-o", out, "--shard-size", "100KB")
    assert result.exit_code == 5, result.stderr
    assert f"{out}: no space left" in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source.safetensors"]


@pytest.mark.parametrize("open_at_once", [128, 2])
def test_sharded_convert_hashes_the_source_in_the_copy_pass(
    tmp_path: Path, monkeypatch, open_at_once: int
) -> None:
    """Every shard and the index record the source's sha256, taken while the shards'
    bytes are copied (no pass of its own: the source is read once), also when the
    shards go in groups (the groups after the first read only their own tensors)."""
    import hashlib

    def no_second_pass(path: str) -> str:
        raise AssertionError(f"{path} hashed in a pass of its own")

    source = tmp_path / "source.safetensors"
    save_file(_state(4.0), source)
    real_chunks = write._read_chunks
    read: list[int] = []

    def counted(fd: int, spans: Any) -> Any:
        for start, view in real_chunks(fd, spans):
            read.append(len(view))
            yield start, view

    monkeypatch.setattr(write, "_read_chunks", counted)
    monkeypatch.setattr(write, "sha256_file", no_second_pass)
    monkeypatch.setattr(save, "MAX_OPEN_SHARDS", open_at_once)
    out = tmp_path / "out.safetensors"
    log = ckptool.convert(source, str(out), shard_size=100_000)
    # One group reads the file once; with two, the second reads its own tensors again.
    once = source.stat().st_size
    assert sum(read) == (once if open_at_once == 128 else once + 2 * 128 * 128 * 4)
    shards = [f for f in log.files if f.endswith(".safetensors")]
    assert len(shards) == 4
    expected = hashlib.sha256(source.read_bytes()).hexdigest()
    for shard in shards:
        assert ckptool.read_metadata(shard).metadata["ckptool.source_sha256"] == expected
    index = json.loads((tmp_path / "out.safetensors.index.json").read_text())
    assert index["metadata"]["ckptool.source_sha256"] == expected
    loaded = ckptool.load_state_dict(tmp_path / "out.safetensors.index.json")
    assert all(torch.equal(loaded[k], v) for k, v in _state(4.0).items())


def test_placements_are_told_apart_by_output(tmp_path: Path) -> None:
    """One payload copies into several outputs (shards): where bytes were written and
    compared is known per output, so a tensor misplaced in one shard is not vouched
    for by the same offset in another."""
    source = tmp_path / "source.bin"
    source.write_bytes(bytes(range(256)) * 8)
    data = write.ByteSource(str(source), 256, 1024)
    payload = write.Payload()
    with open(tmp_path / "a", "w+b") as a, open(tmp_path / "b", "w+b") as b:
        payload.place(data, a.fileno(), 0)
        payload.place(data, b.fileno(), 64)
        payload.copy()
        assert payload.written_at(data, a.fileno()) == {0}
        assert payload.written_at(data, b.fileno()) == {64}
    assert (tmp_path / "b").read_bytes()[64:] == source.read_bytes()[256:1280]


def test_racing_writer_loses_without_force(tmp_path: Path) -> None:
    out = tmp_path / "out.bin"
    refused = pytest.raises(OutputError, match="appeared while this run was writing")
    with refused, atomic_output(str(out), replace=False) as temp:
        temp.file.write(b"mine")
        out.write_bytes(b"theirs")  # another writer commits first
    assert out.read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_racing_sharded_writer_keeps_the_other_writers_shards(tmp_path: Path) -> None:
    source = tmp_path / "source.safetensors"
    save_file(_state(4.0), source)
    out = tmp_path / "out.safetensors"
    ckptool.convert(source, str(out), shard_size=100_000)
    (tmp_path / "out.safetensors.index.json").unlink()  # as if the other run were mid-way
    before = {p.name: p.read_bytes() for p in tmp_path.glob("out-*")}
    with pytest.raises(OutputError, match="exists; add force=True"):
        ckptool.convert(source, str(out), shard_size=100_000)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("out-*")} == before


def test_replacing_a_sharded_output_alternates_names_and_removes_old_shards(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out.safetensors"
    for round_, value in enumerate((1.0, 2.0, 3.0)):
        source = tmp_path / f"s{round_}.safetensors"
        save_file(_state(value), source)
        ckptool.convert(source, str(out), shard_size=100_000, force=True)
        shards = sorted(p.name for p in tmp_path.glob("out-*"))
        infix = ".next" if round_ == 1 else ""
        assert shards == [f"out-0000{i}-of-00004{infix}.safetensors" for i in range(1, 5)]
        assert _values(tmp_path / "out.safetensors.index.json") == _values(source)


def test_stale_temp_files_of_dead_runs_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "out.bin"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = tmp_path / f".out.bin.{dead.stdout.strip()}.abc123.tmp"
    live = tmp_path / f".out.bin.{os.getpid()}.def456.tmp"
    other = tmp_path / f".other.bin.{dead.stdout.strip()}.abc123.tmp"
    for path in (stale, live, other):
        path.write_bytes(b"x")
    with atomic_output(str(out)) as temp:
        temp.file.write(b"data")
    assert not stale.exists() and live.exists() and other.exists()


def test_commit_is_recorded_for_the_interrupt_message(tmp_path: Path) -> None:
    out = tmp_path / "out.bin"
    with atomic_output(str(out)) as temp:
        temp.file.write(b"data")
        assert str(out) not in committed_outputs()
    assert committed_outputs()[-1] == str(out)


def test_fsync_happens_before_the_rename(tmp_path: Path, monkeypatch) -> None:
    order: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (order.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(
        os, "replace", lambda a, b: (order.append("replace"), real_replace(a, b))[1]
    )
    with atomic_output(str(tmp_path / "out.bin")) as temp:
        temp.file.write(b"data")
    assert order[:2] == ["fsync", "replace"], order


@pytest.mark.parametrize("fadvise", ["linux", "absent", "refused"])
def test_write_back_starts_for_every_compared_range(
    tmp_path: Path, monkeypatch, fadvise: str
) -> None:
    """The output's bytes go to disk while the copy runs (the final fsync then waits for
    little): each tensor's bytes are handed over once, after they compared equal, in
    both output formats; without posix_fadvise (macOS), or where a filesystem refuses
    the hint, the same file is written."""
    advised: list[tuple[int, int]] = []

    def record(fd: int, offset: int, length: int, advice: int) -> None:
        assert advice == os.POSIX_FADV_DONTNEED
        if fadvise == "refused":
            raise OSError(errno.EINVAL, "Invalid argument")
        advised.append((offset, offset + length))

    monkeypatch.setattr(write, "CHUNK", 4096)  # a tensor spans many chunks
    monkeypatch.setattr(write, "_FADVISE", None if fadvise == "absent" else record)
    source = tmp_path / "source.safetensors"
    save_file(_state(6.0), source)
    for out in (tmp_path / "out.safetensors", tmp_path / "out.pt"):
        advised.clear()
        assert ckptool.convert(source, str(out)).output
        loaded = ckptool.load_state_dict(out)
        assert all(torch.equal(loaded[k], v) for k, v in _state(6.0).items())
        tensors = ckptool.read_metadata(out).tensors.values()
        expected = {(t.file_offset, t.file_offset + t.storage_nbytes) for t in tensors}
        hinted = fadvise == "linux"
        assert _merged(advised) == (_merged(expected) if hinted else []), out
        assert sum(b - a for a, b in advised) == (sum(b - a for a, b in expected) * hinted)


def _merged(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Adjacent [start, end) ranges joined."""
    joined: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if joined and joined[-1][1] == start:
            joined[-1] = (joined[-1][0], end)
        else:
            joined.append((start, end))
    return joined


def test_bytes_that_differ_after_writing_fail_verification_with_exit_5(
    run_cli, tmp_path: Path, monkeypatch
) -> None:
    """Break the write on purpose: the read-back verification must catch it."""
    source = tmp_path / "source.safetensors"
    save_file(_state(6.0), source)
    real = write._write

    def corrupting(out_fd: int, data: memoryview, position: int) -> None:
        real(out_fd, data, position)
        os.pwrite(out_fd, b"\xff", position)

    monkeypatch.setattr(write, "_write", corrupting)
    # Copied bytes, and bytes computed at write time (a cast), read back as they are
    # written, in both output formats.
    for out in (tmp_path / "out.safetensors", tmp_path / "out.pt"):
        for cast in ((), ("--dtype", "float16")):
            result = run_cli("convert", source, "-o", out, *cast)
            assert result.exit_code == 5, result.stderr
            assert f"{out}: the output's bytes at offset" in result.stderr, result.stderr
            assert "differ when read back" in result.stderr, result.stderr
            assert sorted(p.name for p in tmp_path.iterdir()) == ["source.safetensors"]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_bytes_written_off_their_header_offset_fail_verification(
    run_cli, tmp_path: Path, monkeypatch, suffix: str
) -> None:
    """A plan that writes a tensor's bytes somewhere other than where the header says
    (each piece still reads back as written) is caught by the final parse."""
    source = tmp_path / "source.safetensors"
    save_file(_state(6.0), source)
    real = write.Payload.place
    placed: list[int] = []

    def misplaced(self: write.Payload, data: write.TensorData, fd: int, position: int) -> None:
        placed.append(position)
        real(self, data, fd, position + (64 if len(placed) == 2 else 0))

    monkeypatch.setattr(write.Payload, "place", misplaced)
    out = tmp_path / f"out{suffix}"
    result = run_cli("convert", source, "-o", out)
    # In a .pt the shifted bytes also land on the next record's header; and the shifted
    # piece overlaps the next tensor, whose write may land before the shifted piece is
    # read back (writes and read-backs run on threads of their own).
    caught = ("differ from the source", "does not read back", "differ when read back")
    assert result.exit_code == 5 and any(c in result.stderr for c in caught), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source.safetensors"]


@pytest.mark.parametrize("slow", [None, "digest", "write", "check"])
def test_one_pass_copy_over_many_chunks_hashes_and_copies_exactly(
    tmp_path: Path, monkeypatch, slow: str | None
) -> None:
    """Small read chunks make the copy run through many of them: the sha256 taken on
    another thread while the read buffers take turns must still be the file's, and
    views sharing one storage at different offsets (overlapping ranges) copy whole.
    With one stage of the pipeline held back, the reader runs ahead of it: a buffer
    read into again before that stage is done with it shows as a wrong sha256, a wrong
    file or a false read-back mismatch."""
    import hashlib
    import time

    from safetensors import safe_open

    def held_back(real: Any) -> Any:
        def slowed(*args: Any) -> Any:
            time.sleep(0.002)
            return real(*args)

        return slowed

    stages = {
        "digest": (write._Pipeline, "_digest"),
        "write": (write, "_write"),
        "check": (write, "_compare_written"),
    }
    if slow is not None:
        owner, name = stages[slow]
        monkeypatch.setattr(owner, name, held_back(getattr(owner, name)))
    monkeypatch.setattr(write, "CHUNK", 4096)
    base = torch.randn(50_001)
    state = {"base": base, "tail": base[12_345:], "middle": base[7:20_007], "w": torch.randn(999)}
    torch.save(state, tmp_path / "in.pt")
    st = ckptool.convert(tmp_path / "in.pt", str(tmp_path / "out.safetensors"))
    back = ckptool.convert(tmp_path / "out.safetensors", str(tmp_path / "back.pt"))
    assert st.output and back.output
    with safe_open(tmp_path / "out.safetensors", "pt") as f:
        recorded = f.metadata()["ckptool.source_sha256"]
    assert recorded == hashlib.sha256((tmp_path / "in.pt").read_bytes()).hexdigest()
    for path in ("out.safetensors", "back.pt"):
        loaded = ckptool.load_state_dict(tmp_path / path)
        for name, tensor in state.items():
            assert torch.equal(loaded[name], tensor), (path, name)


@pytest.mark.parametrize("gathered", ["exact", "corrupted", "short"])
def test_small_tensors_are_written_and_read_back_in_runs(
    run_cli, tmp_path: Path, monkeypatch, gathered: str
) -> None:
    """2,000 small tensors of a torch.save zip (each in a record of its own, so not back
    to back in the source) go back to back into the output: a few gathered writes and
    read-backs, not one of each per tensor. A byte changed after a gathered write is
    caught by its read-back; a short gathered write is completed."""
    state = {f"experts.{i}.w": torch.arange(4.0) + 4 * i for i in range(2000)}
    source = tmp_path / "source.pt"
    torch.save(state, source)
    real_pwritev, real_pwrite = os.pwritev, os.pwrite
    calls: list[str] = []

    def pwritev(fd: int, buffers: list[memoryview], position: int) -> int:
        calls.append("pwritev")
        if gathered == "short":  # half of the first part only
            return real_pwritev(fd, [buffers[0][: len(buffers[0]) // 2]], position)
        written = real_pwritev(fd, buffers, position)
        if gathered == "corrupted":  # the run's last byte
            real_pwrite(fd, b"\xff", position + written - 1)
        return written

    def pwrite(fd: int, data: memoryview, position: int) -> int:
        calls.append("pwrite")
        return real_pwrite(fd, data, position)

    monkeypatch.setattr(os, "pwritev", pwritev)
    monkeypatch.setattr(os, "pwrite", pwrite)
    out = tmp_path / "out.safetensors"
    result = run_cli("convert", source, "-o", out)
    if gathered == "corrupted":
        assert result.exit_code == 5 and "differ when read back" in result.stderr, result.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["source.pt"]
        return
    assert result.exit_code == 0, result.stderr
    loaded = ckptool.load_state_dict(out)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert "pwritev" in calls
    if gathered == "exact":  # after a short one, the rest is written part by part
        assert len(calls) < 50, calls[:60]
        # From a safetensors file the tensors are back to back in the source too: one
        # part, written as it is.
        calls.clear()
        assert run_cli("convert", out, "-o", tmp_path / "again.safetensors").exit_code == 0
        assert "pwritev" not in calls and 0 < len(calls) < 50, calls[:60]


def test_a_computed_tensor_of_another_length_than_planned_is_refused() -> None:
    """The header was written for the planned length: bytes of another length (a cast
    or merge that went wrong) would shift every tensor after it."""
    from ckptool.errors import OutputError
    from ckptool.formats.write import ComputedBytes

    assert bytes(ComputedBytes(4, lambda: b"abcd").materialize()) == b"abcd"
    for made in (b"abc", b"abcde"):
        with pytest.raises(OutputError, match=f"has {len(made)} bytes, 4 planned"):
            ComputedBytes(4, lambda made=made: made).materialize()


def _convert_with(run_cli, tmp_path: Path, monkeypatch, target: Any, name: str, fault: Any):
    source = tmp_path / "source.safetensors"
    save_file(_state(1.0), source)
    monkeypatch.setattr(target, name, fault)
    return run_cli("convert", source, "-o", tmp_path / "out.safetensors")


def test_a_header_that_names_other_tensors_fails_verification(
    run_cli, tmp_path: Path, monkeypatch
) -> None:
    """Every byte reads back as written and the file parses: only the comparison of the
    parsed file with the plan sees that a name changed."""

    class Renaming:
        def __getattr__(self, name: str) -> Any:
            return getattr(json, name)

        def dumps(self, value: Any, **kwargs: Any) -> str:
            if isinstance(value, dict):  # the header (the placeholder's value is a str)
                value = {k.replace("layer3", "layer9"): v for k, v in value.items()}
            return json.dumps(value, **kwargs)

    result = _convert_with(run_cli, tmp_path, monkeypatch, write, "json", Renaming())
    assert result.exit_code == 5 and "written keys differ from the plan" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source.safetensors"]


def test_a_header_with_another_dtype_fails_verification(
    run_cli, tmp_path: Path, monkeypatch
) -> None:
    codes = {**write.SAFETENSORS_CODES, "float32": "I32"}  # same width: the file parses
    result = _convert_with(run_cli, tmp_path, monkeypatch, write, "SAFETENSORS_CODES", codes)
    assert result.exit_code == 5, result.stderr
    assert "'layer0.weight' was written as int32[128, 128]" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source.safetensors"]


def test_tensors_placed_at_each_others_offsets_fail_verification(
    run_cli, tmp_path: Path, monkeypatch
) -> None:
    """The first two tensors (same size) swap places: each piece reads back as written
    and the data section is tiled, yet each name would hold the other's values."""
    real = write.Payload.place
    calls: list[int] = []
    size = 128 * 128 * 4

    def swapped(self: write.Payload, data: write.TensorData, fd: int, position: int) -> None:
        calls.append(position)
        shift = {1: size, 2: -size}.get(len(calls), 0)
        real(self, data, fd, position + shift)

    result = _convert_with(run_cli, tmp_path, monkeypatch, write.Payload, "place", swapped)
    assert result.exit_code == 5, result.stderr
    assert "bytes of 'layer0.weight' differ from the source" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source.safetensors"]
