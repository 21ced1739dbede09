"""Saving a planned list of tensors: format choice, atomic write, verification, shards."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckptool import activity
from ckptool.choices import OutputFormat
from ckptool.errors import CheckpointReadError, OutputError, UsageError, VerificationError, option
from ckptool.formats.bounded import lone_surrogate, short_str
from ckptool.formats.meta import FLOAT4, QUANTIZED, CheckpointMeta
from ckptool.formats.safetensors_header import ALIASES_KEY, read_safetensors_meta
from ckptool.formats.sharded import read_index
from ckptool.formats.torch_pickle import read_zip_meta
from ckptool.formats.torch_zip_writer import write_torch_zip

if TYPE_CHECKING:
    import torch

from ckptool.formats.write import (
    SAFETENSORS_CODES,
    SOURCE_SHA256,
    OutTensor,
    Payload,
    TempOutput,
    atomic_output,
    check_output,
    committed_outputs,
    finish_safetensors,
    forget_committed,
    output_error,
    place_safetensors,
    verify_output,
    write_safetensors,
)

_SUFFIXES = {
    ".safetensors": OutputFormat.SAFETENSORS,
    **dict.fromkeys((".pt", ".pth", ".bin", ".ckpt"), OutputFormat.PT),
}


def output_format_for(out: str, explicit: str | None) -> OutputFormat:
    """``--format`` if given, else from OUT's suffix.

    Raises:
        UsageError: an unknown --format, or a suffix that names no format.
    """
    if explicit is not None:
        try:
            return OutputFormat(explicit)
        except ValueError as e:
            raise UsageError(
                f"{option('fmt', explicit, quoted=True)}: choose safetensors or pt"
            ) from e
    suffix = os.path.splitext(out)[1].lower()
    if suffix not in _SUFFIXES:
        raise UsageError(
            f"{out}: cannot tell the format from {suffix or 'no suffix'!r}; "
            f"add {option('fmt', 'safetensors')} or {option('fmt', 'pt')}"
        )
    return _SUFFIXES[suffix]


@dataclass(frozen=True)
class SavedFile:
    """What was written: the files (index last for shards) and the bytes of tensor data."""

    paths: tuple[str, ...]
    nbytes: int
    aliases: Mapping[str, str]


def save_tensors(
    out: str,
    tensors: Sequence[OutTensor],
    *,
    fmt: OutputFormat,
    inputs: Sequence[str],
    force: bool,
    metadata: Mapping[str, str] | None = None,
    hashed: str | None = None,
    dedupe_tied: bool = False,
) -> SavedFile:
    """Write ``tensors`` to ``out`` atomically and verify them by reading the file back.

    Args:
        hashed: the file that identifies the source; a safetensors output records its
            sha256 (taken while its bytes are copied) as ``ckptool.source_sha256``.
        dedupe_tied: safetensors cannot alias, so names sharing one source are stored
            once and recorded under ``ckptool.aliases`` (restored as tied on load);
            otherwise each name is stored in full, which any reader can load strictly.

    Raises:
        OutputError: as :func:`check_output` and :func:`atomic_output`.
        VerificationError: the file read back differs from the plan.
    """
    check_output(out, inputs=inputs, force=force)
    stored, aliases = (
        split_aliases(tensors)
        if dedupe_tied and fmt is OutputFormat.SAFETENSORS
        else (list(tensors), {})
    )
    safetensors = fmt is OutputFormat.SAFETENSORS
    refuse_unwritable(out, stored, safetensors=safetensors)
    # A .pt output has no metadata to hold a hash, so then the source is not hashed.
    payload = Payload(hashed if safetensors else None)
    payload.on_bytes = activity.advance
    activity.phase(f"write {os.path.basename(out)}", sum(t.nbytes for t in stored))
    with atomic_output(out, replace=force) as temp:
        with _named(out):
            if safetensors:
                write_safetensors(temp.file, stored, _with_aliases(metadata, aliases), payload)
            else:
                write_torch_zip(temp.file, stored, payload)
        activity.phase("verify and sync to disk")
        _verify_and_sync(temp, out, stored, payload, aliases, safetensors=safetensors)
    return SavedFile((out,), sum(t.nbytes for t in stored), aliases)


@contextlib.contextmanager
def _named(out: str) -> Iterator[None]:
    """A read-back mismatch while writing ``out`` names it."""
    try:
        yield
    except VerificationError as e:
        raise VerificationError(f"{out}: {e}") from e


def _with_aliases(metadata: Mapping[str, str] | None, aliases: Mapping[str, str]) -> dict[str, str]:
    extra = {ALIASES_KEY: json.dumps(aliases)} if aliases else {}
    return {**(metadata or {}), **extra}


def _verify_and_sync(
    temp: TempOutput,
    out: str,
    stored: Sequence[OutTensor],
    payload: Payload,
    aliases: Mapping[str, str],
    *,
    safetensors: bool,
) -> None:
    """Parse the written file and check it against the plan while it goes to disk.

    Raises:
        VerificationError: as :func:`verify_output`, or the file does not read back.
    """
    temp.file.flush()
    with ThreadPoolExecutor(max_workers=1) as pool:
        # Write-back to disk overlaps the read-back verification.
        synced = pool.submit(os.fsync, temp.file.fileno())
        written = _read_back(temp.path, out, safetensors)
        verify_output(written, stored, payload, temp.file.fileno(), aliases=aliases)
        synced.result()


def refuse_unwritable(out: str, tensors: Sequence[OutTensor], *, safetensors: bool) -> None:
    """Refuse, before anything is written, tensors the output could not hold as they are.

    Raises:
        CheckpointReadError: a quantized tensor (its scale and zero point are torch's
            own; written as plain integers, the file would not load).
        OutputError: for safetensors, a dtype it has no code for, or a name holding half
            a character (a pickle's names may; safetensors' UTF-8 header cannot).
    """
    quantized = next((t for t in tensors if t.dtype in QUANTIZED), None)
    if quantized is not None:
        raise CheckpointReadError(
            f"{out}: not written: {short_str(quantized.name)!r} is a quantized tensor "
            f"({quantized.dtype}), whose scale and zero point ckptool cannot write; "
            "dequantize the model first, or keep this file as it is"
        )
    if not safetensors:
        return
    odd = next((t for t in tensors if t.dtype not in SAFETENSORS_CODES), None)
    if odd is not None:
        raise OutputError(
            f"{out}: safetensors has no {odd.dtype} dtype (tensor {short_str(odd.name)!r}); "
            "write a .pt file"
        )
    scalar = next((t for t in tensors if t.dtype == FLOAT4 and not t.shape), None)
    if scalar is not None:
        raise OutputError(
            f"{out}: safetensors stores {FLOAT4} pairs along the last dimension, and "
            f"{short_str(scalar.name)!r} has none (0-dim); write a .pt file"
        )
    found = lone_surrogate([t.name for t in tensors])
    if found is not None:
        name, half = found
        raise OutputError(
            f"{out}: safetensors cannot store the name {short_str(name)!r}: it holds the lone "
            f"surrogate {half!r} (half a character); write a .pt file or rename the key"
        )


def _read_back(temp: str, out: str, safetensors: bool) -> CheckpointMeta:
    """The written file as our reader sees it; one it cannot read is an output problem."""
    try:
        return read_safetensors_meta(temp) if safetensors else read_zip_meta(temp, key=None)
    except CheckpointReadError as e:
        raise VerificationError(f"{out}: the file written does not read back ({e})") from e


def split_aliases(tensors: Sequence[OutTensor]) -> tuple[list[OutTensor], dict[str, str]]:
    """Keep the first name of each tied tensor (same bytes, dtype, shape); map the rest to it."""
    first: dict[object, str] = {}
    stored, aliases = [], {}
    for tensor in tensors:
        identity = None
        if tensor.identity is not None:
            identity = (tensor.identity, tensor.dtype, tensor.shape)
        if identity is not None and identity in first:
            aliases[tensor.name] = first[identity]
            continue
        if identity is not None:
            first[identity] = tensor.name
        stored.append(tensor)
    return stored, aliases


def shard_plan(tensors: Sequence[OutTensor], max_bytes: int) -> list[list[OutTensor]]:
    """Greedy, order-preserving shards of at most ``max_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def save_sharded(
    out: str,
    tensors: Sequence[OutTensor],
    *,
    max_bytes: int,
    inputs: Sequence[str],
    force: bool,
    metadata: Mapping[str, str] | None = None,
    hashed: str | None = None,
) -> SavedFile:
    """Hugging Face layout: ``stem-0000i-of-0000n.safetensors`` shards, then the index.

    The index is the single commit point. Shards are written (each atomically, each
    verified) under names the current index does not reference, so until the new index
    replaces the old one a reader sees the old checkpoint whole; only then are the old
    shards removed. Replacing an output whose index uses the plain names writes the new
    shards as ``stem-0000i-of-0000n.next.safetensors`` (the next replacement goes back).
    Any failure or interrupt before the commit removes the new shards again.

    ``hashed``, the file that identifies the source, is hashed while the shards are
    copied, in the same pass (its sha256 goes into every shard and the index).
    """
    index_path = out + ".index.json"
    # Tied names are stored once, as in a single file: each alias goes with its target
    # into that shard's ckptool.aliases, and the index lists stored names only (what
    # transformers' index readers expect for tied weights).
    stored, aliases = split_aliases(tensors)
    plan = _with_aliases_beside_targets(shard_plan(stored, max_bytes), tensors, aliases)
    check_output(index_path, inputs=inputs, force=force)
    refuse_unwritable(index_path, tensors, safetensors=True)  # before any shard is written
    previous = _indexed_shards(index_path)
    names = _fresh_shard_names(out.removesuffix(".safetensors"), len(plan), previous)
    for path in names:
        check_output(path, inputs=inputs, force=force)
    before = len(committed_outputs())
    try:
        weight_map, total, metadata = _write_shards(
            out, names, plan, force=force, metadata=metadata, aliases=aliases, hashed=hashed
        )
        index = {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}
        with atomic_output(index_path, replace=force) as temp:
            temp.file.write(json.dumps(index, indent=2).encode())
    except BaseException:
        committed = committed_outputs()[before:]
        if index_path not in committed:
            # Exactly the shards this call committed: never a racing writer's.
            _remove_files(committed)
        raise
    _remove_files(sorted(previous - {os.path.abspath(p) for p in names}))
    return SavedFile((*names, index_path), total, aliases)


