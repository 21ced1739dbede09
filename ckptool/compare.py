"""``ckptool.diff``: a checkpoint against a model spec or a second checkpoint."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckptool.errors import UsageError, option
from ckptool.formats import CheckpointMeta, natural_keys_kept, read_metadata
from ckptool.formats.adapters import describe_adapter
from ckptool.keys import KeyDiff, Transforms, diff

if TYPE_CHECKING:
    from torch import nn

    # Only --values reads tensors: its module (and the readers it brings) loads then.
    from ckptool.values import ValueDiff


@dataclass(frozen=True)
class CheckpointDiff:
    """What ``ckptool diff`` reports: both sides, the key diff, optional value changes."""

    source: CheckpointMeta
    target_label: str
    target_count: int
    keys: KeyDiff
    values: ValueDiff | None = None
    target: CheckpointMeta | None = None
    notes: tuple[str, ...] = ()  # how the comparison was made, when it matters
    torch_accepts: bool = False  # the model's own load_state_dict(strict=True) accepts it

    @property
    def compatible(self) -> bool:
        """torch is the judge: its loading machinery overrules a name comparison."""
        return self.keys.compatible or self.torch_accepts


def _check_what_to_compare(
    target: object, model: object, *, values: bool, shapes_a_model: bool
) -> None:
    """Exactly one of a TARGET checkpoint and a model; --values and the model's shape
    options only where they mean something."""
    if (target is None) == (model is None):
        raise UsageError(
            f"give either a TARGET checkpoint or {option('model', 'SPEC')}, not both or neither"
        )
    if values and target is None:
        raise UsageError(
            f"{option('values', True)} compares two checkpoints; give a TARGET checkpoint"
        )
    if target is not None and shapes_a_model:
        # They shape a model; against a second checkpoint they would silently do nothing.
        raise UsageError(
            f"{option('num_classes')}, {option('head')} and {option('model_args')} apply to "
            f"{option('model', 'SPEC')}, not to a TARGET checkpoint; drop them or compare "
            f"with {option('model')}"
        )


def _adapter_notes(meta: CheckpointMeta) -> tuple[str, ...]:
    """A LoRA adapter diffed against a model: say what it is before the key report."""
    adapter = describe_adapter(meta.path, meta.tensors)
    if adapter is None:
        return ()
    return (
        f"{meta.path} is an adapter ({adapter.summary}): it holds low-rank updates, not "
        "the model's weights; merge it into its base model first",
    )


def diff_checkpoint(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str] | None = None,
    *,
    model: str | nn.Module | None = None,
    model_args: Sequence[str] = (),
    num_classes: int | None = None,
    head: str | None = None,
    key: str | None = None,
    target_key: str | None = None,
    transforms: Transforms | None = None,
    values: bool = False,
) -> CheckpointDiff:
    """Compare a checkpoint's keys with a model's (``model``) or another checkpoint's.

    Args:
        source: the checkpoint to fit.
        target: a second checkpoint, or None when ``model`` is given.
        model: a model spec such as ``torchvision:resnet18`` (built on the meta device),
            or a live ``nn.Module``.
        model_args, num_classes, head: as for :func:`ckptool.build_model`.
        key, target_key: container paths inside ``source`` / ``target``.
        transforms: applied to ``source`` names before comparing.
        values: also compare tensor values (two checkpoints only).

    Raises:
        UsageError: neither or both of ``target`` and ``model``; ``values`` with a model.
        CheckpointReadError, UnsafeCheckpointError, ModelSpecError: from reading/building.
    """
    shapes_a_model = num_classes is not None or bool(head) or bool(model_args)
    _check_what_to_compare(target, model, values=values, shapes_a_model=shapes_a_model)
    with natural_keys_kept():  # the two files mostly share names: each is keyed once
        source_meta = read_metadata(source, key=key)
        target_meta = None if target is None else read_metadata(target, key=target_key)
    adapter_notes = _adapter_notes(source_meta)
    if model is not None:
        from ckptool.models import build_for_shapes, model_label, model_tensor_meta

        built = build_for_shapes(model, model_args=model_args, num_classes=num_classes, head=head)
        notes = (built.note,) if built.note else ()
        label = model_label(model)
        label += f" --num-classes {num_classes}" if num_classes is not None else ""
        target_tensors = model_tensor_meta(built.module)
    else:
        assert target_meta is not None  # checked above: exactly one of target/model
        target_tensors, label, notes = dict(target_meta.tensors), target_meta.path, ()
        built = None
    keys = diff(source_meta.tensors, target_tensors, transforms or Transforms())
    accepted = False
    if built is not None:
        from ckptool.judge import hooks_note, with_hooks

        keys, placement = with_hooks(built, source_meta, target_tensors, keys)
        if placement is not None:
            accepted, notes = keys.compatible, (*notes, hooks_note(keys))
    value_diff = None
    if values and target_meta is not None:
        from ckptool.values import compare_values

        value_diff = compare_values(source_meta, target_meta, keys)
    notes = (*adapter_notes, *notes)
    return CheckpointDiff(
        source_meta, str(label), len(target_tensors), keys, value_diff, target_meta, notes, accepted
    )
