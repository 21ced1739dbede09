"""``ckptool merge-lora``: fold a PEFT LoRA adapter into its base checkpoint, from files.

For each adapted module the merged weight is peft's ``merge_and_unload`` result,
``W + transpose(B @ A) * scale`` (``scale = alpha / r``, or ``alpha / sqrt(r)`` with
rsLoRA; per-module ``rank_pattern``/``alpha_pattern``; ``fan_in_fan_out`` for GPT-2's
Conv1D; ``lora_embedding_A/B`` for embeddings; a conv's update as peft builds it), and
``modules_to_save`` copies replace the base's tensors. One tensor is in memory at a
time; every other base tensor is copied as bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptool.errors import CheckpointReadError, IncompatibleError, UsageError
from ckptool.formats import CheckpointMeta, read_metadata
from ckptool.formats.adapters import CONFIG_NAME, PEFT_PREFIX, TOKENS_SUFFIX, describe_adapter
from ckptool.formats.load import tensor_buffer
from ckptool.formats.meta import DTYPE_SIZES, tied_views
from ckptool.formats.save import output_format_for
from ckptool.formats.write import ComputedBytes, OutTensor, check_output
from ckptool.keys import suggest_prefixes
from ckptool.surgery import (
    Cast,
    SourceBytes,
    SurgeryLog,
    finished,
    provenance,
    renaming_command,
    save_hashed,
)

if TYPE_CHECKING:
    import torch

_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
)


@dataclass(frozen=True)
class LoraSettings:
    """What adapter_config.json says about scaling, read strictly."""

    r: int
    alpha: float
    rslora: bool
    fan_in_fan_out: bool
    rank_pattern: Mapping[str, int]
    alpha_pattern: Mapping[str, float]
    # trainable_token_indices: a list (the input embedding's) or {module pattern: list}
    token_indices: list[int] | Mapping[str, list[int]] | None = None

    def scale(self, module: str) -> float:
        r = _pattern_value(self.rank_pattern, module, self.r)
        alpha = _pattern_value(self.alpha_pattern, module, self.alpha)
        return alpha / math.sqrt(r) if self.rslora else alpha / r


def _pattern_value(patterns: Mapping[str, Any], module: str, default: float) -> float:
    """peft's rule: a pattern key matches a module name that ends with it (as a regex
    after a dot); the longest matching key wins."""
    matches = [key for key in patterns if re.fullmatch(rf"(?:.*\.)?(?:{key})", module) is not None]
    return float(patterns[max(matches, key=len)]) if matches else default


def read_settings(config: Mapping[str, Any] | None, path: str) -> LoraSettings:
    """Raises: CheckpointReadError (no config, wrong types); UsageError (a LoRA variant
    ckptool does not merge: DoRA, LoRA biases, other PEFT types)."""
    if config is None:
        raise CheckpointReadError(
            f"{path}: no {CONFIG_NAME} beside the adapter; its lora_alpha and r set the scale"
        )
    if config.get("peft_type", "LORA") != "LORA":
        raise UsageError(f"{path}: a {config.get('peft_type')!r} adapter; merge-lora merges LoRA")
    for option in ("use_dora", "lora_bias"):
        if config.get(option):
            raise UsageError(f"{path}: {option} adapters are not supported by merge-lora")
    r, alpha = config.get("r"), config.get("lora_alpha")
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    valid = (
        _count(r)
        and _number(alpha)
        and isinstance(ranks, dict)
        and all(_count(v) for v in ranks.values())
        and isinstance(alphas, dict)
        and all(_number(v) for v in alphas.values())
    )
    if not valid or not isinstance(r, int) or not isinstance(alpha, int | float):
        raise CheckpointReadError(
            f"{path}: {CONFIG_NAME} needs a positive integer r, a number lora_alpha and "
            "rank/alpha patterns of those"
        )
    for key in (*ranks, *alphas):
        try:
            re.compile(key)
        except re.error as e:
            raise CheckpointReadError(f"{path}: pattern {key!r} is not a regex ({e})") from e
    return LoraSettings(
        r,
        float(alpha),
        bool(config.get("use_rslora")),
        bool(config.get("fan_in_fan_out")),
        ranks,
        alphas,
        _token_indices(config.get("trainable_token_indices"), path),
    )


def _token_indices(raw: Any, path: str) -> list[int] | dict[str, list[int]] | None:
    if raw is None:
        return None
    if _token_ids(raw):
        return list(raw)
    if isinstance(raw, dict) and all(isinstance(k, str) and _token_ids(v) for k, v in raw.items()):
        return {key: list(ids) for key, ids in raw.items()}
    raise CheckpointReadError(
        f"{path}: {CONFIG_NAME}'s trainable_token_indices must be a list of token ids or "
        "a mapping of module names to such lists"
    )


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(_count(i) or (type(i) is int and i == 0) for i in value)


def tokens_of(settings: LoraSettings, module: str) -> list[int] | None:
    """The token ids whose rows the adapter trained for ``module``: peft's list form
    names the input embedding (the one module the adapter has rows for), the mapping
    form names modules by peft's rule (the longest key the module name ends with)."""
    raw = settings.token_indices
    if raw is None or isinstance(raw, list):
        return raw
    matches = [key for key in raw if re.fullmatch(rf"(?:.*\.)?(?:{re.escape(key)})", module)]
    return raw[max(matches, key=len)] if matches else None


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class LoraPair:
    module: str  # base-model module path
    a: str  # adapter tensor names
    b: str
    embedding: bool


