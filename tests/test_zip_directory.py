"""The central directory of torch.save zips: the one-struct reader agrees with zipfile.

The fast reader takes only archives shaped as torch.save writes them and hands every
other to zipfile, so the promise is: whenever it answers, zipfile reads the same
records. Tests hold it to that on torch's own files, on zip64 end records, and on
mutants of the directory bytes; and they check the refusals that replaced zipfile's
own read of data.pkl (CRC-32, encryption, stored sizes).
"""

from __future__ import annotations

import io
import random
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import ConvBN, seeded_state

from ckptool import CheckpointReadError, read_metadata
from ckptool.formats import torch_pickle, zip_directory
from ckptool.formats.zip_directory import ZipDirectory, read_directory


def torch_zip_bytes(state: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def fast(data: bytes) -> ZipDirectory | None:
    stream = io.BytesIO(data)
    end = zip_directory._end_records(stream, len(data))
    return zip_directory._torch_shaped(stream, len(data), end, max_entries=1 << 20)


def fast_or_refusal(data: bytes) -> ZipDirectory | str | None:
    try:
        return fast(data)
    except (zipfile.BadZipFile, zip_directory.EntryBudgetError):
        return "refused"  # (tests below hold torch to refusing such files too)


def by_zipfile(data: bytes) -> ZipDirectory | str:
    try:
        stream = io.BytesIO(data)
        return zip_directory._with_zipfile(stream, zip_directory._end_records(stream, len(data)))
    except Exception as e:  # every way zipfile refuses is an answer to compare
        return type(e).__name__


def test_torch_save_files_take_the_fast_path_and_read_as_zipfile_reads_them() -> None:
    data = torch_zip_bytes(torchvision.models.resnet18(weights=None).state_dict())
    directory = fast(data)
    assert directory is not None
    assert directory == by_zipfile(data)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert [r.name for r in directory.records] == archive.namelist()
        assert directory.start == archive.start_dir


def test_plain_end_records_are_read_as_zip64_ones() -> None:
    """torch.save always writes zip64 end records (checked here); zipfile's writer
    only past 65,535 entries: both kinds are read."""
    assert torch_zip_bytes(seeded_state(ConvBN))[-22 - 20 : -22][:4] == b"PK\x06\x07"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(3):
            archive.writestr(f"archive/data/{i}", bytes(4 * i))
    data = buffer.getvalue()
    assert b"PK\x06\x07" not in data
    directory = fast(data)
    assert directory is not None and len(directory.records) == 3
    assert directory == by_zipfile(data)


def test_archives_of_other_shapes_go_to_zipfile() -> None:
    """An archive comment, an extra field: zipfile reads them (it searches for the end
    record, takes zip64 sizes from extras). Bytes before the archive: zipfile would
    shift every offset by them, torch does not, and its zip64 locator then points
    before the zip64 record: refused."""
    plain = torch_zip_bytes(seeded_state(ConvBN))
    commented = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(plain)) as src, zipfile.ZipFile(commented, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        dst.comment = b"a comment"
    with_extra = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(plain)) as src, zipfile.ZipFile(with_extra, "w") as dst:
        for info in src.infolist():
            info.extra = struct.pack("<HH", 0xCAFE, 2) + b"xy"
            dst.writestr(info, src.read(info))
    prefixed = b"prefix" + plain
    with pytest.raises(zipfile.BadZipFile, match="locator does not point at the zip64 end"):
        read_directory(io.BytesIO(prefixed), len(prefixed), max_entries=1 << 20)
    with pytest.raises(Exception):  # noqa: B017 (torch's reader refuses it one way or another)
        torch.load(io.BytesIO(prefixed), weights_only=True)
    for data in (commented.getvalue(), with_extra.getvalue()):
        assert fast(data) is None
        directory = read_directory(io.BytesIO(data), len(data), max_entries=1 << 20)
        assert directory == by_zipfile(data)
        assert [r.name for r in directory.records] == [r.name for r in fast(plain).records]


@pytest.mark.parametrize("seed", range(4))
def test_mutated_directories_read_as_zipfile_reads_them_or_go_to_it(seed: int) -> None:
    """Bytes of the directory and end records flipped, overwritten, cut or inserted:
    whenever the fast reader answers, zipfile reads the same records."""
    data = torch_zip_bytes(seeded_state(ConvBN))
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        tail = archive.start_dir
    rng = random.Random(seed)
    answered = 0
    for _ in range(300):
        mutant = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(tail, len(mutant))
            action = rng.choice(("flip", "byte", "cut", "insert"))
            if action == "flip":
                mutant[at] ^= 1 << rng.randrange(8)
            elif action == "byte":
                mutant[at] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
            elif action == "cut":
                del mutant[at]
            else:
                mutant.insert(at, rng.randrange(256))
        directory = fast_or_refusal(bytes(mutant))
        if isinstance(directory, ZipDirectory):
            answered += 1
            assert directory == by_zipfile(bytes(mutant)), (seed, bytes(mutant[tail:]))
    assert answered > 30  # most flips land in fields zipfile ignores: both read them


