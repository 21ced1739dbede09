"""One error hierarchy for the whole library.

Every error carries a message that names the subject, quotes the value and, where
there is one, gives the fix. Only ``ckptool.cli`` turns these into exit codes.
"""

from __future__ import annotations

import contextlib
import contextvars
import shlex
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ckptool.guard import GuardReport, Violation


# Who reads a message: the command line spells an option `--on-mismatch drop`, the
# Python API `on_mismatch='drop'`. The CLI sets it while a command runs.
_ON_COMMAND_LINE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "ckptool_on_command_line", default=False
)


@contextlib.contextmanager
def command_line_voice() -> Iterator[None]:
    """Within it, messages name options as the command line spells them."""
    token = _ON_COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _ON_COMMAND_LINE.reset(token)


def on_command_line() -> bool:
    """Whether messages are read on the command line (see :func:`command_line_voice`)."""
    return _ON_COMMAND_LINE.get()


def shell_word(value: object, *, quoted: bool = False) -> str:
    """``value`` as one shell word that the shell takes literally: a fix printed from a
    crafted file's names (``x; rm -rf ~ #``) must not run anything when pasted.
    ``quoted`` keeps single quotes even where none is needed (a regex reads better so)."""
    text = str(value)
    if not text.isprintable():
        return _ansi_c_quoted(text)
    if quoted and "'" not in text:
        return f"'{text}'"
    return shlex.quote(text)


def _ansi_c_quoted(text: str) -> str:
    """``$'...'`` with each unprintable character escaped (bash, zsh, ksh): a tab or a
    newline inside plain quotes would be printed, and pasted, as something else."""
    out = []
    for char in text:
        code = ord(char)
        if char in "\\'":
            out.append("\\" + char)
        elif char.isprintable():
            out.append(char)
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "$'" + "".join(out) + "'"


_NO_VALUE = object()
# Parameters whose flag is not their name in dashes: one --model-arg per argument.
_FLAGS = {"model_args": "--model-arg", "fmt": "--format"}


def option(
    name: str, value: object = _NO_VALUE, *, quoted: bool = False, python: str | None = None
) -> str:
    """Option ``name`` (its Python parameter name), with ``value`` if given, in the
    reader's words: ``--num-classes 5`` on the command line (``quoted``: in single
    quotes, as a shell takes a regex), ``num_classes=5`` in Python; ``value=True`` is a
    flag, ``--force`` or ``force=True``. ``python`` spells the value for Python where
    the parameter takes another type than the flag's text (``take=[('fc.', 1)]`` for
    ``--take fc.=1``)."""
    if _ON_COMMAND_LINE.get():
        flag = _FLAGS.get(name) or "--" + name.replace("_", "-")
        if value is _NO_VALUE or value is True:  # True: a flag that takes no value
            return flag
        return f"{flag} {shell_word(value, quoted=quoted)}"
    if python is not None:
        return f"{name}={python}"
    return f"{name}=" if value is _NO_VALUE else f"{name}={value!r}"


class CkptError(Exception):
    """Base class of every error ckptool raises on purpose."""


class UsageError(CkptError):
    """The request itself is wrong: a bad flag value, spec or transform."""


class ModelSpecError(UsageError):
    """A model spec cannot be parsed, imported or built."""


class TransformError(UsageError):
    """A key transform (--strip, --rename, ...) cannot be applied as asked."""


class AmbiguousContainerError(UsageError):
    """A checkpoint holds several tensor dicts and none was picked with --key."""

    def __init__(self, message: str, candidates: Sequence[str]) -> None:
        super().__init__(message)
        self.candidates = tuple(candidates)


class CheckpointReadError(CkptError):
    """The input is unreadable, corrupt or in an unsupported format."""


class DataError(CheckpointReadError):
    """Training data is unreadable: a corrupt image, a list file naming a missing file."""


class UnsafeCheckpointError(CkptError):
    """A pickle references globals outside the tensor allowlist; it was not run."""

    def __init__(self, message: str, globals_wanted: Iterable[str]) -> None:
        super().__init__(message)
        self.globals_wanted = tuple(sorted(set(globals_wanted)))


class IncompatibleError(CkptError):
    """A check ran and failed: the checkpoint cannot be made to fit as asked."""


class IncompatibleCheckpointError(IncompatibleError):
    """``load_into``: the checkpoint does not load strictly into the model; ``.diff`` is
    the :class:`ckptool.keys.KeyDiff` with the missing/unexpected keys and the fix."""

    def __init__(self, message: str, diff: object) -> None:
        super().__init__(message)
        self.diff = diff


class OutputError(CkptError):
    """An output cannot be written: exists, same as an input, disk full, no permission."""


class VerificationError(OutputError):
    """The written file does not hold what was meant to be written (exit 5, like any
    output problem: the input is fine, the output is not)."""


class FrozenParameterError(CkptError):
    """A frozen parameter or buffer changed; ``.violations`` names them, ``.report`` is
    the guard's whole report (:class:`ckptool.guard.GuardReport`)."""

    def __init__(self, message: str, violations: Sequence[Violation], report: GuardReport) -> None:
        super().__init__(message)
        self.violations = tuple(violations)
        self.report = report


class TrainingDivergedError(CkptError):
    """Trainable weights became NaN or infinite: the run stopped, nothing was written."""


def first_line(error: BaseException) -> str:
    """``TypeName: the first line of its message`` (at most 200 characters): a foreign
    exception named in one of ckptool's one-line errors."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {line[:200]}" if line else type(error).__name__
