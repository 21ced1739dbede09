"""Parse and validate a safetensors header directly: 8-byte length, then JSON.

Reading only the header keeps ``inspect`` cost proportional to the number of
tensors; validation here is what lets later commands stream byte ranges safely.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import operator
import os
import re
import struct
import threading
from collections.abc import Iterator, Mapping
from typing import Any, cast

from ckptool.errors import CheckpointReadError
from ckptool.formats.bounded import is_count, lone_surrogate, short_str
from ckptool.formats.files import parse_json, require_regular_file
from ckptool.formats.meta import DTYPE_SIZES, FLOAT4, CheckpointMeta, Format, TensorMeta
from ckptool.formats.safetensors_compact import (
    METADATA_KEY,
    DuplicateKeyError,
    HeaderColumns,
    read_compact_header,
    refuse_duplicate_keys,
)

# safetensors dtype code -> torch dtype name.
SAFETENSORS_DTYPES: Mapping[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F4": "float4_e2m1fn_x2", "C64": "complex64", "C128": "complex128",
}  # fmt: skip
# safetensors counts F4 values, two to a byte; torch's float4_e2m1fn_x2 holds a pair per
# element, so the torch shape's last dimension is half the header's (as safetensors'
# own torch loader maps it).
PAIRED_CODE = "F4"


def header_shape(dtype: str, shape: tuple[int, ...]) -> list[int]:
    """The shape a safetensors header records for a torch tensor of ``dtype``."""
    if dtype == FLOAT4:
        return [*shape[:-1], shape[-1] * 2]
    return list(shape)


# Metadata key under which ckptool records names stored once for several (tied) tensors.
ALIASES_KEY = "ckptool.aliases"
# The reference implementation refuses headers above 100 MB; so do we.
MAX_HEADER_BYTES = 100 * 1024 * 1024
# About 100 header bytes per tensor: the largest real headers list ~10^5 tensors.
MAX_TENSORS = 1_000_000


def read_safetensors_meta(path: str, *, natural_order: bool = True) -> CheckpointMeta:
    """Read a ``.safetensors`` header into a :class:`CheckpointMeta`, its tensors in
    natural order, or in the header's with ``natural_order=False`` (a shard, whose
    tensors the index orders: 0.1 s of sort keys saved at 100,000 tensors).

    Raises:
        CheckpointReadError: the header is malformed or does not match the file.
    """
    tensors, raw_metadata, file_size = _tensors_and_metadata(path)
    metadata = _parse_metadata(path, raw_metadata)
    tensors = _with_aliases(path, tensors, metadata.get(ALIASES_KEY))
    if natural_order:
        tensors = _naturally_sorted(tensors)
    return CheckpointMeta(
        path=path,
        format=Format.SAFETENSORS,
        tensors=tensors,
        metadata=metadata,
        file_size=file_size,
        files=(path,),
    )


def _tensors_and_metadata(path: str) -> tuple[dict[str, TensorMeta], Any, int]:
    """The tensors in header order, the raw ``__metadata__`` value and the file size."""
    text, data_start, file_size = _header_text(path)
    compact = read_compact_header(text)
    if compact is not None:
        del text  # 12 MiB at 100,000 tensors: not kept while the entries are made
        tensors = _compact_entries(path, compact.columns, data_start, file_size - data_start)
        if tensors is not None:
            return tensors, compact.metadata, file_size
        # A fault: json reads the header again, and its checks name the fault.
        text, data_start, file_size = _header_text(path)
    header = _parsed_header(path, text)
    del text
    raw_metadata = header.pop(METADATA_KEY, None)
    data_len = file_size - data_start
    tensors = _parse_entries(path, header, data_start=data_start, data_len=data_len)
    return tensors, raw_metadata, file_size  # (the parsed JSON goes with this frame)


def _header_text(path: str) -> tuple[str, int, int]:
    """Return (header text, offset of the data section, file size)."""
    require_regular_file(path)
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointReadError(
                f"{path}: file is {file_size} bytes, too short for safetensors"
            )
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > file_size - 8:
            raise CheckpointReadError(
                f"{path}: safetensors header length {header_len} exceeds the file "
                f"({file_size} bytes); the file is truncated or not safetensors"
            )
        if header_len > MAX_HEADER_BYTES:
            raise CheckpointReadError(
                f"{path}: safetensors header is {header_len} bytes, over the header budget "
                f"of {MAX_HEADER_BYTES} bytes"
            )
        return _decoded(path, f.read(header_len)), 8 + header_len, file_size


def _parsed_header(path: str, text: str) -> dict[str, Any]:
    header = _parse_header(path, text)
    if not isinstance(header, dict):
        raise CheckpointReadError(f"{path}: safetensors header is not a JSON object")
    _refuse_lone_surrogates(path, header)
    if len(header) > MAX_TENSORS:
        raise CheckpointReadError(
            f"{path}: safetensors header lists {len(header)} entries, over the budget of "
            f"{MAX_TENSORS} tensors"
        )
    return header


def _decoded(path: str, raw: bytes) -> str:
    """The header as text: UTF-8 only, as safetensors reads it (``json.loads`` of bytes
    would also take UTF-16 and UTF-8-encoded surrogates, which safetensors refuses)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointReadError(
            f"{path}: safetensors header is not valid UTF-8 (byte {e.start}); "
            "safetensors refuses it too"
        ) from e


