"""torch.save files, zip (torch >= 1.6) and legacy (sequence of pickles), read as metadata.

Only ``data.pkl`` (or the legacy header pickles) is read; storage bytes are never
touched, so cost grows with the number of tensors, not with the file size.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import math
import operator
import os
import re
import struct
import zipfile
import zlib
from typing import Any, BinaryIO

from ckptool.errors import CheckpointReadError
from ckptool.formats.containers import module_versions, select_tensor_dict
from ckptool.formats.meta import DTYPE_SIZES, CheckpointMeta, Format, TensorMeta
from ckptool.formats.restricted_pickle import StorageRef, load_restricted
from ckptool.formats.state_dict_pickle import read_state_dict_pickle
from ckptool.formats.zip_directory import EntryBudgetError, ZipRecord, read_directory

# torch.save's legacy format starts with this number, pickled.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
# A view may describe more bytes than its storage holds (expand(), stride 0); writing it
# materialises them, so a small file could ask for any amount of memory. Real files
# rarely hold such views at all.
MAX_EXPANDED_VIEW_BYTES = 16 * 1024 * 1024
# data.pkl holds only structure (a few hundred bytes per tensor); 64 MB is ~200k tensors.
MAX_PICKLE_BYTES = 64 * 1024 * 1024
# One record per storage plus a handful: far above any real model's tensor count.
MAX_ZIP_ENTRIES = 1_000_000


def is_tensor_meta(value: Any) -> bool:
    return isinstance(value, TensorMeta)


def read_zip_meta(path: str, *, key: str | None) -> CheckpointMeta:
    """Describe a torch.save zip archive from its central directory and data.pkl."""
    archive = read_zip_archive(path)
    meta = _build_meta(
        path,
        Format.TORCH_ZIP,
        archive.obj,
        archive.storages,
        key=key,
        file_size=archive.file_size,
        offsets=archive.offsets,
    )
    return dataclasses.replace(meta, opaque=tuple(sorted(archive.opaque)))


@dataclasses.dataclass(frozen=True)
class ZipArchive:
    """A torch.save zip read as structure: the unpickled object (tensors as unlocated
    TensorMeta stand-ins), its storages, and where each storage's bytes start."""

    path: str
    obj: Any
    storages: dict[str, StorageRef]
    offsets: dict[str, int]
    opaque: frozenset[str]
    file_size: int

    def locate(self, name: str, tensor: TensorMeta) -> TensorMeta:
        """``tensor`` checked against its storage and given the file location of its
        bytes (``name`` is for messages)."""
        _check_view(self.path, name, tensor, self.storages)
        return _plain_meta(tensor, self.path, self.storages, self.offsets)


def read_zip_archive(path: str, window: tuple[int, int] | None = None) -> ZipArchive:
    """Read a torch.save zip's data.pkl with the restricted unpickler; check the records.

    Args:
        window: (offset, length) of the archive inside ``path``, for a torch.save blob
            embedded in a larger file (a DCP ``.distcp`` chunk); offsets come back
            absolute in ``path``.

    Raises:
        CheckpointReadError: corrupt, crafted or not a torch.save zip.
        UnsafeCheckpointError: the pickle names a refused global.
    """
    start, size = window if window is not None else (0, os.path.getsize(path))
    try:
        with open(path, "rb") as raw:
            stream: Any = _Window(raw, start, size) if window is not None else raw
            prefix, pickle_bytes, relative, record_sizes = _read_records(path, stream, size)
    except _ZIP_ERRORS as e:
        raise CheckpointReadError(f"{path}: corrupt zip archive ({type(e).__name__}: {e})") from e
    except OSError as e:
        raise CheckpointReadError(f"{path}: cannot read zip archive ({e})") from e
    scope = f"{prefix}data/"
    # A state dict as torch.save writes it is read in one pass; anything else, and every
    # verdict on a file, is the restricted unpickler's.
    unpickled = read_state_dict_pickle(pickle_bytes, storage_scope=scope)
    if unpickled is None:
        unpickled = load_restricted(pickle_bytes, path=path, storage_scope=scope)
    obj, storages, opaque = unpickled
    _check_storages(path, storages, record_sizes)
    offsets = {name: start + offset for name, offset in relative.items()} if start else relative
    return ZipArchive(path, obj, storages, offsets, opaque, size)


