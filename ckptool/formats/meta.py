"""What a checkpoint holds, described without tensor bytes (and without torch)."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

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


class Format(str, enum.Enum):
    """On-disk layout of a checkpoint."""

    SAFETENSORS = "safetensors"
    TORCH_ZIP = "torch-zip"
    TORCH_LEGACY = "torch-legacy"
    SHARDED = "sharded"
    DCP = "torch-dcp"


@dataclass(frozen=True)
class TensorMeta:
    """Shape, dtype and storage of one tensor, read from a header.

    ``storage`` identifies the bytes the tensor views (a zip record, a legacy storage
    key, a safetensors byte range); two tensors with the same ``storage`` share memory.
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
    def is_contiguous(self) -> bool:
        if self.stride is None or self.numel == 0:  # no elements: any strides will do
            return True
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride), strict=True):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True


@dataclass(frozen=True)
class ContainerEntry:
    """A top-level entry of a checkpoint file that is not the chosen tensor dict."""

    name: str
    kind: str
    summary: str


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

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data, counting shared storage once."""
        seen: dict[str, int] = {}
        total = 0
        for tensor in self.tensors.values():
            if tensor.storage is None:
                total += tensor.nbytes
            else:
                seen[tensor.storage] = max(seen.get(tensor.storage, 0), tensor.nbytes)
        return total + sum(seen.values())

    def shared_groups(self) -> list[list[str]]:
        """Names of tensors that view the same storage, one list per storage."""
        by_storage: dict[str, list[str]] = {}
        for name, tensor in self.tensors.items():
            if tensor.storage is not None:
                by_storage.setdefault(tensor.storage, []).append(name)
        return [names for names in by_storage.values() if len(names) > 1]

    def dtype_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for tensor in self.tensors.values():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel
        return counts