def lora_pairs(adapter: CheckpointMeta) -> tuple[list[LoraPair], dict[str, str], dict[str, str]]:
    """(the A/B pairs, {base name: adapter name} of tensors saved whole, {base weight
    name: adapter name} of trainable token rows)."""
    parts: dict[str, dict[str, str]] = {}
    saved, tokens = {}, {}
    for name in adapter.tensors:
        if name.endswith(TOKENS_SUFFIX):
            module = name.removesuffix(TOKENS_SUFFIX).removeprefix(PEFT_PREFIX)
            tokens[f"{module}.weight"] = name
            continue
        match = _LORA_KEY.match(name)
        if match is None:
            saved[name.removeprefix(PEFT_PREFIX)] = name
            continue
        module = match["module"].removeprefix(PEFT_PREFIX)
        parts.setdefault(module, {})[match["part"]] = name
    pairs = []
    for module, found in parts.items():
        embedding = "lora_embedding_A" in found or "lora_embedding_B" in found
        a, b = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        if a not in found or b not in found:
            raise CheckpointReadError(
                f"{adapter.path}: {module} has {', '.join(sorted(found))} but not both "
                f"{a} and {b}; the adapter is incomplete"
            )
        pairs.append(LoraPair(module, found[a], found[b], embedding))
    return pairs, saved, tokens


def merge_lora(
    base: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    out: str,
    *,
    fmt: str | None = None,
    dtype: str | None = None,
    force: bool = False,
    dry_run: bool = False,
) -> SurgeryLog:
    """Write BASE with the adapter merged in, as peft's ``merge_and_unload`` would.

    Raises:
        CheckpointReadError: unreadable inputs, no or a broken adapter_config.json, an
            incomplete adapter (an A without its B).
        IncompatibleError: the adapter adapts a module the base lacks, or shapes that do
            not fit the base's weight.
        UsageError: a LoRA variant not supported (DoRA, LoRA biases).
    """
    base_meta = read_metadata(base)
    adapter_meta = read_metadata(adapter)
    info = describe_adapter(adapter_meta.path, adapter_meta.tensors)
    if info is None:
        raise UsageError(f"{adapter_meta.path}: holds no lora_A/lora_B tensors; not an adapter")
    settings = read_settings(info.config, adapter_meta.path)
    pairs, saved, tokens = lora_pairs(adapter_meta)
    by_weight = {f"{pair.module}.weight": pair for pair in pairs}
    _check_fits(base_meta, adapter_meta, pairs, saved, settings)
    rows = _token_rows(base_meta, adapter_meta, tokens, settings, by_weight)
    # A weight tied to others in the base (an embedding and an lm_head): one tensor,
    # merged once; each of its names is written with the merged values (otherwise the
    # stale copy wins on load, whichever name loads last).
    partners = _tied_partners(base_meta, [*by_weight, *rows], adapter_meta.path)
    fmt_out = output_format_for(out, fmt)
    if not dry_run:
        check_output(out, inputs=(*base_meta.files, *adapter_meta.files), force=force)
    cast = Cast.of(dtype, (), base_meta.tensors)
    log = SurgeryLog(
        command="merge-lora",
        sources=(base_meta.path, adapter_meta.path),
        output=out,
        format=fmt_out.value,
        kept=tuple(
            n
            for n in base_meta.tensors
            if n not in by_weight and n not in saved and n not in rows and n not in partners
        ),
        merged=(*by_weight, *rows, *partners),
        taken={name: 1 for name in saved},
        dry_run=dry_run,
        notes=(f"adapter: {info.summary}",),
    )
    if dry_run:
        return log
    with ExitStack() as stack:
        base_bytes, adapter_bytes = SourceBytes(base_meta, stack), SourceBytes(adapter_meta, stack)

        def planned(name: str) -> OutTensor:
            if name in rows:
                return _rows_replaced(name, base_bytes, adapter_bytes, rows[name], cast)
            return _merged_tensor(name, base_bytes, adapter_bytes, by_weight, saved, settings, cast)

        plan = [
            dataclasses.replace(planned(partners[name]), name=name)
            if name in partners
            else planned(name)
            for name in base_meta.tensors
        ]
        metadata = provenance("merge-lora", base_meta, adapter=os.path.basename(adapter_meta.path))
        saved_file = save_hashed(out, plan, fmt_out, base_meta, metadata, force=force)
    return finished(log, saved_file.paths, saved_file.nbytes)


