"""What a checkpoint holds, described without tensor bytes (and without torch)."""

from __future__ import annotations

import collections
import enum
import itertools
import math
import operator
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

# torch dtype name -> bytes per element. Sub-byte packed dtypes count their container.
DTYPE_SIZES: Mapping[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "complex128": 16, "complex64": 8, "complex32": 4,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1,
    "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1, "bool": 1,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1, "float4_e2m1fn_x2": 1,
    "qint8": 1, "quint8": 1, "qint32": 4, "quint4x2": 1, "quint2x4": 1,
}  # fmt: skip
# Quantized tensors carry a scale and zero point beside their integers (torch only).
QUANTIZED = frozenset({"qint8", "quint8", "qint32", "quint4x2", "quint2x4"})
# The dtypes a --dtype cast applies to, and that consolidated ZeRO buffers widen from.
FLOATING = frozenset({"float64", "float32", "float16", "bfloat16"})
# fp4: two e2m1 codes a byte, one element a pair; torch converts it to nothing, so code
# that widens values or maps shapes treats it by name.
FLOAT4 = "float4_e2m1fn_x2"
# float8 and float4: block-scaled weights (codes times scales held in other tensors),
# which a cast leaves alone and an average or a load without the scales gets wrong.
LOW_PRECISION = frozenset(d for d in DTYPE_SIZES if d.startswith(("float8_", "float4_")))
# How checkpoints name a low-precision weight's scale: NAME + suffix (DeepSeek's
# weight_scale_inv, compressed-tensors' weight_scale).
SCALE_SUFFIXES = ("_scale_inv", "_scale")


class Format(str, enum.Enum):
    """On-disk layout of a checkpoint."""

    SAFETENSORS = "safetensors"
    TORCH_ZIP = "torch-zip"
    TORCH_LEGACY = "torch-legacy"
    SHARDED = "sharded"
    DCP = "torch-dcp"
    ZERO = "deepspeed-zero"


# Separate runs of one strided view counted exactly by ``occupied_spans`` (beyond it,
# the view's extent): a crafted stride must not make inspect enumerate 2**40 runs.
MAX_EXACT_SPANS = 65536


def tied_views(tensors: Mapping[str, TensorMeta]) -> dict[object, list[str]]:
    """Names that are one tensor (the same view of one storage), by that view; names
    alone in their view are left out."""
    if len(set(map(_STORAGE, tensors.values()))) == len(tensors):
        return {}  # most checkpoints: no storage holds two names (a set tells, in C)
    storages = list(map(_STORAGE, tensors.values()))
    distinct = set(storages)
    distinct.discard(None)
    if len(distinct) == len(storages) - storages.count(None):
        return {}  # a model keys only its tied tensors' storages (the rest are None)
    by_storage: dict[str, list[str]] = {}
    for name, tensor in tensors.items():
        if tensor.storage is not None:
            by_storage.setdefault(tensor.storage, []).append(name)
    by_view: dict[object, list[str]] = {}
    for names in by_storage.values():
        if len(names) > 1:  # only names sharing a storage can be one tensor
            for name in names:
                by_view.setdefault(tensors[name].view_identity, []).append(name)
    return {view: names for view, names in by_view.items() if len(names) > 1}


def union_length(spans: list[tuple[int, int]]) -> int:
    """Bytes covered by the union of [start, end) spans."""
    total, reach = 0, None
    for start, end in sorted(spans):
        if reach is None or start > reach:
            total, reach = total + end - start, end
        elif end > reach:
            total, reach = total + end - reach, end
    return total