def _with_aliases_beside_targets(
    plan: list[list[OutTensor]], tensors: Sequence[OutTensor], aliases: Mapping[str, str]
) -> list[list[OutTensor]]:
    """Each shard of ``plan`` plus the aliases of the tensors it stores (no bytes)."""
    if not aliases:
        return plan
    by_name = {t.name: t for t in tensors}
    shard_of = {t.name: i for i, shard in enumerate(plan) for t in shard}
    for alias, target in aliases.items():
        plan[shard_of[target]].append(by_name[alias])
    return plan


# Shards copied in one pass over the source are open at once, a file descriptor each;
# past this many, further groups follow (the first group's pass hashed the source).
MAX_OPEN_SHARDS = 128


def _write_shards(
    out: str,
    names: Sequence[str],
    plan: Sequence[Sequence[OutTensor]],
    *,
    force: bool,
    metadata: Mapping[str, str] | None,
    aliases: Mapping[str, str],
    hashed: str | None,
) -> tuple[dict[str, str], int, dict[str, str]]:
    """Write the shards; return the weight map (stored names), the bytes of tensor data
    and the metadata they were written with (the source's sha256 included)."""
    metadata = dict(metadata or {})
    # Each shard's stored tensors and the aliases it records, split once (the aliases
    # sit in their target's shard).
    shards = [
        _Shard(
            path,
            [t for t in shard if t.name not in aliases],
            {t.name: aliases[t.name] for t in shard if t.name in aliases},
        )
        for path, shard in zip(names, plan, strict=True)
    ]
    for start in range(0, len(shards), MAX_OPEN_SHARDS):
        group = shards[start : start + MAX_OPEN_SHARDS]
        sha256 = _write_shard_group(out, group, force=force, metadata=metadata, hashed=hashed)
        if sha256 is not None:
            metadata[SOURCE_SHA256] = sha256
            hashed = None  # the groups after the first carry the hash as plain metadata
    weight_map = {t.name: os.path.basename(s.path) for s in shards for t in s.stored}
    total = sum(t.nbytes for s in shards for t in s.stored)
    return weight_map, total, metadata


