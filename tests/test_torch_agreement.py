"""A torch.save zip that ckptool reads is one torch loads.

torch's zip reader (miniz) checks end records, entries and a few records (version,
.storage_alignment, serialization_id, byteorder) that zipfile ignores; a file that reads
here and fails in torch.load would make ``inspect`` and ``check`` pass a file nobody
can load. Each test builds the crafted file, shows that torch refuses it and that
ckptool refuses it with a line that says why. The sweep at the end holds the promise on
every single-byte mutant of a small file's zip structure.

Two disagreements are deliberate, and not swept: ckptool keeps unknown globals in
data.pkl as inert data (README "Training checkpoints"), and refuses a CRC-32 mismatch
that torch never checks.
"""

from __future__ import annotations

import io
import struct
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.utils.serialization

from ckptool import CheckpointReadError, read_metadata

STATE = {"a": torch.arange(4.0), "b": torch.ones(3)}
Shape = Callable[[bytes], bytes]


@contextmanager
def crc32_off() -> Iterator[None]:
    """torch.save without CRC-32s (a documented speed-up): mutated bytes then reach the
    checks under test instead of failing the CRC first."""
    config = torch.utils.serialization.config.save
    config.compute_crc32 = False
    try:
        yield
    finally:
        config.compute_crc32 = True


def saved(*, crc32: bool = True) -> bytes:
    buffer = io.BytesIO()
    if crc32:
        torch.save(STATE, buffer)
    else:
        with crc32_off():
            torch.save(STATE, buffer)
    return buffer.getvalue()


def torch_loads(data: bytes) -> bool:
    try:
        torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception:  # every way torch refuses counts as refusing
        return False
    return True


def ckptool_reads(path: Path, data: bytes) -> bool:
    path.write_bytes(data)
    try:
        read_metadata(path)
    except CheckpointReadError:
        return False
    return True


def refused_by_both(tmp_path: Path, data: bytes, message: str) -> None:
    assert not torch_loads(data)
    path = tmp_path / "crafted.pt"
    path.write_bytes(data)
    with pytest.raises(CheckpointReadError, match=message):
        read_metadata(path)


def end_records(data: bytes) -> tuple[int, int, int]:
    """Where the zip64 end record, its locator and the end record start."""
    end = len(data) - 22
    assert data[end : end + 4] == b"PK\x05\x06"
    assert data[end - 20 : end - 16] == b"PK\x06\x07"
    assert data[end - 76 : end - 72] == b"PK\x06\x06"
    return end - 76, end - 20, end


# ---- end records


def test_a_zip64_locator_pointing_past_the_end_is_refused(tmp_path: Path) -> None:
    """zipfile ignores the locator's pointer (it reads the record before the locator);
    torch follows it."""
    data = bytearray(saved())
    _, locator, _ = end_records(data)
    data[locator + 8 + 4] ^= 0x40  # a high byte of the pointer
    refused_by_both(tmp_path, bytes(data), "the zip64 locator points past the end of the file")


def test_a_zip64_locator_pointing_at_another_zip64_record_is_refused(tmp_path: Path) -> None:
    """A second zip64 record hidden in a tensor's bytes, counting one entry less: torch
    would read that one, zipfile the one before the locator."""
    plain = saved()
    zip64, locator, _ = end_records(plain)
    fields = list(struct.unpack_from("<4sQ2H2L4Q", plain, zip64))
    fields[6] -= 1
    fields[7] -= 1
    decoy = struct.pack("<4sQ2H2L4Q", *fields)
    state = {"a": torch.frombuffer(bytearray(decoy), dtype=torch.uint8)}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = bytearray(buffer.getvalue())
    zip64, locator, _ = end_records(data)
    struct.pack_into("<Q", data, locator + 8, data.index(decoy))
    path = tmp_path / "decoy.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointReadError, match=f"points at {data.index(decoy)}, not at"):
        read_metadata(path)


def test_a_zip64_locator_pointing_at_no_record_is_refused(tmp_path: Path) -> None:
    """torch then reads the plain end record and loads the file; zipfile reads the zip64
    record before the locator. The two could see different archives: refused."""
    data = bytearray(saved())
    _, locator, _ = end_records(data)
    data[locator + 8] ^= 0x01  # one byte off
    assert torch_loads(bytes(data))
    path = tmp_path / "off-by-one.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointReadError, match="locator does not point at the zip64 end"):
        read_metadata(path)


def _zip64_field(fmt: str, offset: int, value: int, message: str) -> tuple[str, int, int, str]:
    return fmt, offset, value, message


