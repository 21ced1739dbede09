"""A zip archive's central directory, as torch.save writes it, read in one pass.

zipfile builds a ZipInfo per entry (date, extra fields, attributes) in Python: 0.5 s
and 49 MiB for the 100,006 records of a 100,000-tensor torch.save file. torch.save's
directory has one shape: no archive comment, no bytes before the archive, entries
without extra fields (zip64 end records past 65,535 entries). That shape is read here
with one struct per entry. Any other archive is read by zipfile, whose records are
turned into the same ``ZipRecord``. Tests hold both readers to the same records on
every archive the fast one accepts.

Either way, the archive is refused where torch's own reader (miniz) refuses it and
zipfile would not, so that a file ckptool reads is one torch loads: end records that
count other than the entries, name another disk, or whose zip64 locator points
elsewhere than the zip64 record zipfile reads; entries on other disks, entries marked as
directories (torch reads them as empty) and an entry that runs past the directory's end.
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
            for an archive torch's reader refuses (see the module's docstring).
    """
    end = _end_records(stream, size)  # read once; both readers hold the archive to it
    return _torch_shaped(stream, size, end, max_entries=max_entries) or _with_zipfile(stream, end)


class EntryBudgetError(Exception):
    """The end record counts more entries than the caller's budget."""

    def __init__(self, count: int) -> None:
        super().__init__(f"the end record counts {count} entries")
        self.count = count


def _with_zipfile(stream: Any, end: _EndRecords | None) -> ZipDirectory:
    with zipfile.ZipFile(stream) as archive:
        infos, start = archive.infolist(), archive.start_dir
    if end is not None:  # zipfile found none otherwise, and refused the archive above
        for info in infos:
            _check_entry(info.filename, info.volume, info.external_attr, end.disk)
        _check_entry_lengths(stream, start, end.length)
    return ZipDirectory(list(map(_from_info, infos)), start)


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
# The DOS attribute of a directory, in an entry's external attributes.
_DOS_DIRECTORY = 0x10

# The layouts, as in zipfile; "x" skips fields no reader here uses (times, versions
# made by, internal attributes).
_END = struct.Struct("<4s4H2LH")
_END64_LOCATOR = struct.Struct("<4sLQL")
_END64 = struct.Struct("<4sQ2H2L4Q")
_CENTRAL = struct.Struct("<4s2xBxHH4xLLLHHHH2xLL")
# zipfile refuses entries that need a newer version to extract.
_MAX_EXTRACT_VERSION = 63
_END_SIGNATURE = b"PK\x05\x06"
_END64_SIGNATURE = b"PK\x06\x06"
_LOCATOR_SIGNATURE = b"PK\x06\x07"


class _NotTorchShaped(Exception):
    """The archive is not shaped as torch.save writes it: zipfile reads it instead."""


class _EndRecords(NamedTuple):
    """The end records as torch's reader reads them (the zip64 record's fields if it
    has one)."""

    closes_file: bool  # the plain end record ends the file: no comment after it
    zip64: bool
    entries: int
    start: int
    length: int
    disk: int  # the disk it is on: entries on other disks but 1 are refused


def _torch_shaped(
    stream: Any, size: int, end: _EndRecords | None, *, max_entries: int
) -> ZipDirectory | None:
    """The directory read entry by entry with one struct, or None if the archive is not
    shaped as torch.save writes it."""
    if end is None or not end.closes_file:
        return None
    # zipfile otherwise shifts every offset by the bytes between directory and end records
    directory_end = size - _END.size - (_END64_LOCATOR.size + _END64.size if end.zip64 else 0)
    if end.start + end.length != directory_end:
        return None
    if end.entries > max_entries:  # as many entries must be read, or it is refused below
        raise EntryBudgetError(end.entries)
    stream.seek(end.start)
    try:
        records = _entries(stream.read(end.length), end.disk)
    except _NotTorchShaped:
        return None
    if len(records) != end.entries:
        # zipfile reads entries until the directory's length is used up, torch reads as
        # many as the end record counts: the two would see different archives.
        raise zipfile.BadZipFile(
            f"the end record counts {end.entries} entries but the directory holds {len(records)}"
        )
    return ZipDirectory(records, end.start)


def _end_records(stream: Any, size: int) -> _EndRecords | None:
    """The end records, found as zipfile finds them, or None without one.

    Raises:
        BadZipFile: torch's reader refuses them, or it and zipfile would read different
            ones.
    """
    position = _end_record_position(stream, size)
    if position is None:
        return None
    stream.seek(position)
    _, disk, directory_disk, on_disk, count, length, start, _ = _END.unpack(stream.read(_END.size))
    zip64 = _zip64_end(stream, size, position)
    if zip64 is not None:
        disk, directory_disk, on_disk, count, length, start = zip64
    if on_disk != count:
        raise zipfile.BadZipFile(
            f"the end record counts {count} entries but {on_disk} on this disk; "
            "torch refuses archives over several disks"
        )
    if (disk, directory_disk) not in ((0, 0), (1, 1)):
        raise zipfile.BadZipFile(
            f"the end record names disks {disk} and {directory_disk}; torch refuses "
            "archives over several disks"
        )
    # (A comment length with no comment after the record reads as an empty comment.)
    return _EndRecords(position == size - _END.size, zip64 is not None, count, start, length, disk)