def _read_records(
    path: str, stream: BinaryIO, size: int
) -> tuple[str, bytes, dict[str, int], dict[str, int]]:
    """The archive's prefix, its data.pkl, where each record's bytes start (relative to
    the archive; none for a big-endian one) and each record's size."""
    try:
        directory = read_directory(stream, size, max_entries=MAX_ZIP_ENTRIES)
    except EntryBudgetError as e:
        raise _over_entry_budget(path, e.count) from None
    records = _check_archive(path, directory.records, size)
    prefix = _archive_prefix(path, records)
    _check_parsed_records(path, stream, records, prefix)
    pickle_bytes = read_bounded(records, f"{prefix}data.pkl", path=path, stream=stream)
    # Big-endian archives (rare) need torch to swap bytes; leave offsets unknown.
    relative = (
        _record_data_offsets(path, stream, records, directory.start)
        if _is_little_endian(path, stream, records, prefix)
        else {}
    )
    record_sizes = {name: record.file_size for name, record in records.items()}
    return prefix, pickle_bytes, relative, record_sizes


class _Window(io.RawIOBase):
    """Bytes [start, start + size) of an open file, as a file of their own."""

    def __init__(self, raw: BinaryIO, start: int, size: int) -> None:
        self._raw, self._start, self._size, self._position = raw, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: Any) -> int:
        wanted = max(0, min(len(buffer), self._size - self._position))
        self._raw.seek(self._start + self._position)
        data = self._raw.read(wanted)
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)


# What zipfile raises on hostile bytes besides BadZipFile: names that do not decode,
# methods it does not implement, fields that do not unpack.
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    EOFError,
    ValueError,
    NotImplementedError,
    struct.error,
    OverflowError,
    RuntimeError,  # an encrypted entry
)


def read_bounded(records: dict[str, ZipRecord], name: str, *, path: str, stream: BinaryIO) -> bytes:
    """Read one (stored, size-checked) entry, refusing pickles over the size budget."""
    if records[name].file_size > MAX_PICKLE_BYTES:
        raise CheckpointReadError(
            f"{path}: {name} is over the pickle size budget of {MAX_PICKLE_BYTES} bytes"
        )
    return _entry_bytes(path, stream, records[name])


def _entry_bytes(path: str, stream: BinaryIO, record: ZipRecord) -> bytes:
    """A stored entry's bytes, checked against its CRC-32 unless the CRC is 0:
    torch.save with ``torch.utils.serialization.config.save.compute_crc32 = False``
    (a documented speed-up) records every CRC as 0, and torch's reader never checks
    them, so such files load in torch; refusing them as corrupt would be wrong."""
    stream.seek(_local_data_offset(path, stream, record))
    data = stream.read(record.file_size)
    if len(data) != record.file_size:
        raise CheckpointReadError(
            f"{path}: zip entry {record.name!r} is cut short; the file is truncated"
        )
    if record.crc != 0 and zlib.crc32(data) != record.crc:
        raise CheckpointReadError(
            f"{path}: zip entry {record.name!r} does not match its CRC-32; the file is corrupt"
        )
    return data


def _is_little_endian(
    path: str, stream: BinaryIO, records: dict[str, ZipRecord], prefix: str
) -> bool:
    byteorder = _small_record(path, stream, records, f"{prefix}byteorder")
    if byteorder is None:  # written before torch recorded byte order: always little-endian
        return True
    if byteorder not in (b"little", b"big"):  # as torch compares it: exactly
        raise CheckpointReadError(
            f"{path}: byteorder record is {byteorder[:16]!r}; torch refuses any but 'little' "
            "or 'big'"
        )
    return byteorder == b"little"


