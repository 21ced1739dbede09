"""Reading checkpoints: format detection, metadata from headers, tensor loading."""

from __future__ import annotations

import glob
import os
import pickle
import re
from typing import Any

from ckptool.errors import CheckpointReadError, option
from ckptool.formats.files import gc_paused, require_regular_file
from ckptool.formats.meta import CheckpointMeta, ContainerEntry, Format, TensorMeta
from ckptool.formats.safetensors_header import natural_keys_kept, read_safetensors_meta
from ckptool.formats.sharded import read_sharded_meta

# The pickle, DCP and ZeRO readers are imported where a file needs them: their modules
# (regexes compiled at import) cost about 70 ms here that a safetensors read never uses.

__all__ = [
    "CheckpointMeta",
    "ContainerEntry",
    "Format",
    "TensorMeta",
    "detect_format",
    "natural_keys_kept",
    "read_metadata",
    "resolve_checkpoint",
]

_ZIP_MAGIC = b"PK\x03\x04"


def read_metadata(path: str | os.PathLike[str], *, key: str | None = None) -> CheckpointMeta:
    """Describe a checkpoint (names, shapes, dtypes, containers) without reading tensor bytes.

    Args:
        path: a ``.safetensors``, torch.save (zip or legacy) file, ``*.index.json``,
            a torch.distributed.checkpoint or DeepSpeed ZeRO folder (or the folder of
            DeepSpeed's ``latest`` file), or a directory holding exactly one file.
        key: dotted path of the tensor dict inside nested containers (``model.ema``).

    Returns:
        The checkpoint's :class:`CheckpointMeta`.

    Raises:
        CheckpointReadError: unreadable, corrupt or unsupported input.
        UnsafeCheckpointError: a pickle that imports outside the tensor allowlist.
        UsageError: ``key`` is wrong, or several tensor dicts and no ``key``.
    """
    with gc_paused():
        return _read_meta(os.fspath(path), key=key)


def _read_meta(path: str, *, key: str | None) -> CheckpointMeta:
    resolved = resolve_checkpoint(path)
    file_format = detect_format(resolved)
    if file_format is Format.SHARDED:
        # The index orders the tensors: a shard's own order is not worth sorting.
        return read_sharded_meta(resolved, read_shard=_read_shard_meta)
    if file_format is Format.DCP:
        from ckptool.formats.dcp import read_dcp_meta

        return read_dcp_meta(resolved, key=key)
    if file_format is Format.ZERO:
        from ckptool.formats.zero import read_zero_meta

        if key is not None:
            raise CheckpointReadError(
                f"{resolved}: a ZeRO folder is one state dict; {option('key')} does not apply"
            )
        return read_zero_meta(resolved)
    return _read_file_meta(resolved, key=key, file_format=file_format)


def _read_shard_meta(path: str) -> CheckpointMeta:
    return _read_file_meta(path, natural_order=False)


def _read_file_meta(
    path: str,
    *,
    key: str | None = None,
    file_format: Format | None = None,
    natural_order: bool = True,
) -> CheckpointMeta:
    file_format = file_format or detect_format(path)
    if file_format is Format.SAFETENSORS:
        if key is not None:
            raise CheckpointReadError(
                f"{path}: safetensors files are flat; {option('key')} does not apply"
            )
        return read_safetensors_meta(path, natural_order=natural_order)
    from ckptool.formats.restricted_pickle import NeedsTorchError
    from ckptool.formats.torch_pickle import read_legacy_meta, read_zip_meta

    try:
        if file_format is Format.TORCH_ZIP:
            return read_zip_meta(path, key=key)
        return read_legacy_meta(path, key=key)
    except NeedsTorchError:
        # Sparse, quantized or subclassed tensors: safe, but only torch can describe them.
        return _read_meta_with_torch(path, file_format, key=key)


def resolve_checkpoint(path: str) -> str:
    """Map a directory to the checkpoint file inside it; check a file exists and is readable."""
    if os.path.isdir(path):
        return _checkpoint_in_directory(path)
    require_regular_file(path)
    if not os.access(path, os.R_OK):
        raise CheckpointReadError(f"{path}: permission denied")
    return path


# What a Hugging Face Trainer or Lightning run writes beside the weights: never weights.
_TRAINING_STATE = re.compile(
    r"(training_args\.bin|optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth)$"
)
# The weight files transformers and diffusers look for, in their order of preference.
_WEIGHT_FILE_NAMES = [
    "model.safetensors",
    "diffusion_pytorch_model.safetensors",
    "pytorch_model.bin",
    "diffusion_pytorch_model.bin",
]


