"""Loading tensor values. Imports torch; never unpickles outside weights_only."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ckptool.errors import CheckpointReadError
from ckptool.formats.containers import select_tensor_dict
from ckptool.formats.meta import CheckpointMeta, Format
from ckptool.formats.sharded import read_index

if TYPE_CHECKING:
    import torch


def torch_load_safely(path: str, *, mmap: bool) -> Any:
    """``torch.load`` with ``weights_only=True`` and tensors on the CPU (memory-mapped for zip).

    Raises:
        CheckpointReadError: torch cannot read the file.
    """
    import pickle

    import torch

    try:
        return torch.load(path, weights_only=True, mmap=mmap, map_location="cpu")
    except pickle.UnpicklingError as e:
        # weights_only refusals land here; our own scan runs first, so this is rare.
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointReadError(f"{path}: torch refused to load it: {first_line}") from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointReadError(f"{path}: torch cannot read it ({e})") from e


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
    if meta.format is Format.SAFETENSORS:
        with _safe_open(meta.path) as handle:
            for name in meta.tensors:
                yield name, handle.get_tensor(name)
    elif meta.format is Format.SHARDED:
        # Shard by shard, so each shard file is opened once.
        weight_map = read_index(meta.path)
        for shard in dict.fromkeys(weight_map[name] for name in meta.tensors):
            with _safe_open_any(shard) as handle:
                for name in meta.tensors:
                    if weight_map[name] == shard:
                        yield name, handle.get_tensor(name)
    else:
        obj = torch_load_safely(meta.path, mmap=meta.format is Format.TORCH_ZIP)
        _, tensors, _ = select_tensor_dict(obj, key=meta.key, is_tensor=_is_tensor, path=meta.path)
        yield from ((name, tensors[name]) for name in meta.tensors)


@contextmanager
def _safe_open(path: str) -> Iterator[Any]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            yield handle
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointReadError(f"{path}: cannot read tensors ({e})") from e


@contextmanager
def _safe_open_any(path: str) -> Iterator[Any]:
    """A shard may be safetensors or a torch.save file (``pytorch_model-00001-of-00002.bin``)."""
    if path.endswith(".safetensors"):
        with _safe_open(path) as handle:
            yield handle
        return
    obj = torch_load_safely(path, mmap=True)
    yield _DictHandle(obj)


class _DictHandle:
    def __init__(self, tensors: dict[str, Any]) -> None:
        self._tensors = tensors

    def get_tensor(self, name: str) -> Any:
        return self._tensors[name]


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)
