"""Loading tensor values. Imports torch; never unpickles outside weights_only."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

from ckptool.errors import CheckpointReadError, UsageError, first_line, option
from ckptool.formats import detect_format
from ckptool.formats.bounded import short_str
from ckptool.formats.containers import select_tensor_dict
from ckptool.formats.dcp import Chunk, chunk_index, dcp_name, load_dcp_tensor
from ckptool.formats.files import read_assembly
from ckptool.formats.meta import FLOAT4, CheckpointMeta, Format, TensorMeta
from ckptool.formats.safetensors_header import ALIASES_KEY
from ckptool.formats.sharded import read_index

if TYPE_CHECKING:
    import torch


def torch_load_safely(path: str, *, mmap: bool) -> Any:
    """``torch.load`` with ``weights_only=True`` and tensors on the CPU (memory-mapped for zip).

    Raises:
        CheckpointReadError: torch cannot read the file.
    """
    import pickle
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            # torch's own deprecation notes (TypedStorage, quantized tensors) would be
            # lines on stderr that the user cannot act on.
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, weights_only=True, mmap=mmap, map_location="cpu")
    except pickle.UnpicklingError as e:
        # weights_only refusals land here; our own scan runs first, so this is rare.
        raise CheckpointReadError(f"{path}: torch refused to load it: {first_line(e)}") from e
    except Exception as e:
        # torch's loader answers hostile bytes with whatever it hits first (TypeError,
        # AssertionError, KeyError, ...): all of them mean the file is unreadable.
        raise CheckpointReadError(f"{path}: torch cannot read it ({first_line(e)})") from e


def load_state_dict(
    path: str | os.PathLike[str], *, key: str | None = None
) -> dict[str, torch.Tensor]:
    """Load a checkpoint's tensor dict with real values, safely.

    The header is read and checked first (so unsafe pickles are refused with the names
    of the globals they wanted), then tensors are loaded with safetensors or
    ``torch.load(weights_only=True)``.

    Raises:
        CheckpointReadError, UnsafeCheckpointError, UsageError: as :func:`read_metadata`.
    """
    from ckptool.formats import read_metadata

    meta = read_metadata(path, key=key)
    return dict(iter_tensors(meta))


def iter_tensors(meta: CheckpointMeta) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor of ``meta``, few in memory at a time."""
    with open_tensors(meta) as reader:
        for name in meta.tensors:
            yield name, reader.get(name)


@contextmanager
def open_tensors(meta: CheckpointMeta) -> Iterator[TensorReader]:
    """Random access to ``meta``'s tensors: safetensors lazily, torch files memory-mapped."""
    with ExitStack() as stack:
        yield TensorReader(meta, stack)