def _refuse_lone_surrogates(path: str, header: dict[str, Any]) -> None:
    """A ``\\ud800`` escape decodes to half a character that no UTF-8 text can hold:
    safetensors refuses the header, and the name could not be printed or written."""
    metadata = header.get(METADATA_KEY)
    strings = list(header)
    if isinstance(metadata, dict):
        strings += [*metadata, *(v for v in metadata.values() if isinstance(v, str))]
    found = lone_surrogate(strings)
    if found is not None:
        text, half = found
        raise CheckpointReadError(
            f"{path}: safetensors header key or value {short_str(text)!r} holds the lone "
            f"surrogate {half!r} (half a character, not valid Unicode); safetensors "
            "refuses it too"
        )


def _parse_header(path: str, raw: str) -> Any:
    """The header as JSON, refusing repeated keys anywhere (json keeps the last silently,
    which would let one name hide another tensor's bytes; safetensors' own reader
    refuses them).

    A hook on every JSON object costs more than the parse itself on a 100k-tensor
    header, so a plain parse comes first and keys are counted instead. Every key in the
    text ends in a quote, optional whitespace and a colon, so ``key_ends`` is at least
    the number of keys the text holds; the parsed header and its entries hold those
    keys less the repeats, and ``_keys_found`` counts some of them. So key_ends >= keys
    in the text >= keys parsed >= keys found, and equality at both ends means no key
    repeats; otherwise the exact hook decides.
    """
    header = parse_json(raw, path=path, what="safetensors header")
    if _key_ends(raw) == _keys_found(header):
        return header
    try:
        return parse_json(
            raw, path=path, what="safetensors header", pairs_hook=refuse_duplicate_keys
        )
    except DuplicateKeyError as e:
        raise CheckpointReadError(f"{path}: safetensors header repeats the key {e.key!r}") from e


def _key_ends(raw: str) -> int:
    """Places in ``raw`` where a key can end: a quote, optional whitespace, a colon."""
    tight = raw.count('":')  # what every writer emits; a count runs at memchr speed
    return tight if _SPACED_KEY_END.search(raw) is None else len(_KEY_END.findall(raw))


_KEY_END = re.compile(r'"[ \t\n\r]*:')
_SPACED_KEY_END = re.compile(r'"[ \t\n\r]+:')


def _keys_found(header: Any) -> int:
    """Keys of the header object and of the objects directly inside it (the entries and
    ``__metadata__``); deeper objects, which no real header has, are not counted."""
    if not isinstance(header, dict):
        return 0
    return len(header) + sum(len(v) for v in header.values() if type(v) is dict)