def _end_record_at(data: bytes) -> int:
    at = len(data) - 22
    assert data[at : at + 4] == b"PK\x05\x06"
    return at


def test_an_entry_count_other_than_the_directory_s_is_refused(tmp_path: Path) -> None:
    """torch reads as many entries as the end record counts, zipfile all of them."""
    data = bytearray(torch_zip_bytes(seeded_state(ConvBN)))
    at = _end_record_at(data)
    zip64 = at - 20 - 56
    count = struct.unpack_from("<Q", data, zip64 + 32)[0]
    struct.pack_into("<QQ", data, zip64 + 24, count - 1, count - 1)
    assert isinstance(by_zipfile(bytes(data)), ZipDirectory)  # zipfile reads it whole
    path = tmp_path / "miscounted.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointReadError, match=f"counts {count - 1} entries but the dir"):
        read_metadata(path)


def test_an_end_record_with_a_comment_is_found_as_zipfile_finds_it() -> None:
    """With a comment, zipfile searches for the last end signature: here one in the
    record's own count fields, where it reads a cut record and refuses the archive."""
    data = bytearray(torch_zip_bytes(seeded_state(ConvBN)))
    at = _end_record_at(data)
    data[at + 8 : at + 12] = b"PK\x05\x06"
    assert isinstance(by_zipfile(bytes(data)), ZipDirectory)  # no comment: not searched
    data[-2:] = b"\x01\x00"
    assert fast(bytes(data)) is None
    assert by_zipfile(bytes(data)) == "BadZipFile"


def test_a_name_with_a_nul_is_read_as_zipfile_cuts_it() -> None:
    data = bytearray(torch_zip_bytes(seeded_state(ConvBN)))
    directory = fast(bytes(data))
    assert directory is not None
    name = next(r.raw_name for r in directory.records if r.name.endswith("data/0"))
    at = data.index(name, directory.start)
    data[at + len(name) - 2] = 0  # "archive/data/0" -> "archive/data\x000"
    assert fast(bytes(data)) is None
    zipfile_read = read_directory(io.BytesIO(bytes(data)), len(data), max_entries=1 << 20)
    assert "archive/data" in [r.name for r in zipfile_read.records]


DirectoryEdit = Callable[[str, bytearray, int], None]


def crafted(edit_record: DirectoryEdit) -> bytes:
    """A ConvBN torch.save zip whose central directory entries ``edit_record`` edits in
    place (name, archive bytes, where the entry starts)."""
    data = bytearray(torch_zip_bytes(seeded_state(ConvBN)))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        position = archive.start_dir
        for info in archive.infolist():
            edit_record(info.filename, data, position)
            name_length, extra, comment = struct.unpack_from("<3H", data, position + 28)
            position += 46 + name_length + extra + comment
    return bytes(data)


def _set_flag(bit: int) -> DirectoryEdit:
    def edit(name: str, data: bytearray, position: int) -> None:
        if name.endswith("data/0"):
            flags = struct.unpack_from("<H", data, position + 8)[0]
            struct.pack_into("<H", data, position + 8, flags | bit)

    return edit


def _stored_size_off_by_one(name: str, data: bytearray, position: int) -> None:
    if name.endswith("data/0"):
        compressed = struct.unpack_from("<L", data, position + 20)[0]
        struct.pack_into("<L", data, position + 20, compressed + 1)


def _sizes_past_the_end(name: str, data: bytearray, position: int) -> None:
    if name.endswith("data/0"):
        struct.pack_into("<LL", data, position + 20, 1 << 30, 1 << 30)  # both sizes: 1 GiB


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set_flag(0x01), "data/0' is compressed or encrypted"),
        (_set_flag(0x40), "data/0' is compressed or encrypted"),
        (_set_flag(0x20), "data/0' is compressed or encrypted"),
        (_set_flag(0x2000), "data/0' is compressed or encrypted"),
        (
            _stored_size_off_by_one,
            r"data/0' is not compressed, yet its sizes differ \(\d+ bytes, \d+ stored\)",
        ),
        (_sizes_past_the_end, "data/0' claims 1073741824 bytes beyond the end of the file"),
    ],
    ids=["encrypted", "strongly-encrypted", "patched", "masked", "stored-size", "past-the-end"],
)
def test_records_torch_never_writes_are_refused(
    tmp_path: Path, edit: DirectoryEdit, message: str
) -> None:
    path = tmp_path / "crafted.pt"
    path.write_bytes(crafted(edit))
    with pytest.raises(CheckpointReadError, match=message):
        read_metadata(path)


