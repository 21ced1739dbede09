"""Recognise PEFT LoRA adapter files: what they adapt, at which rank and scale.

An adapter (``adapter_model.safetensors`` or ``adapter_model.bin``) holds only low-rank
updates — ``<module>.lora_A.weight`` [r, in] and ``<module>.lora_B.weight`` [out, r],
``lora_embedding_A/B`` for embeddings — plus the ``modules_to_save`` copies; the scale
and options live in ``adapter_config.json`` beside it. Diffing one against a model says
"everything unexpected"; this says what the file is instead. Pure metadata: no torch.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ckptool.errors import CheckpointReadError
from ckptool.formats.files import parse_json, require_regular_file
from ckptool.formats.meta import TensorMeta

_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B|embedding_A|embedding_B)(?:\.[^.]+)?$")
# peft's trainable tokens (``trainable_token_indices``): new rows for some tokens of an
# embedding, which replace the base's rows when merged.
TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"
PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
MAX_CONFIG_BYTES = 1024 * 1024


@dataclass(frozen=True)
class AdapterInfo:
    """A LoRA adapter's modules (base-model names), ranks, and its config if found."""

    modules: tuple[str, ...]
    ranks: tuple[int, ...]  # distinct ranks, ascending
    saved: tuple[str, ...]  # full copies (modules_to_save), base-model names
    config: Mapping[str, Any] | None
    tokens: tuple[str, ...] = ()  # modules with trainable token rows, base-model names

    @property
    def summary(self) -> str:
        ranks = "/".join(map(str, self.ranks))
        text = f"LoRA on {len(self.modules)} modules, r={ranks}"
        config = self.config or {}
        alpha, r = config.get("lora_alpha"), config.get("r")
        if _number(alpha) and _number(r) and r:
            rslora = bool(config.get("use_rslora"))
            scale = alpha / (r**0.5 if rslora else r)
            text += f", alpha={alpha} (scale {scale:.4g}{', rsLoRA' if rslora else ''})"
        base = config.get("base_model_name_or_path")
        if isinstance(base, str) and base:
            text += f", base {base[:80]}"
        if self.saved:
            plural = "s" if len(self.saved) != 1 else ""
            text += f"; {len(self.saved)} tensor{plural} saved whole (modules_to_save)"
        if self.tokens:
            text += f"; trainable tokens on {', '.join(self.tokens)}"
        return text


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def describe_adapter(path: str, tensors: Mapping[str, TensorMeta]) -> AdapterInfo | None:
    """The adapter these tensors form, or None if they hold no LoRA pair.

    Raises:
        CheckpointReadError: an ``adapter_config.json`` beside the file that is not a
            JSON object (or is too big, or nests too deeply).
    """
    modules: dict[str, int] = {}
    lora_names = set()
    # Every LoRA name holds ".lora_": a substring test at C speed spares a 100k-tensor
    # model 100k regex matches.
    marked = itertools.compress(tensors, map(str.__contains__, tensors, itertools.repeat(".lora_")))
    for name in marked:
        meta = tensors[name]
        match = _LORA.match(name)
        if match is None:
            continue
        lora_names.add(name)
        module = match["module"].removeprefix(PEFT_PREFIX)
        if match["part"] in ("A", "embedding_A") and meta.shape:
            modules[module] = meta.shape[0]  # lora_A is [r, in]; embedding_A [r, num]
        else:
            modules.setdefault(module, 0)
    if not modules:
        return None
    others = [n.removeprefix(PEFT_PREFIX) for n in tensors if n not in lora_names]
    saved = tuple(n for n in others if not n.endswith(TOKENS_SUFFIX))
    tokens = tuple(n.removesuffix(TOKENS_SUFFIX) for n in others if n.endswith(TOKENS_SUFFIX))
    ranks = tuple(sorted({r for r in modules.values() if r}))
    return AdapterInfo(tuple(modules), ranks, saved, _read_config(path), tokens)


def _read_config(path: str) -> Mapping[str, Any] | None:
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    config_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.exists(config_path):
        return None
    size = require_regular_file(config_path)
    if size > MAX_CONFIG_BYTES:
        raise CheckpointReadError(f"{config_path}: {size} bytes; an adapter config is small")
    with open(config_path, "rb") as f:
        config = parse_json(f.read(), path=config_path, what="adapter config")
    if not isinstance(config, dict):
        raise CheckpointReadError(f"{config_path}: adapter config is not a JSON object")
    return config