def _with_aliases(
    path: str, tensors: dict[str, TensorMeta], raw: str | None
) -> dict[str, TensorMeta]:
    """Names that ``ckptool convert`` stored once for tied tensors view the same bytes."""
    if raw is None:
        return tensors
    aliases = parse_json(raw, path=path, what=f"{ALIASES_KEY} metadata")
    if not isinstance(aliases, dict) or not all(isinstance(t, str) for t in aliases.values()):
        raise CheckpointReadError(f"{path}: {ALIASES_KEY} metadata must map names to names")
    result = dict(tensors)
    for alias, target in aliases.items():
        # An alias never shadows a stored name: that would hide the stored tensor's bytes.
        if target not in tensors or alias in tensors:
            raise CheckpointReadError(
                f"{path}: {ALIASES_KEY} maps {alias!r} to {target!r}, which is not a stored tensor"
            )
        result[alias] = tensors[target]
    return result


def _parse_metadata(path: str, raw: Any) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise CheckpointReadError(f"{path}: safetensors __metadata__ must map strings to strings")
    return dict(raw)


def _parse_entries(
    path: str, header: dict[str, Any], *, data_start: int, data_len: int
) -> dict[str, TensorMeta]:
    tensors = _entries_in_bulk(path, header, data_start=data_start, data_len=data_len)
    if tensors is None:  # something is wrong: checking entry by entry names it
        tensors = _entries_one_by_one(path, header, data_start=data_start, data_len=data_len)
    return tensors


def _naturally_sorted(tensors: dict[str, TensorMeta]) -> dict[str, TensorMeta]:
    # Writers order the header by dtype and size; people read names in natural order.
    names = list(tensors)
    keys = _natural_keys(names)
    ordered = [names[i] for i in sorted(range(len(names)), key=keys.__getitem__)]
    return dict(zip(ordered, map(tensors.__getitem__, ordered), strict=True))


class _KeptKeys(threading.local):
    """Natural keys kept by ``natural_keys_kept`` (name -> key), None outside it; per
    thread, so that two threads' diffs neither share nor end each other's."""

    keys: dict[str, str] | None = None


_kept = _KeptKeys()


@contextlib.contextmanager
def natural_keys_kept() -> Iterator[None]:
    """Within it, the natural keys of the names read are kept and reused: diff reads two
    headers that mostly share their names, and the second one's keys then cost a dict
    lookup each, not 1 us (0.1 s at 100,000 names). They go when it ends."""
    outer = _kept.keys
    _kept.keys = {} if outer is None else outer
    try:
        yield
    finally:
        _kept.keys = outer


def _natural_keys(names: list[str]) -> list[str]:
    kept = _kept.keys
    if kept is None:
        return list(map(natural_key, names))
    keys = list(map(kept.get, names))
    for i in itertools.compress(range(len(names)), map(operator.not_, keys)):
        keys[i] = kept[names[i]] = natural_key(names[i])
    return cast("list[str]", keys)  # no None is left


def _entries_in_bulk(
    path: str, header: dict[str, Any], *, data_start: int, data_len: int
) -> dict[str, TensorMeta] | None:
    """The tensors, or None if any entry fails a check (then nothing is trusted and
    ``header`` is left whole for the entry-by-entry check; on success it is emptied).

    The same checks as ``_entries_one_by_one``, or stricter, made column by column
    with builtins that loop in C: a 100,000-tensor header costs 0.15 s here against
    0.9 s entry by entry.
    """
    entries = list(header.values())
    if not entries:
        return {} if data_len == 0 else None
    if _types(entries) != {dict}:
        return None
    try:
        codes, shapes, offsets = ([entry[field] for entry in entries] for field in _FIELDS)
    except KeyError:
        return None
    if _types(codes) != {str}:
        return None
    if not (_types(shapes) == _types(offsets) == {list} and set(map(len, offsets)) == {2}):
        return None
    bounds = list(itertools.chain.from_iterable(offsets))
    if not _all_counts(bounds):
        return None
    columns = HeaderColumns(list(header), codes, shapes, bounds[0::2], bounds[1::2])
    if not _columns_hold(columns, data_len):
        return None
    # Every check passed: the parsed JSON goes before the entries are made, so the two
    # are never in memory at once (at 100,000 tensors, 56 MiB and 39 MiB).
    del entries, codes, shapes, offsets, bounds
    header.clear()
    return _entries(path, columns, data_start)


