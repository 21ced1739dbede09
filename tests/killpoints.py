"""Run ckptool's CLI with a signal delivered at an exact point of its writes.

    python tests/killpoints.py EVENT SIGNAL -- ckptool-args...

Every file-system step that commits or removes output (``os.replace``, ``os.link``,
``os.unlink``, ``os.rename``) and every chunk of bytes written (``os.pwrite``,
``os.pwritev``, ``os.copy_file_range``) is an event, counted from 1. Just before event
EVENT the process sends itself SIGNAL (KILL, INT or TERM). Walking EVENT over 1, 2, 3,
... visits every point of a write, the rename windows included, without random sleeps.
Exit status 99 says the run finished before EVENT.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

NOT_REACHED = 99
_PATCHED = ("replace", "link", "unlink", "rename", "pwrite", "pwritev", "copy_file_range")


def install(event: int, signum: int) -> None:
    count = 0

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal count
            # Only the command's own steps count (its main thread and its write pipeline's
            # threads, named ckptool-*): not a library's cache file written by a helper
            # thread, so event N is the same write step on every run.
            thread = threading.current_thread()
            if thread is threading.main_thread() or thread.name.startswith("ckptool-"):
                count += 1
                if count == event:
                    os.kill(os.getpid(), signum)
            return original(*args, **kwargs)

        return counted

    for name in _PATCHED:
        setattr(os, name, wrap(getattr(os, name)))


def main() -> None:
    event, signame = int(sys.argv[1]), sys.argv[2]
    args = sys.argv[sys.argv.index("--") + 1 :]
    sys.argv = ["ckptool", *args]
    # Imported first, so that nothing an import does on disk is counted as an event.
    import ckptool.formats.load
    import ckptool.formats.save
    import ckptool.surgery  # noqa: F401
    from ckptool.cli import main as ckptool_main

    # A shell starts background jobs with SIGINT ignored, and Python then leaves it
    # ignored: the signal this harness delivers must reach ckptool's handler anyway.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    install(event, getattr(signal, f"SIG{signame}"))

    try:
        ckptool_main()
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    sys.exit(NOT_REACHED)


if __name__ == "__main__":
    main()