def _is_training_state(name: str) -> bool:
    return _TRAINING_STATE.fullmatch(name) is not None


def _checkpoint_in_directory(folder: str) -> str:
    from ckptool.formats.dcp import is_dcp_directory
    from ckptool.formats.zero import is_zero_directory, latest_zero_directory

    if is_dcp_directory(folder) or is_zero_directory(folder):
        return folder
    tagged = latest_zero_directory(folder)
    if tagged is not None:
        return tagged
    indexes = sorted(glob.glob(os.path.join(folder, "*.index.json")))
    if len(indexes) == 1:
        return indexes[0]
    singles = [
        p
        for pattern in ("*.safetensors", "*.pt", "*.pth", "*.bin", "*.ckpt")
        for p in sorted(glob.glob(os.path.join(folder, pattern)))
        if not _is_training_state(os.path.basename(p))
    ]
    if not indexes and len(singles) == 1:
        return singles[0]
    # transformers writes model.safetensors and, for old readers, pytorch_model.bin.
    preferred = [p for p in singles if os.path.basename(p) in _WEIGHT_FILE_NAMES]
    if not indexes and preferred:
        return min(preferred, key=lambda p: _WEIGHT_FILE_NAMES.index(os.path.basename(p)))
    found = [os.path.basename(p) for p in indexes or singles]
    if not found:
        raise CheckpointReadError(f"{folder}: directory holds no checkpoint file")
    raise CheckpointReadError(
        f"{folder}: directory holds several checkpoints ({', '.join(found[:5])}); name one"
    )


def detect_format(path: str) -> Format:
    """Tell the format from the first bytes, not the file name.

    Raises:
        CheckpointReadError: empty, or not a format ckptool reads.
    """
    if path.endswith(".index.json"):
        return Format.SHARDED
    if os.path.isdir(path):
        from ckptool.formats.dcp import is_dcp_directory
        from ckptool.formats.zero import is_zero_directory

        if is_dcp_directory(path):
            return Format.DCP
        if is_zero_directory(path):
            return Format.ZERO
    require_regular_file(path)
    with open(path, "rb") as f:
        head = f.read(_MAGIC_BYTES)
        size = os.fstat(f.fileno()).st_size
    if not head:
        raise CheckpointReadError(f"{path}: file is empty")
    if head.startswith(_ZIP_MAGIC):
        return Format.TORCH_ZIP
    # A safetensors header length such as 384 starts with byte 0x80, like a pickle: a
    # length that fits the file decides; otherwise the reader reports the bad length.
    fits = int.from_bytes(head[:8], "little") + 8 <= size
    if len(head) >= 9 and head[8:9] == b"{" and (fits or not _looks_like_pickle(head)):
        return Format.SAFETENSORS
    if _looks_like_pickle(head):
        return Format.TORCH_LEGACY
    other = next((what for magic, what in _OTHER_FORMATS if head.startswith(magic)), None)
    what = f"is {other}, not a PyTorch checkpoint" if other else "not a recognised checkpoint"
    raise CheckpointReadError(
        f"{path}: {what} (expected safetensors, a torch.save zip or legacy file, or a *.index.json)"
    )


_MAGIC_BYTES = 9


def _looks_like_pickle(head: bytes) -> bool:
    return len(head) >= 2 and head[:1] == pickle.PROTO and 2 <= head[1] <= pickle.HIGHEST_PROTOCOL


# Weight files of other frameworks that users hand to a PyTorch tool: named, not guessed.
_OTHER_FORMATS = (
    (b"GGUF", "a GGUF file (llama.cpp)"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (Keras .h5 weights?)"),
    (b"\x93NUMPY", "a NumPy .npy array"),
)


def _read_meta_with_torch(path: str, file_format: Format, *, key: str | None) -> CheckpointMeta:
    from ckptool.formats.load import torch_load_safely  # imports torch

    obj = torch_load_safely(path, mmap=file_format is Format.TORCH_ZIP)
    from ckptool.formats.containers import select_tensor_dict

    chosen, tensors, containers = select_tensor_dict(
        obj, key=key, is_tensor=_is_torch_tensor, path=path
    )
    return CheckpointMeta(
        path=path,
        format=file_format,
        tensors={name: _meta_of_tensor(t) for name, t in tensors.items()},
        key=chosen,
        containers=containers,
        file_size=os.path.getsize(path),
        files=(path,),
    )


def _is_torch_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def _meta_of_tensor(tensor: Any) -> TensorMeta:
    return TensorMeta(shape=tuple(tensor.shape), dtype=str(tensor.dtype).removeprefix("torch."))
