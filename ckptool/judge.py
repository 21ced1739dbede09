"""torch as the judge: does the model's own loading machinery accept the checkpoint?

A key comparison misses what models do while loading: ``weight_norm`` parametrizations
rename ``weight_g``/``weight_v`` in a load hook, BatchNorm fills a missing
``num_batches_tracked``, ``_load_from_state_dict`` overrides and pre-hooks rename or
consume keys. Where the key diff says "incompatible", the checkpoint's tensors (as meta
tensors: no bytes are read) are handed to ``load_state_dict`` of a throwaway meta copy
of the model; if torch accepts them strictly, torch is right.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckptool.formats.meta import CheckpointMeta, TensorMeta
from ckptool.keys import KeyDiff, Transforms, apply_transforms, fold_names, transform_prefix

if TYPE_CHECKING:
    from torch import nn

    from ckptool.models import ShapeModel


@dataclass(frozen=True)
class TorchVerdict:
    """torch's own loading accepted names the key diff could not place."""

    consumed: tuple[str, ...]  # checkpoint names the key diff did not match

    @property
    def note(self) -> str:
        shown = ", ".join(fold_names(self.consumed)[:4])
        return (
            f"the model's own loading (its load hooks) accepts {len(self.consumed)} "
            f"checkpoint keys a name comparison cannot place ({shown}): "
            "torch loads this file with strict=True"
        )


def torch_accepts(
    model: nn.Module,
    tensors: Mapping[str, TensorMeta],
    unplaced: tuple[str, ...],
    *,
    versions: Mapping[str, int] | None,
    transforms: Transforms,
) -> TorchVerdict | None:
    """Whether ``model.load_state_dict(tensors, strict=True)`` succeeds, judged on meta.

    ``model`` must be on the meta device (it is loaded into, and so changed);
    ``tensors`` are the checkpoint's names after the transforms; ``versions`` the
    module versions torch.save kept (hooks depend on them), renamed the same way.
    Returns None when torch refuses too, or for a dtype torch cannot put on meta.
    """
    import collections

    import torch

    fake: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
    with_versions(fake, versions, transforms)
    for name, meta in tensors.items():
        dtype = getattr(torch, meta.dtype, None)
        if not isinstance(dtype, torch.dtype):
            return None
        fake[name] = torch.empty(meta.shape, dtype=dtype, device="meta")
    try:
        with warnings.catch_warnings():
            # BatchNorm's hook copies a CPU num_batches_tracked into the meta buffer.
            warnings.simplefilter("ignore")
            model.load_state_dict(fake, strict=True)  # missing or unexpected keys raise
    except (RuntimeError, KeyError, ValueError, TypeError):  # torch says no (or a hook broke)
        return None
    return TorchVerdict(unplaced)


def with_versions(
    state: Mapping[str, object], versions: Mapping[str, int] | None, transforms: Transforms
) -> None:
    """Attach the module versions torch.save kept, renamed like the keys: as
    ``torch.load`` returns a state dict, with ``_metadata`` {module path: {"version"}}
    (BatchNorm's hook fills num_batches_tracked only for old versions)."""
    import collections

    if versions is None:
        return
    state._metadata = collections.OrderedDict(  # type: ignore[attr-defined]
        (transform_prefix(f"{path}.", transforms).rstrip("."), {"version": version})
        for path, version in versions.items()
    )


def judge_by_torch(built: ShapeModel, meta: CheckpointMeta, keys: KeyDiff) -> TorchVerdict | None:
    """Ask the model's own ``load_state_dict`` where the key diff said no.

    Only a meta model is loaded into: the one ckptool built, or a meta copy of the
    caller's live model (which itself is never touched). A model ckptool had to build on
    the CPU is not judged (None).
    """
    module = meta_copy(built.module) if built.live else built.module
    if module is None or any(not t.is_meta for t in module.state_dict().values()):
        return None
    mapping = apply_transforms(meta.tensors, keys.transforms).mapping
    renamed = {new: meta.tensors[old] for new, old in mapping.items()}
    unplaced = (*keys.unexpected, *(m.key for m in keys.shape_mismatch))
    return torch_accepts(
        module,
        renamed,
        unplaced,
        versions=meta.module_versions,
        transforms=keys.transforms,
    )


def meta_copy(model: nn.Module) -> nn.Module | None:
    """A copy of ``model`` whose parameters and buffers are meta tensors, made without
    copying a byte of them (deepcopy with every tensor pre-mapped); None if it fails."""
    import copy
    import itertools

    import torch

    memo: dict[int, object] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        fake = torch.empty_like(tensor, device="meta")
        is_parameter = isinstance(tensor, torch.nn.Parameter)
        memo[id(tensor)] = (
            torch.nn.Parameter(fake, requires_grad=tensor.requires_grad) if is_parameter else fake
        )
    try:
        return copy.deepcopy(model, memo)
    except Exception:  # a module that cannot be copied cannot be judged; say nothing
        return None