@dataclass(frozen=True)
class _Shard:
    path: str
    stored: list[OutTensor]
    aliases: dict[str, str]  # alias -> stored name, for this shard's ckptool.aliases


def _write_shard_group(
    out: str,
    group: Sequence[_Shard],
    *,
    force: bool,
    metadata: Mapping[str, str],
    hashed: str | None,
) -> str | None:
    """Write, verify and commit ``group``'s shards, their bytes copied in one pass (each
    source byte read once); the source's sha256 when ``hashed``.

    Without force each shard is created exclusively: a racing writer fails here and
    removes only its own shards.
    """
    payload = Payload(hashed)
    payload.on_bytes = activity.advance
    with contextlib.ExitStack() as stack:
        opened = []
        for shard in group:
            temp = stack.enter_context(atomic_output(shard.path, replace=force))
            shard_metadata = _with_aliases(metadata, shard.aliases)
            opened.append(
                (temp, place_safetensors(temp.file, shard.stored, shard_metadata, payload))
            )
        size = sum(t.nbytes for shard in group for t in shard.stored)
        activity.phase(f"write {len(group)} shards of {os.path.basename(out)}", size)
        try:
            with _named(out):
                payload.copy()
        except OSError as e:
            # Not the error of whichever shard's temp file is innermost.
            raise output_error(out, e) from e
        activity.phase("verify and sync to disk")
        for shard, (temp, header) in zip(group, opened, strict=True):
            finish_safetensors(temp.file, header, payload)
            _verify_and_sync(
                temp, shard.path, shard.stored, payload, shard.aliases, safetensors=True
            )
    return payload.source_sha256