class TensorMeta(NamedTuple):
    """Shape, dtype and storage of one tensor, read from a header.

    ``storage`` identifies the bytes the tensor views within its file (a zip record, a
    legacy storage key, a safetensors tensor's own name: its byte range overlaps no
    other's, and an alias gets its target's); two tensors with the same ``storage``
    share memory.

    A named tuple rather than a frozen dataclass: as immutable, and built in C, which
    is most of what reading a 100,000-tensor header costs (2.5x faster to create).
    """

    shape: tuple[int, ...]
    dtype: str
    storage: str | None = None
    storage_offset: int = 0
    stride: tuple[int, ...] | None = None
    file: str | None = None  # the file holding the storage's bytes, when known
    file_offset: int | None = None  # where the storage's bytes start in ``file``
    # How many bytes from ``file_offset`` the reader checked lie inside the storage record:
    # the only bytes ``byte_range`` may ever point at.
    storage_nbytes: int | None = None
    # Only a model's metadata sets it: False for buffers and frozen parameters, whose
    # values the model computes (CQT kernels, position tables) rather than learns.
    learned: bool = True

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES.get(self.dtype, 0)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def byte_range(self) -> tuple[str, int, int] | None:
        """(file, offset, length) of this tensor's bytes if they can be copied as-is.

        None unless the bytes lie inside the storage record the reader validated: a
        copy must never reach past it (into a zip header, another record, another file).
        """
        if self.file is None or self.file_offset is None or self.storage_nbytes is None:
            return None
        start = self.storage_offset * self.itemsize
        if not self.is_contiguous or start < 0 or start + self.nbytes > self.storage_nbytes:
            return None
        return self.file, self.file_offset + start, self.nbytes

    @property
    def strides(self) -> tuple[int, ...]:
        """The strides, with None (as a header says it) spelled out as C-contiguous."""
        if self.stride is not None:
            return self.stride
        out, step = [], 1
        for size in reversed(self.shape):
            out.append(step)
            step *= size
        return tuple(reversed(out))

    @property
    def view_identity(self) -> tuple[object, ...]:
        """Equal for two names that are the same tensor (tied), different otherwise."""
        return (self.storage, self.storage_offset, self.shape, self.strides, self.dtype)

    def occupied_spans(self) -> list[tuple[int, int]]:
        """[start, end) byte ranges of the storage this tensor's elements cover.

        Exact for dense, permuted and broadcast views; a view with more than
        MAX_EXACT_SPANS separate runs is given as its whole extent (an upper bound).
        """
        if self.numel == 0:
            return []
        if self.stride is None:  # C-contiguous as stored (every safetensors tensor)
            start = self.storage_offset * self.itemsize
            return [(start, start + self.nbytes)]
        # Size-1 and stride-0 (broadcast) dims reach no new bytes; innermost first.
        dims = sorted(
            (
                (size, step)
                for size, step in zip(self.shape, self.strides, strict=True)
                if size != 1 and step != 0
            ),
            key=lambda d: d[1],
        )
        run = 1  # elements in one contiguous run
        while dims and dims[0][1] == run:
            run *= dims.pop(0)[0]
        start = self.storage_offset * self.itemsize
        if math.prod(size for size, _ in dims) > MAX_EXACT_SPANS:
            last = sum((size - 1) * step for size, step in dims) + run
            return [(start, start + last * self.itemsize)]
        offsets = [0]
        for size, step in dims:
            offsets = [o + i * step for o in offsets for i in range(size)]
        length = run * self.itemsize
        return [(start + o * self.itemsize, start + o * self.itemsize + length) for o in offsets]

    @property
    def is_contiguous(self) -> bool:
        if self.stride is None or self.numel == 0:  # no elements: any strides will do
            return True
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride), strict=True):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True


def _all_dense(tensors: Collection[TensorMeta]) -> bool:
    """Whether each tensor has no strides (safetensors) or a dense tensor's (a torch.save
    tensor, mostly), checked in C: one set of dense strides per distinct shape.

    False does not say one is strided: ``is_contiguous`` also takes any stride for a
    dimension of size 1, or for a tensor without elements."""
    strides = list(map(_STRIDE, tensors))
    unstrided = strides.count(None)
    if unstrided == len(strides):
        return True
    shapes = list(map(_SHAPE, tensors))
    dense = {shape: dense_strides(shape) for shape in set(shapes)}
    matching: int = sum(map(operator.eq, strides, map(dense.__getitem__, shapes)))
    return unstrided + matching == len(strides)


def dense_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """The strides torch gives a dense tensor of ``shape``: each the product of the sizes
    after it (a size of 0 counted as 1)."""
    if not shape:
        return ()
    sizes = map(max, reversed(shape[1:]), itertools.repeat(1))
    return tuple(itertools.accumulate(sizes, operator.mul, initial=1))[::-1]


# Per-tensor columns, read at C speed: a 100,000-tensor listing pays for every
# Python-level property call.
_STORAGE = operator.attrgetter("storage")
_DTYPE = operator.attrgetter("dtype")
_SHAPE = operator.attrgetter("shape")
_STRIDE = operator.attrgetter("stride")