def test_a_pickle_that_fails_its_crc_is_refused(tmp_path: Path) -> None:
    """zipfile checked data.pkl's CRC-32 when it read it; the reader now checks it."""
    plain = torch_zip_bytes(seeded_state(ConvBN))
    with zipfile.ZipFile(io.BytesIO(plain)) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("data.pkl"))
        data_pkl = archive.read(info)
    at = plain.index(data_pkl) + len(data_pkl) - 2  # the pickle's last opcodes
    assert plain[at : at + 2].endswith(b".")
    path = tmp_path / "flipped.pt"
    path.write_bytes(plain[:at] + b"\x00" + plain[at + 1 :])
    with pytest.raises(CheckpointReadError, match=r"data\.pkl' does not match its CRC-32"):
        read_metadata(path)
    path.write_bytes(plain)
    assert set(read_metadata(path).tensors) == set(seeded_state(ConvBN))


def test_a_local_header_must_repeat_the_directory_name(tmp_path: Path) -> None:
    plain = torch_zip_bytes(seeded_state(ConvBN))
    directory = fast(plain)
    assert directory is not None
    record = next(r for r in directory.records if r.name.endswith("data/0"))
    name_at = record.header_offset + 30
    assert plain[name_at : name_at + len(record.raw_name)] == record.raw_name
    swapped = bytearray(plain)
    swapped[name_at + len(record.raw_name) - 1] = ord("9")  # data/0 -> data/9
    path = tmp_path / "swapped.pt"
    path.write_bytes(bytes(swapped))
    with pytest.raises(CheckpointReadError, match="local header names another entry"):
        read_metadata(path)


def _pickle_local_header(plain: bytes) -> int:
    directory = fast(plain)
    assert directory is not None
    record = next(r for r in directory.records if r.name.endswith("data.pkl"))
    assert plain[record.header_offset : record.header_offset + 4] == b"PK\x03\x04"
    return record.header_offset


def test_a_local_header_without_its_signature_is_refused(tmp_path: Path) -> None:
    """torch's reader refuses it (the name and sizes could still be right)."""
    data = bytearray(torch_zip_bytes(seeded_state(ConvBN)))
    directory = fast(bytes(data))
    assert directory is not None
    record = next(r for r in directory.records if r.name.endswith("data/0"))
    data[record.header_offset + 3] = 0x05  # PK\x03\x04 -> PK\x03\x05
    path = tmp_path / "unsigned.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointReadError, match="'archive/data/0' has no valid local header"):
        read_metadata(path)


def test_a_local_name_length_must_be_the_directory_s(tmp_path: Path) -> None:
    """torch finds the data after the local header's own lengths: one longer than the
    directory's name would move data.pkl by a byte."""
    data = bytearray(torch_zip_bytes(seeded_state(ConvBN)))
    at = _pickle_local_header(bytes(data))
    (name_length,) = struct.unpack_from("<H", data, at + 26)
    struct.pack_into("<H", data, at + 26, name_length + 1)
    path = tmp_path / "longer-name.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointReadError, match="local header names another entry"):
        read_metadata(path)


def test_a_local_extra_field_past_the_end_of_the_file_is_refused(tmp_path: Path) -> None:
    data = bytearray(torch_zip_bytes(seeded_state(ConvBN)))
    at = _pickle_local_header(bytes(data))
    struct.pack_into("<H", data, at + 28, 0xFFFF)  # data.pkl would start past the end
    assert len(data) < 0xFFFF
    path = tmp_path / "cut.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointReadError, match="is cut short; the file is truncated"):
        read_metadata(path)


def _entry_at(data: bytes, name: bytes) -> int:
    """Where the central directory entry named ``name`` starts."""
    directory = fast(data)
    assert directory is not None
    at = directory.start
    while data[at + 46 : at + 46 + len(name)] != name:
        name_length, extra, comment = struct.unpack_from("<3H", data, at + 28)
        at += 46 + name_length + extra + comment
    return at


def test_a_version_zipfile_cannot_extract_goes_to_zipfile() -> None:
    data = bytearray(torch_zip_bytes(seeded_state(ConvBN)))
    directory = fast(bytes(data))
    assert directory is not None
    at = _entry_at(bytes(data), directory.records[-2].raw_name)
    data[at + 6] = 64  # "version needed to extract": 6.4, past zipfile's 6.3
    assert fast(bytes(data)) is None
    assert by_zipfile(bytes(data)) == "NotImplementedError"


