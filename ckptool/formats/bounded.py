"""Values from untrusted files: checked, and described in bounded time and length."""

from __future__ import annotations

import reprlib
from collections.abc import Sequence
from typing import Any, TypeGuard

# repr() of a crafted object (a tuple that shares itself at every level) can take
# exponential time; reprlib stops at a few levels and a few items per level.
_REPR = reprlib.Repr()
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


def visible(text: str, *, one_line: bool = False) -> str:
    """``text`` with control characters written as ``\\xNN`` (newlines too if ``one_line``)."""
    text = text.translate(_CONTROLS)
    return text.replace("\n", "\\x0a") if one_line else text
