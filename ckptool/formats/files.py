"""Checks on input files: before one is opened, and on the JSON read from it."""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Callable
from typing import Any

from ckptool.errors import CheckpointReadError


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


def parse_json(
    text: str | bytes,
    *,
    path: str,
    what: str,
    pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
) -> Any:
    """``json.loads`` that answers deep nesting with a CheckpointReadError.

    Raises:
        CheckpointReadError: not UTF-8, not JSON, or nested deeper than Python recurses.
    """
    try:
        return json.loads(text, object_pairs_hook=pairs_hook)
    except RecursionError as e:
        raise CheckpointReadError(f"{path}: {what} nests too deeply (nesting budget)") from e
    except UnicodeDecodeError as e:
        raise CheckpointReadError(f"{path}: {what} is not valid UTF-8") from e
    except json.JSONDecodeError as e:
        raise CheckpointReadError(f"{path}: {what} is not valid JSON ({e.msg})") from e
