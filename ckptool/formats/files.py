"""Input files: checks before one is opened and on the JSON read from it; tensors
assembled from byte ranges of several files."""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import stat
from collections.abc import Callable, Iterator
from typing import Any

from ckptool.errors import CheckpointReadError
from ckptool.formats.meta import Assembly


def require_regular_file(path: str) -> int:
    """Return the size of ``path`` if it is a regular file (after symlinks); refuse otherwise.

    Opening a FIFO for reading blocks until a writer appears, and a device can be
    endless, so anything but a regular file is refused without being opened.

    Raises:
        CheckpointReadError: missing, a symlink loop, unreadable, or not a regular file.
    """
    try:
        info = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CheckpointReadError(f"{path}: symlink loop") from e
        if e.errno == errno.ENOENT:
            raise CheckpointReadError(f"{path}: no such file") from e
        raise CheckpointReadError(f"{path}: cannot read ({e.strerror or e})") from e
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "a FIFO, device or socket"
        raise CheckpointReadError(f"{path}: is {kind}, not a regular file; not read")
    return info.st_size


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Turn the cyclic garbage collector off for a read; afterwards it is as it was.

    A 100,000-tensor header makes a million objects (JSON dicts, lists, entries) and no
    reference cycles, yet each collection on the way walks the young ones: 0.05-0.1 s
    of a 0.4 s read, more for the second file of a diff. Cycles made meanwhile (an
    exception's traceback) are collected when it is back on."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def parse_json(
    text: str | bytes,
    *,
    path: str,
    what: str,
    pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
) -> Any:
    """``json.loads`` that answers deep nesting with a CheckpointReadError.

    Raises:
        CheckpointReadError: not UTF-8, not JSON, nested deeper than Python recurses, or
            holding a number too long for ``int``.
    """
    try:
        return json.loads(text, object_pairs_hook=pairs_hook)
    except RecursionError as e:
        raise CheckpointReadError(f"{path}: {what} nests too deeply (nesting budget)") from e
    except UnicodeDecodeError as e:
        raise CheckpointReadError(f"{path}: {what} is not valid UTF-8") from e
    except json.JSONDecodeError as e:
        raise CheckpointReadError(f"{path}: {what} is not valid JSON ({e.msg})") from e
    except ValueError as e:  # a number of more digits than Python converts
        reason = str(e).split(":")[0]
        raise CheckpointReadError(f"{path}: {what} is not readable JSON ({reason})") from e


def read_assembly(assembly: Assembly, name: str) -> bytearray:
    """The stored bytes of one consolidated tensor, read piece by piece."""
    data = bytearray(sum(p.length for p in assembly.pieces))
    view = memoryview(data)
    position = 0
    for piece in assembly.pieces:
        with open(piece.file, "rb") as f:
            f.seek(piece.offset)
            got = f.readinto(view[position : position + piece.length])
        if got != piece.length:
            raise CheckpointReadError(f"{piece.file}: cut short inside {name!r}")
        position += piece.length
    return data
