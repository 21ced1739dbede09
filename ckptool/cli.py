"""Thin click commands: parse -> call the API -> render -> exit code. Only this imports click.

Heavy modules (rich via ckptool.report, torch via models) are imported inside the
commands so that ``ckptool --help`` starts in well under a second.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from ckptool import activity, jsontext
from ckptool._version import __version__
from ckptool.choices import (
    CastDtype,
    MismatchPolicy,
    Optimizer,
    OutputFormat,
    Strategy,
    values,
)
from ckptool.errors import (
    CheckpointReadError,
    CkptError,
    OutputError,
    UnsafeCheckpointError,
    UsageError,
    command_line_voice,
    shell_word,
)
from ckptool.threads import configure_threads, prefer_sleeping_workers

if TYPE_CHECKING:
    from ckptool.training.results import TrainOptions, WeightOptions

# Exit codes, SPEC.md: 0 ok, 1 check failed, 2 usage, 3 unreadable input, 4 unsafe, 5 output.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREADABLE, EXIT_UNSAFE, EXIT_OUTPUT = range(6)
EXIT_INTERRUPTED = 130
_EXIT_CODES: tuple[tuple[type[CkptError], int], ...] = (
    (UnsafeCheckpointError, EXIT_UNSAFE),
    (CheckpointReadError, EXIT_UNREADABLE),
    (OutputError, EXIT_OUTPUT),
    (UsageError, EXIT_USAGE),
    (CkptError, EXIT_FAILED),
)

F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str, code: int, *, as_json: bool = False) -> NoReturn:
    """One line on stderr and the exit code; with --json also the documented error
    document on stdout, so a script parsing stdout never meets an empty one."""
    # Imported here: the formats package is not needed for --help.
    from ckptool.formats.bounded import visible

    line = visible(message, one_line=True)
    if as_json:
        click.echo(json.dumps({"error": line, "exit_code": code}))
    click.echo(f"ckptool: error: {line}", err=True)
    sys.exit(code)


def _interrupted_message() -> str:
    from ckptool.formats.write import committed_outputs

    done = committed_outputs()
    if done:
        return f"interrupted after {done[-1]} was written and verified; it is complete"
    return "interrupted; nothing was written"


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM (kill, a scheduler's timeout) gets the same cleanup as Ctrl-C.
    raise KeyboardInterrupt


def exit_code_for(error: CkptError) -> int:
    return next(code for kind, code in _EXIT_CODES if isinstance(error, kind))


def handle_errors(command: F) -> F:
    """Turn expected failures into one line on stderr and the documented exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("as_json"))
        try:
            with command_line_voice():
                return command(*args, **kwargs)
        except CkptError as e:
            _fail(str(e).splitlines()[0], exit_code_for(e), as_json=as_json)
        except MemoryError:
            _fail("out of memory while reading the input", EXIT_UNREADABLE, as_json=as_json)
        except KeyboardInterrupt:
            _fail(_interrupted_message(), EXIT_INTERRUPTED, as_json=as_json)

    return wrapper  # type: ignore[return-value]


def _with_options(command: F, options: Sequence[Callable[[Any], Any]]) -> F:
    """Apply a group of click options so they show in --help in the listed order."""
    for option in reversed(options):
        command = option(command)
    return command


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
    return _with_options(command, options)


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
    return _with_options(command, options)


def freeze_options(command: F) -> F:
    """What trains: --strategy, --freeze-until, --train, --freeze (check and finetune)."""
    options = [
        click.option(
            "--strategy",
            type=click.Choice(values(Strategy)),
            help="Transfer-learning scenario (default: linear, only the head trains).",
        ),
        click.option(
            "--freeze-until",
            metavar="STAGE",
            help="With --strategy partial: the last frozen stage.",
        ),
        click.option(
            "--train", multiple=True, metavar="P", help="Only parameters under P (or glob) train."
        ),
        click.option(
            "--freeze",
            "freeze_names",
            multiple=True,
            metavar="P",
            help="Freeze parameters under P (or glob).",
        ),
    ]
    return _with_options(command, options)


def _emit_json(document: dict[str, Any]) -> None:
    # Indented for a person at a terminal; compact for a program, which for a 100k-tensor
    # checkpoint is 10x faster (only the compact form has json's C encoder).
    indent = 2 if sys.stdout.isatty() else None
    click.echo(jsontext.dumps(document, indent=indent))


