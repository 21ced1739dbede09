"""ckptool: checkpoint surgery and inspection for PyTorch.

The public API is imported lazily so that ``import ckptool`` (and ``ckptool --help``)
does not import torch; torch loads on first use of a function that needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ckptool._version import __version__
from ckptool.errors import (
    AmbiguousContainerError,
    CheckpointReadError,
    CkptError,
    DataError,
    FrozenParameterError,
    IncompatibleCheckpointError,
    IncompatibleError,
    ModelSpecError,
    OutputError,
    TrainingDivergedError,
    TransformError,
    UnsafeCheckpointError,
    UsageError,
    VerificationError,
)

if TYPE_CHECKING:
    from ckptool.compare import diff_checkpoint as diff
    from ckptool.formats import read_metadata
    from ckptool.formats.load import load_state_dict
    from ckptool.formats.save import save_state_dict
    from ckptool.freezing import freeze, hold_frozen, summarize
    from ckptool.guard import FreezeGuard, GuardReport
    from ckptool.keys import Transforms
    from ckptool.models import build_model, replace_head
    from ckptool.sanity import check
    from ckptool.surgery import adapt, convert, load_into, merge

_LAZY = {
    "read_metadata": ("ckptool.formats", "read_metadata"),
    "load_state_dict": ("ckptool.formats.load", "load_state_dict"),
    "diff": ("ckptool.compare", "diff_checkpoint"),
    "Transforms": ("ckptool.keys", "Transforms"),
    "build_model": ("ckptool.models", "build_model"),
    "replace_head": ("ckptool.models", "replace_head"),
    "save_state_dict": ("ckptool.formats.save", "save_state_dict"),
    "adapt": ("ckptool.surgery", "adapt"),
    "load_into": ("ckptool.surgery", "load_into"),
    "convert": ("ckptool.surgery", "convert"),
    "merge": ("ckptool.surgery", "merge"),
    "merge_lora": ("ckptool.lora", "merge_lora"),
    "check": ("ckptool.sanity", "check"),
    "freeze": ("ckptool.freezing", "freeze"),
    "summarize": ("ckptool.freezing", "summarize"),
    "hold_frozen": ("ckptool.freezing", "hold_frozen"),
    "FreezeGuard": ("ckptool.guard", "FreezeGuard"),
    "GuardReport": ("ckptool.guard", "GuardReport"),
}

__all__ = [
    "AmbiguousContainerError",
    "CheckpointReadError",
    "CkptError",
    "DataError",
    "FreezeGuard",
    "FrozenParameterError",
    "GuardReport",
    "IncompatibleCheckpointError",
    "IncompatibleError",
    "ModelSpecError",
    "OutputError",
    "TrainingDivergedError",
    "TransformError",
    "Transforms",
    "UnsafeCheckpointError",
    "UsageError",
    "VerificationError",
    "__version__",
    "adapt",
    "build_model",
    "check",
    "convert",
    "diff",
    "freeze",
    "hold_frozen",
    "load_into",
    "load_state_dict",
    "merge",
    "merge_lora",
    "read_metadata",
    "replace_head",
    "save_state_dict",
    "summarize",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ckptool' has no attribute {name!r}")