def _check_parsed_records(
    path: str, stream: BinaryIO, records: dict[str, ZipRecord], prefix: str
) -> None:
    """torch parses these records before it reads data.pkl and refuses the file if one
    does not parse; the file would then read here and fail in torch."""
    version_name = f"{prefix}.data/version"
    if version_name not in records:
        version_name = f"{prefix}version"
    version = _small_record(path, stream, records, version_name)
    if version is None:
        raise CheckpointReadError(f"{path}: zip archive has no version record; torch refuses it")
    _check_version(path, version)
    alignment = _small_record(path, stream, records, f"{prefix}.storage_alignment")
    if alignment is not None and not _parses_as_int(alignment):
        raise CheckpointReadError(
            f"{path}: .storage_alignment record {alignment[:16]!r} is not a number; torch "
            "refuses it"
        )
    identifier = _small_record(path, stream, records, f"{prefix}.data/serialization_id")
    if identifier is not None and not _is_utf8(identifier):
        raise CheckpointReadError(
            f"{path}: .data/serialization_id record is not UTF-8 text; torch refuses it"
        )


# The file format versions torch 2.x reads (caffe2::serialize's supported range).
MIN_FORMAT_VERSION, MAX_FORMAT_VERSION = 1, 10
# strtoull's grammar: leading white space, a sign, decimal digits; the rest ignored. (It
# negates to a huge number after a minus sign: over the maximum, as a negative is under.)
_VERSION_NUMBER = re.compile(rb"[ \t\n\v\f\r]*([+-]?[0-9]+)")


def _check_version(path: str, version: bytes) -> None:
    number = _VERSION_NUMBER.match(version)
    if number is None:
        raise CheckpointReadError(
            f"{path}: version record {version[:16]!r} is not a number; torch refuses it"
        )
    value = int(number.group(1))
    if not MIN_FORMAT_VERSION <= value <= MAX_FORMAT_VERSION:
        raise CheckpointReadError(
            f"{path}: file format version {value}; torch reads versions "
            f"{MIN_FORMAT_VERSION}-{MAX_FORMAT_VERSION}"
        )


def _parses_as_int(data: bytes) -> bool:
    try:
        int(data)  # as torch parses .storage_alignment
    except ValueError:
        return False
    return True


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _small_record(
    path: str, stream: BinaryIO, records: dict[str, ZipRecord], name: str
) -> bytes | None:
    """A record torch writes in a few bytes (version, byte order, ...), or None if the
    archive has none; a crafted one of gigabytes is refused before it is read."""
    record = records.get(name)
    if record is None:
        return None
    if record.file_size > MAX_SMALL_RECORD_BYTES:
        raise CheckpointReadError(
            f"{path}: zip entry {record.name!r} is {record.file_size} bytes; torch writes a "
            "few bytes there"
        )
    return _entry_bytes(path, stream, record)


MAX_SMALL_RECORD_BYTES = 1024


def _record_data_offsets(
    path: str, f: Any, records: dict[str, ZipRecord], central_directory: int
) -> dict[str, int]:
    """Absolute offset of each record's bytes, after its local header (30 bytes, name,
    extra field: torch pads the extra field to align data to 64 bytes).

    The local header is read as torch's reader reads it; its name must be the central
    directory's, and each record (header and data) must end before the next one starts
    and before the central directory: otherwise one record's bytes are another's header.
    """
    offsets = {}
    spans = []
    for name, record in records.items():
        offsets[name] = _local_data_offset(path, f, record)
        spans.append((record.header_offset, offsets[name] + record.file_size, name))
    end_of_previous = 0
    for begin, end, name in sorted(spans):
        if begin < end_of_previous or end > central_directory:
            raise CheckpointReadError(
                f"{path}: zip entry {name!r} overlaps another record or the central "
                "directory; the file is crafted or corrupt"
            )
        end_of_previous = end
    return offsets


def _local_data_offset(path: str, f: Any, record: ZipRecord) -> int:
    """Where the record's bytes start: after its local header, whose name must be the
    central directory's (read in the same call: the two are adjacent)."""
    f.seek(record.header_offset)
    header = f.read(_LOCAL_HEADER.size + len(record.raw_name))
    if len(header) < _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        raise CheckpointReadError(f"{path}: zip entry {record.name!r} has no valid local header")
    name_length, extra_length = _LOCAL_HEADER.unpack_from(header)
    if header[_LOCAL_HEADER.size :] != record.raw_name or name_length != len(record.raw_name):
        raise CheckpointReadError(
            f"{path}: zip entry {record.name!r}: local header names another entry"
        )
    return record.header_offset + _LOCAL_HEADER.size + len(record.raw_name) + int(extra_length)