def _indexed_shards(index_path: str) -> set[str]:
    """Absolute paths of the shards an existing index references (none if unreadable)."""
    if not os.path.isfile(index_path):
        return set()
    try:
        return {os.path.abspath(p) for p in read_index(index_path).values()}
    except CheckpointReadError:
        return set()


def _fresh_shard_names(stem: str, count: int, taken: set[str]) -> list[str]:
    for infix in ("", ".next"):
        names = [f"{stem}-{i + 1:05d}-of-{count:05d}{infix}.safetensors" for i in range(count)]
        if not taken & {os.path.abspath(n) for n in names}:
            return names
    raise AssertionError("unreachable: one index never references both name sets")


def _remove_files(paths: Sequence[str]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        forget_committed(path)


def save_state_dict(
    state: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    fmt: str | None = None,
    force: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> SavedFile:
    """Save a state dict atomically (temp file, fsync, rename) and verify it by reading back.

    The format follows the suffix (``.safetensors``, or ``.pt/.pth/.bin/.ckpt``) unless
    ``fmt`` names it. Tied tensors stay tied: one storage in ``.pt``; in safetensors
    one copy plus a ``ckptool.aliases`` entry that :func:`ckptool.load_state_dict` honours.

    Raises:
        OutputError: ``path`` exists without ``force``, no space, no permission.
        UsageError: unknown format.
    """
    out = os.fspath(path)
    chosen = output_format_for(out, fmt)
    plan = [_out_tensor(name, tensor) for name, tensor in state.items()]
    return save_tensors(
        out, plan, fmt=chosen, inputs=(), force=force, metadata=metadata, dedupe_tied=True
    )


def _out_tensor(name: str, tensor: torch.Tensor) -> OutTensor:
    from ckptool.formats.load import tensor_bytes

    dtype = str(tensor.dtype).removeprefix("torch.")
    tie = None
    if tensor.numel():  # views of one storage with the same layout are the same tensor
        tie = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.stride()))
    return OutTensor(name, dtype, tuple(tensor.shape), tensor_bytes(tensor), tie=tie)
