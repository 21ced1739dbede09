"""A second reader of safetensors headers: the compact JSON their writers emit.

safetensors' own writer (and ckptool's) emits one shape of header: no whitespace, the
``__metadata__`` object first if there is one, then each tensor as
``"name":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}``, padded with spaces.
``json.loads`` of a 100,000-tensor header builds 100,000 dicts and 200,000 lists that
are thrown away at once; this reads the same header with one regex match per tensor,
as columns.

It decides nothing: it returns the columns ``json.loads`` would give, or None for any
header outside that shape (whitespace, another key order, an escape in a tensor name, a
repeated name, a number over 19 digits, a tensor named ``__metadata__``), and the
general reader then parses, checks and names the fault. The columns still go through
every check the general reader makes on an entry (dtype, counts, spans, tiling).
``scripts/compare_header_reader.py`` holds the two readers to the same answers on
mutated headers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

from ckptool.formats.bounded import lone_surrogate

METADATA_KEY = "__metadata__"


class HeaderColumns(NamedTuple):
    """A header's entries column by column, in header order, not yet checked (either
    reader's; ``safetensors_header`` checks them)."""

    names: Sequence[str]
    codes: Sequence[str]  # safetensors dtype codes
    shapes: Sequence[Sequence[int]]
    begins: list[int]  # data offsets, counts already
    ends: list[int]


class CompactHeader(NamedTuple):
    metadata: dict[str, str] | None  # ``__metadata__``, None if the header has none
    columns: HeaderColumns


def read_compact_header(text: str) -> CompactHeader | None:
    """The header ``text`` as columns, or None where it is not compact (see the module)."""
    body = text.rstrip(" ")  # safetensors pads the header to 8 bytes with spaces
    if not body.startswith("{"):
        return None
    opening = _opening_metadata(body)
    if opening is None:
        return None
    metadata, start = opening
    # split gives the text between matches (gaps) and each match's six groups in turn,
    # all in C: the matches cover the entries exactly when the first gap is the opening
    # and every other gap is empty (nothing between, before or after them went unread);
    # with no match at all, the one gap is the whole text.
    parts = _ENTRY.split(body)
    gaps = parts[:: _ENTRY.groups + 1]
    names, codes, dims, begins, ends, separators = (
        parts[group :: _ENTRY.groups + 1] for group in range(1, _ENTRY.groups + 1)
    )
    del parts
    if gaps[0] != body[:start] or any(gaps[1:]):
        return None
    # Each entry but the last is followed by a comma; the last by the object's brace.
    if separators.count("}") != 1 or separators[-1] != "}":
        return None
    # json keeps the last of repeated keys; the general reader names the repeat.
    if len(set(names)) != len(names) or METADATA_KEY in names:
        return None
    # One string per dtype, not one per tensor (5 MiB at 100,000 tensors).
    code_of = {code: code for code in set(codes)}
    columns = HeaderColumns(
        names=names,
        codes=tuple(map(code_of.__getitem__, codes)),
        shapes=_shapes(dims),
        begins=list(map(int, begins)),
        ends=list(map(int, ends)),
    )
    return CompactHeader(metadata, columns)


def _opening_metadata(body: str) -> tuple[dict[str, str] | None, int] | None:
    """The ``__metadata__`` that opens the header (None if it has none) and where the
    entries start; None where json would not read the metadata alike."""
    found = _METADATA.match(body)
    if found is None:
        return None, 1
    try:
        metadata = json.loads(found[1], object_pairs_hook=refuse_duplicate_keys)
    except (ValueError, DuplicateKeyError):  # the general reader names either
        return None
    if lone_surrogate([*metadata, *metadata.values()]) is not None:  # refused in general
        return None
    return metadata, found.end()


class DuplicateKeyError(Exception):  # not a ValueError, which parse_json answers
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A ``json.loads`` object hook: the object, or DuplicateKeyError naming a key it
    repeats (json keeps the last silently)."""
    result = dict(pairs)  # called for every object: the common case stays in C
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKeyError(key)
            seen.add(key)
    return result


def _shapes(dims: Sequence[str]) -> list[tuple[int, ...]]:
    """Shapes from their text; layers repeat shapes, so each text is parsed once and
    equal shapes are one tuple."""
    parsed: dict[str, tuple[int, ...]] = {}
    for text in set(dims):
        parsed[text] = tuple(map(int, text.split(","))) if text else ()
    return list(map(parsed.__getitem__, dims))


# A JSON string with no escape and no control character: its text is its value.
_PLAIN_STRING = r'"([^"\\\x00-\x1f]*)"'
# A count as JSON writes it: no sign, no leading zero; 19 digits hold any int64.
_COUNT = r"(?:0|[1-9][0-9]{0,18})"
_ENTRY = re.compile(
    _PLAIN_STRING + r':\{"dtype":"([A-Z0-9_]+)","shape":\['
    rf"((?:{_COUNT}(?:,{_COUNT})*)?)"
    rf'\],"data_offsets":\[({_COUNT}),({_COUNT})\]\}}([,}}])'
)
# Any JSON string (json.loads decides whether its escapes are valid).
_STRING = r'"(?:[^"\\\x00-\x1f]|\\.)*"'
_METADATA = re.compile(
    rf'\{{"{METADATA_KEY}":(\{{(?:{_STRING}:{_STRING}(?:,{_STRING}:{_STRING})*)?\}}),'
)
