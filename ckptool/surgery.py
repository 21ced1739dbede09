"""``adapt``, ``convert`` and ``merge``: plan output tensors, write them, return a log.

Tensors whose values do not change are copied as bytes straight from the source file
(no torch, no tensor in memory); only dtype casts, strided views, DCP chunks and
tensors filled from the model's initialisation go through torch, one at a time.
Nothing here prints; results are :class:`SurgeryLog` objects rendered by the report.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ckptool import activity
from ckptool._version import __version__
from ckptool.choices import MismatchPolicy, OutputFormat
from ckptool.errors import (
    CheckpointReadError,
    IncompatibleCheckpointError,
    IncompatibleError,
    TransformError,
    UsageError,
    option,
    shell_word,
)
from ckptool.formats import CheckpointMeta, read_metadata
from ckptool.formats.bounded import listed
from ckptool.formats.dcp import chunk_assembly, dcp_name
from ckptool.formats.files import read_assembly
from ckptool.formats.load import (
    TensorReader,
    holds_non_finite,
    open_tensors,
    read_tensor_alone,
    tensor_buffer,
    tensor_bytes,
)
from ckptool.formats.meta import (
    DTYPE_SIZES,
    FLOATING,
    LOW_PRECISION,
    NOT_A_TENSOR,
    Assembly,
    Format,
    TensorMeta,
    tied_views,
)
from ckptool.formats.save import (
    SavedFile,
    output_format_for,
    save_sharded,
    save_tensors,
)
from ckptool.formats.write import (
    ByteSource,
    ComputedBytes,
    OutTensor,
    TensorData,
    check_output,
)
from ckptool.keys import (
    DtypeMismatch,
    KeyDiff,
    ShapeMismatch,
    Suggestion,
    Transforms,
    apply_transforms,
    diff,
    discarded_by_choice,
    fold_names,
    learned_numel,
    mostly_init,
    scaled_codes_words,
    suggest_prefixes,
    under_prefix,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ckptool.models import ShapeModel

# Models up to this size are built whole on the CPU to fill missing tensors, so the
# model's own initialisation (e.g. a zero-initialised ViT head) is what gets written.
FULL_BUILD_LIMIT = 512 * 1024 * 1024


@dataclass(frozen=True)
class Cast:
    """``--dtype D --keep-dtype PATTERN...``: the dtype each tensor is written in.

    Floating tensors go to ``dtype`` unless their (output) name matches a glob in
    ``keep`` (``'*norm*'``, ``'*.bias'``): exports that keep norms in float32.
    """

    dtype: str | None = None
    keep: tuple[str, ...] = ()

    @classmethod
    def of(cls, dtype: str | None, keep: Sequence[str], names: Iterable[str]) -> Cast:
        """Raises UsageError: --keep-dtype without --dtype, or a pattern matching no name."""
        if keep and dtype is None:
            raise UsageError(
                f"{option('keep_dtype')} keeps some tensors out of a {option('dtype')} cast; "
                f"add {option('dtype')}"
            )
        listed = list(names)
        for pattern in keep:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in listed):
                raise UsageError(
                    f"{option('keep_dtype', pattern, quoted=True)} matches no tensor name (a "
                    "glob over whole "
                    "names: '*norm*', '*.bias')"
                )
        return cls(dtype, tuple(keep))

    def target(self, name: str, current: str) -> str:
        if self.dtype is None or current not in FLOATING or self.keeps(name):
            return current
        return self.dtype

    def keeps(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.keep)

    def notes(self, tensors: Mapping[str, TensorMeta]) -> tuple[str, ...]:
        """What the cast leaves that one might expect it to change: float8 and float4
        weights (an FP8 checkpoint's) keep their dtype, since dequantizing them takes
        their scales; the scales themselves are cast like any float32 tensor."""
        if self.dtype is None:
            return ()
        low = [n for n, t in tensors.items() if t.dtype in LOW_PRECISION]
        if not low:
            return ()
        scales = [
            n
            for n, t in tensors.items()
            if "scale" in n.rpartition(".")[2] and self.target(n, t.dtype) != t.dtype
        ]
        note = (
            f"{len(low)} float8/float4 tensors keep their dtype ({listed(low, 3)}): "
            f"{option('dtype')} casts float16/32/64 and bfloat16; dequantizing FP8 weights "
            "takes their scales, which is not a cast"
        )
        if scales:
            note += (
                f"; tensors named like scales were cast ({listed(scales, 3)}): "
                f"{option('keep_dtype', '*scale*', quoted=True)} keeps them"
            )
        return (note,)


@dataclass(frozen=True)
class SurgeryLog:
    """What a surgery command did (or, with dry_run, would do)."""

    command: str
    sources: tuple[str, ...]
    output: str | None
    format: str | None
    kept: tuple[str, ...] = ()
    renamed: Mapping[str, str] = field(default_factory=dict)  # source name -> output name
    dropped: tuple[str, ...] = ()
    left_out: tuple[str, ...] = ()
    mismatched: tuple[ShapeMismatch, ...] = ()
    reinit: tuple[str, ...] = ()
    filled: tuple[str, ...] = ()
    cast: tuple[str, ...] = ()
    taken: Mapping[str, int] = field(default_factory=dict)  # output name -> input index
    averaged: tuple[str, ...] = ()
    merged: tuple[str, ...] = ()  # merge-lora: weights with the adapter's update added
    aliases: Mapping[str, str] = field(default_factory=dict)
    files: tuple[str, ...] = ()
    nbytes: int = 0
    verified: bool = False
    notes: tuple[str, ...] = ()  # how the work was done, when it matters (a CPU build)
    from_checkpoint: int = 0  # adapt: elements of the model's learned tensors from the file
    model_numel: int = 0  # adapt: all of the model's learned values (trainable parameters)
    dry_run: bool = False
    transforms: tuple[str, ...] = ()
    init_method: str = ""


# --- reading source bytes ------------------------------------------------------------


class SourceBytes:
    """Where an output tensor's bytes come from: the file as-is, or torch when it must."""

    def __init__(self, meta: CheckpointMeta, stack: ExitStack) -> None:
        self.meta = meta
        self._stack = stack
        self._reader: TensorReader | None = None
        self._assembled: dict[tuple[Assembly, str], ComputedBytes] = {}

    def data(self, name: str, dtype: str | None = None) -> tuple[TensorData, str]:
        """(where the bytes are, the dtype they are in) for source tensor ``name``: a
        range of the file to copy, or bytes computed (cast, made contiguous) only when
        they are written, so a plan never holds more than one tensor's."""
        tensor = self.meta.tensors[name]
        out_dtype = dtype if dtype and tensor.dtype in FLOATING else tensor.dtype
        located = tensor.byte_range
        # Copies come only from the files this checkpoint was read from.
        if out_dtype == tensor.dtype and located is not None and located[0] in self.meta.files:
            return ByteSource(*located), out_dtype
        length = tensor.numel * DTYPE_SIZES[out_dtype]
        assembly = self.meta.assembled.get(name)
        if assembly is None and out_dtype == tensor.dtype:
            assembly = self._dcp_assembly(name)  # a cast goes through torch anyway
        produce: Callable[[], bytes | bytearray | memoryview]
        if assembly is not None and out_dtype == assembly.stored_dtype:
            produce = functools.partial(read_assembly, assembly, name)  # joined without torch
        else:
            produce = functools.partial(self._tensor_bytes, name, out_dtype)
        if assembly is None:
            return ComputedBytes(length, produce), out_dtype
        # Tied names share one Assembly and so one ComputedBytes: stored and verified once.
        key = (assembly, out_dtype)
        if key not in self._assembled:
            self._assembled[key] = ComputedBytes(length, produce)
        return self._assembled[key], out_dtype

    def _tensor_bytes(self, name: str, dtype: str) -> memoryview:
        return tensor_buffer(self.alone(name), dtype, name=name)

    def alone(self, name: str) -> torch.Tensor:
        """Tensor ``name`` read on its own from the bytes located for it in this
        checkpoint's files (memory holds it and nothing else of the file), else
        through the reader (DCP, ZeRO, legacy files)."""
        meta = self.meta.tensors[name]
        if meta.file in self.meta.files:
            tensor = read_tensor_alone(meta, name)
            if tensor is not None:
                return tensor
        return self.tensor(name)

    def _dcp_assembly(self, name: str) -> Assembly | None:
        if self.meta.format is not Format.DCP:
            return None
        fqn = dcp_name(self.meta, name)
        return chunk_assembly(self.meta.path, fqn, self.meta.tensors[name], self.reader().chunks)

    def reader(self) -> TensorReader:
        if self._reader is None:
            self._reader = self._stack.enter_context(open_tensors(self.meta))
        return self._reader

    def tensor(self, name: str) -> torch.Tensor:
        tensor = self.reader().get(name)
        if not _is_dense(tensor):
            # Sparse and other layouts have no flat bytes to write; densifying silently
            # would change what the output loads as.
            raise CheckpointReadError(
                f"{self.meta.path}: tensor {name!r} is {tensor.layout}; ckptool writes dense "
                "tensors only: save it with .to_dense() first"
            )
        return tensor


def _is_dense(tensor: torch.Tensor) -> bool:
    import torch

    return tensor.layout == torch.strided


# --- adapt ---------------------------------------------------------------------------


def adapt(
    source: str | os.PathLike[str],
    *,
    model: str | nn.Module,
    model_args: Sequence[str] = (),
    num_classes: int | None = None,
    head: str | None = None,
    key: str | None = None,
    transforms: Transforms | None = None,
    on_mismatch: MismatchPolicy | str = MismatchPolicy.ERROR,
    auto: bool = False,
    strict: bool = False,
    dtype: str | None = None,
    keep_dtype: Sequence[str] = (),
    out: str | None = None,
    fmt: str | None = None,
    dry_run: bool = False,
    force: bool = False,
    seed: int = 0,
    allow_mostly_init: bool = False,
    remap: bool = False,
) -> SurgeryLog:
    """Write a checkpoint that loads with ``strict=True`` into the model.

    With ``remap``, checkpoint names are matched to the model's by structure (modules in
    order, same parameter names and shapes; see :mod:`ckptool.remap`): a checkpoint of
    another implementation of the same network.

    Keys the model needs and the checkpoint lacks are filled from the model's
    initialisation; keys the model lacks are left out; both are listed in the log.
    The log states how much of the model (in values) comes from the checkpoint.

    Raises:
        IncompatibleError: shape mismatches with ``on_mismatch='error'``, or with
            ``strict`` any missing/unexpected key no --drop/--reinit prefix names, or
            less than half of the model's values would come from the checkpoint and
            ``allow_mostly_init`` is false (a wrong model, or a fix that drops too much).
        UsageError: ambiguous ``auto``, bad flags; and the read/write errors.
    """
    from ckptool.models import build_for_shapes, model_label, model_tensor_meta

    policy = MismatchPolicy(on_mismatch)
    activity.phase("read the checkpoint's header")
    meta = read_metadata(source, key=key)
    if out is not None and not dry_run:  # fail before the expensive part
        check_output(out, inputs=meta.files, force=force)
    activity.phase("build the model (import torch, meta device)")
    built = build_for_shapes(model, model_args=model_args, num_classes=num_classes, head=head)
    target = model_tensor_meta(built.module)
    fmt_out = output_format_for(out, fmt) if out else None
    remap_note = ""
    activity.phase("plan the keys")
    if remap:
        transforms, remap_note = _structural_transforms(meta, target, transforms, auto=auto)
    keys = plan_keys(meta, target, transforms, auto=auto, policy=policy, strict=strict, built=built)
    transforms = keys.transforms
    # A name tied to a provided one is written with the same bytes: loading either name
    # then puts the trained values into the one tensor.
    from_source = {name: name for name in keys.matched} | dict(keys.through_tie)
    # Names the model's load hooks fill come from the checkpoint too, through the keys
    # the hooks consume (weight_g/weight_v), which are written under their own names.
    to_fill = [n for n in target if n not in from_source and n not in keys.hook_filled]
    cast = Cast.of(dtype, keep_dtype, target)
    log = _adapt_log(meta, keys, to_fill, out, fmt_out, dry_run=dry_run, cast=cast)
    if remap:  # the exact renames are in the provenance; the report names the flag
        shown = tuple(f for f in transforms.flags() if not f.startswith("--rename "))
        log = _replace(log, transforms=("--remap", *shown))
    log = _replace(
        log,
        notes=_adapt_notes(built.note, keys, remap_note)
        + cast.notes({n: meta.tensors[keys.original.get(n, n)] for n in keys.matched})
        + not_tensor_notes(meta),
        from_checkpoint=learned_numel(target, [*from_source, *keys.hook_filled]),
        model_numel=learned_numel(target, target),
    )
    if not allow_mostly_init:
        _refuse_mostly_init(log)
    if dry_run or out is None or fmt_out is None:
        return log
    activity.phase("initialise the tensors the checkpoint lacks")
    init, method = initial_values(model, model_args, num_classes, head, to_fill, target, seed=seed)
    with ExitStack() as stack:
        sources = SourceBytes(meta, stack)
        plan = _adapt_plan(target, keys, from_source, init, cast, sources)
        metadata = provenance("adapt", meta, transforms, model=model_label(model))
        saved = save_hashed(out, plan, fmt_out, meta, metadata, force=force)
    return finished(log, saved.paths, saved.nbytes, init_method=method)


def not_tensor_notes(meta: CheckpointMeta) -> tuple[str, ...]:
    """Values among the tensors that are not tensors (a step counter): every write holds
    tensors only, so it says what it leaves out rather than drop them unseen."""
    values = [e for e in meta.containers if e.kind == NOT_A_TENSOR]
    if not values:
        return ()
    shown = [f"{e.name}: {e.summary}" for e in values[:3]]  # the capped entry comes last
    total = sum(e.count for e in values)
    rest = f" and {total - len(shown)} more" if total > len(shown) else ""
    return (
        f"left out {total} value(s) beside the tensors that are not tensors "
        f"({', '.join(shown)}{rest})",
    )


def _adapt_notes(build_note: str | None, keys: KeyDiff, remap_note: str) -> tuple[str, ...]:
    """What the report adds below the counts: how the model was built, what its load
    hooks place, how --remap matched the modules."""
    from ckptool.judge import hooks_note

    hooked = keys.hooked or keys.hook_filled
    notes = (build_note,) if build_note else ()
    return notes + ((hooks_note(keys),) if hooked else ()) + ((remap_note,) if remap_note else ())


def _adapt_plan(
    target: Mapping[str, TensorMeta],
    keys: KeyDiff,
    from_source: Mapping[str, str],
    init: Mapping[str, torch.Tensor],
    cast: Cast,
    sources: SourceBytes,
) -> list[OutTensor]:
    """What adapt writes, in the model's order: each tensor from the checkpoint (under
    its new name, or its tie partner's) or from the model's initialisation; then the
    names the model's load hooks consume, as the checkpoint has them."""
    meta, original = sources.meta, keys.original
    plan = []
    for name, wanted in target.items():
        if name in keys.hook_filled:
            continue
        if name in from_source:
            provided = original.get(from_source[name], from_source[name])
            wanted_dtype = cast.target(name, meta.tensors[provided].dtype)
            data, out_dtype = sources.data(provided, wanted_dtype)
        else:
            out_dtype = cast.target(name, wanted.dtype)
            data = tensor_bytes(init[name], out_dtype, name=name)
        plan.append(OutTensor(name, out_dtype, wanted.shape, data))
    for name in keys.hooked:
        old = original.get(name, name)
        data, out_dtype = sources.data(old, cast.target(name, meta.tensors[old].dtype))
        plan.append(OutTensor(name, out_dtype, meta.tensors[old].shape, data))
    return plan


def _structural_transforms(
    meta: CheckpointMeta,
    target: Mapping[str, TensorMeta],
    given: Transforms | None,
    *,
    auto: bool,
) -> tuple[Transforms, str]:
    """--remap as exact renames, and a note that shows the module mapping."""
    from ckptool.remap import module_pairs, remap_transforms, structural_remap

    given = given or Transforms()
    if auto or given.strip or given.add_prefix or given.rename:
        raise UsageError(
            f"{option('remap', True)} matches names by structure; it takes no "
            f"{option('auto', True)} or renames"
        )
    if meta.format is Format.SAFETENSORS:
        raise UsageError(
            f"{option('remap', True)} needs the checkpoint's module order, which safetensors does "
            "not keep "
            "(its names are sorted); use the torch.save file"
        )
    mapping = structural_remap(meta.tensors, target)
    pairs = [f"{old or '.'} -> {new or '.'}" for old, new in module_pairs(mapping)]
    shown = listed(pairs, 6, sep="; ", more="; ... {} more")
    note = f"remap: {len(pairs)} modules matched in order by names and shapes ({shown})"
    return dataclasses.replace(given, rename=remap_transforms(mapping)), note


def save_hashed(
    out: str,
    plan: Sequence[OutTensor],
    fmt: OutputFormat,
    meta: CheckpointMeta,
    metadata: dict[str, str],
    *,
    force: bool,
    dedupe_tied: bool = False,
) -> SavedFile:
    """Save with the source's sha256 in the metadata, hashed while the bytes are copied."""
    return save_tensors(
        out,
        plan,
        fmt=fmt,
        inputs=meta.files,
        force=force,
        metadata=metadata,
        hashed=_hashed_file(meta),
        dedupe_tied=dedupe_tied,
    )


def plan_keys(
    meta: CheckpointMeta,
    target: Mapping[str, TensorMeta],
    transforms: Transforms | None,
    *,
    auto: bool = False,
    policy: MismatchPolicy = MismatchPolicy.ERROR,
    strict: bool = False,
    built: ShapeModel | None = None,
) -> KeyDiff:
    """The key plan of an adapt: transforms (plus, with --auto, the fix), refusals included.

    With ``built``, torch is the judge: names the model's load hooks place (found under
    the renames, before any drop) are kept, not dropped and re-initialised.

    Raises:
        IncompatibleError, UsageError: as :func:`adapt`.
    """
    from ckptool.judge import with_hooks

    given = transforms or Transforms()
    if not auto:
        quick = diff(meta.tensors, target, given, suggest=False)
        if quick.fits_after_adapt and _accepted(quick, policy=policy, strict=strict):
            return quick  # a plan that works needs no search for a better prefix
    keys = diff(meta.tensors, target, given)
    hooks = None
    if built is not None:
        keys, hooks = with_hooks(built, meta, target, keys)
    if auto:  # with its own suggestions: a refusal below names what would still help
        keys = diff(meta.tensors, target, _whole_fix(keys), hooks=hooks)
    _refuse_incompatible(keys, policy=policy, strict=strict)
    return keys


def adapt_into(
    model: nn.Module,
    source: str | os.PathLike[str],
    *,
    key: str | None = None,
    transforms: Transforms | None = None,
    auto: bool = False,
    on_mismatch: MismatchPolicy | str = MismatchPolicy.ERROR,
    strict: bool = False,
) -> SurgeryLog:
    """``adapt`` into a model in memory: matched tensors are copied in, the rest keep
    the model's initialisation. Same plan and refusals as :func:`adapt`.
    """
    from ckptool.models import ShapeModel, model_tensor_meta

    meta = read_metadata(source, key=key)
    keys = plan_keys(
        meta,
        model_tensor_meta(model),
        transforms,
        auto=auto,
        policy=MismatchPolicy(on_mismatch),
        strict=strict,
        built=ShapeModel(model, None, live=True),
    )
    return _load_and_log(model, meta, keys)


def _load_and_log(model: nn.Module, meta: CheckpointMeta, keys: KeyDiff) -> SurgeryLog:
    """Copy the matched tensors into ``model``; the log lists what kept its own values."""
    load_matched(model, meta, keys)  # a tied name receives its partner's values with it
    provided = {*keys.matched, *keys.through_tie, *keys.hook_filled}
    to_fill = [name for name in model.state_dict() if name not in provided]
    return _adapt_log(meta, keys, to_fill, None, None, dry_run=False, cast=Cast())


def load_into(
    model: nn.Module,
    checkpoint: str | os.PathLike[str],
    *,
    key: str | None = None,
    strip: Sequence[str] = (),
    add_prefix: str | None = None,
    rename: Sequence[str] = (),
    drop: Sequence[str] = (),
    reinit: Sequence[str] = (),
) -> SurgeryLog:
    """Load a checkpoint into a live model, in place, with ``diff``'s verdict.

    The transforms are the CLI flags as keywords (``strip=["module."], drop=["fc."]``).
    Every model key must come from the checkpoint unless a ``drop``/``reinit`` prefix
    names it (those keep the model's own values); nothing unexpected, no shape mismatch:
    what ``model.load_state_dict(..., strict=True)`` demands, with the renames applied.

    Returns:
        The log: kept, renamed, dropped, left out, and the names that kept their values.

    Raises:
        IncompatibleCheckpointError: it does not fit; ``.diff`` holds the key diff and
            its suggested fix. The model is left untouched.
    """
    from ckptool.judge import with_hooks
    from ckptool.models import ShapeModel, model_tensor_meta

    transforms = Transforms.from_flags(
        strip=strip, add_prefix=add_prefix, rename=rename, drop=drop, reinit=reinit
    )
    meta = read_metadata(checkpoint, key=key)
    target = model_tensor_meta(model)
    keys = diff(meta.tensors, target, transforms)
    keys, _ = with_hooks(ShapeModel(model, None, live=True), meta, target, keys)
    if not keys.fits_after_adapt:
        raise IncompatibleCheckpointError(_not_strict(meta.path, model, keys), keys)
    return _load_and_log(model, meta, keys)


def _not_strict(path: str, model: nn.Module, keys: KeyDiff) -> str:
    # load_into is Python only: the fix as its keyword arguments, ready to pass back.
    fix = f"; fix: load_into(..., {keys.fix.transforms.keywords()})" if keys.fix else ""
    return f"{path} does not load strictly into {type(model).__name__}: {_misfits(keys)}{fix}"


def load_matched(model: nn.Module, meta: CheckpointMeta, keys: KeyDiff) -> tuple[str, ...]:
    """Copy the matched checkpoint tensors into ``model``; return the non-finite ones."""
    import torch

    original = keys.original
    if keys.hooked or keys.hook_filled:
        return _load_through_hooks(model, meta, keys, original)
    state = model.state_dict()
    non_finite = []
    with open_tensors(meta) as reader, torch.no_grad():
        for name in keys.matched:
            tensor = reader.get(original.get(name, name))
            if holds_non_finite(tensor):
                non_finite.append(name)
            state[name].copy_(tensor)
    return tuple(non_finite)


def _load_through_hooks(
    model: nn.Module, meta: CheckpointMeta, keys: KeyDiff, original: Mapping[str, str]
) -> tuple[str, ...]:
    """Matched and hook-consumed tensors through ``load_state_dict`` (the hooks turn
    weight_g/weight_v into the parametrization); the rest keeps the model's values."""
    import collections

    from ckptool.judge import with_versions

    state: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
    with_versions(state, meta.module_versions, keys.transforms)  # as torch.load gives it
    with open_tensors(meta) as reader:
        for name in (*keys.matched, *keys.hooked):
            state[name] = reader.get(original.get(name, name))
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:  # the judge said the hooks take them; they did not
        raise IncompatibleError(
            f"{meta.path}: the model's loading left {', '.join(result.unexpected_keys[:3])} "
            "unused, though its hooks took them on the meta device"
        )
    return tuple(name for name, tensor in state.items() if holds_non_finite(tensor))


def _whole_fix(found: KeyDiff) -> Transforms:
    """--auto: the whole fix ``diff`` prints (renames, drops, re-inits), not a part of it."""
    if found.ambiguous:
        options = " or ".join(s.transforms.words() for s in found.ambiguous)
        raise UsageError(
            f"{option('auto', True)}: ambiguous, {options} match equally many keys; pass one "
            "explicitly"
        )
    if found.scaled_codes:
        raise IncompatibleError(f"{option('auto', True)}: {scaled_codes_words(found)}")
    if found.compatible or (found.fits_after_adapt and found.fix is None):
        return found.transforms
    by_choice = discarded_by_choice(found)
    if by_choice is not None and found.fix is not None:
        raise IncompatibleError(
            f"{option('auto', True)}: {by_choice}; if that is intended, pass the whole fix "
            f"instead: {found.fix.transforms.words()} {option('allow_mostly_init', True)}"
        )
    if found.fix is None or found.fix.keeps_little:
        raise IncompatibleError(
            f"{option('auto', True)}: no transform keeps a meaningful part of this checkpoint, "
            "most of the model would be fresh initialisation: it is probably not for this "
            "model (see ckptool diff)"
        )
    return found.fix.transforms


def _accepted(keys: KeyDiff, *, policy: MismatchPolicy, strict: bool) -> bool:
    """Whether :func:`_refuse_incompatible` lets ``keys`` through."""
    try:
        _refuse_incompatible(keys, policy=policy, strict=strict)
    except IncompatibleError:
        return False
    return True


def _refuse_incompatible(keys: KeyDiff, *, policy: MismatchPolicy, strict: bool) -> None:
    """``keys`` must come with its suggestions (``diff(suggest=True)``): the hint."""
    if keys.scaled_codes:  # whatever the flags: written as weights, the codes are wrong
        raise IncompatibleError(scaled_codes_words(keys))
    hint = _fix_hint(keys)
    if not keys.matched:
        # Writing the model's init under a new name would look like success; it is not.
        advice = (
            f"{hint} (or {option('auto', True)})"
            if hint
            else (f"check {option('model')} and {option('key')}")
        )
        raise IncompatibleError(
            "no checkpoint key matches the model, the output would hold only its "
            f"initialisation; {advice}"
        )
    if keys.shape_mismatch and policy is MismatchPolicy.ERROR:
        shown = listed(
            [f"{m.key} {list(m.source)} -> {list(m.target)}" for m in keys.shape_mismatch], 3
        )
        advice = hint or f"add {option('on_mismatch', 'drop')}"
        raise IncompatibleError(f"shape mismatch: {shown}; {advice}")
    if strict and (keys.unexpected or keys.unexplained_missing or keys.shape_mismatch):
        advice = hint or f"name them with {option('drop')}/{option('reinit')}"
        raise IncompatibleError(f"{option('strict', True)}: {_misfits(keys)}; {advice}")


def _misfits(keys: KeyDiff) -> str:
    """'shape mismatch fc.{weight,bias}; missing ...; unexpected ...' (three names each)."""
    found = (
        ("shape mismatch", [m.key for m in keys.shape_mismatch]),
        ("missing", list(keys.unexplained_missing)),
        ("unexpected", list(keys.unexpected)),
    )
    parts = [f"{what} {', '.join(fold_names(names)[:3])}" for what, names in found if names]
    scaled = [scaled_codes_words(keys)] if keys.scaled_codes else []
    return "; ".join(scaled + parts)


def _fix_hint(keys: KeyDiff) -> str:
    """The flags the fix adds to those given, as 'add ...' ('' if none); the whole fix
    as 'use ...' if it moved a given --drop (adding to it would keep the old one)."""
    if keys.fix is None:
        return ""
    given, fix = keys.transforms, keys.fix.transforms
    if keys.fix.moved(given.drop) != given.drop:
        return f"use {fix.words()}"
    extra = Transforms(
        strip=tuple(p for p in fix.strip if p not in given.strip),
        add_prefix=fix.add_prefix if fix.add_prefix != given.add_prefix else None,
        rename=tuple(r for r in fix.rename if r not in given.rename),
        drop=tuple(p for p in fix.drop if p not in given.drop),
        reinit=tuple(p for p in fix.reinit if p not in given.reinit),
    )
    return f"add {extra.words()}" if extra != Transforms() else ""


def _refuse_mostly_init(log: SurgeryLog) -> None:
    if not mostly_init(log.from_checkpoint, log.model_numel):
        return
    raise IncompatibleError(
        f"only {log.from_checkpoint:,} of the model's {log.model_numel:,} trainable values "
        f"({log.from_checkpoint / log.model_numel:.0%}) would come from the checkpoint, the "
        "rest from fresh initialisation: the checkpoint may be for another model, or the "
        f"transforms drop too much; add {option('allow_mostly_init', True)} if that is intended"
    )


def _adapt_log(
    meta: CheckpointMeta,
    keys: KeyDiff,
    to_fill: Sequence[str],
    out: str | None,
    fmt: OutputFormat | None,
    *,
    dry_run: bool,
    cast: Cast,
) -> SurgeryLog:
    original = keys.original
    mismatched = {m.key for m in keys.shape_mismatch}
    reinit = set(keys.reinit)
    return SurgeryLog(
        command="adapt",
        sources=(meta.path,),
        output=out,
        format=fmt.value if fmt else None,
        kept=tuple(n for n in (*keys.matched, *keys.hooked) if n not in original),
        renamed={original[n]: n for n in (*keys.matched, *keys.hooked) if n in original},
        dropped=keys.dropped,
        left_out=keys.unexpected,
        mismatched=keys.shape_mismatch,
        reinit=tuple(n for n in to_fill if n in reinit),
        filled=tuple(n for n in to_fill if n not in reinit and n not in mismatched),
        aliases=dict(keys.through_tie),
        cast=tuple(
            n
            for n in keys.matched
            if cast.target(n, meta.tensors[original.get(n, n)].dtype)
            != meta.tensors[original.get(n, n)].dtype
        ),
        dry_run=dry_run,
        transforms=tuple(keys.transforms.flags()),
    )


def finished(log: SurgeryLog, files: Sequence[str], nbytes: int, **changes: object) -> SurgeryLog:
    """The log of a write that completed and was verified by reading it back."""
    return _replace(log, files=tuple(files), nbytes=nbytes, verified=True, **changes)


# --- initial values for filled tensors -----------------------------------------------


def initial_values(
    spec: str | nn.Module,
    model_args: Sequence[str],
    num_classes: int | None,
    head: str | None,
    names: Sequence[str],
    target: Mapping[str, TensorMeta],
    *,
    seed: int,
) -> tuple[dict[str, torch.Tensor], str]:
    """Fresh initial values for ``names``, seeded; returns (values, how they were made).

    Small models are built whole on the CPU (their own init code runs); large ones are
    built on the meta device and only the modules owning ``names`` are materialised and
    initialised with ``reset_parameters()``, so a 7B model needs no 28 GB of memory.
    """
    import torch

    from ckptool.models import build_for_shapes, build_model, materialize

    if not names:
        return {}, ""
    if not isinstance(spec, str):  # a live model: what the caller built is the init
        state = spec.state_dict()
        return {n: state[n].detach() for n in names}, "the live model's own values"
    torch.manual_seed(seed)
    total = sum(t.nbytes for t in target.values())
    options: dict[str, Any] = {"model_args": model_args, "num_classes": num_classes, "head": head}
    if total <= FULL_BUILD_LIMIT:
        net = build_model(spec, **options)
        state = net.state_dict()
        return {n: state[n] for n in names}, "the model's own initialisation (built on CPU)"
    built = build_for_shapes(spec, **options)
    net = built.module
    owners = _owning_modules(net, names)
    if built.note or any(not hasattr(module, "reset_parameters") for module in owners.values()):
        # Built on the CPU already when the meta device failed; otherwise build whole.
        net = built.module if built.note else build_model(spec, **options)
        state = net.state_dict()
        return {n: state[n] for n in names}, "the model's own initialisation (built on CPU)"
    for module in owners.values():
        materialize(module, "cpu")
        # Checked above; getattr because nn.Module types unknown attributes as Tensor.
        reset = getattr(module, "reset_parameters")  # noqa: B009
        reset()
    state = net.state_dict()
    modules = ", ".join(sorted(owners))
    return {
        n: state[n] for n in names
    }, f"reset_parameters() of {modules} (rest of the model on meta)"


def _owning_modules(net: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    owners = {}
    for name in names:
        path = name.rpartition(".")[0]
        owners[path] = net.get_submodule(path) if path else net
    return owners


# --- provenance ----------------------------------------------------------------------


def provenance(
    command: str, meta: CheckpointMeta, transforms: Transforms | None = None, **extra: str
) -> dict[str, str]:
    """``__metadata__`` that lets a file found later explain where it came from."""
    if transforms is not None:
        extra = {"transforms": json.dumps(transforms.flags()), **extra}
    source = os.path.basename(os.path.normpath(meta.path))
    return tool_provenance(command, source=source, **extra)


def tool_provenance(command: str, **fields: str) -> dict[str, str]:
    """The metadata every file ckptool writes carries: the format Hugging Face loaders
    expect, ckptool's version and command, and ``fields`` as ``ckptool.<name>``."""
    return {
        "format": "pt",
        "ckptool.version": __version__,
        "ckptool.command": command,
        **{f"ckptool.{name}": value for name, value in fields.items()},
    }


def _hashed_file(meta: CheckpointMeta) -> str:
    """The file whose sha256 identifies the source: the file itself, an index, DCP
    metadata, ZeRO's rank-0 model states (its files are listed model states first)."""
    if meta.format is Format.ZERO:
        return meta.files[0]
    if os.path.isdir(meta.path):
        return os.path.join(meta.path, ".metadata")
    return meta.path


# --- convert -------------------------------------------------------------------------


def convert(
    source: str | os.PathLike[str],
    out: str,
    *,
    key: str | None = None,
    fmt: str | None = None,
    dtype: str | None = None,
    keep_dtype: Sequence[str] = (),
    shard_size: int | None = None,
    force: bool = False,
    dry_run: bool = False,
) -> SurgeryLog:
    """Rewrite a checkpoint in another format (and dtype), keeping every name.

    Tied tensors are stored once in safetensors (``ckptool.aliases`` metadata) and
    come back tied in torch files.

    Raises:
        UsageError: sharding a .pt output; read/write errors as usual.
    """
    meta = read_metadata(source, key=key)
    fmt_out = output_format_for(out, fmt)
    if not dry_run and shard_size is None:
        check_output(out, inputs=meta.files, force=force)
    if shard_size is not None and fmt_out is not OutputFormat.SAFETENSORS:
        raise UsageError(
            f"{option('shard_size')} writes safetensors shards; use an OUT ending in .safetensors"
        )
    cast = Cast.of(dtype, keep_dtype, meta.tensors)
    log = SurgeryLog(
        command="convert",
        sources=(meta.path,),
        output=out,
        format=fmt_out.value,
        kept=tuple(meta.tensors),
        cast=_casts(meta, cast),
        dry_run=dry_run,
        notes=cast.notes(meta.tensors) + not_tensor_notes(meta),
    )
    if dry_run:
        return log
    with ExitStack() as stack:
        plan = _plan_all(SourceBytes(meta, stack), cast)
        metadata = provenance("convert", meta)
        if shard_size is not None:
            saved = save_sharded(
                out, plan, max_bytes=shard_size, inputs=meta.files, force=force,
                metadata=metadata, hashed=_hashed_file(meta),
            )  # fmt: skip
        else:
            saved = save_hashed(out, plan, fmt_out, meta, metadata, force=force, dedupe_tied=True)
    return finished(log, saved.paths, saved.nbytes, aliases=saved.aliases)


def _plan_all(sources: SourceBytes, cast: Cast) -> list[OutTensor]:
    return [_planned(sources, name, cast) for name in sources.meta.tensors]


def _casts(meta: CheckpointMeta, cast: Cast) -> tuple[str, ...]:
    return tuple(n for n, t in meta.tensors.items() if cast.target(n, t.dtype) != t.dtype)


# --- merge ---------------------------------------------------------------------------


def merge(
    inputs: Sequence[str | os.PathLike[str]],
    out: str,
    *,
    take: Sequence[tuple[str, int]] = (),
    average: bool = False,
    fmt: str | None = None,
    dtype: str | None = None,
    keep_dtype: Sequence[str] = (),
    force: bool = False,
    dry_run: bool = False,
) -> SurgeryLog:
    """Combine checkpoints: ``take`` keys under a prefix from input N, or ``average`` all.

    Input 0 is the base. With ``average``, every input must have the same names and
    shapes; floating tensors are averaged in float64, complex ones in complex128, and
    stored in the base's dtype; integer, bool and quantized tensors (e.g.
    ``num_batches_tracked``) are taken from the base and listed in the log's ``taken``,
    as are float8/float4 weights when every input holds the same bits (else refused).

    Raises:
        UsageError: neither or both modes, a --take index out of range or a prefix
            with no keys; IncompatibleError: inputs that cannot be averaged (also while
            writing: float8/float4 weights that differ).
    """
    if len(inputs) < 2:
        raise UsageError("merge needs a BASE and at least one OTHER checkpoint")
    if bool(take) == average:
        take_flag = option("take", "PREFIX=N", python="[(PREFIX, N)]")
        raise UsageError(f"merge needs either {take_flag} or {option('average', True)} (not both)")
    metas = [read_metadata(p) for p in inputs]
    fmt_out = output_format_for(out, fmt)
    files = tuple(f for m in metas for f in m.files)
    if not dry_run:
        check_output(out, inputs=files, force=force)
    cast = Cast.of(dtype, keep_dtype, (n for m in metas for n in m.tensors))
    with ExitStack() as stack:
        sources = [SourceBytes(m, stack) for m in metas]
        if average:
            _check_same_keys(metas)
            plan, log = _plan_average(sources, cast), _merge_log(metas, out, fmt_out, dry_run)
            averaged = [n for n, t in metas[0].tensors.items() if t.dtype in AVERAGED]
            log = _replace(
                log,
                averaged=tuple(averaged),
                # Integers, bools, packed and quantized tensors: the base's, and said so.
                taken={n: 0 for n, t in metas[0].tensors.items() if t.dtype not in AVERAGED},
            )
        else:
            origin, followed = _keep_ties_whole(metas, _take_origins(metas, take))
            log = _replace(_merge_log(metas, out, fmt_out, dry_run), taken=origin, notes=followed)
            plan = [_planned(sources[i], name, cast) for name, i in origin.items()]
        if dry_run:
            return log
        saved = save_tensors(
            out,
            plan,
            fmt=fmt_out,
            inputs=files,
            force=force,
            metadata=provenance("merge", metas[0]),
        )
    return finished(log, saved.paths, saved.nbytes)


def _replace(log: SurgeryLog, **changes: object) -> SurgeryLog:
    return dataclasses.replace(log, **changes)  # type: ignore[arg-type]


def _merge_log(
    metas: Sequence[CheckpointMeta], out: str, fmt: OutputFormat, dry_run: bool
) -> SurgeryLog:
    return SurgeryLog(
        command="merge",
        sources=tuple(m.path for m in metas),
        output=out,
        format=fmt.value,
        dry_run=dry_run,
    )


def _planned(source: SourceBytes, name: str, cast: Cast) -> OutTensor:
    tensor = source.meta.tensors[name]
    data, out_dtype = source.data(name, cast.target(name, tensor.dtype))
    # Tied names of an assembled (ZeRO) checkpoint share one Assembly: stored once.
    return OutTensor(name, out_dtype, tensor.shape, data, tie=source.meta.assembled.get(name))


def _take_origins(
    metas: Sequence[CheckpointMeta], take: Sequence[tuple[str, int]]
) -> dict[str, int]:
    """Output name -> input index: the base's keys, with keys under each prefix from its input."""
    for prefix, index in take:
        if not 0 <= index < len(metas):
            raise UsageError(
                f"{_take_words(prefix, index)}: inputs are numbered 0 (BASE) to {len(metas) - 1}"
            )
        if not any(under_prefix(n, prefix) for n in metas[index].tensors):
            change = _prefix_change(metas[0], metas[index])
            raise UsageError(
                f"{_take_words(prefix, index)}: {metas[index].path} has no keys under "
                f"{prefix!r}{_naming_hint(metas[index], change)}"
            )
        if not any(under_prefix(n, prefix) for n in metas[0].tensors):
            _refuse_renamed_copies(metas[0], metas[index], prefix, index)
    origin: dict[str, int] = {}
    placed: set[str] = set()
    for name in metas[0].tensors:
        rule = next(((p, i) for p, i in take if under_prefix(name, p)), None)
        if rule is None:
            origin[name] = 0
        elif rule[0] not in placed:  # the taken block goes where the base had it
            placed.add(rule[0])
            origin.update({n: rule[1] for n in metas[rule[1]].tensors if under_prefix(n, rule[0])})
    for prefix, index in take:
        if prefix not in placed:
            origin.update({n: index for n in metas[index].tensors if under_prefix(n, prefix)})
    return origin


def _keep_ties_whole(
    metas: Sequence[CheckpointMeta], origin: dict[str, int]
) -> tuple[dict[str, int], tuple[str, ...]]:
    """Names that are one tensor in the base (an embedding and its lm_head) come from one
    input: a --take of one of them takes the others from the same input, where they are
    one tensor too (else a load lets whichever name comes last win); notes say so.

    Raises: UsageError when a take splits such a tensor in a way no input can fill.
    """
    notes = []
    for tied in tied_views(metas[0].tensors).values():
        names = [n for n in tied if n in origin]  # a take may replace some of them
        if len({origin[n] for n in names}) <= 1:
            continue  # what is left of the tensor comes from one input
        chosen = {origin[n] for n in names if origin[n] != 0}
        shown = " and ".join(names)
        index = min(chosen)
        if len(chosen) > 1 or not _one_tensor_in(_tie_groups_of(metas[index]), names):
            where = (
                "inputs " + ", ".join(map(str, sorted(chosen)))
                if len(chosen) > 1
                else (f"input {index}, which does not hold them as one tensor")
            )
            raise UsageError(
                f"{option('take', True)}: {shown} are one tensor in the base, but would come "
                f"from {where}: a load would keep whichever name comes last; take them from "
                "one input that ties them too"
            )
        followers = [n for n in names if origin[n] != index]
        origin.update(dict.fromkeys(followers, index))
        notes.append(
            f"{', '.join(followers)} taken from input {index} too: one tensor with "
            f"{next(n for n in names if n not in followers)} (tied)"
        )
    return origin, tuple(notes)


def _refuse_renamed_copies(
    base: CheckpointMeta, other: CheckpointMeta, prefix: str, index: int
) -> None:
    """Keys the base lacks are added (a trained head onto a headless backbone), but not
    when they are the base's own keys under another prefix (``module.layer4.`` for
    ``layer4.``): that would keep both copies and replace nothing."""
    change = _prefix_change(base, other)
    if change is None:
        return
    renamed = apply_transforms(list(other.tensors), change.transforms).mapping
    copies = [
        (old, new)
        for new, old in renamed.items()
        if under_prefix(old, prefix) and new in base.tensors
    ]
    if copies:
        old, new = copies[0]
        raise UsageError(
            f"{_take_words(prefix, index)}: the base has no keys under {prefix!r}, and "
            f"{other.path}'s are the base's under another name ({old!r} is its {new!r}): "
            f"they would be added beside them, replacing nothing{_naming_hint(other, change)}"
        )


def _prefix_change(base: CheckpointMeta, other: CheckpointMeta) -> Suggestion | None:
    """The prefix change (--strip module., ...) that makes more of ``other``'s names the
    base's than match as they are, and applies without two names colliding; or None."""
    names, wanted = list(other.tensors), list(base.tensors)
    as_they_are = sum(n in base.tensors for n in names)
    for found in suggest_prefixes(names, wanted, baseline=as_they_are):
        try:
            apply_transforms(names, found.transforms)
        except TransformError:
            continue
        return found
    return None


def _naming_hint(other: CheckpointMeta, change: Suggestion | None) -> str:
    """'; OTHER names its keys differently: ...' when ``change`` (see _prefix_change)
    makes them the base's."""
    if change is None:
        return ""
    flags = " ".join(change.flags)
    return (
        f"; {other.path} names its keys differently ({change.matched} match the base's "
        f"after {flags}): give the inputs the same names first "
        f"({renaming_command(other.path, flags)})"
    )


def renaming_command(path: str, flags: str) -> str:
    """The command that renames a checkpoint's keys (adapt needs the model's spec)."""
    return f"ckptool adapt {shell_word(path)} --model SPEC {flags} -o OUT"


def _take_words(prefix: str, index: int) -> str:
    return option("take", f"{prefix}={index}", python=f"[({prefix!r}, {index})]")


def _check_same_keys(metas: Sequence[CheckpointMeta]) -> None:
    base = metas[0]
    base_ties = list(tied_views(base.tensors).values())
    for index, meta in enumerate(metas[1:], start=1):
        keys = diff(meta.tensors, base.tensors, suggest=False)
        _check_same_kind(index, meta, keys.dtype_mismatch)
        _check_same_ties(index, meta, base_ties)
        if keys.missing or keys.unexpected or keys.shape_mismatch:
            problems = [
                f"{len(keys.missing)} missing",
                f"{len(keys.unexpected)} unexpected",
                f"{len(keys.shape_mismatch)} shape mismatches",
            ]
            example = (
                keys.missing or keys.unexpected or tuple(m.key for m in keys.shape_mismatch)
            )[0]
            raise IncompatibleError(
                f"{option('average', True)}: input {index} ({meta.path}) differs from the base: "
                f"{', '.join(problems)} (e.g. {example!r}); average needs identical keys and "
                f"shapes{_naming_hint(meta, _prefix_change(base, meta))}"
            )


def _check_same_ties(index: int, meta: CheckpointMeta, base_ties: list[list[str]]) -> None:
    """Names that are one tensor in the base must be one in every input: else their
    averages differ, and loading the soup into the tied model keeps whichever comes last."""
    ties = _tie_groups_of(meta)  # once per input, not once per tied name
    for names in base_ties:
        if not _one_tensor_in(ties, names):
            raise IncompatibleError(
                f"{option('average', True)}: {' and '.join(names)} are one tensor in the base "
                f"but not in input {index} ({meta.path}): their averages would differ"
            )


def _tie_groups_of(meta: CheckpointMeta) -> list[set[str]]:
    return [set(group) for group in tied_views(meta.tensors).values()]


def _one_tensor_in(ties: Sequence[set[str]], names: Sequence[str]) -> bool:
    """``names`` are all one tensor: within one of ``ties`` (a checkpoint's tie groups)."""
    return any(set(names) <= group for group in ties)


def _check_same_kind(index: int, meta: CheckpointMeta, mismatches: Sequence[DtypeMismatch]) -> None:
    """Dtypes may differ (float16 and float32 average in float64), but a complex tensor
    averaged with a real one would lose its imaginary part, or gain a zero one."""
    for m in mismatches:
        if (m.source in COMPLEX) != (m.target in COMPLEX):
            raise IncompatibleError(
                f"{option('average', True)}: {m.key!r} is {m.source} in input {index} "
                f"({meta.path}) but {m.target} in the base; complex and real tensors do "
                "not average"
            )


def _plan_average(sources: Sequence[SourceBytes], cast: Cast) -> list[OutTensor]:
    """The averaged tensors as bytes made when written, one tensor at a time: planning
    (and a dry run) averages nothing, and memory holds one tensor's inputs at a time."""
    plan = []
    for name, meta in sources[0].meta.tensors.items():
        if meta.dtype in LOW_PRECISION:
            same = functools.partial(_identical_in_all, sources, name)
            plan.append(OutTensor(name, meta.dtype, meta.shape, ComputedBytes(meta.nbytes, same)))
            continue
        if meta.dtype not in AVERAGED:
            plan.append(_planned(sources[0], name, cast))
            continue
        out_dtype = cast.target(name, meta.dtype)
        length = meta.numel * DTYPE_SIZES[out_dtype]
        average = functools.partial(_averaged, sources, name, out_dtype)
        plan.append(OutTensor(name, out_dtype, meta.shape, ComputedBytes(length, average)))
    return plan


# What --average averages: real floats in float64, complex in complex128 (a complex
# tensor taken from the base would drop every other input's values without a word).
# complex32 is left out: torch warns that it barely supports it. float8/float4 weights
# are not averaged: see _identical_in_all.
COMPLEX = frozenset({"complex64", "complex128"})
AVERAGED = FLOATING | COMPLEX


def _identical_in_all(sources: Sequence[SourceBytes], name: str) -> memoryview:
    """The base's float8/float4 tensor, if every input holds the same bits. Such weights
    are codes times per-block scales held in other tensors; averaging the codes (or
    the scales) apart is not averaging the weights, and dequantizing them is not
    ckptool's to guess, so inputs that differ are refused (at write time: nothing is
    written)."""
    import torch

    def bits(source: SourceBytes) -> torch.Tensor:
        return source.alone(name).contiguous().view(torch.uint8)

    base = bits(sources[0])
    for index, source in enumerate(sources[1:], start=1):
        if not torch.equal(bits(source), base):
            raise IncompatibleError(
                f"{option('average', True)}: {name!r} ({sources[0].meta.tensors[name].dtype}) "
                f"differs in input {index} ({source.meta.path}): float8/float4 weights "
                "average only after dequantizing them with their scales, which ckptool does "
                "not do"
            )
    return tensor_buffer(base)


def _averaged(sources: Sequence[SourceBytes], name: str, dtype: str) -> memoryview:
    import torch

    wide = torch.complex128 if dtype in COMPLEX else torch.float64
    total = torch.zeros(sources[0].meta.tensors[name].shape, dtype=wide)
    for source in sources:
        total += source.alone(name).to(wide)
    return tensor_buffer(total / len(sources), dtype, name=name)