def test_an_entry_cut_by_the_directory_end_goes_to_zipfile() -> None:
    """The second-to-last name grows over the last entry but for its final 10 bytes:
    what is left is shorter than an entry header, which zipfile calls truncated."""
    data = bytearray(torch_zip_bytes(seeded_state(ConvBN)))
    directory = fast(bytes(data))
    assert directory is not None
    second_last = _entry_at(bytes(data), directory.records[-2].raw_name)
    last = _entry_at(bytes(data), directory.records[-1].raw_name)
    directory_end = _end_record_at(data) - 20 - 56
    swallowed = directory_end - 10 - (second_last + 46)
    data[last : directory_end - 10] = b"x" * (directory_end - 10 - last)  # ASCII name
    struct.pack_into("<H", data, second_last + 28, swallowed)
    assert fast(bytes(data)) is None
    assert by_zipfile(bytes(data)) == "BadZipFile"


@pytest.mark.parametrize(("field", "value"), [(16, 2), (4, 1)], ids=["disks", "disk"])
def test_a_multi_disk_locator_is_refused_as_zipfile_refuses_it(field: int, value: int) -> None:
    """Two disks, or the zip64 record on disk 1 (torch ignores that field, and would
    read the file: refusing it keeps the fast reader's answer zipfile's)."""
    data = bytearray(torch_zip_bytes(seeded_state(ConvBN)))
    locator = _end_record_at(data) - 20
    struct.pack_into("<L", data, locator + field, value)
    with pytest.raises(zipfile.BadZipFile, match="span multiple disks"):
        fast(bytes(data))
    assert by_zipfile(bytes(data)) == "BadZipFile"


def test_a_zip64_record_without_its_signature_goes_to_zipfile() -> None:
    """zipfile then reads the plain end record alone and takes the 76 bytes of zip64
    records before it for bytes the archive grew by: it shifts every offset, finds no
    directory there and refuses the file."""
    data = bytearray(torch_zip_bytes(seeded_state(ConvBN)))
    zip64 = _end_record_at(data) - 20 - 56
    data[zip64 : zip64 + 4] = b"PK\x06\x00"
    assert fast(bytes(data)) is None
    assert by_zipfile(bytes(data)) == "BadZipFile"


def test_a_directory_over_the_entry_budget_is_refused_before_it_is_read() -> None:
    """The first entry is broken: read, it would send the archive to zipfile. Over the
    budget, the end record's count alone refuses it."""
    data = bytearray(torch_zip_bytes(seeded_state(ConvBN)))
    directory = fast(bytes(data))
    assert directory is not None
    count = len(directory.records)
    data[directory.start : directory.start + 4] = b"PK\x09\x09"
    with pytest.raises(zip_directory.EntryBudgetError, match=f"counts {count} entries"):
        read_directory(io.BytesIO(bytes(data)), len(data), max_entries=count - 1)
    with pytest.raises(zipfile.BadZipFile):  # within the budget: read, and zipfile refuses
        read_directory(io.BytesIO(bytes(data)), len(data), max_entries=count)


def test_the_entry_budget_holds_for_archives_either_reader_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = torch_zip_bytes(seeded_state(ConvBN))
    directory = fast(plain)
    assert directory is not None
    commented = plain[:-2] + struct.pack("<H", 9) + b"a comment"  # zipfile reads this one
    assert fast(commented) is None
    monkeypatch.setattr(torch_pickle, "MAX_ZIP_ENTRIES", len(directory.records) - 1)
    for name, data in (("plain.pt", plain), ("commented.pt", commented)):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CheckpointReadError, match=r"entries, over the budget of \d+"):
            read_metadata(path)
    monkeypatch.setattr(torch_pickle, "MAX_ZIP_ENTRIES", len(directory.records))
    assert len(read_metadata(tmp_path / "commented.pt").tensors) == len(seeded_state(ConvBN))


@pytest.mark.parametrize("length", [4, 21])
def test_a_zip_shorter_than_an_end_record_is_refused_as_corrupt(
    tmp_path: Path, length: int
) -> None:
    """The first bytes of a torch.save file name it a zip; cut before 22 bytes, there is
    no end record to read, and the fast reader does not seek before the file's start."""
    data = torch_zip_bytes(seeded_state(ConvBN))[:length]
    assert fast(data) is None
    path = tmp_path / "cut.pt"
    path.write_bytes(data)
    with pytest.raises(CheckpointReadError, match="corrupt zip archive"):
        read_metadata(path)
