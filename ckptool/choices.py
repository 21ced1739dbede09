"""The closed sets of values that options take, as enums: one definition each, which the
library compares against and the CLI turns into its click choices.

Kept apart from the modules that use them (freezing, surgery, saving, fine-tuning)
so that the CLI can build its options without importing those: ``ckptool --help``
stays fast.
"""

from __future__ import annotations

import enum


class Strategy(str, enum.Enum):
    """The four transfer-learning scenarios."""

    LINEAR = "linear"  # feature extraction: only the head trains
    PARTIAL = "partial"  # freeze the first stages, train the rest
    FULL = "full"  # fine-tune everything from the pretrained weights
    SCRATCH = "scratch"  # architecture only: re-initialise, train everything


class MismatchPolicy(str, enum.Enum):
    """What ``adapt`` does with shape mismatches no --drop/--reinit names."""

    ERROR = "error"
    DROP = "drop"


class OutputFormat(str, enum.Enum):
    """What ``-o`` writes: safetensors or a torch.save zip."""

    SAFETENSORS = "safetensors"
    PT = "pt"


class Optimizer(str, enum.Enum):
    """The optimizers ``finetune`` builds."""

    SGD = "sgd"
    ADAMW = "adamw"


class CastDtype(str, enum.Enum):
    """Floating dtypes ``--dtype`` casts to."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT64 = "float64"


def values(choices: type[enum.Enum]) -> list[str]:
    """The members' values, in definition order (what --help lists)."""
    return [str(member.value) for member in choices]
