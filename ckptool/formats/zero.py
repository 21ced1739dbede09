"""DeepSpeed ZeRO checkpoint folders (stage 1, 2 and 3), consolidated from the files alone.

No deepspeed import, no torch.load, nothing executed: every file is read with the
restricted unpickler (DeepSpeed's enums and named tuples stay inert records) and each
consolidated tensor is described as the byte ranges, in the ranks' files, that make it
up. The layout, as DeepSpeed's ``engine.save_checkpoint`` writes it and its
``zero_to_fp32.py`` reads it back::

    DIR/latest                      the tag of the newest save (``global_step2``)
    DIR/TAG/mp_rank_00_model_states.pt                    stage 1/2, one file
    DIR/TAG/zero_pp_rank_R_mp_rank_00_model_states.pt     stage 3, one per rank R
    DIR/TAG/[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt   one per rank R

A model-states file holds ``buffer_names`` (buffers kept whole in ``module``),
``param_shapes`` (one ordered ``{name: shape}`` per optimizer parameter group),
``shared_params`` (``{alias: name}``, tied weights), and, for frozen parameters,
``frozen_param_shapes`` and ``frozen_param_fragments``. The fp32 master weights are in
the optimizer-states files:

* stage 1/2: ``single_partition_of_fp32_groups[g]`` is rank R's slice of group g's flat
  vector (the last rank's without its padding). Joined in rank order, the parameters of
  the group follow one another, each after ``param_alignment_paddings[g][i]`` elements.
* stage 3: ``fp32_flat_groups[g]`` holds, for every parameter of the groups in order,
  ``ceil(numel / world)`` elements of rank R's share; a parameter is the ranks' shares
  joined and cut to its size.

What comes out is what ``zero_to_fp32`` returns: buffers (floating ones as float32),
frozen parameters, trainable parameters in fp32, then the shared names, tied. One
difference, on purpose: DeepSpeed records frozen parameters only from stage 2 on, so
``zero_to_fp32`` drops them for stage 1; ckptool takes them from ``module``, where
stage 1 keeps every parameter whole.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ckptool.errors import CheckpointReadError
from ckptool.formats.bounded import is_count, short_repr, short_str
from ckptool.formats.meta import (
    DTYPE_SIZES,
    FLOATING,
    Assembly,
    CheckpointMeta,
    ContainerEntry,
    Format,
    Piece,
    TensorMeta,
)
from ckptool.formats.restricted_pickle import OpaqueObject
from ckptool.formats.torch_pickle import ZipArchive, read_zip_archive

LATEST_FILE = "latest"
_OPTIM = re.compile(r"(?:[a-z0-9]+_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")
_MODEL = re.compile(r"(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt")
_EXPERT = re.compile(r".*expp_rank_\d+.*\.pt")


def is_zero_directory(path: str) -> bool:
    """A folder holding ZeRO optimizer-states files (one per rank) and model states."""
    if not os.path.isdir(path):
        return False
    names = os.listdir(path)
    return any(_OPTIM.fullmatch(n) for n in names) and any(_MODEL.fullmatch(n) for n in names)


def latest_zero_directory(folder: str) -> str | None:
    """The tag folder DeepSpeed's ``latest`` file names, if ``folder`` is a save root."""
    latest = os.path.join(folder, LATEST_FILE)
    if not os.path.isfile(latest):
        return None
    with open(latest, "rb") as f:
        raw = f.read(256)
    tag = raw.decode("utf-8", "replace").strip()
    if not tag or "/" in tag or "\\" in tag or tag in (".", ".."):
        raise CheckpointReadError(f"{latest}: names no checkpoint tag ({short_repr(raw)})")
    tagged = os.path.join(folder, tag)
    if not is_zero_directory(tagged):
        raise CheckpointReadError(
            f"{latest}: names tag {tag!r}, but {tagged} holds no ZeRO checkpoint"
        )
    return tagged