class TensorReader:
    """Gets tensors by name; opens each file (or shard) once, on first use."""

    def __init__(self, meta: CheckpointMeta, stack: ExitStack) -> None:
        self._meta = meta
        self._stack = stack
        self._handles: dict[str, Any] = {}
        self._weight_map = read_index(meta.path) if meta.format is Format.SHARDED else None
        self._aliases = _aliases(meta)
        self._tied: dict[Any, torch.Tensor] = {}
        self._chunks: dict[str, list[Chunk]] | None = None  # DCP: read on first use
        uses = Counter(meta.assembled.values())
        self._shared_assemblies = {a for a, n in uses.items() if n > 1}

    def get(self, name: str) -> torch.Tensor:
        if self._meta.format is Format.DCP:
            fqn = dcp_name(self._meta, name)
            return load_dcp_tensor(self._meta.path, fqn, self._meta.tensors[name], self.chunks)
        if name in self._meta.assembled:
            return self._assembled(name)
        if name in self._aliases or name in self._aliases.values():
            # Tied tensors come back as one object, as torch.load would give them.
            target = self._aliases.get(name, name)
            if target not in self._tied:
                self._tied[target] = self._get_stored(target)
            return self._tied[target]
        return self._get_stored(name)

    @property
    def chunks(self) -> dict[str, list[Chunk]]:
        """A DCP folder's chunk index, read from ``.metadata`` once."""
        if self._chunks is None:
            self._chunks = chunk_index(self._meta.path)
        return self._chunks

    def _assembled(self, name: str) -> torch.Tensor:
        """A tensor joined from pieces of several files (ZeRO); tied names share one."""
        import torch

        assembly = self._meta.assembled[name]
        if assembly in self._tied:
            return self._tied[assembly]
        data = read_assembly(assembly, name)
        stored = getattr(torch, assembly.stored_dtype)
        flat = torch.frombuffer(data, dtype=stored) if data else torch.empty(0, dtype=stored)
        meta = self._meta.tensors[name]
        tensor = flat.reshape(meta.shape).to(getattr(torch, meta.dtype))
        if assembly in self._shared_assemblies:  # kept only for the names tied to it
            self._tied[assembly] = tensor
        return tensor

    def _get_stored(self, name: str) -> torch.Tensor:
        path = self._weight_map[name] if self._weight_map is not None else self._meta.path
        if path not in self._handles:
            self._handles[path] = self._open(path)
        try:
            tensor = self._handles[path].get_tensor(name)
        except Exception as e:  # safetensors raises its own SafetensorError on bad bytes
            raise CheckpointReadError(f"{path}: cannot read {name!r} ({first_line(e)})") from e
        if tensor.is_meta:
            raise CheckpointReadError(
                f"{path}: tensor {name!r} was saved from the meta device and holds no values"
            )
        return tensor  # type: ignore[no-any-return]

    def _open(self, path: str) -> Any:
        if self._peek_safetensors(path):
            return self._stack.enter_context(_safe_open(path))
        if self._meta.opaque and self._weight_map is None:
            # torch.load(weights_only=True) refuses the objects beside the weights; the
            # tensors are rebuilt from the storage bytes the reader located instead.
            return _StorageBytesHandle(self._meta)
        # torch memory-maps only zip files; a sharded index may name legacy .bin shards.
        obj = torch_load_safely(path, mmap=detect_format(path) is Format.TORCH_ZIP)
        key = self._meta.key if self._weight_map is None else None
        _, tensors, _ = select_tensor_dict(obj, key=key, is_tensor=_is_tensor, path=path)
        return _DictHandle(tensors)

    def _peek_safetensors(self, path: str) -> bool:
        if self._weight_map is None:
            return self._meta.format is Format.SAFETENSORS
        return path.endswith(".safetensors")


@contextmanager
def _safe_open(path: str) -> Iterator[Any]:
    from safetensors import safe_open

    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # SafetensorError is not an OSError or ValueError
        raise CheckpointReadError(f"{path}: cannot read tensors ({first_line(e)})") from e
    with handle:
        yield handle


class _StorageBytesHandle:
    """Tensors rebuilt from their storages' bytes in the file (offsets and extents the
    metadata reader checked), for torch files ``torch.load(weights_only=True)`` refuses.
    Each storage is read once; views of one storage share it, as with torch.load."""

    def __init__(self, meta: CheckpointMeta) -> None:
        self._meta = meta
        self._storages: dict[str, torch.Tensor] = {}

    def get_tensor(self, name: str) -> torch.Tensor:
        meta = self._meta.tensors[name]
        key = meta.storage or ""
        if key not in self._storages:
            self._storages[key] = read_storage(meta, self._meta.path, name)
        return view_of_storage(meta, self._storages[key])


def read_located_tensor(meta: TensorMeta, path: str, name: str) -> torch.Tensor:
    """One tensor read from its storage's bytes in the file, nothing kept mapped or
    cached: what a streamed writer needs to hold one tensor at a time."""
    return view_of_storage(meta, read_storage(meta, path, name))


def read_tensor_alone(meta: TensorMeta, name: str) -> torch.Tensor | None:
    """One tensor read from the bytes the metadata reader located for it (only its own
    bytes when it is contiguous, else its storage's), or None where they were not
    located (DCP, ZeRO, a legacy file): a cast reads each tensor once and keeps none."""
    import torch

    located = meta.byte_range
    if located is None:
        stored = meta.file is not None and meta.file_offset is not None
        return read_located_tensor(meta, meta.file or "", name) if stored else None
    file, offset, length = located
    if length == 0:
        return torch.empty(meta.shape, dtype=getattr(torch, meta.dtype))
    data = bytearray(length)
    with open(file, "rb", buffering=0) as f:
        if os.preadv(f.fileno(), [data], offset) != length:
            raise CheckpointReadError(f"{file}: the bytes of {name!r} are cut short")
    return torch.frombuffer(data, dtype=getattr(torch, meta.dtype)).reshape(meta.shape)