def numels(tensors: Iterable[TensorMeta]) -> Iterator[int]:
    """Each tensor's element count, computed in C."""
    return map(math.prod, map(_SHAPE, tensors))


def itemsizes(tensors: Iterable[TensorMeta]) -> Iterator[int]:
    """Each tensor's ``itemsize`` (0 for a dtype of unknown size), computed in C."""
    return map(DTYPE_SIZES.get, map(_DTYPE, tensors), itertools.repeat(0))


def nbytes_each(tensors: Iterable[TensorMeta]) -> Iterator[int]:
    """Each tensor's ``nbytes`` (elements times item size), computed in C."""
    tensors = list(tensors)
    return map(operator.mul, numels(tensors), itemsizes(tensors))


@dataclass(frozen=True)
class Piece:
    """``length`` bytes at ``offset`` in ``file``: part of one assembled tensor."""

    file: str
    offset: int
    length: int


@dataclass(frozen=True)
class Assembly:
    """A tensor put together from several files (a ZeRO parameter from each rank's
    partition): its pieces joined in order are its bytes in ``stored_dtype``, which
    may differ from the tensor's dtype (a float16 buffer comes out as float32)."""

    pieces: tuple[Piece, ...]
    stored_dtype: str


# The kind of a non-tensor value inside the chosen tensor dict ({..., "step": 5}):
# listed by inspect, left out by every write.
NOT_A_TENSOR = "not_tensor"


@dataclass(frozen=True)
class ContainerEntry:
    """A top-level entry of a checkpoint file that is not the chosen tensor dict, or
    (kind NOT_A_TENSOR) a value inside that dict that is not a tensor."""

    name: str
    kind: str
    summary: str
    count: int = 1  # the values it stands for: more for the one past a capped listing


@dataclass(frozen=True)
class CheckpointMeta:
    """Everything ``inspect`` reports about a checkpoint, from headers only."""

    path: str
    format: Format
    tensors: Mapping[str, TensorMeta]
    key: str | None = None
    containers: tuple[ContainerEntry, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    file_size: int = 0
    files: tuple[str, ...] = ()
    # torch.save of a state_dict() keeps each module's version (``_metadata``); loading
    # hooks read it (BatchNorm fills num_batches_tracked only for old versions).
    module_versions: Mapping[str, int] | None = None
    # Globals the pickle names that ckptool kept as inert data (never imported, never
    # called): a training checkpoint's argparse.Namespace, numpy scalars, configs.
    opaque: tuple[str, ...] = ()
    # Tensors that no single file holds whole, by name: where their bytes are.
    assembled: Mapping[str, Assembly] = field(default_factory=dict)

    @property
    def num_params(self) -> int:
        return sum(numels(self.tensors.values()))

    @property
    def nbytes(self) -> int:
        """Distinct bytes of tensor data: what the tensors occupy, each byte counted once.

        Tensors that view one storage (tied names, or LSTM weights sliced from one flat
        buffer) are counted by the union of the bytes they cover, not by the storage.
        """
        tensors = self.tensors.values()
        views = collections.Counter(map(_STORAGE, tensors))
        views.pop(None, None)  # no storage known: the tensor's own bytes
        if max(views.values(), default=0) < 2 and _all_dense(tensors):
            # Most files: each tensor dense and alone in its storage; summed in C, as a
            # 100,000-tensor file asks for it too.
            return sum(nbytes_each(tensors))
        total = 0
        shared: dict[str, list[tuple[int, int]]] = {}
        for tensor in tensors:
            if tensor.storage is None:
                total += tensor.nbytes
            elif views[tensor.storage] > 1:
                shared.setdefault(tensor.storage, []).extend(tensor.occupied_spans())
            elif tensor.is_contiguous:  # most tensors: alone in their storage, dense
                total += tensor.nbytes
            else:
                total += sum(end - start for start, end in tensor.occupied_spans())
        return total + sum(map(union_length, shared.values()))

    def shared_groups(self) -> list[list[str]]:
        """Names that are one tensor (tied): the same view of the same storage.

        Different slices of one storage (``flatten_parameters()`` LSTM weights) are
        separate tensors and are not grouped.
        """
        return list(tied_views(self.tensors).values())

    def dtype_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        tensors = self.tensors.values()
        for dtype, numel in zip(map(_DTYPE, tensors), numels(tensors), strict=True):
            counts[dtype] = counts.get(dtype, 0) + numel
        return counts