def _end_record_position(stream: Any, size: int) -> int | None:
    """Where the end record starts: at the end of the file if it has no comment, else
    the last end signature within a comment's reach (as zipfile and torch look)."""
    if size < _END.size:
        return None
    stream.seek(size - _END.size)
    last = stream.read(_END.size)
    if last[:4] == _END_SIGNATURE and last[-2:] == b"\x00\x00":
        return size - _END.size
    window = max(size - (1 << 16) - _END.size, 0)
    stream.seek(window)
    tail: bytes = stream.read()
    found = tail.rfind(_END_SIGNATURE)
    if found < 0 or len(tail) - found < _END.size:
        return None
    return window + found


def _zip64_end(stream: Any, size: int, position: int) -> tuple[int, ...] | None:
    """(disk, directory disk, entries on it, entries, length, start) from the zip64 end
    record, or None without one.

    zipfile reads the zip64 record right before its locator, itself right before the
    end record; torch reads it where the locator points. Both read the plain end record
    if there is no zip64 one. An archive where the two would differ is refused, as is
    one that either refuses.
    """
    if position < _END64_LOCATOR.size + _END64.size:
        return None  # torch's reader does not look for a locator then
    stream.seek(position - _END64_LOCATOR.size)
    located, locator_disk, offset, disks = _END64_LOCATOR.unpack(stream.read(_END64_LOCATOR.size))
    if located != _LOCATOR_SIGNATURE:
        return None
    if locator_disk != 0 or disks > 1:
        raise zipfile.BadZipFile("zipfiles that span multiple disks are not supported")
    if offset > size - _END64.size:
        raise zipfile.BadZipFile(
            f"the zip64 locator points past the end of the file (to {offset}); torch refuses it"
        )
    before_locator = position - _END64_LOCATOR.size - _END64.size
    stream.seek(offset)
    fields = _END64.unpack(stream.read(_END64.size))
    if fields[0] != _END64_SIGNATURE:
        stream.seek(before_locator)
        if stream.read(4) == _END64_SIGNATURE:  # zipfile reads that one, torch none
            raise zipfile.BadZipFile("the zip64 locator does not point at the zip64 end record")
        return None
    if offset != before_locator:
        raise zipfile.BadZipFile(
            f"the zip64 locator points at {offset}, not at the zip64 end record before it"
        )
    if fields[1] < _END64.size - 12:  # what follows the record's size field
        raise zipfile.BadZipFile(f"the zip64 end record's size ({fields[1]}) is too small")
    if disks != 1:
        raise zipfile.BadZipFile(f"the zip64 locator counts {disks} disks; torch reads 1")
    return fields[4:]


def _check_entry(name: str, disk: int, attributes: int, end_disk: int) -> None:
    """Refuse an entry torch's reader refuses or reads otherwise than zipfile."""
    if disk == 0xFFFF or disk not in (end_disk, 1):
        raise zipfile.BadZipFile(
            f"zip entry {name!r} starts on disk {disk}; torch refuses archives over several disks"
        )
    if attributes & _DOS_DIRECTORY and not name.endswith("/"):
        raise zipfile.BadZipFile(
            f"zip entry {name!r} is marked as a directory; torch would read it as empty"
        )


def _check_entry_lengths(stream: Any, start: int, length: int) -> None:
    """zipfile cuts a name, extra field or comment that runs past the directory's end
    (it reads the directory as one block); torch refuses the archive."""
    stream.seek(start)
    data = stream.read(length)
    position = 0
    while position < len(data):  # zipfile read a whole header at each of these
        name, extra, comment = struct.unpack_from("<3H", data, position + 28)
        position += _CENTRAL.size + name + extra + comment
    if position > length:
        raise _past_the_directory()


def _past_the_directory() -> zipfile.BadZipFile:
    return zipfile.BadZipFile("the last zip entry runs past the end of the central directory")


def _entries(data: bytes, disk: int) -> list[ZipRecord]:
    """Every entry of the directory ``data``, unless one is read otherwise by zipfile:
    an extra field (zip64 sizes live there), a NUL in the name (zipfile cuts it there),
    a name that is not UTF-8 where flagged, an entry cut short. ``disk`` is the end
    record's."""
    records = []
    unpack, position, length = _CENTRAL.unpack_from, 0, len(data)
    while position < length:
        if length - position < _CENTRAL.size:
            raise _NotTorchShaped
        (signature, version, flags, method, crc, compressed, plain, name_length, extra,
         comment, entry_disk, attributes, offset) = unpack(data, position)  # fmt: skip
        name_start = position + _CENTRAL.size
        position = name_start + name_length + comment
        raw = data[name_start : name_start + name_length]
        if signature != b"PK\x01\x02" or version > _MAX_EXTRACT_VERSION or extra:
            raise _NotTorchShaped
        if b"\x00" in raw:
            raise _NotTorchShaped
        if position > length:
            raise _past_the_directory()
        try:
            name = raw.decode("utf-8" if flags & UTF8_NAME else "cp437")
        except UnicodeDecodeError:
            raise _NotTorchShaped from None
        if entry_disk != disk or attributes & _DOS_DIRECTORY:  # else it passes: skip the call
            _check_entry(name, entry_disk, attributes, disk)
        records.append(ZipRecord(name, offset, plain, compressed, crc, flags, method, raw))
    return records
