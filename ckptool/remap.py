"""``--remap``: match a checkpoint of another implementation of the same network to the
model by structure — modules in order, each with the same parameter names and shapes.

Two implementations of one architecture (a torchvision model and a hand-written
``nn.Sequential`` of the same layers) name everything differently but register their
modules in the same order. The target's modules must appear, in order, among the
checkpoint's; the match is accepted only if it is the only one (checkpoint modules the
model lacks may be skipped, but never in two different ways). Pure key logic: no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ckptool.errors import IncompatibleError, option
from ckptool.formats.meta import TensorMeta
from ckptool.keys import name_pattern, name_replacement

# Module counts above this make the alignment table too big to be worth it (n * m cells).
MAX_MODULES = 20_000


@dataclass(frozen=True)
class Module:
    """One module's tensors: its path, and (leaf name, shape) of each, in order."""

    path: str
    leaves: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def signature(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        return self.leaves

    def names(self) -> list[str]:
        return [f"{self.path}.{leaf}" if self.path else leaf for leaf, _ in self.leaves]


def modules_in_order(tensors: Mapping[str, TensorMeta]) -> list[Module]:
    """Group names by module, in the order the modules first appear."""
    grouped: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for name, meta in tensors.items():
        path, _, leaf = name.rpartition(".")
        grouped.setdefault(path, []).append((leaf, meta.shape))
    return [Module(path, tuple(leaves)) for path, leaves in grouped.items()]


def structural_remap(
    source: Mapping[str, TensorMeta], target: Mapping[str, TensorMeta]
) -> dict[str, str]:
    """Checkpoint name -> model name, for every model tensor.

    Raises:
        IncompatibleError: some model module has no counterpart in order (the structures
            differ), or two different assignments fit equally (ambiguous).
    """
    src, tgt = modules_in_order(source), modules_in_order(target)
    if len(src) * len(tgt) > MAX_MODULES * MAX_MODULES // 100:
        raise IncompatibleError(
            f"{option('remap', True)}: {len(src)} x {len(tgt)} modules is too many to align"
        )
    ways = _embeddings(src, tgt)
    if ways[0][0] == 0:
        raise IncompatibleError(f"{option('remap', True)}: {_first_unmatched(src, tgt)}")
    if ways[0][0] > 1:
        raise IncompatibleError(
            f"{option('remap', True)}: ambiguous, {_two_choices(src, tgt, ways)}"
        )
    mapping: dict[str, str] = {}
    for s, t in _the_embedding(src, tgt, ways):
        mapping.update(zip(s.names(), t.names(), strict=True))
    return mapping


def _embeddings(src: Sequence[Module], tgt: Sequence[Module]) -> list[list[int]]:
    """ways[i][j]: in how many ways tgt[j:] embeds, in order, into src[i:] (capped at 2)."""
    n, m = len(src), len(tgt)
    ways = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n + 1):
        ways[i][m] = 1  # nothing left to place
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            total = ways[i + 1][j]  # skip checkpoint module i
            if src[i].signature == tgt[j].signature:
                total += ways[i + 1][j + 1]
            ways[i][j] = min(total, 2)
    return ways


def _the_embedding(
    src: Sequence[Module], tgt: Sequence[Module], ways: list[list[int]]
) -> list[tuple[Module, Module]]:
    pairs, i = [], 0
    for j, module in enumerate(tgt):
        while not (src[i].signature == module.signature and ways[i + 1][j + 1] > 0):
            i += 1
        pairs.append((src[i], module))
        i += 1
    return pairs


def _two_choices(src: Sequence[Module], tgt: Sequence[Module], ways: list[list[int]]) -> str:
    """Name the first model module with two possible counterparts."""
    i = 0
    for j, module in enumerate(tgt):
        options = [
            k
            for k in range(i, len(src))
            if src[k].signature == module.signature and ways[k + 1][j + 1] > 0
        ]
        if len(options) > 1:  # two ways to continue the earliest embedding: ambiguous
            first, second = src[options[0]].path, src[options[1]].path
            return (
                f"the model's {module.path or '(top level)'} could be the checkpoint's "
                f"{first or '(top level)'} or {second or '(top level)'} (same names and "
                f"shapes); map it with {option('rename')} instead"
            )
        i = options[0] + 1 if options else i
    return f"two assignments fit; map the names with {option('rename')} instead"


def remap_transforms(mapping: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The mapping as exact-name --rename rules (what adapt applies and records)."""
    return tuple(
        (f"^{name_pattern(old)}$", name_replacement(new))
        for old, new in mapping.items()
        if old != new
    )


def module_pairs(mapping: Mapping[str, str]) -> list[tuple[str, str]]:
    """(checkpoint module, model module) pairs of the mapping, in order, for display."""
    pairs: dict[tuple[str, str], None] = {}
    for old, new in mapping.items():
        pairs[(old.rpartition(".")[0], new.rpartition(".")[0])] = None
    return list(pairs)


def _first_unmatched(src: Sequence[Module], tgt: Sequence[Module]) -> str:
    """The first model module that cannot be placed after the ones before it."""
    i = 0
    for module in tgt:
        k = next((k for k in range(i, len(src)) if src[k].signature == module.signature), None)
        if k is None:
            shapes = ", ".join(f"{leaf} {list(shape)}" for leaf, shape in module.leaves[:4])
            return (
                f"the model's {module.path or '(top level)'} ({shapes}) has no counterpart, in "
                "order, in the checkpoint: the structures differ"
            )
        i = k + 1
    return "the structures differ"