def _merged_tensor(
    name: str,
    base: SourceBytes,
    adapter: SourceBytes,
    by_weight: Mapping[str, LoraPair],
    saved: Mapping[str, str],
    settings: LoraSettings,
    cast: Cast,
) -> OutTensor:
    """One tensor of the output: an adapted weight merged when it is written (one merged
    tensor in memory at a time), a tensor the adapter saved whole, or the base's own."""
    meta = base.meta.tensors[name]
    out_dtype = cast.target(name, meta.dtype)
    if name in by_weight:
        pair = by_weight[name]
        merge_one = functools.partial(_merged_bytes, base, adapter, name, pair, settings, out_dtype)
        length = meta.numel * DTYPE_SIZES[out_dtype]
        return OutTensor(name, out_dtype, meta.shape, ComputedBytes(length, merge_one))
    source, source_name = (adapter, saved[name]) if name in saved else (base, name)
    data, written = source.data(source_name, out_dtype)
    return OutTensor(name, written, meta.shape, data)


@dataclass(frozen=True)
class TokenRows:
    """Rows of an embedding the adapter trained (peft's trainable tokens)."""

    delta: str  # the adapter tensor: one new row per token id
    ids: tuple[int, ...]


def _token_rows(
    base: CheckpointMeta,
    adapter: CheckpointMeta,
    tokens: Mapping[str, str],
    settings: LoraSettings,
    by_weight: Mapping[str, LoraPair],
) -> dict[str, TokenRows]:
    """{base weight name: its trained rows}, each checked against the base's weight.

    Raises: CheckpointReadError (no token ids for a module, or ids that do not fit its
    rows); IncompatibleError (the base lacks the weight); UsageError (LoRA on the same
    weight: the order peft applies them in is not ckptool's to guess).
    """
    rows = {}
    for weight_name, delta in tokens.items():
        module = weight_name.removesuffix(".weight")
        ids = tokens_of(settings, module)
        weight, new = base.tensors.get(weight_name), adapter.tensors[delta]
        if weight is None:
            raise IncompatibleError(
                f"{adapter.path} trains token rows of {module}, which {base.path} lacks "
                f"(no {weight_name}); is this the adapter's base model?"
            )
        if weight_name in by_weight:
            raise UsageError(
                f"{adapter.path}: {module} has both LoRA and trainable tokens; merge-lora "
                "merges one or the other"
            )
        if ids is None or len(weight.shape) != 2 or len(new.shape) != 2:
            raise CheckpointReadError(
                f"{adapter.path}: trainable tokens on {module} without their token ids in "
                f"{CONFIG_NAME} (trainable_token_indices), or not a 2-D embedding"
            )
        vocab, width = weight.shape
        fits = new.shape == (len(ids), width) and len(set(ids)) == len(ids)
        if not fits or any(i >= vocab for i in ids):
            raise CheckpointReadError(
                f"{adapter.path}: {len(ids)} trainable token ids for {module} (up to "
                f"{max(ids, default=0)}) do not fit its rows {list(new.shape)} and the base's "
                f"embedding {list(weight.shape)}"
            )
        rows[weight_name] = TokenRows(delta, tuple(ids))
    return rows


def _tied_partners(base: CheckpointMeta, changed: list[str], adapter: str) -> dict[str, str]:
    """{name: the changed name it is tied to} for every other name of a changed tensor.

    Raises: UsageError when two names of one tied tensor are both changed (peft would
    apply both updates to the one tensor; merge-lora merges one per tensor).
    """
    partners: dict[str, str] = {}
    for names in tied_views(base.tensors).values():
        adapted = [n for n in names if n in changed]
        if len(adapted) > 1:
            raise UsageError(
                f"{adapter} updates {' and '.join(adapted)}, which are one tensor in "
                f"{base.path}; merge-lora merges one update per tensor"
            )
        if adapted:
            partners.update((n, adapted[0]) for n in names if n != adapted[0])
    return partners


def _rows_replaced(
    name: str, base: SourceBytes, adapter: SourceBytes, rows: TokenRows, cast: Cast
) -> OutTensor:
    """The base's embedding with the trained rows in place of the old ones, as peft's
    TrainableTokensLayer.merge writes them (index_copy: replaced, not added)."""
    meta = base.meta.tensors[name]
    out_dtype = cast.target(name, meta.dtype)

    def replaced() -> memoryview:
        import torch

        weight = base.alone(name).clone()
        new_rows = adapter.tensor(rows.delta).to(weight.dtype)
        weight.index_copy_(0, torch.tensor(rows.ids), new_rows)
        return tensor_buffer(weight, out_dtype, name=name)

    length = meta.numel * DTYPE_SIZES[out_dtype]
    return OutTensor(name, out_dtype, meta.shape, ComputedBytes(length, replaced))