@pytest.mark.parametrize(
    ("fmt", "offset", "value", "message"),
    [
        _zip64_field("<Q", 4, 43, r"the zip64 end record's size \(43\) is too small"),
        _zip64_field("<LL", 16, 2, "the end record names disks 2 and 2"),
        _zip64_field("<Q", 24, 1, r"counts \d+ entries but 1 on this disk"),
        _zip64_field("<L", 56 + 16, 0, "the zip64 locator counts 0 disks; torch reads 1"),
    ],
    ids=["record-size", "disks", "entries-on-disk", "locator-disks"],
)
def test_zip64_fields_torch_refuses_are_refused(
    tmp_path: Path, fmt: str, offset: int, value: int, message: str
) -> None:
    data = bytearray(saved())
    zip64, _, _ = end_records(data)
    struct.pack_into(fmt, data, zip64 + offset, *[value] * len(fmt[1:]))
    assert zipfile.ZipFile(io.BytesIO(bytes(data))).namelist()  # zipfile reads it
    refused_by_both(tmp_path, bytes(data), message)


def test_a_plain_end_record_on_another_disk_is_refused(tmp_path: Path) -> None:
    """The same checks hold for plain end records (zipfile's writer, under 65,536
    entries)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(saved())) as src, zipfile.ZipFile(buffer, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    data = bytearray(buffer.getvalue())
    assert torch_loads(bytes(data)) and b"PK\x06\x07" not in data
    struct.pack_into("<HH", data, len(data) - 22 + 4, 3, 3)
    refused_by_both(tmp_path, bytes(data), "the end record names disks 3 and 3")


# ---- central directory entries


def _entry(data: bytes, suffix: str) -> int:
    """Where the central directory entry whose name ends with ``suffix`` starts."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        at = archive.start_dir
    while True:
        name_length, extra, comment = struct.unpack_from("<3H", data, at + 28)
        if data[at + 46 : at + 46 + name_length].decode().endswith(suffix):
            return at
        at += 46 + name_length + extra + comment


def commented(data: bytes) -> bytes:
    """The archive with a comment after its end record: zipfile reads it, not the fast
    reader; torch loads it as it loads the plain file."""
    return data[:-2] + struct.pack("<H", 3) + b"abc"


@pytest.mark.parametrize("shape", [bytes, commented], ids=["torch-shaped", "commented"])
def test_an_entry_on_another_disk_is_refused(tmp_path: Path, shape: Shape) -> None:
    data = bytearray(saved())
    at = _entry(bytes(data), "data/0")
    struct.pack_into("<H", data, at + 34, 1)  # disk 1: torch reads it as this disk
    assert torch_loads(shape(bytes(data)))
    assert ckptool_reads(tmp_path / "disk1.pt", shape(bytes(data)))
    struct.pack_into("<H", data, at + 34, 2)
    refused_by_both(tmp_path, shape(bytes(data)), "'archive/data/0' starts on disk 2")


@pytest.mark.parametrize("shape", [bytes, commented], ids=["torch-shaped", "commented"])
def test_an_entry_marked_as_a_directory_is_refused(tmp_path: Path, shape: Shape) -> None:
    """torch reads a directory's bytes as nothing: the tensor would load as garbage."""
    data = bytearray(saved())
    at = _entry(bytes(data), "data/0")
    struct.pack_into("<L", data, at + 38, 0x10)  # the DOS directory attribute
    path = tmp_path / "directory.pt"
    path.write_bytes(shape(bytes(data)))
    try:
        loaded = torch.load(path, weights_only=True)
    except Exception:  # refusing is as good: the point is torch does not read the tensor
        pass
    else:
        assert not torch.equal(loaded["a"], STATE["a"])
    with pytest.raises(CheckpointReadError, match="'archive/data/0' is marked as a directory"):
        read_metadata(path)


