"""torch.distributed.checkpoint directories: ``.metadata`` (a pickle) plus ``*.distcp`` files.

``.metadata`` is read with the restricted unpickler; DCP's own metadata dataclasses
become inert records, anything else is refused as unsafe. Each tensor chunk in a
``.distcp`` file is a torch.save blob, loaded with ``weights_only=True``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptool.errors import CheckpointReadError, UsageError, option
from ckptool.formats.bounded import is_count, short_repr, short_str
from ckptool.formats.containers import (
    EXTRA_STATE,
    capped_entries,
    extra_state_refusal,
    select_tensor_dict,
)
from ckptool.formats.files import require_regular_file
from ckptool.formats.meta import (
    DTYPE_SIZES,
    NOT_A_TENSOR,
    Assembly,
    CheckpointMeta,
    ContainerEntry,
    Format,
    Piece,
    TensorMeta,
)
from ckptool.formats.restricted_pickle import Record, load_restricted
from ckptool.formats.torch_pickle import read_zip_archive

if TYPE_CHECKING:
    import torch

METADATA_FILE = ".metadata"
_DCP = "torch.distributed.checkpoint."
DCP_RECORDS = frozenset(
    {
        _DCP + "metadata.Metadata",
        _DCP + "metadata.TensorStorageMetadata",
        _DCP + "metadata.BytesStorageMetadata",
        _DCP + "metadata.ChunkStorageMetadata",
        _DCP + "metadata.TensorProperties",
        _DCP + "metadata.MetadataIndex",
        _DCP + "metadata.StorageMeta",
        _DCP + "metadata._MEM_FORMAT_ENCODING",
        _DCP + "filesystem._StorageInfo",
        "torch.serialization._get_layout",
        "pathlib.PosixPath",
        "pathlib.WindowsPath",
    }
)
# First segments that mark a nested container rather than a module of the model.
CONTAINER_NAMES = frozenset(
    {"model", "state_dict", "module", "ema", "model_ema", "app", "optimizer", "optim"}
)


def is_dcp_directory(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, METADATA_FILE))


@dataclass(frozen=True)
class Chunk:
    """Where one chunk of a tensor lives: offsets into the tensor, bytes in a file."""

    offsets: tuple[int, ...]
    file: str
    offset: int
    length: int


def _read_records(folder: str) -> Record:
    path = os.path.join(folder, METADATA_FILE)
    with open(path, "rb") as f:
        obj = load_restricted(f, path=path, records=DCP_RECORDS).obj
    if not isinstance(obj, Record) or "state_dict_metadata" not in obj.state:
        raise CheckpointReadError(f"{path}: not torch.distributed.checkpoint metadata")
    return obj


def read_dcp_meta(folder: str, *, key: str | None) -> CheckpointMeta:
    """Describe a DCP directory from ``.metadata`` alone."""
    entries = _read_records(folder).state["state_dict_metadata"]
    if not isinstance(entries, dict) or not all(isinstance(fqn, str) for fqn in entries):
        raise CheckpointReadError(f"{folder}: DCP state_dict_metadata is not a dict of names")
    flat = {fqn: _tensor_meta(folder, fqn, entry) for fqn, entry in entries.items()}
    tensors = {fqn: t for fqn, t in flat.items() if t is not None}
    values = [fqn for fqn, t in flat.items() if t is None]
    if key is not None and key in values:  # as torch.save's '--key epoch is 5'
        raise UsageError(
            f"{folder}: {option('key', key, quoted=True)} is a pickled value (not read), not "
            "a tensor dict"
        )
    nested = _nest_containers(tensors)
    chosen, found, containers = select_tensor_dict(
        nested, key=key, is_tensor=lambda v: isinstance(v, TensorMeta), path=folder
    )
    containers += _pickled_values(folder, values, chosen)
    size = sum(e.stat().st_size for e in os.scandir(folder) if e.is_file())
    declared = sum(t.nbytes for t in tensors.values())
    if declared > size:
        # Loading allocates every declared tensor; the chunks hold their bytes uncompressed.
        raise CheckpointReadError(
            f"{folder}: DCP metadata declares {declared} bytes of tensors but the folder "
            f"holds {size} bytes; the metadata is corrupt"
        )
    return CheckpointMeta(
        path=folder,
        format=Format.DCP,
        tensors=found,
        key=chosen,
        containers=containers,
        file_size=size,
        files=tuple(sorted(os.path.join(folder, n) for n in os.listdir(folder))),
    )


def _pickled_values(folder: str, fqns: list[str], chosen: str | None) -> tuple[ContainerEntry, ...]:
    """DCP's non-tensor items (a ``step``, a config), which ckptool does not read: listed,
    as torch.save's are; inside the chosen state dict they are left out of writes, and
    a module's extra state there is refused (a copy without it would not load strictly).
    """
    entries = []
    for fqn in fqns:
        inside = chosen is None or fqn.startswith(f"{chosen}.")
        name = fqn.removeprefix(f"{chosen}.") if chosen and inside else fqn
        parts = name.split(".")
        if inside and EXTRA_STATE in parts:  # DCP flattens a dict value into its keys
            held = ".".join(parts[: parts.index(EXTRA_STATE) + 1])
            refusal = extra_state_refusal([short_str(held)], "a pickled value")
            raise CheckpointReadError(f"{folder}: {refusal}")
        kind = NOT_A_TENSOR if inside else "other"
        entries.append(ContainerEntry(short_str(name), kind, "a pickled value (not read)"))
    listed_entries: tuple[ContainerEntry, ...] = ()
    for kind in (NOT_A_TENSOR, "other"):
        of_kind = [e for e in entries if e.kind == kind]
        listed_entries += capped_entries(of_kind, lambda e: e, kind)
    return listed_entries


def _tensor_meta(folder: str, fqn: str, entry: Any) -> TensorMeta | None:
    if not isinstance(entry, Record) or not entry.record_name.endswith("TensorStorageMetadata"):
        return None  # BytesStorageMetadata: a pickled non-tensor value such as 'step'
    properties = entry.state.get("properties")
    # TensorProperties pickles as a tuple that starts with the dtype.
    values = properties.state.get("values") if isinstance(properties, Record) else None
    dtype = getattr(values[0], "name", None) if isinstance(values, tuple) and values else None
    size = entry.state.get("size")
    if not isinstance(size, tuple) or not all(is_count(d) for d in size):
        raise CheckpointReadError(
            f"{folder}: DCP entry {short_str(fqn)!r} has a malformed size {short_repr(size)}"
        )
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise CheckpointReadError(
            f"{folder}: DCP entry {short_str(fqn)!r} has no known dtype ({short_repr(dtype)})"
        )
    return TensorMeta(shape=tuple(size), dtype=dtype)


def _nest_containers(tensors: Mapping[str, TensorMeta]) -> dict[str, Any]:
    """DCP flattens ``{'model': sd}`` to ``model.conv1.weight``; undo that for containers."""
    heads = {fqn.split(".", 1)[0] for fqn in tensors}
    if not heads & CONTAINER_NAMES or len(heads) > len(CONTAINER_NAMES):
        return dict(tensors)
    nested: dict[str, Any] = {}
    for fqn, tensor in tensors.items():
        head, _, rest = fqn.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = tensor
        else:
            nested[head] = tensor
    return nested


def chunk_index(folder: str) -> dict[str, list[Chunk]]:
    """Every tensor's chunks (one per rank that saved a shard), from one read of
    ``.metadata``: a reader keeps it rather than unpickling the metadata per tensor."""
    storage = _read_records(folder).state.get("storage_data", {})
    if not isinstance(storage, dict):
        raise CheckpointReadError(f"{folder}: DCP storage_data is not a dict")
    index: dict[str, list[Chunk]] = {}
    for key, info in storage.items():
        fqn = key.state.get("fqn") if isinstance(key, Record) else None
        if not isinstance(fqn, str):
            continue
        if not isinstance(info, Record):
            raise CheckpointReadError(f"{folder}: DCP storage entry for {fqn!r} is malformed")
        if info.state.get("transform_descriptors"):
            raise CheckpointReadError(f"{folder}: {fqn!r} is stored with transforms (compression)")
        index.setdefault(fqn, []).append(_chunk(folder, fqn, key, info))
    return index


def _chunk(folder: str, fqn: str, index: Record, info: Record) -> Chunk:
    offsets = index.state.get("offset") or ()
    relative, offset, length = (info.state.get(k) for k in ("relative_path", "offset", "length"))
    if not (
        isinstance(offsets, tuple | list)
        and all(is_count(o) for o in offsets)
        and isinstance(relative, str)
        and is_count(offset)
        and is_count(length)
    ):
        raise CheckpointReadError(f"{folder}: DCP storage entry for {fqn!r} is malformed")
    return Chunk(
        offsets=tuple(offsets),
        file=os.path.join(folder, os.path.basename(relative)),
        offset=offset,
        length=length,
    )


def dcp_name(meta: CheckpointMeta, name: str) -> str:
    """The fully qualified name DCP stores tensor ``name`` of ``meta`` under."""
    return f"{meta.key}.{name}" if meta.key else name


def chunk_assembly(
    folder: str, fqn: str, meta: TensorMeta, index: Mapping[str, list[Chunk]]
) -> Assembly | None:
    """The tensor as byte ranges of the ``.distcp`` files, when its chunks are blocks of
    whole rows (``Shard(0)``, or a single chunk) stored contiguously: then it is copied
    without torch. None otherwise (column shards, strided views): torch assembles those.

    Each chunk is a torch.save blob; its storage record is located by the zip reader,
    so every byte copied lies in a record that reader checked.
    """
    placed = []
    for chunk in index.get(fqn, []):
        if chunk.offset + chunk.length > require_regular_file(chunk.file):
            raise CheckpointReadError(f"{chunk.file}: truncated inside {fqn!r}")
        archive = read_zip_archive(chunk.file, (chunk.offset, chunk.length))
        if not isinstance(archive.obj, TensorMeta):
            raise CheckpointReadError(f"{chunk.file}: chunk of {fqn!r} holds no tensor")
        part = archive.locate(fqn, archive.obj)
        whole_rows = (
            len(part.shape) == len(meta.shape)
            and part.shape[1:] == meta.shape[1:]
            and not any(chunk.offsets[1:])
        )
        if part.dtype != meta.dtype or part.byte_range is None or not whole_rows:
            return None
        placed.append((chunk.offsets[0] if chunk.offsets else 0, part))
    ordered = sorted(placed, key=lambda p: p[0])
    row = 0
    for start, part in ordered:
        if start != row:
            return None  # a gap or an overlap: torch's assembly reports it
        row += part.shape[0] if part.shape else 1
    if not placed or row != (meta.shape[0] if meta.shape else 1):
        return None
    return Assembly(tuple(Piece(*p.byte_range) for _, p in ordered if p.byte_range), meta.dtype)


def load_dcp_tensor(
    folder: str, fqn: str, meta: TensorMeta, index: Mapping[str, list[Chunk]]
) -> torch.Tensor:
    """Assemble tensor ``fqn`` from its chunks (``index``: :func:`chunk_index`); each
    chunk is a weights_only torch.load."""
    import torch

    chunks = index.get(fqn)
    if not chunks:
        raise CheckpointReadError(f"{folder}: no stored data for {fqn!r}")
    result = torch.empty(meta.shape, dtype=getattr(torch, meta.dtype))
    for chunk in chunks:
        part = _load_chunk(chunk, fqn)
        region = tuple(slice(o, o + s) for o, s in zip(chunk.offsets, part.shape, strict=False))
        try:
            result[region] = part
        except (RuntimeError, IndexError, TypeError) as e:
            raise CheckpointReadError(
                f"{chunk.file}: chunk of {fqn!r} ({list(part.shape)} at {list(chunk.offsets)}) "
                f"does not fit its tensor {list(meta.shape)}"
            ) from e
    return result


def _load_chunk(chunk: Chunk, fqn: str) -> torch.Tensor:
    import torch

    size = require_regular_file(chunk.file)
    if chunk.offset + chunk.length > size:
        raise CheckpointReadError(f"{chunk.file}: truncated inside {fqn!r}")
    with open(chunk.file, "rb") as f:
        f.seek(chunk.offset)
        blob = f.read(chunk.length)
    try:
        part = torch.load(io.BytesIO(blob), weights_only=True, map_location="cpu")
    except Exception as e:  # weights_only refusals and corrupt blobs alike
        raise CheckpointReadError(f"{chunk.file}: cannot load {fqn!r} ({e})") from e
    if not isinstance(part, torch.Tensor):
        raise CheckpointReadError(
            f"{chunk.file}: chunk of {fqn!r} holds a {type(part).__name__}, not a tensor"
        )
    return part