def _renaming_hint(base: CheckpointMeta, pairs: list[LoraPair]) -> str:
    """How the base's names become the adapter's, when a prefix change does it (a
    DataParallel base holds module.fc1.weight for the adapter's fc1)."""
    adapted = {f"{pair.module}.weight" for pair in pairs}
    if not adapted.isdisjoint(base.tensors):
        return ""  # some names agree already: a module is missing, not a prefix
    found = suggest_prefixes(list(base.tensors), list(adapted))
    if not found or found[0].matched < len(adapted):
        return ""
    flags = " ".join(found[0].flags)
    return (
        f"the base names its keys differently (the adapter's match after {flags}): "
        f"rename them first ({renaming_command(base.path, flags)})"
    )


def _check_fits(
    base: CheckpointMeta,
    adapter: CheckpointMeta,
    pairs: list[LoraPair],
    saved: Mapping[str, str],
    settings: LoraSettings,
) -> None:
    for pair in pairs:
        weight = base.tensors.get(f"{pair.module}.weight")
        if weight is None:
            raise IncompatibleError(
                f"{adapter.path} adapts {pair.module}, which {base.path} lacks "
                f"(no {pair.module}.weight); "
                + (_renaming_hint(base, pairs) or "is this the adapter's base model?")
            )
        a, b = adapter.tensors[pair.a].shape, adapter.tensors[pair.b].shape
        expected = _update_shape(a, b, pair, settings)
        if expected != weight.shape:
            raise IncompatibleError(
                f"{adapter.path}: the update for {pair.module} is {list(expected)}, the base's "
                f"weight {list(weight.shape)}; is this the adapter's base model?"
            )
    for name, adapter_name in saved.items():
        if (
            name not in base.tensors
            or base.tensors[name].shape != adapter.tensors[adapter_name].shape
        ):
            raise IncompatibleError(
                f"{adapter.path} saves {name} whole (modules_to_save), which {base.path} "
                "lacks or has in another shape"
            )


def _update_shape(
    a: tuple[int, ...], b: tuple[int, ...], pair: LoraPair, settings: LoraSettings
) -> tuple[int, ...]:
    if len(a) < 2 or len(b) < 2 or a[0] != b[1]:
        return (*b[:1], *a[1:])  # rank mismatch: any shape that cannot fit
    if pair.embedding:
        return (a[1], b[0])  # [num_embeddings, dim]: transpose(B @ A)
    if len(a) in (3, 4, 5):  # Conv1d/2d/3d: [out, in, *kernel]
        return (b[0], *a[1:])
    return (a[1], b[0]) if settings.fan_in_fan_out else (b[0], a[1])


def _merged_bytes(
    base: SourceBytes,
    adapter: SourceBytes,
    name: str,
    pair: LoraPair,
    settings: LoraSettings,
    dtype: str,
) -> memoryview:
    # The weight is read on its own, not through a mapping of the whole base: memory
    # holds one weight and its update at a time.
    return tensor_buffer(_merged(base.alone(name), adapter, pair, settings), dtype, name=name)


def _merged(
    weight: torch.Tensor, adapter: SourceBytes, pair: LoraPair, settings: LoraSettings
) -> torch.Tensor:
    """W + delta, with delta computed as peft's get_delta_weight does (float32 on CPU
    for half-precision factors, then back to their dtype)."""
    import torch

    a, b = adapter.tensor(pair.a), adapter.tensor(pair.b)
    low_precision = b.dtype in (torch.float16, torch.bfloat16)
    if low_precision:
        a, b = a.float(), b.float()
    scale = settings.scale(pair.module)
    if pair.embedding:
        delta = (b @ a).T * scale
    elif a.dim() > 2 and all(size == 1 for size in weight.shape[2:]):  # 1x1 convs
        product = b.flatten(1) @ a.flatten(1)  # [out, r] @ [r, in]
        delta = product.reshape(*product.shape, *weight.shape[2:]) * scale
    elif a.dim() > 2:  # a kernel: the update is A convolved with B, as peft builds it
        conv = {3: torch.nn.functional.conv1d, 4: torch.nn.functional.conv2d}.get(
            a.dim(), torch.nn.functional.conv3d
        )
        delta = conv(a.transpose(0, 1), b).transpose(0, 1) * scale
    else:
        product = b @ a
        delta = (product.T if settings.fan_in_fan_out else product) * scale
    if low_precision:
        delta = delta.to(adapter.tensor(pair.b).dtype)
    return weight + delta.to(weight.dtype)