# A local header is 30 bytes; the name's and the extra field's lengths end it.
_LOCAL_HEADER = struct.Struct("<26xHH")


def _check_archive(path: str, directory: list[ZipRecord], file_size: int) -> dict[str, ZipRecord]:
    records: dict[str, ZipRecord] = {}
    if any(r.name.endswith("constants.pkl") or "/code/" in r.name for r in directory):
        raise CheckpointReadError(
            f"{path}: is a TorchScript archive, not a state dict; load it with "
            "torch.jit.load and save model.state_dict() instead"
        )
    if len(directory) > MAX_ZIP_ENTRIES:
        raise _over_entry_budget(path, len(directory))
    for record in directory:
        if record.name in records:
            # torch reads the first record of a name, zipfile the last: refuse, don't guess.
            raise CheckpointReadError(
                f"{path}: zip entry {record.name!r} appears twice; the file is crafted or corrupt"
            )
        if record.compress_type != zipfile.ZIP_STORED or record.flag_bits & _NOT_PLAIN:
            raise CheckpointReadError(
                f"{path}: zip entry {record.name!r} is compressed or encrypted; torch.save "
                "never does either, so the file was repacked or is not a torch checkpoint"
            )
        if record.compress_size != record.file_size:
            raise CheckpointReadError(
                f"{path}: zip entry {record.name!r} is not compressed, yet its sizes differ "
                f"({record.file_size} bytes, {record.compress_size} stored); the file is "
                "crafted or corrupt"
            )
        # The local header and name precede the data; the end must lie inside the file.
        data_start = record.header_offset + _LOCAL_HEADER.size + len(record.raw_name)
        if data_start + record.file_size > file_size:
            raise CheckpointReadError(
                f"{path}: zip entry {record.name!r} claims {record.file_size} bytes beyond "
                "the end of the file; the file is truncated or corrupt"
            )
        records[record.name] = record
    return records


def _over_entry_budget(path: str, count: int) -> CheckpointReadError:
    return CheckpointReadError(
        f"{path}: zip archive has {count} entries, over the budget of {MAX_ZIP_ENTRIES}"
    )


# Flag bits of an encrypted (0, 6) or patched (5) entry, and of a directory whose local
# headers are masked (13): torch refuses to read them.
_NOT_PLAIN = 0x01 | 0x20 | 0x40 | 0x2000


def _archive_prefix(path: str, records: dict[str, ZipRecord]) -> str:
    pickles = [name for name in records if name.endswith("data.pkl") and name.count("/") <= 1]
    if any(name.endswith("/archive_format") for name in records):
        raise CheckpointReadError(
            f"{path}: is a torch.export archive (.pt2), not a torch.save state dict; load it "
            "with torch.export.load and save its state_dict() instead"
        )
    if records and all(name.endswith(".npy") for name in records):
        raise CheckpointReadError(f"{path}: is a NumPy .npz archive, not a torch.save file")
    if len(pickles) != 1:
        raise CheckpointReadError(
            f"{path}: zip archive has no torch data.pkl; not a torch.save file"
        )
    return pickles[0][: -len("data.pkl")]


def _check_storages(
    path: str, storages: dict[str, StorageRef], record_sizes: dict[str, int]
) -> None:
    for ref in storages.values():
        size = record_sizes.get(ref.key)
        if size is None:
            raise CheckpointReadError(
                f"{path}: storage record {ref.key!r} is missing from the archive"
            )
        if size < ref.nbytes:
            raise CheckpointReadError(
                f"{path}: storage record {ref.key!r} has {size} bytes but its tensors need "
                f"{ref.nbytes}; the file is corrupt"
            )