def _show(
    result: Any,
    as_json: bool,
    to_json: Callable[[Any], dict[str, Any]],
    render: Callable[[Any, Any], None],
    console: Any = None,
) -> None:
    """One JSON document on stdout, or the human rendering (on ``console`` if given)."""
    if as_json:
        _emit_json(to_json(result))
        return
    from ckptool.report import make_console

    render(result, console or make_console())


# click 8.2 signals "no arguments: show the help" as a usage error of its own.
_NO_ARGS_IS_HELP: type[click.UsageError] = getattr(
    click.exceptions, "NoArgsIsHelpError", type("_Never", (click.UsageError,), {})
)


class _OneLineErrors(click.Group):
    """click's own usage errors (an unknown option, a bad choice) in ckptool's voice:
    one line and exit 2 instead of click's three lines, and the --json error document."""

    def main(self, args: Sequence[str] | None = None, *posargs: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        argv = list(args) if args is not None else sys.argv[1:]
        try:
            return super().main(argv, *posargs, **kwargs)
        except _NO_ARGS_IS_HELP as e:  # a bare `ckptool`: the help, as click shows it
            click.echo(e.format_message())
            sys.exit(e.exit_code)
        except click.UsageError as e:
            where = e.ctx.info_name if e.ctx is not None and e.ctx.parent is not None else ""
            hint = f" (ckptool {where} --help lists the options)" if where else ""
            _fail(e.format_message() + hint, EXIT_USAGE, as_json="--json" in argv)
        except click.Abort:
            _fail("aborted; nothing was written", EXIT_INTERRUPTED, as_json="--json" in argv)


@click.group(
    cls=_OneLineErrors,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=(
        "Exit codes: 0 ok or compatible, 1 a check ran and failed (incompatible, guard "
        "violation), 2 usage, 3 input unreadable or unsupported, 4 input refused as "
        "unsafe, 5 output problem, 130 interrupted (nothing written). With --json a "
        'failure also prints {"error": ..., "exit_code": N} on stdout. finetune '
        "runs under torchrun too (torchrun --standalone --nproc_per_node N --no-python "
        "ckptool finetune ...; "
        "rank 0 writes)."
    ),
)
@click.version_option(__version__, prog_name="ckptool")
def cli() -> None:
    """Inspect, diff, adapt and fine-tune PyTorch checkpoints; no pickle is ever executed."""


@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--key", metavar="PATH", help="Dotted path of the tensor dict (e.g. model.ema).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@handle_errors
def inspect(checkpoint: str, key: str | None, as_json: bool) -> None:
    """What is in CHECKPOINT: format, containers, tensors by module; headers only."""
    from ckptool.formats import read_metadata
    from ckptool.report import inspect_json, render_inspect

    meta = read_metadata(checkpoint, key=key)
    if as_json:  # without the entries: a 100k-tensor checkpoint's take 30 MB
        document = inspect_json(meta)
        del meta
        _emit_json(document)
        return
    _show(meta, as_json, inspect_json, render_inspect)


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
        source,
        target,
        model=model,
        model_args=model_args,
        num_classes=num_classes,
        head=head,
        key=key,
        target_key=target_key,
        transforms=transforms,
        values=values,
    )
    if as_json:
        _emit_json(diff_json(result))
    else:
        console = make_console()
        render_diff(result, console)
        fix = result.keys.fix
        if fix is not None and model is not None and not result.compatible and not fix.keeps_little:
            target_flags = _model_flags(model, model_args, num_classes, head)
            console.print("  fix: " + fix_command(fix, source, target_flags), markup=False)
    sys.exit(EXIT_OK if result.compatible else EXIT_FAILED)


def _model_flags(
    model: str, model_args: tuple[str, ...], num_classes: int | None, head: str | None
) -> list[str]:
    flags = [f"--model {shell_word(model)}", *(f"--model-arg {shell_word(a)}" for a in model_args)]
    flags += [f"--num-classes {num_classes}"] if num_classes is not None else []
    flags += [f"--head {shell_word(head)}"] if head else []
    return flags


threads_option = click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="torch threads (default: the CPUs this process may use, by affinity and cgroup quota).",
)


