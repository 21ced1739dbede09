"""Parse and validate a safetensors header directly: 8-byte length, then JSON.

Reading only the header keeps ``inspect`` cost proportional to the number of
tensors; validation here is what lets later commands stream byte ranges safely.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import struct
from collections.abc import Mapping
from typing import Any

from ckptool.errors import CheckpointReadError
from ckptool.formats.bounded import is_count
from ckptool.formats.files import parse_json, require_regular_file
from ckptool.formats.meta import DTYPE_SIZES, CheckpointMeta, Format, TensorMeta

# safetensors dtype code -> torch dtype name.
SAFETENSORS_DTYPES: Mapping[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
    "C64": "complex64", "C128": "complex128",
}  # fmt: skip

# Metadata key under which ckptool records names stored once for several (tied) tensors.
ALIASES_KEY = "ckptool.aliases"
# The reference implementation refuses headers above 100 MB; so do we.
MAX_HEADER_BYTES = 100 * 1024 * 1024
# About 100 header bytes per tensor: the largest real headers list ~10^5 tensors.
MAX_TENSORS = 1_000_000


def read_safetensors_meta(path: str) -> CheckpointMeta:
    """Read a ``.safetensors`` header into a :class:`CheckpointMeta`.

    Raises:
        CheckpointReadError: the header is malformed or does not match the file.
    """
    header, data_start, file_size = read_header(path)
    metadata = _parse_metadata(path, header.pop("__metadata__", None))
    tensors = _parse_entries(path, header, data_start=data_start, data_len=file_size - data_start)
    tensors = _with_aliases(path, tensors, metadata.get(ALIASES_KEY))
    return CheckpointMeta(
        path=path,
        format=Format.SAFETENSORS,
        tensors=tensors,
        metadata=metadata,
        file_size=file_size,
        files=(path,),
    )


def read_header(path: str) -> tuple[dict[str, Any], int, int]:
    """Return (header dict, offset of the data section, file size)."""
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
        raw = f.read(header_len)
    header = _parse_header(path, raw)
    if not isinstance(header, dict):
        raise CheckpointReadError(f"{path}: safetensors header is not a JSON object")
    if len(header) > MAX_TENSORS:
        raise CheckpointReadError(
            f"{path}: safetensors header lists {len(header)} entries, over the budget of "
            f"{MAX_TENSORS} tensors"
        )
    return header, 8 + header_len, file_size


def _parse_header(path: str, raw: bytes) -> Any:
    """The header as JSON, refusing repeated keys anywhere (json keeps the last silently,
    which would let one name hide another tensor's bytes; safetensors' own reader
    refuses them).

    A hook on every JSON object costs more than the parse itself on a 100k-tensor
    header, so a plain parse comes first and the keys are counted instead. Every key in
    the text ends in a quote, optional whitespace and a colon, so the text has at most
    as many keys as such endings (an escaped quote inside a string can only add one);
    the parsed objects hold the keys less the repeats. Equal counts therefore mean no
    key repeats; otherwise the exact hook decides.
    """
    header = parse_json(raw, path=path, what="safetensors header")
    if len(_KEY_ENDS.findall(raw)) == _count_keys(header):
        return header
    try:
        return parse_json(
            raw, path=path, what="safetensors header", pairs_hook=_refuse_duplicate_keys
        )
    except _DuplicateKeyError as e:
        raise CheckpointReadError(f"{path}: safetensors header repeats the key {e.key!r}") from e


_KEY_ENDS = re.compile(rb'"[ \t\n\r]*:')


def _count_keys(value: Any, depth: int = 0) -> int:
    """Keys in all the objects of a parsed JSON value (-1 past a sane depth: the exact
    path decides then)."""
    if depth > 64:
        return -1
    total, children = (len(value), value.values()) if isinstance(value, dict) else (0, value)
    # Most values (a shape, offsets) hold no containers: checked at C speed.
    if not any(map(isinstance, children, itertools.repeat(_CONTAINERS))):
        return total
    for child in children:
        if isinstance(child, _CONTAINERS):
            inner = _count_keys(child, depth + 1)
            if inner < 0:
                return -1
            total += inner
    return total


_CONTAINERS = (dict, list)


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)  # called for every header object: the common case stays in C
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKeyError(key)
            seen.add(key)
    return result


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
    return {name: result[name] for name in sorted(result, key=natural_key)}


def _parse_metadata(path: str, raw: Any) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise CheckpointReadError(f"{path}: safetensors __metadata__ must map strings to strings")
    return dict(raw)


def _parse_entries(
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
    # Writers order the header by dtype and size; people read names in natural order.
    return {name: tensors[name] for name in sorted(tensors, key=natural_key)}


def natural_key(name: str) -> list[tuple[tuple[int, str], ...]]:
    """'layer10.0' sorts after 'layer2.1': digit runs compare as numbers, component by
    dotted component (components repeat across a model's names, so each is keyed once)."""
    return [_component_key(part) for part in name.split(".")]


@functools.lru_cache(maxsize=1 << 16)
def _component_key(part: str) -> tuple[tuple[int, str], ...]:
    pieces = _DIGIT_RUNS.split(part)
    return tuple((int(p), "") if i % 2 else (-1, p) for i, p in enumerate(pieces))


_DIGIT_RUNS = re.compile(r"(\d+)")


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
    begin, end = offsets
    tensor = TensorMeta(
        shape=tuple(shape),
        dtype=dtype,
        storage=f"{path}@{begin}",
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
