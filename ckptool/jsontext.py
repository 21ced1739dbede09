"""JSON as every parser reads it, for ``--json`` output and the files ckptool writes."""

from __future__ import annotations

import json
import math
from typing import Any


def dumps(document: Any, *, indent: int | None = None) -> str:
    """``json.dumps`` that writes standard JSON: a non-finite float (a loss that went
    NaN, a change to or from NaN) becomes null. json's default writes NaN and Infinity,
    which are not JSON: jq, JavaScript and most parsers refuse the whole document."""
    try:
        return json.dumps(document, indent=indent, allow_nan=False)
    except ValueError:  # only a document holding one is walked (100k-tensor ones are big)
        return json.dumps(_finite(document), indent=indent, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value