def read_zero_meta(folder: str) -> CheckpointMeta:
    """Describe the consolidated state dict of a ZeRO folder, and where its bytes are
    (``assembled``).

    Raises:
        CheckpointReadError: a rank's file missing, model-parallel or expert shards,
            files that do not agree with one another.
    """
    layout = _Layout.of(folder)
    model = _ModelStates.of(read_zip_archive(layout.model_files[0]))
    optim = [_OptimStates.of(read_zip_archive(f)) for f in layout.optim_files]
    stage, world = optim[0].stage, optim[0].world
    for states in optim[1:]:
        if (states.stage, states.world) != (stage, world):
            raise CheckpointReadError(
                f"{states.path}: a stage {states.stage} save of {states.world} ranks, but "
                f"rank 0's is stage {stage} of {world}: files of another save mixed in"
            )
    layout.check_ranks(stage, world)
    parts: dict[str, tuple[TensorMeta, Assembly]] = {}
    parts.update(model.buffers())
    if stage <= 2:
        parts.update(model.frozen_whole(stage))
        parts.update(_stage2_params(folder, model.param_shapes, optim))
    else:
        others = [_ModelStates.of(read_zip_archive(f)) for f in layout.model_files[1:]]
        ranks = [model, *others]  # rank 0's file is read once
        parts.update(_stage3_frozen(folder, ranks))
        parts.update(_stage3_params(folder, model.param_shapes, optim))
    for alias, name in model.shared.items():
        if name in parts:
            parts[alias] = parts[name]  # same TensorMeta (storage): tied, as torch ties them
    files = layout.model_files + layout.optim_files
    return CheckpointMeta(
        path=folder,
        format=Format.ZERO,
        tensors={name: tensor for name, (tensor, _) in parts.items()},
        containers=(
            ContainerEntry("deepspeed", "ZeRO", f"stage {stage}, {world} ranks, {model.version}"),
        ),
        file_size=sum(os.path.getsize(f) for f in files),
        files=tuple(files),
        assembled={name: assembly for name, (_, assembly) in parts.items()},
    )


@dataclass(frozen=True)
class _Layout:
    folder: str
    model_files: list[str]
    optim_files: list[str]
    model_ranks: list[int]
    optim_ranks: list[int]

    @classmethod
    def of(cls, folder: str) -> _Layout:
        names = sorted(os.listdir(folder))
        if any(_EXPERT.fullmatch(n) for n in names):
            raise CheckpointReadError(
                f"{folder}: a mixture-of-experts ZeRO checkpoint (expp_rank_* files); "
                "ckptool consolidates data-parallel ZeRO only"
            )
        models = {n: _MODEL.fullmatch(n) for n in names}
        optims = {n: _OPTIM.fullmatch(n) for n in names}
        found = [m for m in (*models.values(), *optims.values()) if m]
        if any(int(m.group(2)) != 0 for m in found):
            raise CheckpointReadError(
                f"{folder}: a model-parallel ZeRO checkpoint (mp_rank_01 and up); ckptool "
                "consolidates data-parallel ranks only, as DeepSpeed's zero_to_fp32 does"
            )
        model_files = sorted(
            ((int(m.group(1) or 0), n) for n, m in models.items() if m), key=lambda r: r[0]
        )
        optim_files = sorted((int(m.group(1)), n) for n, m in optims.items() if m)
        return cls(
            folder,
            [os.path.join(folder, n) for _, n in model_files],
            [os.path.join(folder, n) for _, n in optim_files],
            [r for r, _ in model_files],
            [r for r, _ in optim_files],
        )

    def check_ranks(self, stage: int, world: int) -> None:
        """Every rank's file is here, once: a partial save must not consolidate quietly."""
        _check_rank_files(self.folder, "optimizer states", self.optim_ranks, world)
        if stage == 3:
            _check_rank_files(self.folder, "model states", self.model_ranks, world)


def _check_rank_files(folder: str, kind: str, ranks: list[int], world: int) -> None:
    if ranks == list(range(world)):
        return
    missing = sorted(set(range(world)) - set(ranks))
    if missing:
        listed = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
        raise CheckpointReadError(
            f"{folder}: a ZeRO checkpoint of {world} ranks, but the {kind} of rank "
            f"{listed} are missing (an interrupted save, or files copied in part)"
        )
    raise CheckpointReadError(
        f"{folder}: {kind} files for ranks {ranks[:8]} do not match the {world} ranks "
        "the checkpoint was saved from (files of another save mixed in)"
    )