def _compact_entries(
    path: str, columns: HeaderColumns, data_start: int, data_len: int
) -> dict[str, TensorMeta] | None:
    """The tensors of a compact header's columns, or None if any entry fails a check."""
    if len(columns.names) >= MAX_TENSORS:  # the general reader counts and refuses
        return None
    return _entries(path, columns, data_start) if _columns_hold(columns, data_len) else None


def _columns_hold(columns: HeaderColumns, data_len: int) -> bool:
    """Every entry passes the checks ``_entries_one_by_one`` makes, or stricter ones."""
    _, codes, shapes, begins, ends = columns
    kinds = set(codes)
    # F4 is rare, and its shapes are mapped entry by entry.
    if not kinds <= SAFETENSORS_DTYPES.keys() or PAIRED_CODE in kinds:
        return False
    if not _all_counts(list(itertools.chain.from_iterable(shapes))):
        return False
    spans = list(map(operator.sub, ends, begins))
    # Each span holds exactly its shape's elements (a negative span never does).
    if spans != list(map(operator.mul, map(math.prod, shapes), map(_ITEMSIZES.get, codes))):
        return False
    # Spans are non-negative (checked above), so ranges that chain in header order tile;
    # writers list tensors in data order, so only other files pay for the sort.
    return _tile(begins, ends, data_len) or _tiles_when_sorted(begins, ends, data_len)


def _entries(path: str, columns: HeaderColumns, data_start: int) -> dict[str, TensorMeta]:
    """The tensors of columns that hold (``_columns_hold``)."""
    names, codes, shapes, begins, ends = columns
    dtypes = list(map(SAFETENSORS_DTYPES.get, codes))
    # Layers repeat shapes (every expert of a MoE has the same): one tuple per shape.
    canonical: dict[tuple[int, ...], tuple[int, ...]] = {}
    tuples = list(map(tuple, shapes))
    dims = list(map(canonical.setdefault, tuples, tuples))
    rows = zip(  # in TensorMeta's field order
        dims,  # shape
        dtypes,  # dtype
        names,  # storage: each tensor's bytes are its own (aliases share the target's)
        itertools.repeat(0),  # storage_offset
        itertools.repeat(None),  # stride
        itertools.repeat(path),  # file
        map(data_start.__add__, begins),  # file_offset
        map(operator.sub, ends, begins),  # storage_nbytes
        itertools.repeat(True),  # learned
    )
    return dict(zip(names, map(TensorMeta._make, rows), strict=True))


_FIELDS = ("dtype", "shape", "data_offsets")
_ITEMSIZES = {code: DTYPE_SIZES[dtype] for code, dtype in SAFETENSORS_DTYPES.items()}


def _types(values: Any) -> set[type]:
    return set(map(type, values))


def _all_counts(values: list[Any]) -> bool:
    """Every value is a count (``is_count``; JSON makes no int subclasses but bool)."""
    return not values or (_types(values) == {int} and min(values) >= 0 and max(values) < 2**63)


def _tile(begins: list[int], ends: list[int], data_len: int) -> bool:
    """[begin, end) ranges, in this order, cover 0..data_len exactly: each begins where
    the one before it ends."""
    return begins[0] == 0 and ends[-1] == data_len and begins[1:] == ends[:-1]


def _tiles_when_sorted(begins: list[int], ends: list[int], data_len: int) -> bool:
    ranges = sorted(zip(begins, ends, strict=True))
    return _tile(
        list(map(operator.itemgetter(0), ranges)),
        list(map(operator.itemgetter(1), ranges)),
        data_len,
    )


