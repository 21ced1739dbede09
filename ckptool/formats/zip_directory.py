"""A zip archive's central directory, as torch.save writes it, read in one pass.

zipfile builds a ZipInfo per entry (date, extra fields, attributes) in Python: 0.5 s
and 49 MiB for the 100,006 records of a 100,000-tensor torch.save file. torch.save's
directory has one shape: no archive comment, no bytes before the archive, entries
without extra fields (zip64 end records past 65,535 entries). That shape is read here
with one struct per entry. Any other archive is read by zipfile, whose records are
turned into the same ``ZipRecord``. What zipfile accepts or refuses is unchanged but
for one refusal: a torch-shaped directory whose end record counts other than the
entries it holds (torch reads as many as counted, zipfile as many as there are). Tests
hold both readers to the same records on every archive the fast one accepts.
"""

from __future__ import annotations

import struct
import zipfile
from typing import Any, NamedTuple


class ZipRecord(NamedTuple):
    """One central directory entry: what the readers of torch.save files need."""

    name: str
    header_offset: int  # where the local header starts
    file_size: int
    compress_size: int
    crc: int
    flag_bits: int
    compress_type: int
    raw_name: bytes  # the name as stored, which the local header must repeat


class ZipDirectory(NamedTuple):
    records: list[ZipRecord]
    start: int  # where the central directory starts: every record ends before it


def read_directory(stream: Any, size: int, *, max_entries: int) -> ZipDirectory:
    """The central directory of the zip archive ``stream`` (``size`` bytes).

    Raises:
        EntryBudgetError: a torch-shaped directory counts over ``max_entries`` entries;
            refused before any is read (a crafted one of millions would fill memory).
            Callers check the count of any other archive once zipfile has read it.
        What zipfile raises on an archive it cannot read (BadZipFile, ...); BadZipFile
            for an entry count that is not the directory's.
    """
    return _torch_shaped(stream, size, max_entries=max_entries) or _with_zipfile(stream)


class EntryBudgetError(Exception):
    """The end record counts more entries than the caller's budget."""

    def __init__(self, count: int) -> None:
        super().__init__(f"the end record counts {count} entries")
        self.count = count


def _with_zipfile(stream: Any) -> ZipDirectory:
    with zipfile.ZipFile(stream) as archive:
        return ZipDirectory(list(map(_from_info, archive.infolist())), archive.start_dir)


def _from_info(info: zipfile.ZipInfo) -> ZipRecord:
    # zipfile decoded the name as UTF-8 if flag bit 11 is set, else as cp437 (which
    # maps every byte, so encoding gives the stored bytes back).
    encoding = "utf-8" if info.flag_bits & UTF8_NAME else "cp437"
    return ZipRecord(
        info.filename,
        info.header_offset,
        info.file_size,
        info.compress_size,
        info.CRC,
        info.flag_bits,
        info.compress_type,
        info.orig_filename.encode(encoding),
    )


UTF8_NAME = 0x800

# The layouts, as in zipfile; "x" skips fields no reader here uses (times, attributes).
_END = struct.Struct("<4s4H2LH")
_END64_LOCATOR = struct.Struct("<4sLQL")
_END64 = struct.Struct("<4sQ2H2L4Q")
_CENTRAL = struct.Struct("<4s2xBxHH4xLLLHHH8xL")
# zipfile refuses entries that need a newer version to extract.
_MAX_EXTRACT_VERSION = 63


class _NotTorchShaped(Exception):
    """The archive is not shaped as torch.save writes it: zipfile reads it instead."""


def _torch_shaped(stream: Any, size: int, *, max_entries: int) -> ZipDirectory | None:
    """The directory read entry by entry with one struct, or None if the archive is not
    shaped as torch.save writes it."""
    try:
        count, start, length = _directory_span(stream, size)
        if count > max_entries:  # as many entries must be read, or it is refused below
            raise EntryBudgetError(count)
        stream.seek(start)
        records = _entries(stream.read(length))
    except _NotTorchShaped:
        return None
    if len(records) != count:
        # zipfile reads entries until the directory's length is used up, torch reads as
        # many as the end record counts: the two would see different archives.
        raise zipfile.BadZipFile(
            f"the end record counts {count} entries but the directory holds {len(records)}"
        )
    return ZipDirectory(records, start)


def _directory_span(stream: Any, size: int) -> tuple[int, int, int]:
    """(entries, start, length) of the central directory if the end record closes the
    file without a comment and the directory ends where the end records begin (zipfile
    otherwise searches for the record, or shifts every offset by the bytes before the
    archive)."""
    if size < _END.size:
        raise _NotTorchShaped
    stream.seek(size - _END.size)
    signature, _, _, _, count, length, start, comment = _END.unpack(stream.read(_END.size))
    if signature != b"PK\x05\x06" or comment:
        raise _NotTorchShaped
    end_records = size - _END.size
    zip64 = _zip64_end(stream, size)
    if zip64 is not None:
        count, length, start = zip64
        end_records -= _END64_LOCATOR.size + _END64.size
    if start + length != end_records:
        raise _NotTorchShaped
    return count, start, length


def _zip64_end(stream: Any, size: int) -> tuple[int, int, int] | None:
    """(entries, length, start) from the zip64 end record, or None without one. zipfile
    looks for it right before its locator, itself right before the end record, and
    reads the plain end record if either signature is not there."""
    if size < _END.size + _END64_LOCATOR.size + _END64.size:
        return None
    stream.seek(size - _END.size - _END64_LOCATOR.size - _END64.size)
    record = stream.read(_END64.size + _END64_LOCATOR.size)
    located, disk, _, disks = _END64_LOCATOR.unpack_from(record, _END64.size)
    if located != b"PK\x06\x07":
        return None
    if disk != 0 or disks > 1:
        raise _NotTorchShaped  # zipfile refuses an archive on several disks
    fields = _END64.unpack_from(record)
    if fields[0] != b"PK\x06\x06":
        return None
    return fields[7], fields[8], fields[9]


def _entries(data: bytes) -> list[ZipRecord]:
    """Every entry of the directory ``data``, unless one is read otherwise by zipfile:
    an extra field (zip64 sizes live there), a NUL in the name (zipfile cuts it there),
    a name that is not UTF-8 where flagged, an entry cut short. A name or comment that
    runs past the end is cut there, as zipfile's reads cut it, and ends the directory."""
    records = []
    unpack, position, length = _CENTRAL.unpack_from, 0, len(data)
    while position < length:
        if length - position < _CENTRAL.size:
            raise _NotTorchShaped
        (signature, version, flags, method, crc, compressed, plain, name_length, extra,
         comment, offset) = unpack(data, position)  # fmt: skip
        name_start = position + _CENTRAL.size
        position = name_start + name_length + comment
        raw = data[name_start : name_start + name_length]
        if signature != b"PK\x01\x02" or version > _MAX_EXTRACT_VERSION or extra:
            raise _NotTorchShaped
        if b"\x00" in raw:
            raise _NotTorchShaped
        try:
            name = raw.decode("utf-8" if flags & UTF8_NAME else "cp437")
        except UnicodeDecodeError:
            raise _NotTorchShaped from None
        records.append(ZipRecord(name, offset, plain, compressed, crc, flags, method, raw))
    return records
