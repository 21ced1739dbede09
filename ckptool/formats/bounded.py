"""Values from untrusted files: checked, and described in bounded time and length."""

from __future__ import annotations

import itertools
import re
import reprlib
from collections.abc import Sequence
from typing import Any, TypeGuard


class _BoundedRepr(reprlib.Repr):
    """reprlib's limits, for dict subclasses too: reprlib hands an OrderedDict or a
    Counter to the builtin repr, which writes out everything it holds."""

    def repr_instance(self, x: Any, level: int) -> str:
        if isinstance(x, dict):
            return f"{type(x).__name__}({self._first_items(x, level)})"
        return super().repr_instance(x, level)

    def _first_items(self, mapping: dict[Any, Any], level: int) -> str:
        if not mapping:
            return "{}"
        if level <= 0:
            return "{...}"
        # dict.items, not the subclass's: an OrderedDict's iterator hashes every key.
        first = itertools.islice(dict.items(mapping), self.maxdict)
        shown = ", ".join(
            f"{self.repr1(k, level - 1)}: {self.repr1(v, level - 1)}" for k, v in first
        )
        return "{" + shown + (", ..." if len(mapping) > self.maxdict else "") + "}"


# repr() of a crafted object (a tuple that shares itself at every level) can take
# exponential time; reprlib stops at a few levels and a few items per level.
_REPR = _BoundedRepr()
_REPR.maxlevel = 3
_REPR.maxother = _REPR.maxstring = 40


def short_repr(value: Any, limit: int = 60) -> str:
    """A repr of ``value`` of at most ``limit`` characters, computed in bounded time."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def listed(items: Sequence[str], limit: int, *, sep: str = ", ", more: str = " and {} more") -> str:
    """The first ``limit`` items joined, then how many were left out (``more`` formats
    the count): every "a, b and 3 more" in ckptool's messages."""
    shown = sep.join(items[:limit])
    return shown + (more.format(len(items) - limit) if len(items) > limit else "")


def short_str(value: Any, limit: int = 200) -> str:
    """``value`` itself if it is a string (cut to ``limit``), else its short repr."""
    return value[:limit] if isinstance(value, str) else short_repr(value, limit)


def is_count(value: Any) -> TypeGuard[int]:
    """A size, stride, offset or element count: a non-negative int that fits torch's int64."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


# C0 controls but tab and newline, DEL and C1: an ESC in a tensor name must not reach the
# terminal as an escape sequence (it could retitle the window or hide lines).
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if c not in (9, 10)}
# A lone surrogate (a pickle's names may hold one: torch loads them) cannot be written to
# a UTF-8 terminal at all: printing it would fail.
_CONTROLS |= {c: f"\\u{c:04x}" for c in range(0xD800, 0xE000)}


def lone_surrogate(strings: Sequence[str]) -> tuple[str, str] | None:
    """The first string holding a lone surrogate, and that surrogate: half a character
    that no UTF-8 text can hold (a JSON ``\\ud800`` escape, a pickle's name)."""
    try:
        "".join(strings).encode("utf-8")  # one pass in C over 100,000 names
    except UnicodeEncodeError:
        return next((s, m[0]) for s in strings if (m := _SURROGATE.search(s)))
    return None


_SURROGATE = re.compile("[\\ud800-\\udfff]")


def visible(text: str, *, one_line: bool = False) -> str:
    """``text`` with control characters written as ``\\xNN`` (newlines too if ``one_line``)
    and lone surrogates as ``\\udNNN``."""
    text = text.translate(_CONTROLS)
    return text.replace("\n", "\\x0a") if one_line else text
