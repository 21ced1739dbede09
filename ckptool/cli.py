"""Thin click commands: parse -> call the API -> render -> exit code. Only this imports click.

Heavy modules (rich via ckptool.report, torch via models) are imported inside the
commands so that ``ckptool --help`` starts in well under a second.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from ckptool._version import __version__
from ckptool.errors import (
    CheckpointReadError,
    CkptError,
    OutputError,
    UnsafeCheckpointError,
    UsageError,
)

# Exit codes, SPEC.md: 0 ok, 1 check failed, 2 usage, 3 unreadable input, 4 unsafe, 5 output.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREADABLE, EXIT_UNSAFE, EXIT_OUTPUT = range(6)
_EXIT_CODES: tuple[tuple[type[CkptError], int], ...] = (
    (UnsafeCheckpointError, EXIT_UNSAFE),
    (CheckpointReadError, EXIT_UNREADABLE),
    (OutputError, EXIT_OUTPUT),
    (UsageError, EXIT_USAGE),
    (CkptError, EXIT_FAILED),
)

F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"ckptool: error: {message}", err=True)
    sys.exit(code)


def exit_code_for(error: CkptError) -> int:
    return next(code for kind, code in _EXIT_CODES if isinstance(error, kind))


def handle_errors(command: F) -> F:
    """Turn expected failures into one line on stderr and the documented exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except CkptError as e:
            _fail(str(e).splitlines()[0], exit_code_for(e))
        except MemoryError:
            _fail("out of memory while reading the input", EXIT_UNREADABLE)
        except KeyboardInterrupt:
            _fail("interrupted", 130)

    return wrapper  # type: ignore[return-value]


def transform_options(command: F) -> F:
    """The adapt transform flags, shared by diff, adapt and check."""
    options = [
        click.option(
            "--strip",
            multiple=True,
            metavar="P",
            help="Remove prefix P from every key (all-or-nothing).",
        ),
        click.option("--add-prefix", metavar="P", help="Prepend P to every key."),
        click.option("--rename", multiple=True, metavar="REGEX=REPL", help="re.sub on key names."),
        click.option(
            "--drop", multiple=True, metavar="P", help="Remove checkpoint keys under prefix P."
        ),
        click.option(
            "--reinit", multiple=True, metavar="P", help="Take keys under P from the model's init."
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def model_options(command: F) -> F:
    """Model spec flags: --model, --model-arg, --num-classes, --head."""
    options = [
        click.option(
            "--model",
            "model",
            metavar="SPEC",
            help="torchvision:NAME, timm:NAME, pkg.mod:attr or file.py:attr.",
        ),
        click.option(
            "--model-arg",
            "model_args",
            multiple=True,
            metavar="K=V",
            help="Constructor argument (Python literal).",
        ),
        click.option(
            "--num-classes",
            type=click.IntRange(min=1),
            help="Replace the classifier head with N outputs.",
        ),
        click.option(
            "--head",
            metavar="NAME",
            help="The head module to replace (default: the last nn.Linear).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _emit_json(document: dict[str, Any]) -> None:
    click.echo(json.dumps(document, indent=2))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ckptool")
def cli() -> None:
    """Inspect, diff and adapt PyTorch checkpoints, safely: no pickle is ever executed."""


@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--key", metavar="PATH", help="Dotted path of the tensor dict (e.g. model.ema).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@handle_errors
def inspect(checkpoint: str, key: str | None, as_json: bool) -> None:
    """What is in CHECKPOINT: format, containers, tensors by module; headers only."""
    from ckptool.formats import read_metadata
    from ckptool.report import inspect_json, make_console, render_inspect

    meta = read_metadata(checkpoint, key=key)
    if as_json:
        _emit_json(inspect_json(meta))
    else:
        render_inspect(meta, make_console())


@cli.command()
@click.argument("source", type=click.Path())
@click.argument("target", type=click.Path(), required=False)
@model_options
@transform_options
@click.option("--key", metavar="PATH", help="Tensor dict inside SOURCE.")
@click.option("--target-key", metavar="PATH", help="Tensor dict inside TARGET.")
@click.option("--values", is_flag=True, help="Also report which tensors changed (two checkpoints).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@handle_errors
def diff(
    source: str,
    target: str | None,
    model: str | None,
    model_args: tuple[str, ...],
    num_classes: int | None,
    head: str | None,
    strip: tuple[str, ...],
    add_prefix: str | None,
    rename: tuple[str, ...],
    drop: tuple[str, ...],
    reinit: tuple[str, ...],
    key: str | None,
    target_key: str | None,
    values: bool,
    as_json: bool,
) -> None:
    """Why SOURCE does not fit TARGET (a checkpoint) or --model SPEC, and the fix.

    Exit 0 when, after the given transforms, nothing is unexpected or mismatched and
    every missing key lies under a --drop or --reinit prefix; exit 1 otherwise.
    """
    from ckptool.compare import diff_checkpoint
    from ckptool.keys import Transforms
    from ckptool.report import diff_json, fix_command, make_console, render_diff

    transforms = Transforms.from_flags(
        strip=strip, add_prefix=add_prefix, rename=rename, drop=drop, reinit=reinit
    )
    result = diff_checkpoint(
        source, target, model=model, model_args=model_args, num_classes=num_classes,
        head=head, key=key, target_key=target_key, transforms=transforms, values=values,
    )  # fmt: skip
    if as_json:
        _emit_json(diff_json(result))
    else:
        console = make_console()
        render_diff(result, console)
        if result.keys.fix is not None and model is not None:
            target_flags = _model_flags(model, model_args, num_classes, head)
            console.print(
                "  fix: " + fix_command(result.keys.fix, source, target_flags), markup=False
            )
    sys.exit(EXIT_OK if result.compatible else EXIT_FAILED)


def _model_flags(
    model: str, model_args: tuple[str, ...], num_classes: int | None, head: str | None
) -> list[str]:
    flags = [f"--model {model}", *(f"--model-arg {a}" for a in model_args)]
    flags += [f"--num-classes {num_classes}"] if num_classes is not None else []
    flags += [f"--head {head}"] if head else []
    return flags


def main() -> None:
    """Console-script entry point."""
    if os.environ.get("CKPTOOL_DEBUG"):
        cli()
        return
    try:
        cli()
    except Exception as e:  # a bug, not bad input: still one line, but say how to see more
        _fail(
            f"internal error: {type(e).__name__}: {e} (set CKPTOOL_DEBUG=1 for the traceback)",
            EXIT_FAILED,
        )