def test_directories_that_are_directories_are_read(tmp_path: Path) -> None:
    """`zip -r` adds an entry per folder ("archive/", "archive/data/"); torch never
    reads them and loads the file, and so does ckptool."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(saved())) as src, zipfile.ZipFile(buffer, "w") as dst:
        dst.mkdir("archive/")
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    data = buffer.getvalue()
    assert torch_loads(data)
    assert ckptool_reads(tmp_path / "with-folders.pt", data)


def test_an_entry_running_past_the_directory_is_refused_by_either_reader(
    tmp_path: Path,
) -> None:
    """zipfile cuts the last entry's comment at the directory's end, torch refuses the
    archive; so does ckptool, for the torch-shaped file and for one with an archive
    comment (which zipfile reads)."""
    data = bytearray(saved())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        last = archive.infolist()[-1].filename
    at = _entry(bytes(data), last.split("/", 1)[1])
    struct.pack_into("<H", data, at + 32, 5)  # a 5-byte comment past the directory's end
    assert zipfile.ZipFile(io.BytesIO(bytes(data))).namelist()  # zipfile reads it
    past = "the last zip entry runs past the end of the central directory"
    refused_by_both(tmp_path, bytes(data), past)
    refused_by_both(tmp_path, commented(bytes(data)), past)


# ---- records torch parses before data.pkl


def rewritten(name_suffix: str, payload: bytes | None) -> bytes:
    """The saved file with one record's bytes replaced (None: left out), rezipped."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(saved())) as src, zipfile.ZipFile(buffer, "w") as dst:
        for info in src.infolist():
            if not info.filename.endswith(name_suffix):
                dst.writestr(info.filename, src.read(info))
            elif payload is not None:
                dst.writestr(info.filename, payload)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("record", "payload", "message"),
    [
        ("/version", None, "has no version record"),
        ("/version", b"0", "file format version 0; torch reads versions 1-10"),
        ("/version", b"11", "file format version 11; torch reads"),
        ("/version", b"-3", "file format version -3; torch reads"),
        ("/version", b"x3", r"version record b'x3' is not a number"),
        ("/.storage_alignment", b"sixty-four", r"\.storage_alignment record b'sixty-four' is not"),
        ("/.data/serialization_id", b"\xff\xfe", "serialization_id record is not UTF-8 text"),
        ("/byteorder", b"little\n", r"byteorder record is b'little\\n'; torch refuses any but"),
    ],
)
def test_records_torch_cannot_parse_are_refused(
    tmp_path: Path, record: str, payload: bytes | None, message: str
) -> None:
    refused_by_both(tmp_path, rewritten(record, payload), message)


@pytest.mark.parametrize(
    ("record", "payload"),
    [("/version", b" +10 and more"), ("/.storage_alignment", b" 6_4\n"), ("/version", b"1")],
)
def test_records_torch_parses_are_read(tmp_path: Path, record: str, payload: bytes) -> None:
    """torch parses the version as strtoull does and the alignment as Python's int()."""
    data = rewritten(record, payload)
    assert torch_loads(data)
    assert ckptool_reads(tmp_path / "parsed.pt", data)


def test_the_data_version_record_comes_before_the_version_record(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(saved())) as src, zipfile.ZipFile(buffer, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
        dst.writestr("archive/.data/version", b"11")
    refused_by_both(tmp_path, buffer.getvalue(), "file format version 11; torch reads")


# ---- the sweep


def _structure(data: bytes) -> list[int]:
    """Every offset of the zip structure, and of the small records torch parses: all
    but the bytes of data.pkl and of the storages."""
    payloads = []
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            if info.filename.endswith("data.pkl") or "/data/" in info.filename:
                name_length, extra = struct.unpack_from("<HH", data, info.header_offset + 26)
                start = info.header_offset + 30 + name_length + extra
                payloads.append(range(start, start + info.file_size))
    return [at for at in range(len(data)) if not any(at in payload for payload in payloads)]


def test_no_single_byte_mutant_of_the_structure_reads_here_and_fails_in_torch(
    tmp_path: Path,
) -> None:
    data = saved(crc32=False)
    path = tmp_path / "mutant.pt"
    read = refused = 0
    for at in _structure(data):
        for value in (data[at] ^ 0x01, 0xFF):
            if value == data[at]:
                continue
            mutant = data[:at] + bytes([value]) + data[at + 1 :]
            if ckptool_reads(path, mutant):
                read += 1
                assert torch_loads(mutant), (at, value)
            else:
                refused += 1
    assert read > 1000 and refused > 1000  # both verdicts are common: the sweep is not idle


def test_no_single_byte_mutant_of_a_safetensors_header_reads_here_and_fails_there(
    tmp_path: Path,
) -> None:
    """The same promise for .safetensors against the safetensors library's loader, on
    every header byte set to JSON's structural characters and a few others."""
    from safetensors.torch import load_file, save_file

    source = tmp_path / "source.safetensors"
    state = {"a": torch.arange(4.0), "c": torch.zeros(0), "b": torch.ones(3).half()}
    save_file(state, source, metadata={"format": "pt"})
    data = source.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    path = tmp_path / "mutant.safetensors"
    read = refused = 0
    for at in range(header_end):
        for value in {data[at] ^ 0x01, data[at] ^ 0x80, 0, *b'"1 \\,]}'} - {data[at]}:
            if ckptool_reads(path, data[:at] + bytes([value]) + data[at + 1 :]):
                read += 1
                load_file(path)  # raises if the library refuses what ckptool read
            else:
                refused += 1
    assert read > 50 and refused > 1000