@dataclass(frozen=True)
class _ModelStates:
    archive: ZipArchive
    state: Mapping[str, Any]
    module: Mapping[str, Any]
    param_shapes: list[dict[str, tuple[int, ...]]]
    shared: dict[str, str]
    version: str

    @classmethod
    def of(cls, archive: ZipArchive) -> _ModelStates:
        state = archive.obj
        path = archive.path
        if not isinstance(state, dict) or not {"module", "buffer_names", "param_shapes"} <= set(
            state
        ):
            raise CheckpointReadError(f"{path}: not a DeepSpeed model-states file")
        module = state["module"]
        if not isinstance(module, dict):
            raise CheckpointReadError(f"{path}: 'module' is not a dict of tensors")
        shared = state.get("shared_params") or {}
        if not isinstance(shared, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in shared.items()
        ):
            raise CheckpointReadError(f"{path}: 'shared_params' is not a dict of names")
        version = state.get("ds_version")
        return cls(
            archive,
            state,
            module,
            _param_shapes(path, state["param_shapes"]),
            dict(shared),
            f"deepspeed {version}" if isinstance(version, str) else "deepspeed",
        )

    def tensor(self, container: Mapping[str, Any], name: str) -> TensorMeta:
        value = container.get(name)
        if not isinstance(value, TensorMeta):
            raise CheckpointReadError(f"{self.archive.path}: no tensor for {short_str(name)!r}")
        return self.archive.locate(name, value)

    def buffers(self) -> dict[str, tuple[TensorMeta, Assembly]]:
        """Buffers, whole in ``module``; floating ones come out as float32."""
        names = self.state["buffer_names"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise CheckpointReadError(f"{self.archive.path}: 'buffer_names' is not a list")
        wanted = set(names)
        out = {}
        for name in self.module:
            if name in wanted:
                stored = self.tensor(self.module, name)
                dtype = "float32" if stored.dtype in FLOATING else stored.dtype
                out[name] = _whole(self.archive.path, name, stored, dtype)
        return out

    def frozen_whole(self, stage: int) -> dict[str, tuple[TensorMeta, Assembly]]:
        """Stage 1/2 frozen parameters, each whole in one tensor."""
        shapes = self.state.get("frozen_param_shapes")
        if shapes:
            fragments = self.state.get("frozen_param_fragments")
            if not isinstance(fragments, dict) or not isinstance(shapes, dict):
                raise CheckpointReadError(f"{self.archive.path}: malformed frozen parameters")
            return {
                name: _whole(self.archive.path, name, self.tensor(fragments, name))
                for name in shapes
            }
        if stage != 1:
            return {}
        # Stage 1 records no frozen parameters; ``module`` holds every parameter whole.
        known = set(self.state["buffer_names"]) | set(self.shared)
        known |= {name for group in self.param_shapes for name in group}
        return {
            name: _whole(self.archive.path, name, self.tensor(self.module, name))
            for name in self.module
            if name not in known
        }

    def frozen_fragments(self) -> tuple[dict[str, tuple[int, ...]], dict[str, TensorMeta]]:
        shapes = self.state.get("frozen_param_shapes") or {}
        fragments = self.state.get("frozen_param_fragments") or {}
        if not isinstance(shapes, dict) or not isinstance(fragments, dict):
            raise CheckpointReadError(f"{self.archive.path}: malformed frozen parameters")
        checked = {name: _shape(self.archive.path, name, s) for name, s in shapes.items()}
        return checked, {name: self.tensor(fragments, name) for name in checked}


def _param_shapes(path: str, groups: Any) -> list[dict[str, tuple[int, ...]]]:
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise CheckpointReadError(f"{path}: 'param_shapes' is not a list of dicts")
    return [{name: _shape(path, name, shape) for name, shape in g.items()} for g in groups]


def _shape(path: str, name: Any, shape: Any) -> tuple[int, ...]:
    if not isinstance(name, str) or not isinstance(shape, tuple) or not all(map(is_count, shape)):
        raise CheckpointReadError(
            f"{path}: parameter {short_repr(name)} has a malformed shape {short_repr(shape)}"
        )
    return shape


def _whole(
    path: str, name: str, stored: TensorMeta, dtype: str | None = None
) -> tuple[TensorMeta, Assembly]:
    located = stored.byte_range
    if located is None and stored.numel:
        raise CheckpointReadError(f"{path}: tensor {name!r} is not stored contiguously")
    pieces = (Piece(*located),) if located and stored.numel else ()
    out = TensorMeta(shape=stored.shape, dtype=dtype or stored.dtype, storage=f"zero:{name}")
    return out, Assembly(pieces, stored.dtype)


@dataclass(frozen=True)
class _OptimStates:
    path: str
    stage: int
    world: int
    flat_groups: list[TensorMeta]  # this rank's flat fp32 tensors, located
    paddings: list[list[int]] | None  # stage 1/2: elements after each parameter, per group

    @classmethod
    def of(cls, archive: ZipArchive) -> _OptimStates:
        path = archive.path
        state = archive.obj.get("optimizer_state_dict") if isinstance(archive.obj, dict) else None
        if not isinstance(state, dict) or "zero_stage" not in state:
            raise CheckpointReadError(f"{path}: not a DeepSpeed ZeRO optimizer-states file")
        stage = _enum_value(state["zero_stage"])
        if stage not in (1, 2, 3):
            raise CheckpointReadError(f"{path}: unknown ZeRO stage {short_repr(stage)}")
        counts = state.get("partition_count")
        # Stage 1/2 keeps a count per group (experts may differ); the largest is the world.
        world = max(counts) if isinstance(counts, list) and counts else counts
        if not is_count(world) or world < 1:
            raise CheckpointReadError(f"{path}: malformed partition_count {short_repr(counts)}")
        key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
        groups = state.get(key)
        if not isinstance(groups, list) or not all(isinstance(t, TensorMeta) for t in groups):
            raise CheckpointReadError(f"{path}: '{key}' is not a list of tensors")
        located = [archive.locate(f"{key}[{i}]", t) for i, t in enumerate(groups)]
        for i, tensor in enumerate(located):
            if len(tensor.shape) != 1 or (tensor.numel and tensor.byte_range is None):
                raise CheckpointReadError(f"{path}: {key}[{i}] is not a flat, dense tensor")
        paddings = state.get("param_alignment_paddings") if stage <= 2 else None
        if paddings is not None and not (
            isinstance(paddings, list)
            and all(isinstance(g, list) and all(map(is_count, g)) for g in paddings)
        ):
            raise CheckpointReadError(f"{path}: malformed param_alignment_paddings")
        return cls(path, stage, world, located, paddings)


def _enum_value(value: Any) -> Any:
    """``ZeroStageEnum.weights`` pickles as a call of the enum class with its value."""
    if isinstance(value, OpaqueObject) and len(value.args) == 1:
        return value.args[0]
    return value


def _span(
    folder: str, segments: Sequence[TensorMeta], start: int, count: int, name: str
) -> tuple[Piece, ...]:
    """The pieces of elements [start, start + count) of the segments joined end to end."""
    pieces = []
    base = 0
    for segment in segments:
        low, high = max(start, base), min(start + count, base + segment.numel)
        if low < high:
            file, offset, _ = segment.byte_range or ("", 0, 0)
            size = segment.itemsize
            pieces.append(Piece(file, offset + (low - base) * size, (high - low) * size))
        base += segment.numel
    if sum(p.length for p in pieces) != count * (segments[0].itemsize if segments else 0):
        raise CheckpointReadError(
            f"{folder}: {name!r} needs elements {start}..{start + count} of a flat group "
            f"that holds {base}; the ranks' files do not match the model states"
        )
    return tuple(pieces)


def _segments_dtype(folder: str, segments: Sequence[TensorMeta]) -> str:
    dtypes = {s.dtype for s in segments}
    if len(dtypes) != 1 or not dtypes <= set(DTYPE_SIZES):
        raise CheckpointReadError(f"{folder}: flat groups of mixed dtypes {sorted(dtypes)}")
    return dtypes.pop()


def _rank_group(folder: str, optim: _OptimStates, group: int) -> TensorMeta:
    if group >= len(optim.flat_groups):
        raise CheckpointReadError(
            f"{optim.path}: holds {len(optim.flat_groups)} parameter groups; the model "
            f"states of {folder} name more"
        )
    return optim.flat_groups[group]


def _stage2_params(
    folder: str, param_shapes: list[dict[str, tuple[int, ...]]], optim: list[_OptimStates]
) -> dict[str, tuple[TensorMeta, Assembly]]:
    """Stage 1/2: each group's rank slices joined; parameters one after another."""
    out = {}
    paddings = optim[0].paddings
    align = 2 * optim[0].world  # DeepSpeed aligns each group to 2 x world elements
    for g, shapes in enumerate(param_shapes):
        segments = [_rank_group(folder, o, g) for o in optim]
        dtype = _segments_dtype(folder, segments)
        pads = paddings[g] if paddings is not None and g < len(paddings) else [0] * len(shapes)
        if len(pads) != len(shapes):
            raise CheckpointReadError(
                f"{folder}: group {g} has {len(shapes)} parameters but {len(pads)} paddings"
            )
        offset = 0
        for (name, shape), pad in zip(shapes.items(), pads, strict=True):
            numel = math.prod(shape)
            pieces = _span(folder, segments, offset, numel, name)
            out[name] = (TensorMeta(shape, dtype, storage=f"zero:{name}"), Assembly(pieces, dtype))
            offset += numel + pad
        held = sum(s.numel for s in segments)
        if _aligned(offset, align) != _aligned(held, align):
            raise CheckpointReadError(
                f"{folder}: parameter group {g} takes {offset} elements but the ranks hold "
                f"{held}; the ranks' files do not match the model states"
            )
    return out


def _aligned(n: int, align: int) -> int:
    return align * math.ceil(n / align)


def _stage3_params(
    folder: str, param_shapes: list[dict[str, tuple[int, ...]]], optim: list[_OptimStates]
) -> dict[str, tuple[TensorMeta, Assembly]]:
    """Stage 3: each parameter is every rank's share (ceil(numel / world)), joined, cut."""
    world = len(optim)
    sizes = [t.numel for t in optim[0].flat_groups]
    for o in optim[1:]:
        if [t.numel for t in o.flat_groups] != sizes:
            raise CheckpointReadError(
                f"{o.path}: its flat groups differ in size from rank 0's; every rank holds "
                "an equal share in stage 3"
            )
    dtype = _segments_dtype(folder, [t for o in optim for t in o.flat_groups])
    out = {}
    offset = 0
    for name, shape in (item for group in param_shapes for item in group.items()):
        numel = math.prod(shape)
        share = math.ceil(numel / world)
        pieces: list[Piece] = []
        for rank, states in enumerate(optim):
            take = min(share, numel - rank * share)
            if take > 0:
                pieces += _span(folder, states.flat_groups, offset, take, name)
        out[name] = (
            TensorMeta(shape, dtype, storage=f"zero:{name}"),
            Assembly(tuple(pieces), dtype),
        )
        offset += share
    if offset != sum(sizes):
        raise CheckpointReadError(
            f"{folder}: parameters take {offset} elements of each rank's share but the "
            f"ranks hold {sum(sizes)}; the ranks' files do not match the model states"
        )
    return out


def _stage3_frozen(
    folder: str, ranks: list[_ModelStates]
) -> dict[str, tuple[TensorMeta, Assembly]]:
    """Stage 3 frozen parameters: each rank's fragment, joined and cut to size."""
    per_rank = [r.frozen_fragments() for r in ranks]
    shapes = per_rank[0][0]
    fragments = [located for _, located in per_rank]
    out = {}
    for name, shape in shapes.items():
        segments = [f[name] for f in fragments if name in f]
        if len(segments) != len(ranks):
            raise CheckpointReadError(f"{folder}: a rank has no fragment of frozen {name!r}")
        dtype = _segments_dtype(folder, segments)
        pieces = _span(folder, segments, 0, math.prod(shape), name)
        out[name] = (TensorMeta(shape, dtype, storage=f"zero:{name}"), Assembly(pieces, dtype))
    return out