def _entries_one_by_one(
    path: str, header: dict[str, Any], *, data_start: int, data_len: int
) -> dict[str, TensorMeta]:
    tensors: dict[str, TensorMeta] = {}
    ranges: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        tensor, begin, end = _parse_entry(path, name, entry, data_start)
        if end > data_len:
            raise CheckpointReadError(
                f"{path}: tensor {name!r} ends at byte {end} but the data section has "
                f"{data_len} bytes; the file is truncated"
            )
        tensors[name] = tensor
        ranges.append((begin, end, name))
    _check_ranges_cover(path, ranges, data_len)
    return tensors


def natural_key(name: str) -> str:
    """'layer10.0' sorts after 'layer2.1': digit runs compare as numbers, component by
    dotted component.

    The key is one string, so sorting compares in C: components are joined by NUL (a
    shorter component sorts first) and each digit run becomes SOH, a character for its
    length and the digits (a longer number sorts later; SOH sorts before text, so "a7"
    before "ab"). Components repeat across a model's names, so each is keyed once; a
    name of one component (``t123``) is most likely unique, so it skips the cache.
    """
    if "." not in name:
        return _key_of_component(name)
    return "\x00".join(map(_component_key, name.split(".")))


def _key_of_component(part: str) -> str:
    return _DIGIT_RUNS.sub(_number_key, part)


_component_key = functools.lru_cache(maxsize=1 << 16)(_key_of_component)


def _number_key(digits: re.Match[str]) -> str:
    value = digits[0].lstrip("0")
    return f"\x01{chr(0x30 + len(value))}{value}"


_DIGIT_RUNS = re.compile(r"\d+")


def _parse_entry(path: str, name: str, entry: Any, data_start: int) -> tuple[TensorMeta, int, int]:
    if not isinstance(entry, dict):
        raise CheckpointReadError(f"{path}: header entry {name!r} is not an object")
    code = entry.get("dtype")
    if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
        raise CheckpointReadError(f"{path}: tensor {name!r} has unknown dtype {code!r}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(map(is_count, shape)):
        raise CheckpointReadError(
            f"{path}: tensor {name!r} has invalid shape {shape!r}; expected non-negative ints"
        )
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(map(is_count, offsets))
        or offsets[0] > offsets[1]
    ):
        raise CheckpointReadError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
    dtype = SAFETENSORS_DTYPES[code]
    if code == PAIRED_CODE:
        if not shape or shape[-1] % 2:
            raise CheckpointReadError(
                f"{path}: tensor {name!r} is F4 of shape {shape!r}: its last dimension must "
                "count whole pairs of 4-bit values (safetensors refuses it too)"
            )
        shape = [*shape[:-1], shape[-1] // 2]
    begin, end = offsets
    tensor = TensorMeta(
        shape=tuple(shape),
        dtype=dtype,
        storage=name,
        file=path,
        file_offset=data_start + begin,
        storage_nbytes=end - begin,
    )
    if end - begin != tensor.numel * DTYPE_SIZES[dtype]:
        raise CheckpointReadError(
            f"{path}: tensor {name!r} spans {end - begin} bytes but shape {tuple(shape)} "
            f"of {dtype} needs {tensor.nbytes}"
        )
    return tensor, begin, end


def _check_ranges_cover(path: str, ranges: list[tuple[int, int, str]], data_len: int) -> None:
    """Byte ranges must tile the data section exactly, as the reference reader demands:
    overlaps let one write clobber another; gaps and trailing bytes hide data that
    ckptool would read but torch's loader refuses."""
    position = 0
    for begin, end, name in sorted(ranges):
        if begin < position:
            raise CheckpointReadError(
                f"{path}: tensor {name!r} overlaps the previous tensor's bytes "
                f"(starts at {begin}, previous ends at {position})"
            )
        if begin > position:
            raise CheckpointReadError(
                f"{path}: {begin - position} bytes before tensor {name!r} belong to no "
                "tensor; the file is corrupt"
            )
        position = end
    if position != data_len:
        raise CheckpointReadError(
            f"{path}: {data_len - position} bytes after the last tensor belong to no "
            "tensor; the file is corrupt"
        )
