"""What long work is doing right now, for whoever shows it (the CLI's progress bar).

Writes report their phases ("build model", "write", "sync") and bytes here instead of
taking a progress argument through every layer (adapt, convert, merge, merge-lora,
sharded saves all end in the same writer). Nothing listens unless a caller opens
:func:`reporting`; the default listener ignores everything, so library calls stay
silent and pay one attribute lookup per event.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Protocol


class Listener(Protocol):
    def phase(self, name: str, total_bytes: int | None = None) -> None:
        """A new phase begins; ``total_bytes`` when it moves a known number of bytes."""

    def advance(self, nbytes: int) -> None:
        """``nbytes`` more of the current phase are done."""


class _Silent:
    def phase(self, name: str, total_bytes: int | None = None) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass


_SILENT = _Silent()
_listener: contextvars.ContextVar[Listener | None] = contextvars.ContextVar(
    "ckptool_activity", default=None
)


def phase(name: str, total_bytes: int | None = None) -> None:
    (_listener.get() or _SILENT).phase(name, total_bytes)


def advance(nbytes: int) -> None:
    (_listener.get() or _SILENT).advance(nbytes)


@contextlib.contextmanager
def reporting(listener: Listener) -> Iterator[None]:
    """Send this context's phases and bytes to ``listener``."""
    token = _listener.set(listener)
    try:
        yield
    finally:
        _listener.reset(token)
