"""Result objects -> JSON documents and rich renderables. The only module importing rich."""

from __future__ import annotations

import itertools
import math
import operator
import os
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.table import Table

from ckptool.errors import option, shell_word
from ckptool.formats.bounded import listed, visible
from ckptool.formats.meta import (
    NOT_A_TENSOR,
    CheckpointMeta,
    TensorMeta,
    itemsizes,
    nbytes_each,
    numels,
)
from ckptool.keys import (
    Fix,
    FixStep,
    KeyDiff,
    Reason,
    ShapeMismatch,
    Transforms,
    common_dotted_prefix,
    discarded_by_choice,
    fold_counts,
    fold_names,
    scaled_codes_words,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from ckptool.compare import CheckpointDiff
    from ckptool.data import DataSplit
    from ckptool.finetune import EpochMetrics, FinetuneResult
    from ckptool.freezing import FreezeSummary
    from ckptool.guard import GuardReport
    from ckptool.sanity import CheckResult
    from ckptool.surgery import SurgeryLog
    from ckptool.values import ValueDiff

# Folded key labels shown per category before "... and N more".
MAX_LABELS = 8
# Fix steps spelled out in a verdict line.
MAX_VERDICT_STEPS = 3
MAX_ROWS = 40
# A suggested command longer than this many flags is no help to copy.
MAX_FIX_FLAGS = 40


# Columns of piped output: wide enough for a table of folded names without breaking one.
PIPED_WIDTH = 240


class _SafeConsole(Console):
    """Renders every string as plain text: names and paths come from untrusted files, so
    neither rich markup (``[/b]``) nor control characters in them may take effect, and
    a newline in a name (``a\\n fake.weight | 1 | [9]``) cannot print a row of its own.
    Lines meant as lines are :func:`lines_of` text."""

    def render_str(self, text: str, **kwargs: Any) -> Any:
        return super().render_str(visible(text, one_line=True), **kwargs)


def lines_of(labels: Sequence[str]) -> Any:
    """One table cell of several lines, each label on its own, newlines in them escaped."""
    from rich.text import Text

    return Text("\n".join(visible(label, one_line=True) for label in labels))


def make_console(*, stderr: bool = False) -> Console:
    """A console that is plain text when piped or when NO_COLOR is set."""
    plain = bool(os.environ.get("NO_COLOR"))
    stream = sys.stderr if stderr else sys.stdout
    return _SafeConsole(
        file=stream,
        # Piped (a CI log, grep), rich would assume 80 columns and fold key names
        # mid-identifier; a wide page keeps every name whole. COLUMNS still decides.
        width=None if stream.isatty() or os.environ.get("COLUMNS") else PIPED_WIDTH,
        no_color=plain,
        # rich's no_color drops colours only; no colour system drops bold and italic too.
        color_system=None if plain else "auto",
        highlight=False,
        markup=False,
        emoji=False,
        # Plain lines (verdicts, commands to copy) must not be hard-wrapped.
        soft_wrap=True,
    )


def _table(console: Console, *columns: str, title: str | None = None) -> Table:
    style = box.SIMPLE_HEAD if console.is_terminal else box.ASCII
    table = Table(box=style, title=title, title_justify="left", show_edge=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def human_count(n: int) -> str:
    for threshold, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= threshold:
            return f"{n / threshold:.1f}{suffix}"
    return str(n)


def share_text(part: int, whole: int) -> str:
    """``part`` of ``whole`` as a percentage that reads 100% or 0% only when it is: a
    2-value head reinitialised in a 22.7M-value model is 99.995%, which '.1%' prints as
    100.0%, as if nothing came from the model's initialisation."""
    text = f"{part / whole:.1%}"
    if text == "100.0%" and part < whole:
        return ">99.9%"
    if text == "0.0%" and part > 0:
        return "<0.1%"
    return text


def capped(labels: Sequence[str], limit: int = MAX_LABELS, sep: str = ", ") -> str:
    return listed(labels, limit, sep=sep, more=sep + "... and {} more")


def shape_text(shape: Iterable[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


# --- inspect -------------------------------------------------------------------------


def inspect_json(meta: CheckpointMeta) -> dict[str, Any]:
    """The documented ``inspect --json`` document."""
    return {
        "path": meta.path,
        "format": meta.format.value,
        "key": meta.key,
        "files": list(meta.files),
        "file_size": meta.file_size,
        "num_tensors": len(meta.tensors),
        "numel": meta.num_params,
        "nbytes": meta.nbytes,
        "dtypes": meta.dtype_counts(),
        "containers": [
            {"name": c.name, "kind": c.kind, "summary": c.summary} for c in meta.containers
        ],
        "metadata": dict(meta.metadata),
        "shared": meta.shared_groups(),
        "opaque": list(meta.opaque),
        "adapter": _adapter_json(meta),
        "tensors": _tensors_json(meta.tensors),
    }


def _tensors_json(tensors: Mapping[str, TensorMeta]) -> list[dict[str, Any]]:
    # Column by column, without a call per tensor: a 100k-tensor listing pays for each.
    shapes = [tensor.shape for tensor in tensors.values()]
    dtypes = [tensor.dtype for tensor in tensors.values()]
    numels = list(map(math.prod, shapes))
    nbytes = map(operator.mul, numels, itemsizes(tensors.values()))
    return [
        {"name": name, "shape": list(shape), "dtype": dtype, "numel": numel, "nbytes": size}
        for name, shape, dtype, numel, size in zip(
            tensors, shapes, dtypes, numels, nbytes, strict=True
        )
    ]


def _adapter_json(meta: CheckpointMeta) -> dict[str, Any] | None:
    from ckptool.formats.adapters import describe_adapter

    info = describe_adapter(meta.path, meta.tensors)
    if info is None:
        return None
    return {
        "kind": "lora",
        "modules": list(info.modules),
        "ranks": list(info.ranks),
        "modules_to_save": list(info.saved),
        "config": dict(info.config) if info.config is not None else None,
        "summary": info.summary,
    }


def render_inspect(meta: CheckpointMeta, console: Console) -> None:
    """Summary lines, a per-module table and a folded per-tensor table."""
    where = f" in {meta.key!r}" if meta.key else ""
    dtypes = ", ".join(f"{d} ({human_count(n)})" for d, n in meta.dtype_counts().items())
    console.print(meta.path, style="bold")
    console.print(f"  format      {meta.format.value}, {human_bytes(meta.file_size)} on disk")
    console.print(
        f"  tensors     {len(meta.tensors)}{where}, {meta.num_params:,} elements, "
        f"{human_bytes(meta.nbytes)}"
    )
    console.print(f"  dtypes      {dtypes or '-'}")
    for entry in meta.containers:
        if entry.kind == NOT_A_TENSOR:
            line = (
                f"  not tensor  {entry.name}: {entry.summary} (beside the tensors; writes "
                "leave it out)"
            )
        else:
            marker = "  <- tensors" if entry.kind == "tensors" else ""
            line = f"  container   {entry.name}: {entry.summary}{marker}"
        console.print(line, markup=False)
    for key, value in meta.metadata.items():
        console.print(f"  metadata    {key} = {value[:100]}", markup=False)
    adapter = _adapter_json(meta)
    if adapter is not None:
        console.print(f"  adapter     {adapter['summary']}", markup=False)
        console.print(f"  adapts      {capped(fold_names(adapter['modules']), 6)}", markup=False)
    if meta.opaque:
        console.print(
            f"  objects     {capped(list(meta.opaque), 6)} (kept as data, not executed)",
            markup=False,
        )
    for group in meta.shared_groups():
        console.print(f"  tied        {' = '.join(group)}", markup=False)
    console.print(_modules_table(meta, console))
    console.print(_tensors_table(meta, console))


def _modules_table(meta: CheckpointMeta, console: Console) -> Table:
    table = _table(console, "module", "tensors", "params", "size", title="Modules")
    names = list(meta.tensors)
    modules = _top_modules(names)
    counts = Counter(modules)
    # Sums only for the rows shown (at 100,000 flat names, 40 of 100,000 modules).
    shown = list(itertools.islice(counts, MAX_ROWS))
    params, size = dict.fromkeys(shown, 0), dict.fromkeys(shown, 0)
    in_shown = list(map(params.__contains__, modules))
    tensors = list(itertools.compress(meta.tensors.values(), in_shown))
    rows = zip(
        itertools.compress(modules, in_shown), numels(tensors), nbytes_each(tensors), strict=True
    )
    for module, numel, nbytes in rows:
        params[module] += numel
        size[module] += nbytes
    for module in shown:
        table.add_row(module, str(counts[module]), f"{params[module]:,}", human_bytes(size[module]))
    if len(counts) > MAX_ROWS:
        table.add_row(f"... and {len(counts) - MAX_ROWS} more", "", "", "")
    return table


def _top_modules(names: list[str]) -> list[str]:
    """Each name's top-level module, under a wrapper prefix every name shares
    (``module.``, ``model.``) rather than the wrapper itself; made in C."""
    wrapper = common_dotted_prefix(names)
    below = map(str.__getitem__, names, itertools.repeat(slice(len(wrapper), None)))
    heads = map(operator.itemgetter(0), map(str.partition, below, itertools.repeat(".")))
    return list(map(wrapper.__add__, heads))


def _tensors_table(meta: CheckpointMeta, console: Console) -> Table:
    table = _table(console, "tensors", "n", "shape", "dtype", "params", title="Tensors")
    signatures = map(operator.attrgetter("shape", "dtype"), meta.tensors.values())
    rows = fold_counts(zip(meta.tensors, signatures, strict=True))
    for label, count, (shape, dtype) in rows[: MAX_ROWS * 3]:
        # A row folds tensors of one shape: its elements are the count times one's.
        params = count * math.prod(shape)
        table.add_row(label, str(count), shape_text(shape), dtype, f"{params:,}")
    if len(rows) > MAX_ROWS * 3:
        table.add_row(f"... and {len(rows) - MAX_ROWS * 3} more rows (use --json)", "", "", "", "")
    return table


# --- diff ----------------------------------------------------------------------------


def diff_json(report: CheckpointDiff) -> dict[str, Any]:
    """The documented ``diff --json`` document (schema in README.md)."""
    keys = report.keys
    return {
        "source": report.source.path,
        "source_key": report.source.key,
        "target": report.target_label,
        "notes": list(report.notes),
        "compatible": report.compatible,
        "torch_accepts": report.torch_accepts,
        # Incompatible and no fix offered because none keeps a meaningful part of it.
        "fix_keeps_little": not report.compatible
        and not keys.ambiguous
        and not keys.scaled_codes
        and offered_fix_flags(keys) is None,
        "matched": list(keys.matched),
        "missing": list(keys.missing),
        "tied": dict(keys.through_tie),
        "hooked": list(keys.hooked),
        "hook_filled": list(keys.hook_filled),
        "unexpected": list(keys.unexpected),
        "shape_mismatch": _mismatches_json(keys.shape_mismatch),
        "dtype_mismatch": [
            {"key": m.key, "source": m.source, "target": m.target} for m in keys.dtype_mismatch
        ],
        "scaled_codes": dict(keys.scaled_codes),
        "dropped": list(keys.dropped),
        "reinit": list(keys.reinit),
        "renamed": dict(keys.renamed),
        "transforms": keys.transforms.flags(),
        "suggestions": [
            {"flags": s.flags, "matched": s.matched, "total": s.total} for s in keys.suggestions
        ],
        "ambiguous": [s.flags for s in keys.ambiguous],
        "fix": offered_fix_flags(keys),
        "values": _values_json(report.values),
    }


def _mismatches_json(mismatches: Sequence[ShapeMismatch]) -> list[dict[str, Any]]:
    return [{"key": m.key, "source": list(m.source), "target": list(m.target)} for m in mismatches]


def _values_json(values: ValueDiff | None) -> dict[str, Any] | None:
    if values is None:
        return None
    return {
        "compared": values.compared,
        "unchanged": list(values.unchanged),
        "changed": [
            {
                "key": c.key,
                "changed": c.changed,
                "numel": c.numel,
                "max_abs": c.max_abs,
                "rel_l2": c.rel_l2,
            }
            for c in values.changed
        ],
    }


def render_diff(report: CheckpointDiff, console: Console) -> None:
    """Both sides, a category table, mismatches, suggestions, the fix and a verdict line."""
    keys = report.keys
    source = report.source
    where = f", key {source.key!r}" if source.key else ""
    console.print(
        f"  source  {source.path}  ({source.format.value}{where}, {len(source.tensors)} tensors)",
        markup=False,
    )
    console.print(f"  target  {report.target_label}  ({report.target_count} tensors)", markup=False)
    if keys.transforms.flags():
        console.print(f"  with    {' '.join(keys.transforms.flags())}", markup=False)
    for note in report.notes:
        console.print(f"  note    {note}")
    console.print(_categories_table(keys, console))
    if keys.shape_mismatch:
        console.print(_mismatch_table(keys.shape_mismatch, console))
    if report.values is not None:
        _render_values(report.values, keys, console)
    if report.torch_accepts:
        console.print(
            "compatible: the model's own load_state_dict(strict=True) accepts it as it is"
        )
        return
    _render_suggestions(keys, console)
    console.print(verdict(keys), markup=False)


def _categories_table(keys: KeyDiff, console: Console) -> Table:
    table = _table(console, "category", "count", "keys")
    explained = [k for k in keys.missing if keys.transforms.explains(k)]
    rows = [
        ("matched", keys.matched),
        ("missing", keys.unexplained_missing),
        ("missing, tied to a provided key", list(keys.through_tie)),
        ("placed by load hooks", [*keys.hooked, *keys.hook_filled]),
        ("filled from model init", explained),
        ("unexpected", keys.unexpected),
        ("shape mismatch", [m.key for m in keys.shape_mismatch]),
        ("dtype differs", [m.key for m in keys.dtype_mismatch]),
        ("dropped", keys.dropped),
    ]
    for label, names in rows:
        if names or label in ("matched", "missing", "unexpected", "shape mismatch"):
            # Matched keys are the unremarkable majority: a few labels are enough.
            limit = 3 if label == "matched" else MAX_LABELS
            shown = fold_names(names)
            more = [f"... and {len(shown) - limit} more"] if len(shown) > limit else []
            table.add_row(label, str(len(names)), lines_of([*shown[:limit], *more]))
    return table


def _mismatch_table(mismatches: Sequence[ShapeMismatch], console: Console) -> Table:
    table = _table(console, "key", "source", "target", title="Shape mismatches")
    for m in mismatches[:MAX_ROWS]:
        table.add_row(m.key, shape_text(m.source), shape_text(m.target))
    if len(mismatches) > MAX_ROWS:
        table.add_row(f"... and {len(mismatches) - MAX_ROWS} more", "", "")
    return table


def _render_values(values: ValueDiff, keys: KeyDiff, console: Console) -> None:
    if not values.compared:
        # "0/0 changed" reads as "nothing changed": say why nothing was compared.
        flags = offered_fix_flags(keys)
        rerun = f"; rerun with {' '.join(flags)} --values" if flags else ""
        console.print(
            f"values: none compared, no tensor matches by name and shape{rerun}", markup=False
        )
        return
    changed = [c.key for c in values.changed]
    console.print(
        f"values: {len(changed)}/{values.compared} compared tensors changed, "
        f"{len(values.unchanged)} bit-identical",
        markup=False,
    )
    if values.changed:
        table = _table(
            console, "tensor", "changed", "max |delta|", "rel. L2", title="Changed tensors"
        )
        for c in values.changed[:MAX_ROWS]:
            table.add_row(
                c.key, f"{c.changed:,}/{c.numel:,}", f"{c.max_abs:.3g}", f"{c.rel_l2:.3g}"
            )
        console.print(table)


def _render_suggestions(keys: KeyDiff, console: Console) -> None:
    best = keys.suggestions[0].matched if keys.suggestions else 0
    # Far weaker alternatives (one layer's sub-tree) are noise next to the best.
    for s in [s for s in keys.suggestions if 2 * s.matched >= best][:3]:
        console.print(
            f"  suggest {' '.join(s.flags)}: then {s.matched}/{s.total} keys match", markup=False
        )


def offered_fix_flags(keys: KeyDiff) -> list[str] | None:
    """The fix's flags, unless there is none or it would keep too little to be a fix."""
    return keys.fix.transforms.flags() if keys.fix and not keys.fix.keeps_little else None


def verdict(keys: KeyDiff) -> str:
    """One line: compatible or not, and the fix with its reasons."""
    if keys.compatible:
        filled = [k for k in keys.missing if keys.transforms.explains(k)]
        tail = f"; {capped(fold_names(filled), 4)} filled from the model's init" if filled else ""
        return f"compatible: {len(keys.matched)}/{keys.target_total} keys match{tail}"
    if keys.scaled_codes:
        return f"incompatible: {scaled_codes_words(keys)}"
    if keys.ambiguous:
        options = " or ".join(" ".join(s.flags) for s in keys.ambiguous)
        best = keys.ambiguous[0]
        return (
            f"incompatible: ambiguous prefix, {options} each make "
            f"{best.matched}/{best.total} keys match; choose one"
        )
    if keys.fix is None or keys.fix.keeps_little:
        return "incompatible: " + _not_for_this_model(keys)
    # A verdict stays a readable line; the fix line (with --model) and --json carry
    # every flag.
    shown = listed(
        [_describe_step(step) for step in keys.fix.steps],
        MAX_VERDICT_STEPS,
        sep="; ",
        more="; ... and {} more steps (--json lists every flag)",
    )
    return f"incompatible: {shown}"


def _not_for_this_model(keys: KeyDiff) -> str:
    """No transform keeps a meaningful part of the checkpoint: say so, offer no flags."""
    nearest = keys.suggestions[0] if keys.suggestions else None
    named = nearest.matched if nearest else len(keys.matched) + len(keys.shape_mismatch)
    fix = keys.fix
    values = (
        f", {fix.kept_numel / fix.model_numel:.0%} of its trainable values"
        if fix is not None and fix.model_numel
        else ""
    )
    where = f"; nearest: {' '.join(nearest.flags)}" if nearest else ""
    return (
        f"{named}/{keys.target_total} of the target's keys match under any prefix{values} "
        f"({_problems(keys)}): {_why_no_fix(keys)}{where}"
    )


def _why_no_fix(keys: KeyDiff) -> str:
    """Why no fix: the file is not for this model, unless the given --drop/--reinit throw
    the values away (then it may well be for it, and the user may mean it)."""
    by_choice = discarded_by_choice(keys)
    if by_choice is None or keys.fix is None:
        return "this checkpoint is not for this model, so no fix is offered"
    return (
        f"{by_choice}, so no fix is offered (if that is intended: adapt "
        f"{keys.fix.transforms.words()} --allow-mostly-init)"
    )


def _problems(keys: KeyDiff) -> str:
    parts = []
    if keys.unexpected:
        parts.append(f"{len(keys.unexpected)} unexpected")
    if keys.shape_mismatch:
        parts.append(f"{len(keys.shape_mismatch)} shape mismatches")
    if keys.unexplained_missing:
        parts.append(f"{len(keys.unexplained_missing)} missing")
    return ", ".join(parts)


def _describe_step(step: FixStep) -> str:
    names = capped(fold_names(step.keys), 3)
    if step.reason is Reason.PREFIX and step.prefix is not None:
        return f"{_prefix_words(step.prefix)}: then {step.matched}/{step.total} keys match"
    if step.reason is Reason.NESTING:
        return f"{names} sit one module level off the model's: add {step.flag}"
    if step.reason is Reason.RENAMED:
        return f"{names} in the checkpoint under another name (same shape, dtype): add {step.flag}"
    if step.reason is Reason.MOVED:
        return f"{option('drop', step.keys[0])} names keys before that change: {step.flag} after it"
    if step.reason is Reason.TIED:
        return (
            f"{names} missing, but tied in the model to names the checkpoint provides: "
            "adapt writes them with those values"
        )
    if step.reason is Reason.SHAPE_MISMATCH:
        return f"{names} differ in shape: add {step.flag}"
    if step.reason is Reason.UNEXPECTED:
        return f"{names} not in the target: add {step.flag}"
    return f"{names} missing from the checkpoint: add {step.flag}"


def _prefix_words(change: Transforms) -> str:
    """--strip module. --add-prefix bert. -> "strip 'module.', add prefix 'bert.'"; a
    rename (a prefix only some keys have) is shown as its flag."""
    words = [f"strip {p!r}" for p in change.strip]
    words += [f"add prefix {change.add_prefix!r}"] if change.add_prefix else []
    words += [flag.removeprefix("--") for flag in Transforms(rename=change.rename).flags()]
    return ", ".join(words)


def fix_command(fix: Fix, source: str, model_args: Sequence[str]) -> str:
    """The ``ckptool adapt`` command line that applies ``fix`` (if it is short enough to use)."""
    flags = fix.transforms.flags()
    if len(flags) > MAX_FIX_FLAGS:
        return f"needs {len(flags) // 2} transform flags, too many to print; diff --json lists them"
    return " ".join(["ckptool adapt", shell_word(source), *model_args, *flags, "-o OUT"])


# --- surgery -------------------------------------------------------------------------


def surgery_json(log: SurgeryLog) -> dict[str, Any]:
    """The ``adapt/convert/merge --json`` document."""
    return {
        "command": log.command,
        "sources": list(log.sources),
        "notes": list(log.notes),
        "from_checkpoint": log.from_checkpoint,
        "model_numel": log.model_numel,
        "output": log.output,
        "format": log.format,
        "dry_run": log.dry_run,
        "verified": log.verified,
        "files": list(log.files),
        "nbytes": log.nbytes,
        "transforms": list(log.transforms),
        "kept": list(log.kept),
        "renamed": dict(log.renamed),
        "dropped": list(log.dropped),
        "left_out": list(log.left_out),
        "shape_mismatch_dropped": _mismatches_json(log.mismatched),
        "reinit": list(log.reinit),
        "filled": list(log.filled),
        "init": log.init_method or None,
        "cast": list(log.cast),
        "taken": dict(log.taken),
        "averaged": list(log.averaged),
        "merged": list(log.merged),
        "aliases": dict(log.aliases),
    }


def render_surgery(log: SurgeryLog, console: Console) -> None:
    """What was kept, renamed, dropped, filled; then where it was written."""
    console.print(f"{log.command}: {', '.join(log.sources)}", markup=False)
    if log.transforms:
        console.print(f"  with        {' '.join(log.transforms)}", markup=False)
    for note in log.notes:
        console.print(f"  note        {note}")
    if log.model_numel:
        share = share_text(log.from_checkpoint, log.model_numel)
        console.print(
            f"  from ckpt   {share} of the model's {human_count(log.model_numel)} trainable values"
        )
    for label, count, labels, note in _surgery_rows(log):
        if count:
            console.print(
                f"  {label:<11} {count:>4}  {capped(labels, 3)} {note}".rstrip(), markup=False
            )
    if log.init_method:
        console.print(f"  init        {log.init_method}", markup=False)
    if log.dry_run:
        console.print(
            f"dry run: nothing written{f' (would write {log.output})' if log.output else ''}"
        )
    else:
        console.print(
            f"wrote {', '.join(log.files)}: {log.format}, {human_bytes(log.nbytes)}, "
            "verified by reading it back",
            markup=False,
        )


def _surgery_rows(log: SurgeryLog) -> list[tuple[str, int, list[str], str]]:
    """(what, how many, folded names, why) for each way a tensor reached the output."""
    taken: dict[int, list[str]] = {}
    for name, index in log.taken.items():
        taken.setdefault(index, []).append(name)
    renames = [f"{old} -> {new}" for old, new in log.renamed.items()]
    mismatched = [
        f"{m.key} {shape_text(m.source)} -> {shape_text(m.target)}" for m in log.mismatched
    ]
    return [
        ("kept", len(log.kept), fold_names(log.kept), ""),
        ("renamed", len(renames), renames, ""),
        ("dropped", len(log.dropped), fold_names(log.dropped), "(--drop)"),
        ("left out", len(log.left_out), fold_names(log.left_out), "(not in the model)"),
        ("mismatched", len(mismatched), mismatched, "(dropped, filled from init)"),
        ("reinit", len(log.reinit), fold_names(log.reinit), "(--reinit)"),
        ("filled", len(log.filled), fold_names(log.filled), "(missing from the checkpoint)"),
        ("cast", len(log.cast), fold_names(log.cast), "(--dtype)"),
        ("averaged", len(log.averaged), fold_names(log.averaged), ""),
        ("merged", len(log.merged), fold_names(log.merged), "(+ the adapter's update)"),
        *((f"from input {i}", len(n), fold_names(n), "") for i, n in sorted(taken.items())),
        ("aliases", len(log.aliases), [f"{a} = {t}" for a, t in log.aliases.items()], "(tied)"),
    ]


# --- freezing, guard, check ----------------------------------------------------------


def freeze_summary_table(summary: FreezeSummary, console: Console) -> Table:
    """Keras-style: per top-level module, trainable / frozen parameters and status."""
    table = _table(console, "module", "trainable", "frozen", "frozen buffers", "status")
    for m in summary.modules[:MAX_ROWS]:
        table.add_row(
            m.name, f"{m.trainable:,}", f"{m.frozen:,}", f"{m.frozen_buffers:,}", m.status
        )
    table.add_row(
        "total", f"{summary.trainable:,}", f"{summary.frozen:,}", f"{summary.frozen_buffers:,}", ""
    )
    return table


def guard_lines(report: GuardReport) -> list[str]:
    """The guard's verdict, each violation with its cause, and the findings."""
    lines = [report.headline()]
    lines += [f"  {v.describe()}" for v in report.violations[:MAX_LABELS]]
    if len(report.violations) > MAX_LABELS:
        lines.append(f"  ... and {len(report.violations) - MAX_LABELS} more changed tensors")
    for f in report.findings:
        lines.append(f"  note: {f.message}: {capped(fold_names(f.names), 4)}")
    return lines


def check_json(result: CheckResult) -> dict[str, Any]:
    return {
        "ok": result.ok,
        "source": result.source,
        "model": result.model,
        "loadable": result.loadable,
        "torch_accepts": result.torch_accepts,
        "notes": list(result.notes),
        "diff": {
            "missing": list(result.keys.unexplained_missing),
            "unexpected": list(result.keys.unexpected),
            "shape_mismatch": _mismatches_json(result.keys.shape_mismatch),
            "fix": offered_fix_flags(result.keys),
        },
        "non_finite": list(result.non_finite),
        "input_shape": list(result.input_shape) if result.input_shape else None,
        "freeze": result.summary.to_json() if result.summary else None,
        "guard": result.guard.to_json() if result.guard else None,
        "not_moved": list(result.not_moved),
    }


def render_check(result: CheckResult, console: Console) -> None:
    """One line per check, the freeze table, the guard's findings, then the verdict."""
    keys = result.keys
    console.print(f"check: {result.source} -> {result.model}", markup=False)
    if result.torch_accepts:
        loaded = "ok: the model's own load_state_dict(strict=True) accepts it as it is"
    elif result.loadable and keys.through_tie:
        loaded = (
            f"ok: {len(keys.matched)}/{keys.target_total} keys match, "
            f"{len(keys.through_tie)} more take their values through ties in the model"
        )
    else:
        loaded = f"{'ok' if result.loadable else 'FAILED'}: {verdict(keys)}"
    console.print(f"  load       {loaded}", markup=False)
    for note in result.notes:
        console.print(f"  note       {note}", markup=False)
    if result.guard is None:
        flags = offered_fix_flags(keys)
        hint = f"rerun with {' '.join(flags)}" if flags else "no renames make it fit"
        console.print(f"check failed: the checkpoint does not load strictly; {hint}")
        return
    finite = (
        "ok"
        if not result.non_finite
        else f"FAILED: NaN/inf in {capped(fold_names(result.non_finite), 4)}"
    )
    console.print(f"  finite     {finite}", markup=False)
    if result.summary is not None:
        console.print(freeze_summary_table(result.summary, console))
    for line in guard_lines(result.guard):
        console.print(f"  {line}", markup=False)
    if result.not_moved:
        console.print(
            f"  trainable but did not move: {capped(fold_names(result.not_moved), 4)} "
            "(no gradient reached them?)",
            markup=False,
        )
    console.print("check passed" if result.ok else "check failed", markup=False)


# --- fine-tuning ---------------------------------------------------------------------

_SPARKS = "▁▂▃▄▅▆▇█"


class ActivityBar:
    """Long work as one transient line on stderr: a spinner, the phase and, for phases
    that move bytes, a bar with bytes done, rate and time left. Gone when the work
    ends, so the report that follows stands alone."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> ActivityBar:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            _bytes_column(DownloadColumn),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task("starting", total=None)
        return self

    def phase(self, name: str, total_bytes: int | None = None) -> None:
        # Drawn at once, the last phase's end included: a phase may end before the
        # next timed refresh.
        self._progress.refresh()
        # A new task, not a reset one: reset keeps the last total when given None, and a
        # phase without bytes ("verify and sync") showed "0.0/1.9 GiB" that never moved.
        self._progress.remove_task(self._task)
        self._task = self._progress.add_task(name, total=total_bytes)
        self._progress.refresh()

    def advance(self, nbytes: int) -> None:
        self._progress.update(self._task, advance=nbytes)

    def __exit__(self, *_: object) -> None:
        self._progress.stop()


def _bytes_column(download_column: Any) -> Any:
    """Bytes done/total, and nothing for a phase that moves no known number of bytes
    (rich's column shows "0/? bytes" there)."""
    from rich.text import Text

    class BytesColumn(download_column):  # type: ignore[misc]
        def render(self, task: Any) -> Any:
            return Text("") if task.total is None else super().render(task)

    return BytesColumn(binary_units=True)


class EpochProgress:
    """The runner's progress on ``bars`` (stderr) when it is a terminal: a spinner
    naming each preparation step, the data summary, a transient bar per epoch (batches,
    loss, images/s) and a line when each epoch ends. Nothing otherwise: piped, the
    final report's epoch table is the only account of the epochs."""

    def __init__(self, bars: Console | None) -> None:
        self.console = bars if bars is not None else make_console(stderr=True)
        self._drawn = bars is not None and bars.is_terminal
        self._status: Any = None
        self._progress: Any = None
        self._task: Any = None
        self._images = 0
        self._started = 0.0

    def prepare(self, step: str) -> None:
        if not self._drawn:
            return
        if self._status is None:
            self._status = self.console.status(step)
            self._status.start()
        else:
            self._status.update(step)

    def data(self, split: DataSplit) -> None:
        if self._drawn:
            self.console.print(data_line(split), markup=False)

    def _end_preparation(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def start_epoch(self, epoch: int, epochs: int, batches: int) -> None:
        self._end_preparation()
        if not self._drawn:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._progress = Progress(
            TextColumn(f"epoch {epoch}/{epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]} img/s"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=batches, loss="-", rate="-")
        self._images, self._started = 0, time.perf_counter()

    def advance(self, loss: float, images: int) -> None:
        if self._progress is None:
            return
        self._images += images
        rate = self._images / max(time.perf_counter() - self._started, 1e-9)
        self._progress.update(self._task, advance=1, loss=f"{loss:.3f}", rate=f"{rate:.0f}")

    def end_epoch(self, metrics: EpochMetrics) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._drawn:
            self.console.print(_epoch_line(metrics), markup=False)

    def warn(self, message: str) -> None:
        """Always shown, piped too: a warning is not progress."""
        make_console(stderr=True).print(f"ckptool: warning: {message}", markup=False)

    def close(self) -> None:
        """Stop whatever is still drawn (a run that failed before its first epoch)."""
        self._end_preparation()
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def data_line(split: DataSplit) -> str:
    images = len(split.train) + len(split.val)
    return (
        f"data: {len(split.classes)} classes, {images} images "
        f"(train {len(split.train)}, val {len(split.val)})"
    )


def _epoch_line(m: EpochMetrics) -> str:
    val = (
        f", val loss {m.val_loss:.4f} acc {m.val_acc:.3f}"
        if m.val_loss is not None and m.val_acc is not None
        else ""
    )
    train = f"train loss {m.train_loss:.4f} acc {m.train_acc:.3f}"
    return f"epoch {m.epoch}: {train}{val} ({m.images_per_s:.0f} img/s)"


def sparkline(values: Sequence[float]) -> str:
    """A one-line chart: the terminal's picture of a learning curve; a value that is not
    finite (a validation loss that overflowed) is a ``?``, scaled by the others."""
    finite = [v for v in values if math.isfinite(v)]
    low, high = min(finite, default=0.0), max(finite, default=0.0)
    span = (high - low) or 1.0
    return "".join(
        _SPARKS[round((v - low) / span * (len(_SPARKS) - 1))] if math.isfinite(v) else "?"
        for v in values
    )


def render_finetune(result: FinetuneResult, console: Console) -> None:
    """Epoch table, learning curves, what trained, the guard, what moved, the outputs."""
    table = _table(console, "epoch", "train loss", "train acc", "val loss", "val acc", "img/s")
    for m in result.epochs:
        best = " *" if m.epoch == result.best_epoch else ""
        table.add_row(
            f"{m.epoch}{best}",
            f"{m.train_loss:.4f}",
            f"{m.train_acc:.3f}",
            "-" if m.val_loss is None else f"{m.val_loss:.4f}",
            "-" if m.val_acc is None else f"{m.val_acc:.3f}",
            f"{m.images_per_s:.0f}",
        )
    console.print(table)
    for label, values in _curves(result.epochs):
        console.print(
            f"  {label:<10} {values[0]:.3f} {sparkline(values)} {values[-1]:.3f}", markup=False
        )
    console.print(freeze_summary_table(result.summary, console))
    if result.cached_features:
        console.print(
            "  features: the frozen backbone ran once; the head trained on cached features",
            markup=False,
        )
    for line in guard_lines(result.guard):
        console.print(line, markup=False)
    moved = [c.name for c in result.changes if c.changed]
    kept = [c.name for c in result.changes if not c.changed]
    console.print(f"  moved      {', '.join(moved) or '-'}", markup=False)
    console.print(
        f"  unchanged  {', '.join(kept) or '-'} (bit-identical to the start)", markup=False
    )
    verdict_line = (
        "frozen tensors bit-identical" if result.frozen_unchanged else "FROZEN TENSORS CHANGED"
    )
    console.print(
        f"best epoch {result.best_epoch}; {verdict_line}; wrote {', '.join(result.outputs)}",
        markup=False,
    )


def _curves(epochs: Sequence[EpochMetrics]) -> list[tuple[str, list[float]]]:
    curves = [
        ("train loss", [m.train_loss for m in epochs]),
        ("train acc", [m.train_acc for m in epochs]),
    ]
    if all(m.val_loss is not None for m in epochs):
        curves.append(("val loss", [float(m.val_loss or 0.0) for m in epochs]))
        curves.append(("val acc", [float(m.val_acc or 0.0) for m in epochs]))
    return curves


def render_finetune_brief(result: FinetuneResult, console: Console) -> None:
    """The learning curves, the guard and what moved: the demo's view of a run."""
    for label, values in _curves(result.epochs):
        console.print(
            f"  {label:<10} {values[0]:.3f} {sparkline(values)} {values[-1]:.3f}", markup=False
        )
    best = next(m for m in result.epochs if m.epoch == result.best_epoch)
    console.print(f"  best epoch {best.epoch}: val acc {best.val_acc or 0:.3f}", markup=False)
    console.print(
        f"  trains {result.summary.trainable:,} of {result.summary.total:,} parameters"
        + ("; backbone features computed once and cached" if result.cached_features else ""),
        markup=False,
    )
    for line in guard_lines(result.guard)[:1]:
        console.print(f"  {line}", markup=False)
    moved = ", ".join(c.name for c in result.changes if c.changed) or "-"
    kept = ", ".join(c.name for c in result.changes if not c.changed) or "-"
    console.print(f"  moved: {moved}; bit-identical to the start: {kept}", markup=False)


def comparison_table(rows: Sequence[tuple[Any, FinetuneResult]], console: Console) -> Table:
    """Best validation accuracy per run: transfer against scratch."""
    table = _table(
        console, "run", "strategy", "trained params", "epochs", "best val acc", "seconds"
    )
    for spec, result in rows:
        best = max((m.val_acc or 0.0) for m in result.epochs)
        seconds = sum(m.seconds for m in result.epochs)
        table.add_row(
            spec.name,
            spec.strategy,
            f"{result.summary.trainable:,}",
            str(len(result.epochs)),
            f"{best:.3f}",
            f"{seconds:.1f}",
        )
    return table


def render_demo_step(number: int, title: str, command: str, result: Any, console: Console) -> None:
    """A demo step: its title, the command that does the same, and its usual output."""
    console.print()
    console.print(f"{number}. {title}", style="bold")
    if command:
        console.print(f"  $ {command}", markup=False, style="dim")
    # Here, not at the top: `inspect --json` imports this module and needs none of them.
    from ckptool.compare import CheckpointDiff
    from ckptool.finetune import FinetuneResult
    from ckptool.surgery import SurgeryLog

    if isinstance(result, CheckpointMeta):
        render_inspect(result, console)
    elif isinstance(result, CheckpointDiff):
        render_diff(result, console)
    elif isinstance(result, SurgeryLog):
        render_surgery(result, console)
    elif isinstance(result, FinetuneResult):
        render_finetune_brief(result, console)
    elif hasattr(result, "rows"):
        console.print(comparison_table(result.rows, console))
