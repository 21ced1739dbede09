"""Hugging Face sharded checkpoints: ``*.index.json`` naming the shard of each tensor."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

from ckptool.errors import CheckpointReadError
from ckptool.formats.files import parse_json, require_regular_file
from ckptool.formats.meta import CheckpointMeta, Format, TensorMeta
from ckptool.formats.safetensors_header import ALIASES_KEY

# An index lists each tensor once with a short file name: ~100 bytes per tensor.
MAX_INDEX_BYTES = 100 * 1024 * 1024


def read_index(path: str) -> dict[str, str]:
    """Return the index's ``weight_map``: tensor name -> shard file path.

    Raises:
        CheckpointReadError: the index is not JSON, lacks a weight_map, or names a
            shard outside its directory or one that does not exist.
    """
    size = require_regular_file(path)
    if size > MAX_INDEX_BYTES:
        raise CheckpointReadError(
            f"{path}: shard index is {size} bytes, over the index budget of {MAX_INDEX_BYTES}"
        )
    with open(path, "rb") as f:
        index = parse_json(f.read(), path=path, what="shard index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not set(map(type, weight_map.values())) <= {str}:
        raise CheckpointReadError(f"{path}: shard index has no 'weight_map' of name -> file")
    folder = os.path.dirname(os.path.abspath(path))
    # Hundreds of shards name 100,000 tensors: each shard is checked and joined once,
    # in the order of first mention (so a refusal names the first tensor it holds).
    paths = {}
    for shard in dict.fromkeys(weight_map.values()):
        plain = _plain_file_name(shard)
        if plain is None:
            first = next(name for name, named in weight_map.items() if named == shard)
            raise CheckpointReadError(
                f"{path}: shard {shard!r} for {first!r} is not a plain file name"
            )
        paths[shard] = os.path.join(folder, plain)
    resolved = dict(zip(weight_map, map(paths.__getitem__, weight_map.values()), strict=True))
    for shard in sorted(set(paths.values())):
        if not os.path.lexists(shard):
            raise CheckpointReadError(f"{path}: shard {os.path.basename(shard)!r} is missing")
        require_regular_file(shard)
    return resolved


def _plain_file_name(shard: str) -> str | None:
    """The shard's file name in the index's folder, or None. Writers that join paths
    write ``./model-00001.safetensors`` (transformers loads it); anything that leaves
    the folder, names a subfolder or is absolute is refused: an index must not make a
    read, and so a write, take a file from elsewhere."""
    plain = os.path.normpath(shard) if shard.startswith("./") else shard
    if not plain or plain in (".", "..") or os.path.basename(plain) != plain:
        return None
    return plain


def read_sharded_meta(path: str, read_shard: Callable[[str], CheckpointMeta]) -> CheckpointMeta:
    """Describe a sharded checkpoint by reading each shard's header.

    Every tensor must be in the shard the index names, and every shard tensor in the index.
    """
    weight_map = read_index(path)
    tensors: dict[str, TensorMeta] = {}
    shards = sorted(set(weight_map.values()))
    file_size = os.path.getsize(path)
    metadata: dict[str, str] = {}
    storages: set[str] = set()
    aliases: dict[str, str] = {}  # name -> the stored name it views (ckptool.aliases)
    for shard in shards:
        meta = read_shard(shard)
        file_size += meta.file_size
        metadata.update(meta.metadata)
        recorded = _recorded_aliases(meta)
        held = _own_storages(meta.tensors, shard, storages)
        # Most shards record no alias and hold only what the index places there: told
        # in C (a count of 100,000 lookups), then taken whole.
        if not recorded and list(map(weight_map.get, held)).count(shard) == len(held):
            tensors.update(held)
            continue
        for name, tensor in held.items():
            if name in recorded and name not in weight_map:
                aliases[name] = recorded[name]  # stored once, under the index's name
            elif weight_map.get(name) != shard:
                raise CheckpointReadError(
                    f"{path}: tensor {name!r} is in {os.path.basename(shard)!r} "
                    f"but the index says {_shard_name(weight_map.get(name))}"
                )
            tensors[name] = tensor
    absent = list(itertools.filterfalse(tensors.__contains__, weight_map))
    if absent:
        raise CheckpointReadError(
            f"{path}: {len(absent)} indexed tensors are in no shard, e.g. {absent[0]!r}"
        )
    # In the index's order, under the shards' own name strings: their tensors hold those
    # already, and the index's copies (9 MiB at 100,000 tensors) go with it. (Built in C.)
    names = list(map(dict(zip(tensors, tensors, strict=True)).__getitem__, weight_map))
    ordered = dict(zip(names, map(tensors.__getitem__, names), strict=True))
    del names
    ordered.update((alias, tensors[alias]) for alias in aliases)
    # Each shard records its own aliases; the checkpoint's are all of them.
    metadata.pop(ALIASES_KEY, None)
    if aliases:
        metadata[ALIASES_KEY] = json.dumps(aliases)
    return CheckpointMeta(
        path=path,
        format=Format.SHARDED,
        tensors=ordered,
        metadata=metadata,
        file_size=file_size,
        files=(path, *shards),
    )


def _recorded_aliases(meta: CheckpointMeta) -> dict[str, str]:
    """The names a shard's ``ckptool.aliases`` metadata maps to its stored tensors (the
    safetensors reader has checked them and given each its target's bytes)."""
    raw = meta.metadata.get(ALIASES_KEY)
    if raw is None:
        return {}
    found = json.loads(raw)
    return {a: t for a, t in found.items() if isinstance(a, str) and isinstance(t, str)}


def _own_storages(
    tensors: Mapping[str, TensorMeta], shard: str, seen: set[str]
) -> Mapping[str, TensorMeta]:
    """``tensors`` with storage keys no earlier shard used (``seen``, updated): a
    storage key names bytes within one file, and two torch.save shards written through
    a buffer both hold ``archive/data/0``; taken as one storage, their tensors would
    read as tied. On a clash the shard's keys are scoped by its path, unique to it."""
    keys = {t.storage for t in tensors.values() if t.storage is not None}
    if not keys & seen:
        seen |= keys
        return tensors
    return {
        name: t._replace(storage=f"{shard}:{t.storage}") if t.storage is not None else t
        for name, t in tensors.items()
    }


def _shard_name(shard: Any) -> str:
    return repr(os.path.basename(shard)) if isinstance(shard, str) else "no shard"
