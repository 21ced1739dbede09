"""torch as the judge: does the model's own loading machinery accept the checkpoint?

A key comparison misses what models do while loading: ``weight_norm`` parametrizations
rename ``weight_g``/``weight_v`` in a load hook, BatchNorm fills a missing
``num_batches_tracked``, ``_load_from_state_dict`` overrides and pre-hooks rename or
consume keys. Where the key diff says "incompatible", the checkpoint's tensors (as meta
tensors: no bytes are read) are handed to ``load_state_dict(strict=False)`` of a
throwaway meta copy of the model. The keys torch does not call unexpected were consumed
by its hooks, the model keys it does not call missing were filled by them: the diff is
redone with those placed, so the verdict is torch's and the fix keeps them (a new head
does not make adapt drop a weight-normed layer's trained weight_g/weight_v).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ckptool.formats.meta import CheckpointMeta, TensorMeta
from ckptool.keys import (
    HookPlacement,
    KeyDiff,
    Transforms,
    diff,
    fold_names,
    transform_prefix,
)

if TYPE_CHECKING:
    from torch import nn

    from ckptool.models import ShapeModel


def _load_on_meta(
    model: nn.Module,
    tensors: Mapping[str, TensorMeta],
    versions: Mapping[str, int] | None,
    transforms: Transforms,
) -> tuple[list[str], list[str]] | None:
    """torch's (missing, unexpected) keys after ``load_state_dict(strict=False)`` of meta
    stand-ins on a meta model: what the model's hooks make of the names. None if torch
    raises (a shape it refuses, a hook that breaks) or a dtype has no meta form."""
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
            result = model.load_state_dict(fake, strict=False)
    except (RuntimeError, KeyError, ValueError, TypeError):  # torch says no (or a hook broke)
        return None
    return list(result.missing_keys), list(result.unexpected_keys)


def hook_placement(built: ShapeModel, meta: CheckpointMeta, keys: KeyDiff) -> HookPlacement | None:
    """Which names the model's own loading places that a name comparison cannot: the
    checkpoint keys its hooks consume (``weight_g``/``weight_v``) and the model keys they
    fill (``parametrizations.weight.original0/1``, ``num_batches_tracked``).

    Judged on the keys the diff did not already rule out (shape mismatches and
    --reinit names are left out, so a new head does not hide the hooks). None when the
    hooks place nothing, torch refuses, or the model is not on meta.
    """
    module = _meta_module(built)
    if module is None:
        return None
    # The names the comparison matched or could not place; shape mismatches and --reinit
    # names are in neither, so a new head does not hide the hooks.
    original = keys.original
    tensors = {
        name: meta.tensors[original.get(name, name)] for name in (*keys.matched, *keys.unexpected)
    }
    ruled_out = {m.key for m in keys.shape_mismatch}
    placed = _load_on_meta(module, tensors, meta.module_versions, keys.transforms)
    if placed is None:
        return None
    torch_missing, torch_unexpected = set(placed[0]), set(placed[1])
    consumed = frozenset(k for k in keys.unexpected if k not in torch_unexpected)
    reinit = set(keys.reinit)
    filled = frozenset(
        k for k in keys.missing if k not in torch_missing and k not in ruled_out | reinit
    )
    return HookPlacement(consumed, filled) if consumed or filled else None


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


def hooks_note(keys: KeyDiff) -> str:
    """How the model's own loading placed names the comparison could not."""
    placed = (*keys.hooked, *keys.hook_filled)
    shown = ", ".join(fold_names(placed)[:4])
    verdict = ": torch loads this file with strict=True" if keys.compatible else ""
    return (
        f"the model's own loading (its load hooks) places {len(placed)} keys a name "
        f"comparison cannot ({shown}){verdict}"
    )


def with_hooks(
    built: ShapeModel,
    meta: CheckpointMeta,
    target: Mapping[str, TensorMeta],
    keys: KeyDiff,
) -> tuple[KeyDiff, HookPlacement | None]:
    """The diff again with what the model's hooks place (torch's verdict), or as it is.

    Also returns the placement, for a later diff of the same names (--auto, replays).
    """
    if keys.fits_after_adapt:
        return keys, None
    given, judged = keys.transforms, keys
    if keys.fix is not None:
        # Under the fix's module renames (--strip module.) the hooks see the model's
        # names; under the names as given they would act on the wrong modules. Its renames
        # of single tensors are left out: they may do what a hook does (weight_g).
        renamed = dataclasses.replace(
            keys.fix.module_transforms, drop=keys.fix.moved(given.drop), reinit=given.reinit
        )
        if renamed != given:
            judged = diff(meta.tensors, target, renamed, suggest=False)
    placement = hook_placement(built, meta, judged)
    if placement is None:
        return keys, None
    return diff(meta.tensors, target, keys.transforms, hooks=placement), placement


def _meta_module(built: ShapeModel) -> nn.Module | None:
    """A meta model to load into: the one ckptool built, or a meta copy of the caller's
    live model (never the live model itself); None for a model built on the CPU."""
    module = meta_copy(built.module) if built.live else built.module
    if module is None or any(not t.is_meta for t in module.state_dict().values()):
        return None
    return module


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