@cli.command()
@click.argument("checkpoint", type=click.Path())
@model_options
@transform_options
@freeze_options
@threads_option
@click.option(
    "--input-shape",
    metavar="C,H,W",
    help="Sample shape for the synthetic batch (default: inferred).",
)
@click.option("--key", metavar="PATH", help="Tensor dict inside CHECKPOINT.")
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the synthetic batch and the training step.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@handle_errors
def check(
    checkpoint: str,
    model: str | None,
    input_shape: str | None,
    as_json: bool,
    threads: int | None,
    **options: Any,
) -> None:
    """Pre-training sanity check: strict load, finite values, one guarded training step.

    Exit 0 only if the checkpoint loads strictly (after the transform flags), every
    floating tensor is finite, frozen tensors stay bit-identical through one optimizer
    step on a synthetic batch, and every trainable parameter moves.
    """
    from ckptool.keys import Transforms
    from ckptool.report import check_json, render_check
    from ckptool.sanity import check as run_check

    if model is None:
        raise UsageError("check needs --model SPEC, e.g. --model torchvision:resnet18")
    configure_threads(threads)
    transforms = Transforms.from_flags(**{k: options.pop(k) for k in _TRANSFORM_FLAGS})
    train, freeze_names = options.pop("train") or None, options.pop("freeze_names") or None
    shape = _parse_shape(input_shape) if input_shape else None
    result = run_check(
        checkpoint,
        model=model,
        transforms=transforms,
        train=train,
        freeze_names=freeze_names,
        input_shape=shape,
        **options,
    )
    _show(result, as_json, check_json, render_check)
    sys.exit(EXIT_OK if result.ok else EXIT_FAILED)


def _parse_shape(text: str) -> tuple[int, ...]:
    parts = text.replace("x", ",").split(",")
    if not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise UsageError(f"--input-shape {text!r} must be positive integers like 3,224,224")
    return tuple(int(p) for p in parts)