def read_legacy_meta(path: str, *, key: str | None) -> CheckpointMeta:
    """Describe a pre-1.6 torch.save file: magic, protocol, sys info, object, storages."""
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = load_restricted(f, path=path).obj
        if magic != LEGACY_MAGIC:
            raise CheckpointReadError(
                f"{path}: a pickle but not a torch.save checkpoint (no torch magic number)"
            )
        protocol = load_restricted(f, path=path).obj
        if protocol != LEGACY_PROTOCOL:
            raise CheckpointReadError(f"{path}: unsupported legacy torch protocol {protocol!r}")
        load_restricted(f, path=path)  # sys_info
        obj, storages, opaque = load_restricted(f, path=path)
        keys = load_restricted(f, path=path).obj
        offsets = _check_legacy_storages(path, f, keys, storages, file_size)
    meta = _build_meta(
        path, Format.TORCH_LEGACY, obj, storages, key=key, file_size=file_size, offsets=offsets
    )
    return dataclasses.replace(meta, opaque=tuple(sorted(opaque)))


def _check_legacy_storages(
    path: str, f: Any, keys: Any, storages: dict[str, StorageRef], file_size: int
) -> dict[str, int]:
    """Walk the storage records (int64 count + bytes each) by seeking, reading 8 bytes each.

    Returns the offset of each storage's bytes.
    """
    offsets = {}
    if not isinstance(keys, list) or set(map(str, keys)) != set(storages):
        raise CheckpointReadError(f"{path}: legacy storage list does not match the pickled tensors")
    for storage_key in keys:
        ref = storages[str(storage_key)]
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointReadError(f"{path}: truncated before storage {storage_key!r}")
        (count,) = struct.unpack("<q", head)
        if count != ref.numel:
            raise CheckpointReadError(
                f"{path}: storage {storage_key!r} records {count} elements, "
                f"its tensors expect {ref.numel}"
            )
        offsets[ref.key] = f.tell()
        end = f.tell() + ref.nbytes
        if end > file_size:
            raise CheckpointReadError(f"{path}: truncated inside storage {storage_key!r}")
        f.seek(end)
    return offsets


def _build_meta(
    path: str,
    file_format: Format,
    obj: Any,
    storages: dict[str, StorageRef],
    *,
    key: str | None,
    file_size: int,
    offsets: dict[str, int],
) -> CheckpointMeta:
    chosen, tensors, containers = select_tensor_dict(
        obj, key=key, is_tensor=is_tensor_meta, path=path
    )
    # Replaced in place, as the loop does (the dict is the chosen container's).
    if not _located_in_bulk(path, tensors, storages, offsets):
        # Something to name, or a tensor without a location: checked one by one.
        for name, tensor in tensors.items():
            _check_view(path, name, tensor, storages)
            tensors[name] = _plain_meta(tensor, path, storages, offsets)
    return CheckpointMeta(
        path=path,
        format=file_format,
        tensors=tensors,
        key=chosen,
        containers=containers,
        file_size=file_size,
        files=(path,),
        module_versions=module_versions(obj, chosen, path),
    )


def _located_in_bulk(
    path: str,
    tensors: dict[str, TensorMeta],
    storages: dict[str, StorageRef],
    offsets: dict[str, int],
) -> bool:
    """Replace the tensors with what ``_check_view`` and ``_plain_meta`` make of them
    one at a time; False, and nothing replaced, where that could differ: a tensor whose
    storage, dtype size or location is unknown, or one that fails a check (then the
    loop names it).

    The same checks, column by column with builtins that loop in C: 100,000 tensors of
    a state dict cost 0.3 s one at a time. A view's figures depend on its shape, stride,
    offset and dtype only, and a model repeats those: each is worked out once."""
    if not tensors:
        return True
    # Columns, not the stand-ins: each stand-in goes as its tensor replaces it.
    columns = (_SHAPE, _DTYPE, _STORAGE, _OFFSET, _STRIDE)
    shapes, dtypes, keys, starts, strides = (list(map(f, tensors.values())) for f in columns)
    refs = list(map(storages.get, keys))
    file_offsets = list(map(offsets.get, keys))
    if None in refs or None in file_offsets or "" in keys:  # ("": located, no offset)
        return False
    views = set(zip(shapes, strides, starts, dtypes, strict=True))
    figures = {view: _view_figures(*view) for view in views}
    if None in figures.values():
        return False  # a dtype of unknown size: not checked, nor located, one by one
    each = map(figures.__getitem__, zip(shapes, strides, starts, dtypes, strict=True))
    view_bytes, last_element, itemsizes = zip(*each, strict=True)
    # StorageRef.nbytes, in C: an unknown dtype counts 1 byte an element there too.
    sizes = map(DTYPE_SIZES.get, map(_DTYPE, refs), itertools.repeat(1))
    storage_bytes = list(map(operator.mul, map(_NUMEL, refs), sizes))
    budgets = map(max, storage_bytes, itertools.repeat(MAX_EXPANDED_VIEW_BYTES))
    elements = map(operator.floordiv, storage_bytes, itemsizes)
    if not all(map(operator.le, view_bytes, budgets)) or not all(
        map(operator.lt, last_element, elements)
    ):
        return False
    del refs, view_bytes, last_element, itemsizes
    rows = zip(  # in TensorMeta's field order
        shapes,
        dtypes,
        keys,
        starts,
        strides,
        itertools.repeat(path),
        file_offsets,
        storage_bytes,
        itertools.repeat(True),
        strict=False,
    )
    tensors.update(zip(list(tensors), map(TensorMeta._make, rows), strict=True))
    return True


