"""Compare tensor values of two checkpoints, one tensor pair at a time (imports torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckptool.formats.load import open_tensors
from ckptool.formats.meta import FLOAT4, CheckpointMeta
from ckptool.keys import KeyDiff

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TensorChange:
    """How one tensor differs: bits, elements, and size of the change."""

    key: str
    changed: int  # elements whose bits differ
    numel: int
    max_abs: float  # over the changed elements; inf where one became or was NaN
    rel_l2: float  # ||a - b|| / ||a|| (a's finite values), 0 when a is all zeros and b equals it


@dataclass(frozen=True)
class ValueDiff:
    """Which matched tensors changed between two checkpoints and by how much."""

    changed: tuple[TensorChange, ...]
    unchanged: tuple[str, ...]

    @property
    def compared(self) -> int:
        return len(self.changed) + len(self.unchanged)


def compare_values(source: CheckpointMeta, target: CheckpointMeta, keys: KeyDiff) -> ValueDiff:
    """Compare every matched tensor pair of ``keys`` bit-for-bit, streaming pairs.

    Only tensors matched by name and shape are compared; renames from the diff's
    transforms are honoured. Peak memory is about one tensor pair in float64.
    """
    original = keys.original
    changed, unchanged = [], []
    with open_tensors(source) as src, open_tensors(target) as tgt:
        for name in keys.matched:
            change = _compare_pair(name, src.get(original.get(name, name)), tgt.get(name))
            if change is None:
                unchanged.append(name)
            else:
                changed.append(change)
    return ValueDiff(tuple(changed), tuple(unchanged))


def _compare_pair(name: str, a: torch.Tensor, b: torch.Tensor) -> TensorChange | None:
    import torch

    # A quantized tensor's bits are integers plus a scale and zero point (and viewing
    # them as another dtype crashed the interpreter): it compares by the values it holds.
    a, b = (t.dequantize() if t.is_quantized else t for t in (a, b))
    if a.dtype == b.dtype and torch.equal(_bits(a), _bits(b)):
        return None
    if f"torch.{FLOAT4}" in (str(a.dtype), str(b.dtype)):
        return _compare_float4(name, a, b)
    # Complex values differ by |a - b| (a conjugate has a's magnitude: compared by
    # magnitudes, the change was 0); everything else in float64.
    wide = torch.complex128 if a.is_complex() or b.is_complex() else torch.float64
    a64, b64 = a.detach().to(wide), b.detach().to(wide)
    differs = (_bits(a) != _bits(b)) if a.dtype == b.dtype else (a64 != b64)
    count = int(differs.sum())
    if count == 0:  # only the dtype differs (the key diff lists that): the values agree
        return None
    # Only changed elements count: a NaN kept bit for bit is no change (NaN - NaN would
    # make the maximum NaN), and a value that became NaN is an infinite one, as the
    # freeze guard reports it.
    delta = torch.where(differs, (a64 - b64).abs(), 0.0).nan_to_num(nan=math.inf)
    return _measured(name, count, a.numel(), delta, torch.where(a64.isfinite(), a64, 0.0))


def _measured(
    name: str, changed: int, numel: int, delta: torch.Tensor, reference: torch.Tensor
) -> TensorChange:
    """The change's size: its largest element and its L2 norm relative to ``reference``
    (the first tensor's finite values)."""
    import torch

    norm = float(torch.linalg.vector_norm(reference))
    change = float(torch.linalg.vector_norm(delta))
    return TensorChange(name, changed, numel, float(delta.max()), change / norm if norm else change)


# The eight magnitudes of e2m1 (fp4): a 4-bit code is a sign bit and one of these.
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _compare_float4(name: str, a: torch.Tensor, b: torch.Tensor) -> TensorChange:
    """float4_e2m1fn_x2 holds two 4-bit values per element, and torch converts it to
    nothing (``.to(float64)`` raised): each value is decoded from its code, and counts
    are of 4-bit values. Against another dtype the elements do not correspond at all:
    every value counts as changed, by an unknown (infinite) amount."""
    if a.dtype != b.dtype:
        return TensorChange(name, a.numel(), a.numel(), math.inf, math.inf)
    codes_a, codes_b = (_float4_codes(t) for t in (a, b))
    differs = codes_a != codes_b  # by code: -0 and 0 differ, as bits do elsewhere
    values_a, values_b = (_float4_values(codes) for codes in (codes_a, codes_b))
    delta = (values_a - values_b).abs()[differs]
    return _measured(name, int(differs.sum()), codes_a.numel(), delta, values_a)


def _float4_codes(t: torch.Tensor) -> torch.Tensor:
    """The 4-bit codes of a float4_e2m1fn_x2 tensor, low nibble first in each byte."""
    import torch

    packed = t.contiguous().view(torch.uint8).long()
    return torch.stack((packed & 0xF, packed >> 4), dim=-1)


def _float4_values(codes: torch.Tensor) -> torch.Tensor:
    import torch

    table = torch.tensor([*_E2M1, *(-v for v in _E2M1)], dtype=torch.float64)
    return table[codes]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """An integer view of the tensor's bits, so NaN == NaN and -0.0 != 0.0."""
    import torch

    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(t.element_size())
    if t.dtype == torch.bool or width is None:
        return t
    return t.contiguous().view(width)