@cli.command()
@model_options
@click.option(
    "--data",
    required=True,
    metavar="DIR|LIST",
    help="Image folder (one sub-folder per class) or list file.",
)
@click.option(
    "-o",
    "--output",
    "out_dir",
    required=True,
    metavar="OUTDIR",
    help="Where model.safetensors and report.json go.",
)
@click.option(
    "--weights", metavar="CKPT", help="Starting weights, adapted with the transform flags."
)
@transform_options
@click.option("--auto", is_flag=True, help="Apply the whole suggested fix to --weights.")
@click.option(
    "--on-mismatch",
    type=click.Choice(values(MismatchPolicy)),
    default=MismatchPolicy.ERROR.value,
    show_default=True,
    help="Shape mismatches left after the transforms: fail, or train those from scratch.",
)
@click.option("--key", metavar="PATH", help="Tensor dict inside --weights.")
@freeze_options
@click.option(
    "--epochs", type=int, default=5, show_default=True, help="Passes over the training images."
)
@click.option(
    "--batch-size", type=int, default=32, show_default=True, help="Images per optimizer step."
)
@click.option("--lr", type=float, default=0.01, show_default=True, help="Learning rate.")
@click.option(
    "--optimizer",
    type=click.Choice(values(Optimizer)),
    default=Optimizer.SGD.value,
    show_default=True,
    help="sgd (with --momentum) or adamw.",
)
@click.option("--momentum", type=float, default=0.9, show_default=True, help="SGD momentum.")
@click.option(
    "--weight-decay",
    type=float,
    default=1e-4,
    show_default=True,
    help="Weight decay (never applied to frozen tensors).",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--amp", is_flag=True, help="Mixed precision (bf16 on CPU, fp16 on CUDA).")
@click.option("--val-split", type=float, default=0.4, show_default=True, help="Seeded, stratified.")
@click.option("--val-data", metavar="DIR|LIST", help="Validation data instead of a split.")
@click.option(
    "--image-size",
    type=int,
    default=224,
    show_default=True,
    help="Images are resized to this square side.",
)
@click.option(
    "--no-augment", is_flag=True, help="No flips or crop jitter (lets linear cache features)."
)
@click.option(
    "--no-feature-cache",
    is_flag=True,
    help="With linear and --no-augment: run the backbone every epoch.",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the split, the shuffling and the new head.",
)
@click.option(
    "--workers", type=int, default=0, show_default=True, help="DataLoader worker processes."
)
@click.option("--force", is_flag=True, help="Replace the outputs of an earlier run in OUTDIR.")
@threads_option
@click.option("--json", "as_json", is_flag=True, help="Print report.json's document.")
@handle_errors
def finetune(
    model: str | None, data: str, out_dir: str, as_json: bool, threads: int | None, **o: Any
) -> None:
    """Transfer learning in one command: adapt weights, replace the head, freeze, train.

    After every optimizer step the frozen parameters and buffers are checked bit for
    bit; a change stops the run with exit 1 and nothing is written.
    """
    from ckptool.finetune import finetune as run_finetune
    from ckptool.finetune import result_json
    from ckptool.report import EpochProgress, make_console, render_finetune

    if model is None:
        raise UsageError("finetune needs --model SPEC, e.g. --model torchvision:resnet18")
    configure_threads(threads)
    weights, options = _finetune_options(o)
    console = make_console(stderr=as_json)
    from ckptool.errors import FrozenParameterError
    from ckptool.report import guard_lines

    # Progress goes to stderr on a terminal, never with --json; the report to stdout.
    progress = EpochProgress(None if as_json else make_console(stderr=True))
    try:
        result = run_finetune(
            model,
            data,
            out_dir,
            model_args=o.pop("model_args"),
            num_classes=o.pop("num_classes"),
            head=o.pop("head"),
            weights=weights,
            strategy=o.pop("strategy"),
            train=o.pop("train") or None,
            freeze_names=o.pop("freeze_names") or None,
            freeze_until=o.pop("freeze_until"),
            options=options,
            val_data=o.pop("val_data"),
            force=o.pop("force"),
            progress=progress,
        )
    except FrozenParameterError as e:
        progress.close()
        if int(os.environ.get("RANK", "0")) == 0:  # the guard's report, then the error line
            errors = make_console(stderr=True)
            for line in guard_lines(e.report):
                errors.print(line, markup=False)
        raise
    finally:
        progress.close()
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, rank 0 speaks for all ranks
    _show(result, as_json, result_json, render_finetune, console)


def _finetune_options(o: dict[str, Any]) -> tuple[WeightOptions, TrainOptions]:
    """finetune's WeightOptions and TrainOptions, taken out of its keyword arguments."""
    from ckptool.finetune import TrainOptions, WeightOptions
    from ckptool.keys import Transforms

    transforms = Transforms.from_flags(**{k: o.pop(k) for k in _TRANSFORM_FLAGS})
    weights = WeightOptions(
        o.pop("weights"), o.pop("key"), transforms, o.pop("auto"), o.pop("on_mismatch")
    )
    options = TrainOptions(
        epochs=o.pop("epochs"),
        batch_size=o.pop("batch_size"),
        lr=o.pop("lr"),
        optimizer=o.pop("optimizer"),
        momentum=o.pop("momentum"),
        weight_decay=o.pop("weight_decay"),
        device=o.pop("device"),
        amp=o.pop("amp"),
        image_size=o.pop("image_size"),
        augment=not o.pop("no_augment"),
        seed=o.pop("seed"),
        workers=o.pop("workers"),
        val_split=o.pop("val_split"),
        cache_features=not o.pop("no_feature_cache"),
    )
    return weights, options


@cli.command()
@click.argument("folder", required=False, type=click.Path(), default="ckptool-demo")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the training run.")
@threads_option
@handle_errors
def demo(folder: str, seed: int, threads: int | None) -> None:
    """The whole workflow on data shipped with ckptool, on CPU, in about a minute.

    A small CNN pretrained on handwritten digits 0-5 (a DataParallel checkpoint with a
    6-class head) is inspected, diffed, adapted and fine-tuned on digits 6-9 from ten
    images per class, with the freeze guard on; then compared with training from
    scratch. Every step prints the command that does the same on your own files.
    """
    import time

    from ckptool.demo.workflow import Comparison, run
    from ckptool.report import make_console, render_demo_step

    configure_threads(threads)
    console = make_console()
    start = time.perf_counter()
    for number, step in enumerate(run(folder, seed=seed), start=1):
        render_demo_step(number, step.title, step.command, step.result, console)
        if isinstance(step.result, Comparison):
            console.print(
                f"demo finished in {time.perf_counter() - start:.0f} s; files in {folder}/",
                markup=False,
            )


DTYPES = click.Choice(values(CastDtype))


def output_options(command: F) -> F:
    """-o/--output, --format, --dtype, --keep-dtype, --force, --dry-run, --json."""
    options = [
        click.option("-o", "--output", "out", metavar="OUT", help="The file to write."),
        click.option(
            "--format",
            "fmt",
            type=click.Choice(values(OutputFormat)),
            help="Output format (default: from OUT's suffix).",
        ),
        click.option("--dtype", type=DTYPES, help="Cast floating tensors to this dtype."),
        click.option(
            "--keep-dtype",
            "keep_dtype",
            multiple=True,
            metavar="GLOB",
            help="With --dtype: tensors whose name matches keep their dtype ('*norm*').",
        ),
        click.option("--force", is_flag=True, help="Replace OUT if it exists."),
        click.option(
            "--dry-run", is_flag=True, help="Report what would be written; write nothing."
        ),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON document."),
    ]
    return _with_options(command, options)


@contextlib.contextmanager
def _progress_on_stderr(as_json: bool) -> Iterator[None]:
    """A progress bar on stderr while the work runs, when stderr is a terminal and the
    output is not --json: piped or scripted runs print only their result."""
    from ckptool.report import ActivityBar, make_console

    console = make_console(stderr=True)
    if as_json or not console.is_terminal:
        yield
        return
    with ActivityBar(console) as bar, activity.reporting(bar):
        yield


def _require_output(out: str | None, dry_run: bool) -> None:
    if out is None and not dry_run:
        raise UsageError("-o OUT is required (or --dry-run to only report)")


def _emit_surgery(log: Any, as_json: bool) -> None:
    from ckptool.report import render_surgery, surgery_json

    _show(log, as_json, surgery_json, render_surgery)


@cli.command()
@click.argument("source", type=click.Path())
@model_options
@transform_options
@click.option(
    "--on-mismatch",
    type=click.Choice(values(MismatchPolicy)),
    default=MismatchPolicy.ERROR.value,
    show_default=True,
    help="Shape mismatches left after the transforms: fail, or fill from the model's init.",
)
@click.option(
    "--auto", is_flag=True, help="Apply the whole fix diff suggests (refused when ambiguous)."
)
@click.option(
    "--strict", is_flag=True, help="Refuse missing/unexpected keys no --drop/--reinit names."
)
@click.option("--key", metavar="PATH", help="Tensor dict inside SOURCE.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for filled tensors.")
@click.option(
    "--allow-mostly-init",
    is_flag=True,
    help="Write even if less than half of the model's values come from the checkpoint.",
)
@click.option(
    "--remap",
    is_flag=True,
    help="Match names by structure (modules in order, same shapes): another implementation.",
)
@output_options
@handle_errors
def adapt(source: str, model: str | None, **options: Any) -> None:
    """Write a checkpoint that loads with strict=True into --model SPEC.

    Missing keys are filled from the model's initialisation, unexpected keys are left
    out; both are listed. The file is written atomically and verified by reading it back.
    """
    from ckptool.keys import Transforms
    from ckptool.surgery import adapt as run_adapt

    if model is None:
        raise UsageError("adapt needs --model SPEC, e.g. --model torchvision:resnet18")
    _require_output(options["out"], options["dry_run"])
    transforms = Transforms.from_flags(**{k: options.pop(k) for k in _TRANSFORM_FLAGS})
    as_json = options.pop("as_json")
    with _progress_on_stderr(as_json):
        log = run_adapt(source, model=model, transforms=transforms, **options)
    _emit_surgery(log, as_json)


_TRANSFORM_FLAGS = ("strip", "add_prefix", "rename", "drop", "reinit")


@cli.command()
@click.argument("source", type=click.Path())
@click.option(
    "--shard-size", metavar="SIZE", help="Write Hugging Face shards of at most SIZE (e.g. 2GB)."
)
@click.option("--key", metavar="PATH", help="Tensor dict inside SOURCE.")
@output_options
@handle_errors
def convert(source: str, shard_size: str | None, **options: Any) -> None:
    """Rewrite SOURCE as safetensors or a torch file (sharded with --shard-size)."""
    from ckptool.surgery import convert as run_convert

    _require_output(options["out"], options["dry_run"])
    as_json = options.pop("as_json")
    out = options.pop("out") or ""
    size = parse_size(shard_size) if shard_size else None
    with _progress_on_stderr(as_json):
        log = run_convert(source, out, shard_size=size, **options)
    _emit_surgery(log, as_json)


@cli.command()
@click.argument("base", type=click.Path())
@click.argument("others", nargs=-1, required=True, type=click.Path())
@click.option(
    "--take", multiple=True, metavar="PREFIX=N", help="Keys under PREFIX from input N (BASE is 0)."
)
@click.option("--average", is_flag=True, help="Average same-named tensors of all inputs.")
@output_options
@handle_errors
def merge(base: str, others: tuple[str, ...], take: tuple[str, ...], **options: Any) -> None:
    """Combine BASE with OTHER checkpoints: --take parts of them, or --average all."""
    from ckptool.surgery import merge as run_merge

    _require_output(options["out"], options["dry_run"])
    as_json = options.pop("as_json")
    out = options.pop("out") or ""
    rules = [_parse_take(item) for item in take]
    with _progress_on_stderr(as_json):
        log = run_merge([base, *others], out, take=rules, **options)
    _emit_surgery(log, as_json)


@cli.command("merge-lora")
@click.argument("base", type=click.Path())
@click.argument("adapter", type=click.Path())
@output_options
@handle_errors
def merge_lora(base: str, adapter: str, **options: Any) -> None:
    """Merge a PEFT LoRA adapter (file or folder with adapter_config.json) into BASE.

    Streamed: one tensor at a time; the result equals peft's merge_and_unload().
    """
    from ckptool.lora import merge_lora as run_merge_lora

    _require_output(options["out"], options["dry_run"])
    if options.pop("keep_dtype"):
        raise UsageError("--keep-dtype is not supported by merge-lora")
    as_json = options.pop("as_json")
    out = options.pop("out") or ""
    with _progress_on_stderr(as_json):
        log = run_merge_lora(base, adapter, out, **options)
    _emit_surgery(log, as_json)


def _parse_take(item: str) -> tuple[str, int]:
    prefix, sep, index = item.rpartition("=")
    if not sep or not prefix or not index.isdigit():
        raise UsageError(f"--take {item!r} must be PREFIX=N, e.g. fc.=1")
    return prefix, int(index)


_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000, '500MiB' -> 524_288_000 (the Hugging Face convention: GB = 10^9)."""
    number = text.rstrip("BbKkMmGgTtIi ")
    unit = text[len(number) :].strip().upper()
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _SIZE_UNITS or value <= 0:
        raise UsageError(f"--shard-size {text!r}: expected a size such as 2GB, 500MB or 1GiB")
    return int(value * _SIZE_UNITS[unit])


def _whole_summaries() -> None:
    """The top-level --help lists each command by its whole first sentence: click would
    cut it to fit one line ("..."), hiding what the command is for."""
    for command in cli.commands.values():
        if command.help and not command.short_help:
            command.short_help = command.help.strip().split("\n\n")[0].replace("\n", " ")


_whole_summaries()


def main() -> None:
    """Console-script entry point."""
    try:
        _main()
    except SystemExit as done:
        _finish(done.code)
        raise
    _finish(0)


def _finish(code: object) -> None:
    if _teardown_is_slow():
        _exit_now(code)


def _teardown_is_slow() -> bool:
    """Whether to skip the interpreter's teardown: with torch loaded it frees every
    module and runs its libraries' destructors, 0.5 s here after every command that
    needed torch (adapt, check, finetune...). Not while another thread runs: teardown
    waits for it, a hard exit would cut it off. Daemon threads (tqdm's monitor) count
    for neither: teardown does not wait for them."""
    others = [t for t in threading.enumerate() if t is not threading.main_thread()]
    return "torch" in sys.modules and all(t.daemon for t in others)


def _exit_now(code: object) -> NoReturn:
    """Exit as ``sys.exit(code)`` would, without the interpreter's teardown: exit
    handlers run first (logging, DataLoader workers, temporary folders) and output is
    flushed, then the process ends. mypy's command line exits the same way."""
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)  # as sys.exit("message") does
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe, a closed file
            stream.flush()
    os._exit(code or 0)


def _main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    prefer_sleeping_workers()  # before anything imports torch
    # A 100,000-tensor header makes a few hundred thousand small objects, none in a
    # cycle: at the default threshold (700) the cycle collector runs hundreds of times
    # over them and took 40% of `inspect`. mypy's command line does the same.
    gc.set_threshold(200_000, 30, 30)
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