def _view_figures(
    shape: tuple[int, ...], stride: tuple[int, ...] | None, offset: int, dtype: str
) -> tuple[int, int, int] | None:
    """(bytes the view spans, its last element's index, or -1 if it has none, its
    item size), or None for a dtype of unknown size: what ``_check_view`` and the bulk
    pass check against the storage."""
    itemsize = DTYPE_SIZES.get(dtype)
    if itemsize is None:
        return None
    numel = math.prod(shape)
    # The last element's index: the offset plus (size - 1) * stride in each dimension.
    last = offset + sum(map(operator.mul, map(_ONE_LESS, shape), stride or ()))
    return numel * itemsize, last if numel else -1, itemsize


# Fields read column by column (TensorMeta's, and a StorageRef's numel).
_SHAPE, _DTYPE, _STORAGE = map(operator.attrgetter, ("shape", "dtype", "storage"))
_STRIDE, _OFFSET, _NUMEL = map(operator.attrgetter, ("stride", "storage_offset", "numel"))


def _plain_meta(
    tensor: TensorMeta, path: str, storages: dict[str, StorageRef], offsets: dict[str, int]
) -> TensorMeta:
    """A plain TensorMeta whose file location comes only from this reader's own checks,
    never from fields of the unpickled stand-in."""
    storage = tensor.storage
    located = storage is not None and storage in offsets
    return TensorMeta(  # in field order: positional arguments cost less, 100,000 times
        tensor.shape,
        tensor.dtype,
        storage,
        tensor.storage_offset,
        tensor.stride,
        path if located else None,  # file
        offsets[storage] if located and storage else None,  # file_offset
        storages[storage].nbytes if located and storage else None,  # storage_nbytes
    )


def _check_view(path: str, name: str, tensor: TensorMeta, storages: dict[str, StorageRef]) -> None:
    figures = _view_figures(tensor.shape, tensor.stride, tensor.storage_offset, tensor.dtype)
    if tensor.storage is None or figures is None:
        return
    ref = storages.get(tensor.storage)
    if ref is None:
        raise CheckpointReadError(f"{path}: tensor {name!r} views an unknown storage")
    view_bytes, last_element, itemsize = figures
    storage_bytes = ref.nbytes
    if view_bytes > max(storage_bytes, MAX_EXPANDED_VIEW_BYTES):
        raise CheckpointReadError(
            f"{path}: tensor {name!r} views {view_bytes} bytes of a {storage_bytes}-byte "
            f"storage (stride 0 or overlapping), over the expanded-view budget of "
            f"{MAX_EXPANDED_VIEW_BYTES} bytes; re-save it with .contiguous()"
        )
    storage_elements = storage_bytes // itemsize
    if last_element >= storage_elements:
        raise CheckpointReadError(
            f"{path}: tensor {name!r} reads past the end of its storage "
            f"({last_element + 1} > {storage_elements} elements); the file is corrupt"
        )


_ONE_LESS = (-1).__add__