def read_storage(meta: TensorMeta, path: str, name: str) -> torch.Tensor:
    """The bytes of ``meta``'s storage (offset and extent as the reader checked them).

    Raises:
        CheckpointReadError: the storage was not located (big-endian, meta device) or
            the file is cut short.
    """
    import torch

    if meta.numel == 0:
        return torch.empty(0, dtype=torch.uint8)
    if (
        meta.storage is None
        or meta.file is None
        or meta.file_offset is None
        or meta.storage_nbytes is None
    ):
        raise CheckpointReadError(
            f"{path}: tensor {name!r} has no located storage to read (a big-endian or "
            "meta-device file); re-save it with torch.save"
        )
    with open(meta.file, "rb") as f:
        f.seek(meta.file_offset)
        data = bytearray(f.read(meta.storage_nbytes))
    if len(data) != meta.storage_nbytes:
        raise CheckpointReadError(f"{meta.file}: the storage of {name!r} is cut short")
    if not data:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(data, dtype=torch.uint8)


def view_of_storage(meta: TensorMeta, storage: torch.Tensor) -> torch.Tensor:
    """``meta``'s view (shape, strides, offset) of a storage's bytes."""
    import torch

    dtype = getattr(torch, meta.dtype)
    if meta.numel == 0:
        return torch.empty(meta.shape, dtype=dtype)
    return torch.as_strided(storage.view(dtype), meta.shape, meta.strides, meta.storage_offset)


class _DictHandle:
    def __init__(self, tensors: dict[str, Any]) -> None:
        self._tensors = tensors

    def get_tensor(self, name: str) -> Any:
        return self._tensors[name]


def _aliases(meta: CheckpointMeta) -> dict[str, str]:
    stored_once = meta.format in (Format.SAFETENSORS, Format.SHARDED)
    raw = meta.metadata.get(ALIASES_KEY) if stored_once else None
    return dict(json.loads(raw)) if raw else {}


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def tensor_buffer(tensor: torch.Tensor, dtype: str | None = None, *, name: str = "") -> memoryview:
    """Like :func:`tensor_bytes` without the final copy: a view of the (cast,
    contiguous) tensor's own memory, which it keeps alive."""
    import torch

    if dtype is not None and str(tensor.dtype) != f"torch.{dtype}":
        tensor = _cast_in_range(tensor, getattr(torch, dtype), name)
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data if flat.numel() else memoryview(b"")


# float8 is checked for NaN through float32, this many values at a time.
_WIDEN_CHUNK = 1 << 24


def holds_non_finite(tensor: torch.Tensor) -> bool:
    """A floating tensor holding NaN or inf. torch has no ``isfinite`` for most float8
    dtypes (a crash in load_into with FP8 weights) and none for float4, whose e2m1 codes
    are all finite; float8 is checked through float32, which holds each of its values."""
    import torch

    if not tensor.is_floating_point() or str(tensor.dtype) == f"torch.{FLOAT4}":
        return False
    if tensor.element_size() > 1:
        return not bool(torch.isfinite(tensor).all())
    flat = tensor.detach().reshape(-1)
    starts = range(0, flat.numel(), _WIDEN_CHUNK)
    return any(not bool(torch.isfinite(flat[i : i + _WIDEN_CHUNK].float()).all()) for i in starts)


def tensor_bytes(tensor: torch.Tensor, dtype: str | None = None, *, name: str = "") -> bytes:
    """The raw little-endian bytes of ``tensor`` (cast to ``dtype``), C-contiguous.

    Raises:
        UsageError: the cast would turn finite values infinite (``name`` for the message).
    """
    return tensor_buffer(tensor, dtype, name=name).tobytes()


def _cast_in_range(tensor: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """``tensor`` cast to ``dtype``, refusing values the cast would make infinite (1e6 in
    float16 is inf): the written file would hold them as if they had been trained so."""
    import torch

    cast = tensor.to(dtype)
    if not (tensor.is_floating_point() and cast.is_floating_point() and tensor.numel()):
        return cast
    # The extremes first: aminmax makes no tensor of the input's size (casts stream
    # within 2x the largest tensor), and nearly every tensor ends the check here.
    low, high = torch.aminmax(tensor)
    limit = torch.finfo(dtype).max
    if -limit <= float(low) and float(high) <= limit:
        return cast
    overflowed = cast.isinf() & tensor.isfinite()  # an infinite mask entry stays so
    count = int(overflowed.sum())
    if count:
        largest = float(tensor[overflowed].abs().max())
        limit = torch.finfo(dtype).max
        raise UsageError(
            f"{option('dtype', str(dtype).removeprefix('torch.'))}: {count} values of "
            f"{short_str(name)!r} (up to {largest:.3g}) are beyond its range ({limit:.6g}) "
            f"and would become inf; keep the tensor with {option('keep_dtype', name)} or "
            "cast to bfloat16"
        )
    return cast
