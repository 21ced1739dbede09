"""Pure key logic on ``{name: TensorMeta}``: transforms, diff, prefix search, grouping.

Nothing here reads files or imports torch; ``diff`` of two 300-key dicts is microseconds.
Words follow PyTorch: *missing* = the model has it, the checkpoint does not;
*unexpected* = the checkpoint has it, the model does not.
"""

from __future__ import annotations

import bisect
import dataclasses
import difflib
import enum
import functools
import itertools
import operator
import re
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, NoReturn, TypeVar

from ckptool.errors import TransformError, on_command_line, option, shell_word
from ckptool.formats.meta import LOW_PRECISION, SCALE_SUFFIXES, TensorMeta, numels, tied_views

# Prefixes that wrappers add: DataParallel/DDP, torch.compile, Lightning, detection heads.
KNOWN_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "encoder.", "net.")
# How many leading-segment candidates to try when searching prefixes to add.
MAX_ADD_CANDIDATES = 6


@dataclass(frozen=True)
class Transforms:
    """Key transforms, applied in this order: strip, add_prefix, rename, drop, reinit."""

    strip: tuple[str, ...] = ()
    add_prefix: str | None = None
    rename: tuple[tuple[str, str], ...] = ()
    drop: tuple[str, ...] = ()
    reinit: tuple[str, ...] = ()

    @classmethod
    def from_flags(
        cls,
        *,
        strip: Sequence[str] = (),
        add_prefix: str | None = None,
        rename: Sequence[str] = (),
        drop: Sequence[str] = (),
        reinit: Sequence[str] = (),
    ) -> Transforms:
        """Build from CLI values; ``rename`` items are ``REGEX=REPL``.

        Raises:
            TransformError: a rename has no ``=`` or an invalid regex.
        """
        return cls(
            tuple(strip),
            add_prefix or None,
            tuple(map(_parse_rename, rename)),
            tuple(drop),
            tuple(reinit),
        )

    def flags(self) -> list[str]:
        """The CLI flags that reproduce these transforms."""
        out = [f"--strip {shell_word(p)}" for p in self.strip]
        out += [f"--add-prefix {shell_word(self.add_prefix)}"] if self.add_prefix else []
        out += [f"--rename {shell_word(f'{p}={r}', quoted=True)}" for p, r in self.rename]
        out += [f"--drop {shell_word(p)}" for p in self.drop]
        out += [f"--reinit {shell_word(p)}" for p in self.reinit]
        return out

    def words(self) -> str:
        """These transforms as the reader passes them: flags on the command line,
        ``Transforms`` arguments in Python."""
        if on_command_line():
            return " ".join(self.flags())
        fields = dataclasses.asdict(self)
        return ", ".join(f"{name}={value!r}" for name, value in fields.items() if value)

    def keywords(self) -> str:
        """These transforms as ``load_into``'s keyword arguments (the flags' values):
        ``strip=['module.'], drop=['fc.']``."""
        values: list[tuple[str, object]] = [
            ("strip", list(self.strip)),
            ("add_prefix", self.add_prefix),
            ("rename", [f"{pattern}={repl}" for pattern, repl in self.rename]),
            ("drop", list(self.drop)),
            ("reinit", list(self.reinit)),
        ]
        return ", ".join(f"{name}={value!r}" for name, value in values if value)

    def explains(self, name: str) -> bool:
        """True if ``name`` lies under a --drop or --reinit prefix."""
        return self._drop_or_reinit.covers(name)

    @functools.cached_property
    def _drop_or_reinit(self) -> PrefixIndex:
        # A fix may carry thousands of flags: look names up, do not scan the flags.
        return PrefixIndex((*self.drop, *self.reinit))


def _parse_rename(item: str) -> tuple[str, str]:
    pattern, sep, repl = item.partition("=")
    if not sep or not pattern:
        raise TransformError(
            f"{option('rename', item, quoted=True)} must be REGEX=REPLACEMENT, "
            "e.g. '^features\\.=backbone.'"
        )
    try:
        re.compile(pattern)
    except re.error as e:
        raise TransformError(f"{option('rename', item, quoted=True)}: invalid regex ({e})") from e
    return pattern, repl


def under_prefix(name: str, prefix: str) -> bool:
    """``fc.`` and ``fc`` both cover ``fc.weight``; ``fc`` also covers a bare key ``fc``."""
    if prefix.endswith("."):
        return name.startswith(prefix)
    return name == prefix or name.startswith(prefix + ".")


@dataclass(frozen=True)
class Renaming:
    """The result of applying transforms to checkpoint names."""

    mapping: Mapping[str, str]  # new name -> original name, for kept keys
    dropped: tuple[str, ...]  # original names removed by --drop


def apply_transforms(names: Iterable[str], transforms: Transforms) -> Renaming:
    """Rename checkpoint keys; prefix stripping is all-or-nothing, like fvcore.

    Raises:
        TransformError: a --strip prefix is absent from some keys, or two keys
            would end up with the same name.
    """
    return _drop_covered(renamed_names(names, transforms), transforms.drop)


def renamed_names(names: Iterable[str], transforms: Transforms) -> dict[str, str]:
    """New name -> original after --strip, --add-prefix and --rename (before --drop).

    Raises:
        TransformError: as :func:`apply_transforms`.
    """
    names = list(names)
    current = dict(zip(names, names, strict=True))  # current name -> original
    for prefix in transforms.strip:
        current = _strip_all(current, prefix)
    if transforms.add_prefix:
        current = {transforms.add_prefix + k: v for k, v in current.items()}
    for pattern, repl in transforms.rename:
        current, _ = _rename(current, pattern, repl)
    return current


def _drop_covered(current: Mapping[str, str], drop: Sequence[str]) -> Renaming:
    """``current`` less the names under the --drop prefixes (``current`` is not changed:
    a fix's trials rename the same names again)."""
    dropping = PrefixIndex(drop)
    if not dropping:
        return Renaming(current, ())
    covered = dropping.covered(current)
    dropped = tuple(map(current.__getitem__, covered))
    kept = dict(current)
    for name in covered:
        del kept[name]
    return Renaming(kept, dropped)


def _strip_all(current: dict[str, str], prefix: str) -> dict[str, str]:
    lacking = [k for k in current if not k.startswith(prefix)]
    if lacking:
        raise TransformError(
            f"{option('strip', prefix, quoted=True)}: {len(lacking)}/{len(current)} keys do "
            f"not start with it (e.g. {lacking[0]!r}); stripping is all-or-nothing, to strip "
            f"only where present use {option('rename', f'^{name_pattern(prefix)}=', quoted=True)}"
        )
    return {k[len(prefix) :]: v for k, v in current.items()}


def _rename(
    current: Mapping[str, str], pattern: str, repl: str
) -> tuple[dict[str, str], dict[str, str]]:
    """``current`` with ``pattern`` replaced in its names (each keeps its place), and the
    names changed (old -> new)."""
    changes = _changes(current, pattern, repl)
    # Each name looked up in C (changes.get(name, name)): the order stays the same.
    renamed = dict(zip(map(changes.get, current, current), current.values(), strict=True))
    if len(renamed) < len(current):
        _refuse_collision(current, changes, _rule_words(pattern, repl))
    return renamed, changes


def _changes(names: Iterable[str], pattern: str, repl: str) -> dict[str, str]:
    """The names ``pattern`` changes, old -> new."""
    regex = re.compile(pattern)
    # An anchored pattern can only match names that start with its literal text: a fix
    # renaming one tensor of 100k runs re.sub once, not 100k times (names tested in C).
    prefix = _literal_prefix(pattern)
    candidates = filter(operator.methodcaller("startswith", prefix), names) if prefix else names
    changes: dict[str, str] = {}
    for name in candidates:
        try:
            new = regex.sub(repl, name)
        except (re.error, IndexError) as e:
            raise TransformError(f"{_rule_words(pattern, repl)}: bad replacement ({e})") from e
        if new != name:
            changes[name] = new
    return changes


def _rule_words(pattern: str, repl: str) -> str:
    return option("rename", f"{pattern}={repl}", quoted=True)


def _refuse_collision(current: Mapping[str, str], changes: dict[str, str], rule: str) -> NoReturn:
    """Name the first two checkpoint keys that a rename maps to one name."""
    seen: dict[str, str] = {}
    for name, original in current.items():
        new = changes.get(name, name)
        if new in seen:
            raise TransformError(f"{rule} maps both {seen[new]!r} and {original!r} to {new!r}")
        seen[new] = original
    raise AssertionError("no collision")  # the caller saw fewer names come out


def _literal_prefix(pattern: str) -> str:
    """The text every match of ``pattern`` starts with if it is anchored with ``^``
    (``^model\\.layers\\.5`` -> ``model.layers.5``); "" when unsure (alternation, a
    quantifier on the last character, no anchor)."""
    if not pattern.startswith("^") or "|" in pattern:
        return ""
    literal: list[str] = []
    chars = iter(pattern[1:])
    for char in chars:
        if char == "\\":
            escaped = next(chars, "")
            if not escaped or escaped.isalnum():  # \d, \x3d, \A...: not one literal character
                break
            literal.append(escaped)
        elif char in "*?{":  # the character before it may be absent
            literal = literal[:-1]
            break
        elif char in ".^$+[]()":
            break
        else:
            literal.append(char)
    return "".join(literal)


@dataclass(frozen=True)
class ShapeMismatch:
    key: str
    source: tuple[int, ...]
    target: tuple[int, ...]


@dataclass(frozen=True)
class DtypeMismatch:
    key: str
    source: str
    target: str


@dataclass(frozen=True)
class Suggestion:
    """Flags that would make more keys match, and how many match after them."""

    transforms: Transforms
    matched: int
    total: int

    @property
    def flags(self) -> list[str]:
        return self.transforms.flags()


@dataclass(frozen=True)
class HookPlacement:
    """Names the model's own loading places though they do not match by name (found by
    :func:`ckptool.judge.hook_placement`): checkpoint keys its load hooks consume, and
    model keys they fill. Names are as after the given transforms."""

    consumed: frozenset[str]
    filled: frozenset[str]


@dataclass(frozen=True)
class KeyDiff:
    """How a checkpoint's keys (after transforms) compare with a model's or another checkpoint's."""

    matched: tuple[str, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    shape_mismatch: tuple[ShapeMismatch, ...]
    dtype_mismatch: tuple[DtypeMismatch, ...]
    dropped: tuple[str, ...]
    reinit: tuple[str, ...]
    renamed: Mapping[str, str]  # original -> new, only names that changed
    transforms: Transforms
    source_total: int
    target_total: int
    suggestions: tuple[Suggestion, ...] = ()
    fix: Fix | None = None
    ambiguous: tuple[Suggestion, ...] = field(default=())
    # Missing names that are one tensor in the model with a name the checkpoint provides
    # (tied weights, a module under two paths): missing name -> the provided name.
    through_tie: Mapping[str, str] = field(default_factory=dict)
    # Placed by the model's load hooks (torch's verdict): checkpoint keys they consume,
    # written as they are; model keys they fill, not written.
    hooked: tuple[str, ...] = ()
    hook_filled: tuple[str, ...] = ()
    # Matched float8/float4 tensors whose scale the checkpoint holds beside them, going
    # into a higher-precision tensor: (name, the scale's checkpoint name). Loaded without
    # the scale the weights are wrong, so nothing fits until they are dequantized.
    scaled_codes: tuple[tuple[str, str], ...] = ()

    @property
    def original(self) -> dict[str, str]:
        """New name -> the checkpoint's own name, for the names the transforms changed."""
        return {new: old for old, new in self.renamed.items()}

    @property
    def unexplained_missing(self) -> tuple[str, ...]:
        """Missing keys that neither --drop/--reinit nor a tie accounts for."""
        return tuple(
            k for k in self.missing if not self.transforms.explains(k) and k not in self.through_tie
        )

    @property
    def fits_after_adapt(self) -> bool:
        """``adapt`` with these transforms writes a file that loads strictly: nothing
        unexpected or mismatched, every missing key re-initialised or written via its tie,
        and no scaled float8 codes loaded as weights."""
        return (
            not self.unexpected
            and not self.shape_mismatch
            and not self.unexplained_missing
            and not self.scaled_codes
        )

    @property
    def compatible(self) -> bool:
        """As torch's ``load_state_dict(strict=True)`` rules on the renamed names: a tied
        name the file lacks is missing to torch too, though adapt can write it."""
        return self.fits_after_adapt and not self.through_tie


def diff(
    source: Mapping[str, TensorMeta],
    target: Mapping[str, TensorMeta],
    transforms: Transforms = Transforms(),
    *,
    suggest: bool = True,
    hooks: HookPlacement | None = None,
) -> KeyDiff:
    """Compare ``source`` keys (after ``transforms``) with ``target`` keys.

    Args:
        source: the checkpoint's tensors.
        target: the model's (or a second checkpoint's) tensors.
        transforms: applied to ``source`` names first.
        suggest: also search prefix transforms and compose the fix.
        hooks: names the model's load hooks place (neither unexpected nor missing).

    Raises:
        TransformError: as :func:`apply_transforms`; a --drop or --reinit prefix that
            matches no key (a flag that would silently do nothing).
    """
    renaming = apply_transforms(source, transforms)
    _check_prefixes_match(source, target, transforms)
    result = _compare(source, target, renaming, transforms, hooks)
    if not suggest:
        return result
    # Candidates are scored by name matches, so the baseline counts mismatched shapes too.
    named = len(result.matched) + len(result.shape_mismatch)
    suggestions = [
        s
        for s in suggest_prefixes(list(renaming.mapping), list(target), baseline=named)
        if _applies(source, with_suggestion(transforms, s))  # e.g. a rename onto a kept name
    ]
    best = suggestions[0] if suggestions else None
    tied = tuple(s for s in suggestions if best and s.matched == best.matched)
    # With tied, different prefixes there is no single fix to recommend; the report lists them.
    composed = _compose_fix(source, target, result, best, hooks) if len(tied) <= 1 else None
    fix = None
    if composed is not None:
        candidate, last = composed
        if _parses_back(candidate.transforms) and _replays(
            source, target, candidate.transforms, hooks, last
        ):
            fix = candidate
    return dataclasses.replace(
        result,
        suggestions=tuple(suggestions),
        fix=fix,
        ambiguous=tied if len(tied) > 1 else (),
    )


def _check_prefixes_match(
    source: Mapping[str, TensorMeta], target: Mapping[str, TensorMeta], transforms: Transforms
) -> None:
    """--drop must name a checkpoint key (after the renames) or a model key; --reinit a
    model key. A flag that matches nothing is a typo or a misunderstanding, not a no-op."""
    if not transforms.drop and not transforms.reinit:
        return
    renamed = list(renamed_names(source, transforms))
    checks = [
        ("drop", _unmatched(transforms.drop, [*renamed, *target])),
        ("reinit", _unmatched(transforms.reinit, list(target))),
    ]
    for name, unmatched in checks:
        for prefix in unmatched:
            hint = _prefix_hint(prefix, source, target, transforms)
            raise TransformError(f"{option(name, prefix)}: matches no key; {hint}")


def _unmatched(prefixes: Sequence[str], names: Iterable[str]) -> list[str]:
    """The prefixes that cover none of ``names`` (a fix may carry thousands of --drop
    flags, a checkpoint hundreds of thousands of names)."""
    if not prefixes:
        return []
    index = PrefixIndex(prefixes)
    # With a few prefixes, only the names they cover are sorted (filtered in C first);
    # with many, testing each name costs more than sorting them all.
    ordered = SortedNames(names if index.many() else index.covered(names))
    return [p for p in prefixes if not ordered.count_under(p)]


def _prefix_hint(
    prefix: str,
    source: Mapping[str, TensorMeta],
    target: Mapping[str, TensorMeta],
    transforms: Transforms,
) -> str:
    renames = bool(transforms.strip or transforms.add_prefix or transforms.rename)
    if renames and any(under_prefix(name, prefix) for name in source):
        moved = transform_prefix(prefix, transforms)
        return (
            f"it names checkpoint keys as they were before {option('strip')}/"
            f"{option('add_prefix')}/{option('rename')}, but {option('drop')} and "
            f"{option('reinit')} apply after them: use {moved!r}"
        )
    modules = {m for name in (*source, *target) for m in (*_ancestors(name), name)}
    close = difflib.get_close_matches(prefix.rstrip("."), sorted(modules), n=1)
    return f"did you mean {close[0] + '.'!r}?" if close else "list the keys with ckptool inspect"


def transform_prefix(prefix: str, transforms: Transforms) -> str:
    """Where names under ``prefix`` end up after the renames (best effort, for hints
    and module paths)."""
    for strip in transforms.strip:
        prefix = prefix.removeprefix(strip)
    prefix = (transforms.add_prefix or "") + prefix
    for pattern, repl in transforms.rename:
        prefix = re.sub(pattern, repl, prefix)
    return prefix


def _compare(
    source: Mapping[str, TensorMeta],
    target: Mapping[str, TensorMeta],
    renaming: Renaming,
    transforms: Transforms,
    hooks: HookPlacement | None = None,
    earlier: _Earlier | None = None,
) -> KeyDiff:
    """The diff of ``source`` renamed by ``renaming`` (``transforms`` applied) with
    ``target``; with ``earlier``, only the names that may compare differently from it
    are compared again (the rest, in C)."""
    mapping = renaming.mapping
    reinit = PrefixIndex(transforms.reinit)
    reinit_names = set(reinit.covered(mapping))
    # Set membership tested in C throughout, and each big dict asked once a name: at
    # 100,000 names a pass of lookups costs 15-35 ms (its table does not fit a cache).
    compared = list(itertools.filterfalse(reinit_names.__contains__, mapping))
    in_target_flags = list(map(target.__contains__, compared))
    in_target = list(itertools.compress(compared, in_target_flags))
    absent = list(itertools.compress(compared, map(operator.not_, in_target_flags)))
    del in_target_flags
    named = in_target if earlier is None else filter(earlier.recheck.__contains__, in_target)
    matched, shape_mismatch, dtype_mismatch = _fits(source, target, mapping, named)
    if earlier is None:
        # Without --reinit the compared names are the mapping's: its keys answer in C.
        kept: Collection[str] = set(compared) if reinit_names else mapping.keys()
        lacking = list(itertools.filterfalse(kept.__contains__, target))
        renames = transforms.strip or transforms.add_prefix or transforms.rename
        renamed = {old: new for new, old in mapping.items() if old != new} if renames else {}
    else:
        # A name not compared again is in the target as before, where it matched then.
        unfit = earlier.recheck.difference(matched)
        matched = list(itertools.filterfalse(unfit.__contains__, in_target))
        lacking = earlier.lacking(target, mapping, reinit_names)
        renamed = earlier.renamed(mapping)
    consumed, filled = (hooks.consumed, hooks.filled) if hooks else (frozenset(), frozenset())
    missing = tuple(itertools.filterfalse(filled.__contains__, lacking))
    ties = tie_groups(target) if earlier is None else earlier.ties
    through_tie = _through_ties(ties, matched, missing)
    _refuse_reinit_of_ties(ties, matched, transforms)
    return KeyDiff(
        matched=tuple(matched),
        missing=missing,
        unexpected=tuple(itertools.filterfalse(consumed.__contains__, absent)),
        shape_mismatch=tuple(shape_mismatch),
        dtype_mismatch=tuple(dtype_mismatch),
        dropped=renaming.dropped,
        reinit=_reinit_names(target, reinit_names, reinit),
        renamed=renamed,
        transforms=transforms,
        source_total=len(source),
        target_total=len(target),
        through_tie=through_tie,
        hooked=tuple(filter(consumed.__contains__, absent)),
        hook_filled=tuple(filter(filled.__contains__, lacking)),
        scaled_codes=_scaled_codes(source, mapping, dtype_mismatch),
    )


def _fits(
    source: Mapping[str, TensorMeta],
    target: Mapping[str, TensorMeta],
    mapping: Mapping[str, str],
    names: Iterable[str],
) -> tuple[list[str], list[ShapeMismatch], list[DtypeMismatch]]:
    """Of ``names`` (renamed checkpoint names the target has): those whose shapes
    match, those whose shapes do not, and the matched ones of another dtype."""
    matched, shape_mismatch, dtype_mismatch = [], [], []
    for name in names:
        src, tgt = source[mapping[name]], target[name]
        if src.shape != tgt.shape:
            shape_mismatch.append(ShapeMismatch(name, src.shape, tgt.shape))
            continue
        matched.append(name)
        if src.dtype != tgt.dtype:
            dtype_mismatch.append(DtypeMismatch(name, src.dtype, tgt.dtype))
    return matched, shape_mismatch, dtype_mismatch


@dataclass(frozen=True)
class _Earlier:
    """A comparison that a rename trial builds on: its diff, and the names (as renamed)
    whose original the rename changed. Every other name keeps its original, its --drop
    and its --reinit (both go by name), so it compares as it did."""

    diff: KeyDiff
    changed: frozenset[str]
    ties: dict[object, list[str]]  # the target's (tie_groups)

    @functools.cached_property
    def recheck(self) -> frozenset[str]:
        """The names to compare again: the changed ones and those that did not fit
        (a matched name outside this set matched with the same dtype)."""
        shapes, dtypes = self.diff.shape_mismatch, self.diff.dtype_mismatch
        unfit = [m.key for m in shapes] + [m.key for m in dtypes]
        return frozenset(itertools.chain(self.changed, unfit))

    def lacking(
        self, target: Mapping[str, TensorMeta], mapping: Mapping[str, str], reinit: set[str]
    ) -> list[str]:
        """The target's names that the renamed ``mapping`` does not compare (``reinit``:
        the names it re-initialises), in the target's order: those it lacked before,
        unless the rename changed them. Only a few names are looked up in big dicts."""
        lacking = set(self.diff.missing).union(self.diff.hook_filled)  # all it lacked
        lacking.difference_update(self.changed)
        lacking.update(n for n in self.changed if n in target and (n not in mapping or n in reinit))
        return list(filter(lacking.__contains__, target)) if lacking else []

    def renamed(self, mapping: Mapping[str, str]) -> dict[str, str]:
        """KeyDiff.renamed under the renamed ``mapping``: the names renamed before, unless
        the rename changed them, and the changed ones, in the mapping's order."""
        names = set(self.diff.renamed.values())  # a changed one is looked up again
        names.update(n for n in self.changed if n in mapping)
        if not names:
            return {}
        return {mapping[n]: n for n in filter(names.__contains__, mapping) if mapping[n] != n}


def _scaled_codes(
    source: Mapping[str, TensorMeta], mapping: Mapping[str, str], mismatches: list[DtypeMismatch]
) -> tuple[tuple[str, str], ...]:
    """Matched float8/float4 tensors going into a wider dtype whose scale the checkpoint
    holds (under any transforms: a --drop of the scale does not make the codes weights)."""
    found = []
    for m in mismatches:
        if m.source in LOW_PRECISION and m.target not in LOW_PRECISION:
            own = mapping[m.key]
            scale = next((own + s for s in SCALE_SUFFIXES if own + s in source), None)
            if scale is not None:
                found.append((m.key, scale))
    return tuple(found)


def scaled_codes_words(keys: KeyDiff) -> str:
    """Why scaled float8 codes do not fit a wider model, and what would."""
    name, scale = keys.scaled_codes[0]
    more = f" (and {len(keys.scaled_codes) - 1} more)" if len(keys.scaled_codes) > 1 else ""
    kind = next(m for m in keys.dtype_mismatch if m.key == name)
    return (
        f"{name}{more} holds {kind.source} codes scaled by {scale}, and the target wants "
        f"{kind.target}: loaded without their scales the weights are wrong (dropping the "
        "scales throws them away); dequantize them first, which ckptool does not do"
    )


def _reinit_names(
    target: Collection[str], from_checkpoint: set[str], reinit: PrefixIndex
) -> tuple[str, ...]:
    if not reinit:
        return ()
    covered = set(reinit.covered(target)) | from_checkpoint
    return tuple(filter(covered.__contains__, target))


def tie_groups(target: Mapping[str, TensorMeta]) -> dict[object, list[str]]:
    """Names of one tensor, by its identity: ``TensorMeta.storage`` marks ties (a model's
    tied parameters, a checkpoint's aliased names). Singletons are left out."""
    return tied_views(target)


def _through_ties(
    ties: Mapping[object, list[str]], matched: Sequence[str], missing: Sequence[str]
) -> dict[str, str]:
    """Missing names whose tensor the checkpoint provides under a tied name."""
    if not ties or not missing:
        return {}
    # Only tied names are looked up: sets of them, not of 100,000 matched names.
    tied = set(itertools.chain.from_iterable(ties.values()))
    provided = set(filter(tied.__contains__, matched))
    lacking = set(filter(tied.__contains__, missing))
    found: dict[str, str] = {}
    for names in ties.values():
        source = next((n for n in names if n in provided), None)
        if source is not None:
            found.update({n: source for n in names if n in lacking})
    return found


def _refuse_reinit_of_ties(
    ties: Mapping[object, list[str]], matched: Sequence[str], transforms: Transforms
) -> None:
    """Re-initialising one name of a tie overwrites the trained values that the
    checkpoint provides under the other name: loading makes the last write win."""
    if not transforms.reinit:
        return
    provided, reinit = set(matched), PrefixIndex(transforms.reinit)
    for names in ties.values():
        kept = [n for n in names if n in provided]
        hit = [n for n in names if reinit.covers(n)]
        if kept and hit:
            raise TransformError(
                f"{option('reinit')} would re-initialise {hit[0]!r}, which the model ties to "
                f"{kept[0]!r} (one tensor under both names) that the checkpoint provides: "
                "its trained values would be overwritten; re-initialise both names or neither"
            )


def suggest_prefixes(
    source: Sequence[str], target: Sequence[str], *, baseline: int = 0
) -> list[Suggestion]:
    """Prefix transforms that make more names match, best first.

    Candidates come from the data (prefixes all source keys share, prefixes many of them
    share, leading modules of the target) and from :data:`KNOWN_PREFIXES`; each is
    scored by exact name matches. A prefix every key has is stripped (``--strip``); one
    only some keys have is renamed away where present (``--rename '^model\\.backbone\\.='``,
    a Lightning module's sub-tree), and what stays unmatched is left to --drop.
    Candidates that match the same names identically are one suggestion (the simplest).
    """
    target_set = set(target)
    by_result: dict[frozenset[tuple[str, str]], Suggestion] = {}
    adds = _add_candidates(target)
    for strip, everywhere in _strip_candidates(source):
        for add in adds:
            if strip == add:
                continue  # the names as given: that is the baseline, not a suggestion
            pairs = _matched_pairs(source, target_set, strip, add, everywhere, baseline)
            if pairs is None:
                continue
            candidate = Suggestion(
                _prefix_transforms(strip, add, everywhere), len(pairs), len(target)
            )
            known = by_result.get(pairs)
            if known is None or _simpler(candidate, known):
                by_result[pairs] = candidate
    return sorted(by_result.values(), key=lambda s: (-s.matched, *_complexity(s)))


def _matched_pairs(
    source: Sequence[str], target: set[str], strip: str, add: str, everywhere: bool, baseline: int
) -> frozenset[tuple[str, str]] | None:
    """(source name, target name) pairs that match after the prefix change, or None if
    they cannot outnumber ``baseline``; a partial prefix renames only the names that
    have it, the others keep theirs.

    Names are scored a block at a time, and scoring stops once the matches so far plus
    every name left cannot beat the baseline: against a checkpoint that mostly fits
    already, a wrong candidate costs one block, not a pass over 100,000 names.
    """
    found: list[tuple[str, str]] = []
    for start in range(0, len(source), SCORING_BLOCK):
        block = source[start : start + SCORING_BLOCK]
        renamed = _renamed(block, strip, add, everywhere)
        found += itertools.compress(
            zip(block, renamed, strict=True), map(target.__contains__, renamed)
        )
        if len(found) + len(source) - start - len(block) <= baseline:
            return None
    return frozenset(found) if len(found) > baseline else None  # (no names at all)


# Names scored at a time by _matched_pairs before it checks whether a candidate can win.
SCORING_BLOCK = 4096


def _renamed(names: Sequence[str], strip: str, add: str, everywhere: bool) -> list[str]:
    if everywhere:  # every name has the prefix: renamed in C, no test per name
        cut = len(strip)
        return list(map(add.__add__, map(operator.itemgetter(slice(cut, None)), names)))
    return [add + n[len(strip) :] if n.startswith(strip) else n for n in names]


def _prefix_transforms(strip: str, add: str, everywhere: bool) -> Transforms:
    if everywhere or not strip:
        return Transforms(strip=(strip,) if strip else (), add_prefix=add or None)
    return Transforms(rename=((f"^{name_pattern(strip)}", name_replacement(add)),))


def _complexity(s: Suggestion) -> tuple[int, bool, list[str]]:
    """Fewer flags first; a --strip reads simpler than the equivalent --rename."""
    return len(s.flags), bool(s.transforms.rename), s.flags


def _simpler(a: Suggestion, b: Suggestion) -> bool:
    return _complexity(a) < _complexity(b)


# Prefixes shared by only some source keys that are tried (the most common ones).
MAX_PARTIAL_CANDIDATES = 8
# How deep a partial prefix may go (``model.backbone.body.`` is 3 segments).
MAX_PARTIAL_DEPTH = 3


def _strip_candidates(names: Sequence[str]) -> list[tuple[str, bool]]:
    """(prefix, whether every name has it): '' and every dotted prefix all names share
    (``module.``, ``module.model.``), then the prefixes most names share."""
    if not names:
        return [("", True)]
    common = common_dotted_prefix(names)
    parts = common.split(".")[:-1] if common else []
    shared = ["", *(".".join(parts[: i + 1]) + "." for i in range(len(parts)))][:4]
    # Only a name's first MAX_PARTIAL_DEPTH modules matter: names are grouped by them in
    # C, then each group is counted once (100,000 names make a few thousand groups).
    heads = Counter(map(_GROUP, map(_LEADING_MODULES.match, names)))
    counts: Counter[str] = Counter()
    for head, many in heads.items():
        segments = head.split(".")[:-1]
        for depth in range(len(parts) + 1, len(segments) + 1):
            if segments[depth - 1].isdigit():
                break  # a list element (layers.3.) is not a wrapper or a sub-tree
            counts[".".join(segments[:depth]) + "."] += many
    partial = [p for p, n in counts.most_common() if 1 < n < len(names)][:MAX_PARTIAL_CANDIDATES]
    return [(p, True) for p in shared] + [(p, False) for p in partial]


# A name's leading modules, each with its dot, at most MAX_PARTIAL_DEPTH of them (never
# the leaf: 'a.b' -> 'a.', 'w' -> '').
_LEADING_MODULES = re.compile(rf"(?:[^.]*\.){{0,{MAX_PARTIAL_DEPTH}}}")
_GROUP = operator.methodcaller("group")


def common_dotted_prefix(names: Sequence[str]) -> str:
    """The longest prefix ending in '.' that every name shares ('' if none)."""
    if not names:
        return ""
    first, last = min(names), max(names)
    end = 0
    for i, (a, b) in enumerate(zip(first, last, strict=False)):
        if a != b:
            break
        if a == ".":
            end = i + 1
    return first[:end]


def _add_candidates(target: Sequence[str]) -> list[str]:
    """'' plus the target's most common leading modules (``bert.``, ``backbone.``)."""
    # Each dotted name's first module and its dot, made in C.
    dotted = itertools.compress(target, map(operator.contains, target, itertools.repeat(".")))
    heads = map(operator.itemgetter(0), map(str.partition, dotted, itertools.repeat(".")))
    leading = Counter(map(operator.add, heads, itertools.repeat(".")))
    common = [prefix for prefix, _ in leading.most_common(MAX_ADD_CANDIDATES)]
    known = [p for p in KNOWN_PREFIXES if p in leading and p not in common]
    return ["", *common, *known]


class Reason(str, enum.Enum):
    """Why a fix step is needed."""

    PREFIX = "prefix"
    SHAPE_MISMATCH = "shape mismatch"
    UNEXPECTED = "unexpected"
    MISSING = "missing"
    TIED = "tied"  # no flag: adapt writes the name from its tie partner
    NESTING = "nesting"  # a rename moving layers one module level deeper or shallower
    RENAMED = "renamed"  # a rename pairing a tensor the model lacks with one it misses
    MOVED = "moved"  # a given --drop, moved with the keys the prefix fix renames


@dataclass(frozen=True)
class FixStep:
    """One flag of the suggested fix, with the keys that need it."""

    flag: str
    reason: Reason
    keys: tuple[str, ...] = ()
    matched: int = 0  # for PREFIX: names that match after it, out of total
    total: int = 0
    # for RENAMED: the (pattern, replacement); for MOVED: the (given, moved) prefix
    rule: tuple[str, str] | None = None
    prefix: Transforms | None = None  # for PREFIX: the prefix change itself


@dataclass(frozen=True)
class Fix:
    """Transforms that make the checkpoint compatible, and why each flag is there."""

    transforms: Transforms
    steps: tuple[FixStep, ...]
    kept_numel: int = 0  # the model's learned values the checkpoint provides after the fix
    model_numel: int = 0  # all of its learned values (see learned_numel)
    given_discards: int = 0  # learned values under the given --drop/--reinit prefixes

    @property
    def module_transforms(self) -> Transforms:
        """The transforms without the renames of single tensors: the names the model's
        load hooks expect (they rename ``weight_g`` themselves)."""
        singles = {s.rule for s in self.steps if s.reason is Reason.RENAMED}
        kept = tuple(r for r in self.transforms.rename if r not in singles)
        return dataclasses.replace(self.transforms, rename=kept)

    def moved(self, drop: Sequence[str]) -> tuple[str, ...]:
        """Given --drop prefixes as they apply under the fix's renames (see Reason.MOVED)."""
        return _apply_moves(self.steps, drop)

    @property
    def keeps_little(self) -> bool:
        """The fix would leave most of the model at its fresh initialisation: no fix at all."""
        return mostly_init(self.kept_numel, self.model_numel)

    @property
    def keeps_little_by_choice(self) -> bool:
        """It keeps little because the given --drop/--reinit discard values the checkpoint
        has: without them it would not (the file is for this model; the user may mean it)."""
        kept_without = self.kept_numel + self.given_discards
        return self.keeps_little and not mostly_init(kept_without, self.model_numel)


def discarded_by_choice(keys: KeyDiff) -> str | None:
    """Why the fix keeps little when the given --drop/--reinit explain it (the file is
    for this model; the user may mean it), in the words diff and ``--auto`` both say."""
    if keys.fix is None or not keys.fix.keeps_little_by_choice:
        return None
    given = Transforms(drop=keys.transforms.drop, reinit=keys.transforms.reinit)
    return (
        f"most of the model would be fresh initialisation, as the given {given.words()} "
        "discard the rest"
    )


# Below this share of the model's values from the checkpoint, a "fix" is no fix: the file
# is likely for another model; adapt refuses to write it unless told.
MOSTLY_INIT_SHARE = 0.5


def learned_numel(target: Mapping[str, TensorMeta], names: Iterable[str]) -> int:
    """Elements of the learned tensors among ``names``: a model's trainable parameters
    (buffers and frozen parameters are computed, not trained), any checkpoint tensor.
    ``names`` may be ``target`` itself: all of them, then read without a lookup each."""
    tensors = target.values() if names is target else map(target.__getitem__, names)
    return sum(numels(filter(operator.attrgetter("learned"), tensors)))  # in C


def mostly_init(from_checkpoint: int, model_numel: int) -> bool:
    """Less than MOSTLY_INIT_SHARE of the model's values would come from the checkpoint."""
    return model_numel > 0 and from_checkpoint < MOSTLY_INIT_SHARE * model_numel


def with_suggestion(given: Transforms, suggestion: Suggestion) -> Transforms:
    """The given transforms plus a suggested prefix change."""
    return dataclasses.replace(
        given,
        strip=given.strip + suggestion.transforms.strip,
        add_prefix=suggestion.transforms.add_prefix or given.add_prefix,
        rename=given.rename + suggestion.transforms.rename,
    )


def _applies(source: Iterable[str], transforms: Transforms) -> bool:
    try:
        apply_transforms(source, transforms)
    except TransformError:
        return False
    return True


def _parses_back(transforms: Transforms) -> bool:
    """Each printed ``--rename REGEX=REPL``, parsed as adapt parses it, gives back the
    rule that was replayed: the flag is split at its first ``=`` and the regex compiled.
    (Every flag value is one shell word by construction, see ``shell_word``; checking
    only the renames keeps a fix of 100k --drop flags from paying a shell parse each.)"""
    try:
        return all(_parse_rename(f"{p}={r}") == (p, r) for p, r in transforms.rename)
    except TransformError:
        return False


def _replays(
    source: Mapping[str, TensorMeta],
    target: Mapping[str, TensorMeta],
    transforms: Transforms,
    hooks: HookPlacement | None,
    last: KeyDiff,
) -> bool:
    """A fix is printed only if running it works: the transforms apply, every flag
    matches something, and adapt's output would load strictly with something kept.

    ``last`` is the composer's last comparison: when the fix added no flag after it,
    it is the replay's comparison already (a 100k-name diff saves one pass), and only
    the flag checks that ``diff`` makes before comparing remain."""
    try:
        if last.transforms == transforms:
            _check_prefixes_match(source, target, transforms)
            replayed = last
        else:
            replayed = diff(source, target, transforms, suggest=False, hooks=hooks)
    except TransformError:
        return False
    return replayed.fits_after_adapt and bool(replayed.matched)


def _compose_fix(
    source: Mapping[str, TensorMeta],
    target: Mapping[str, TensorMeta],
    as_given: KeyDiff,
    best: Suggestion | None,
    hooks: HookPlacement | None = None,
) -> tuple[Fix, KeyDiff] | None:
    """The given transforms (``as_given`` compared with them) plus the best prefix fix
    plus --drop/--reinit for what remains; with the last comparison made (with the fix's
    transforms, unless --drop/--reinit were added after it)."""
    given = as_given.transforms
    base, steps, after = given, [], as_given  # without a prefix fix, compared already
    if best is not None:
        steps = [
            FixStep(
                " ".join(best.flags),
                Reason.PREFIX,
                matched=best.matched,
                total=best.total,
                prefix=best.transforms,
            )
        ]
        try:
            base, moved = _drops_moved(source, target, with_suggestion(given, best), best)
            steps += moved
            after = _compare(source, target, apply_transforms(source, base), base, hooks)
        except TransformError:
            return None
    nesting = _nesting_rename(source, target, base, after, hooks)
    if nesting is not None:
        base, after, step = nesting
        steps.append(step)
    base, after, renames = _rename_tensors(source, target, base, after, hooks)
    steps += renames
    drop, reinit = _cover_remaining(after)
    steps += _steps("--drop", drop, after) + _steps("--reinit", reinit, after)
    if after.through_tie:
        steps.append(FixStep("", Reason.TIED, tuple(after.through_tie)))
    fix = dataclasses.replace(base, drop=base.drop + drop, reinit=base.reinit + reinit)
    if fix == given and not after.through_tie:
        return None
    model_numel = learned_numel(target, target)
    # The model's names are matched, mismatched, missing or filled by hooks, each once:
    # what the fix keeps (matched, tied, hook-filled) is all less the few it does not.
    ties = after.through_tie
    lost = [*(m.key for m in after.shape_mismatch), *(n for n in after.missing if n not in ties)]
    kept = model_numel - learned_numel(target, lost)
    discards = _given_discards(target, given, steps)
    return Fix(fix, tuple(steps), kept, model_numel, discards), after


def _given_discards(
    target: Mapping[str, TensorMeta], given: Transforms, steps: Sequence[FixStep]
) -> int:
    """Learned values of the model's names under the given --drop (as the fix moved
    them) and --reinit prefixes: what the user's own flags leave to initialisation."""
    prefixes = [*_apply_moves(steps, given.drop), *given.reinit]
    if not prefixes:
        return 0
    return learned_numel(target, PrefixIndex(prefixes).covered(target))


def _apply_moves(steps: Sequence[FixStep], drop: Sequence[str]) -> tuple[str, ...]:
    """``drop`` with each prefix a MOVED step moved replaced by where it moved."""
    moves = dict(s.rule for s in steps if s.reason is Reason.MOVED and s.rule)
    return tuple(moves.get(prefix, prefix) for prefix in drop)


def _drops_moved(
    source: Mapping[str, TensorMeta],
    target: Mapping[str, TensorMeta],
    transforms: Transforms,
    prefix_fix: Suggestion,
) -> tuple[Transforms, list[FixStep]]:
    """``transforms`` with each given --drop prefix that covers no key once the prefix
    fix renames the keys moved with them (``--drop module.fc.`` -> ``--drop fc.`` after
    ``--strip module.``): the user named the keys as the report showed them, and --drop
    applies after every rename. Prefixes that still cover a key stay as given (they may
    name the model's keys: --drop fc. fills the head from the model's init).

    Raises:
        TransformError: as :func:`apply_transforms`.
    """
    if not transforms.drop:
        return transforms, []
    names = SortedNames([*renamed_names(source, transforms), *target])
    drop, steps = [], []
    for prefix in transforms.drop:
        if names.count_under(prefix):
            drop.append(prefix)
            continue
        # If the moved prefix covers nothing either, the replay refuses the fix.
        moved = transform_prefix(prefix, prefix_fix.transforms)
        drop.append(moved)
        steps.append(
            FixStep(f"--drop {shell_word(moved)}", Reason.MOVED, (prefix,), rule=(prefix, moved))
        )
    return dataclasses.replace(transforms, drop=tuple(drop)), steps


def _nesting_rename(
    source: Mapping[str, TensorMeta],
    target: Mapping[str, TensorMeta],
    base: Transforms,
    after: KeyDiff,
    hooks: HookPlacement | None,
) -> tuple[Transforms, KeyDiff, FixStep] | None:
    """A rename that moves checkpoint layers one module level deeper or shallower
    (``prefilt_layers.0.weight`` for the model's ``prefilt_layers.0.0.weight``, code that
    wrapped a layer in a Sequential): keeps those weights instead of re-initialising them.
    Returns the transforms with it, the diff after it, and its fix step; None if no
    rename of that kind makes more names match."""
    if not after.unexpected or not after.missing:
        return None
    original = after.original
    missing_by_leaf: dict[tuple[str, tuple[int, ...]], list[str]] = {}
    for name in after.missing:
        missing_by_leaf.setdefault((name.rpartition(".")[2], target[name].shape), []).append(name)
    rules: Counter[tuple[str, str]] = Counter()
    for name in after.unexpected:
        module, _, leaf = name.rpartition(".")
        shape = source[original.get(name, name)].shape
        for partner in missing_by_leaf.get((leaf, shape), ())[:MAX_NESTING_PARTNERS]:
            rule = _nesting_rule(module, partner.rpartition(".")[0])
            if rule is not None:
                rules[rule] += 1
    if not rules:
        return None
    trials = _RenameBase(base, renamed_names(source, base), tie_groups(target))
    best: tuple[Transforms, KeyDiff, tuple[str, ...], tuple[str, str]] | None = None
    for rule, _ in rules.most_common(MAX_NESTING_RULES):
        renamed = _with_rename(source, target, trials, after, rule, hooks)
        if renamed is not None and (best is None or len(renamed[1].matched) > len(best[1].matched)):
            best = (renamed[0].transforms, *renamed[1:], rule)
    if best is None:
        return None
    transforms, trial, moved, rule = best
    flag = Transforms(rename=(rule,)).flags()[0]
    return transforms, trial, FixStep(flag, Reason.NESTING, moved)


# How many same-leaf, same-shape partners one unexpected key is paired with, and how
# many candidate nesting renames are tried (each renames every name once more).
MAX_NESTING_PARTNERS = 8
MAX_NESTING_RULES = 4


def _nesting_rule(module: str, wanted: str) -> tuple[str, str] | None:
    """(pattern, replacement) turning ``module.leaf`` into ``wanted.leaf`` where one is
    the other plus one module level; numbered segments become groups, so one rule moves
    every layer of a list (``prefilt_layers.{0..4}``)."""
    if wanted.startswith(module + ".") and "." not in wanted[len(module) + 1 :]:
        pattern, repl, groups = _module_pattern(module)
        extra = name_replacement(wanted[len(module) + 1 :])
        return f"^{pattern}\\.([^.]+)$", f"{repl}.{extra}.\\{groups + 1}"
    if module.startswith(wanted + ".") and "." not in module[len(wanted) + 1 :]:
        pattern, repl, groups = _module_pattern(wanted)
        extra = name_pattern(module[len(wanted) + 1 :])
        return f"^{pattern}\\.{extra}\\.([^.]+)$", f"{repl}.\\{groups + 1}"
    return None


def _module_pattern(module: str) -> tuple[str, str, int]:
    """'layers.3.conv' -> ('layers\\.(\\d+)\\.conv', 'layers.\\1.conv', 1 group)."""
    pattern, repl, groups = [], [], 0
    for segment in module.split("."):
        if segment.isdigit():  # as _strip_candidates tells list elements
            groups += 1
            pattern.append(r"(\d+)")
            repl.append(f"\\{groups}")
        else:
            pattern.append(name_pattern(segment))
            repl.append(name_replacement(segment))
    return r"\.".join(pattern), ".".join(repl), groups


# Tensor names that differ between ports of the same layer: TF-era LayerNorm
# (gamma/beta) and weight norm before and after torch's parametrizations. Tails, both ways.
KNOWN_RENAMES = (
    ("gamma", "weight"),
    ("beta", "bias"),
    ("weight_g", "parametrizations.weight.original0"),
    ("weight_v", "parametrizations.weight.original1"),
)
# How many renames of tensors are tried (each renames every name once more); past that the
# module is dropped and re-initialised as before.
MAX_TENSOR_RENAMES = 8


def _rename_tensors(
    source: Mapping[str, TensorMeta],
    target: Mapping[str, TensorMeta],
    base: Transforms,
    after: KeyDiff,
    hooks: HookPlacement | None,
) -> tuple[Transforms, KeyDiff, list[FixStep]]:
    """Renames that keep trained tensors a --drop would throw away: an unexpected key
    and a missing key of the same shape and dtype, paired by a known port rename
    (``LayerNorm.gamma`` -> ``LayerNorm.weight``), as names of one module whose leaf
    names contain one another and fit no other (``w2.weight`` -> ``w2.weight_orig``),
    or as the only pair differing in an index written apart (``norm.1`` -> ``norm1``).
    A change repeated across modules gets one rule for all of them, else one rule per
    tensor; each rule is kept only if it loses no matched name and matches more (a
    comparison of the names it changes)."""
    steps: list[FixStep] = []
    # The rules in the order they are tried, each with its group's general rule (None
    # when the group has none); a general rule that is kept skips the rest of its group.
    queue = [
        (rule, general)
        for general, singles in _rename_rules(source, target, after)
        for rule in ((general, *singles) if general else singles)
    ]
    tries = 0
    trials: _RenameBase | None = None  # made once a rule is tried
    done: tuple[str, str] | None = None  # the general rule kept: its group is done
    one_by_one = 0  # rules left to try one at a time (a batch of them was not kept)
    while queue and tries < MAX_TENSOR_RENAMES:
        if trials is None:
            trials = _RenameBase(base, renamed_names(source, base), tie_groups(target))
        # Rules of groups without a general rule rename one tensor each: a run of them
        # is tried at once, where that gives what trying them one at a time gives.
        run = list(itertools.takewhile(lambda item: item[1] is None, queue))
        run = run[: MAX_TENSOR_RENAMES - tries]
        if len(run) > 1 and not one_by_one:
            rules = [rule for rule, _ in run]
            batch = _with_renames(source, target, trials, after, rules, hooks)
            if batch is not None:
                trials, after, moved_each = batch
                steps += map(_renamed_step, rules, moved_each)
                tries += len(run)
                del queue[: len(run)]
                continue
            one_by_one = len(run)
        rule, general = queue.pop(0)
        if general is not None and general is done:
            continue
        tries += 1
        one_by_one = max(one_by_one - 1, 0)
        renamed = _with_rename(source, target, trials, after, rule, hooks)
        if renamed is None:
            continue
        trials, after, moved = renamed
        steps.append(_renamed_step(rule, moved))
        if rule is general:
            done = general
    return (trials.transforms if trials else base), after, steps


def _renamed_step(rule: tuple[str, str], moved: tuple[str, ...]) -> FixStep:
    return FixStep(Transforms(rename=(rule,)).flags()[0], Reason.RENAMED, moved, rule=rule)


def _rename_rules(
    source: Mapping[str, TensorMeta], target: Mapping[str, TensorMeta], after: KeyDiff
) -> list[tuple[tuple[str, str] | None, list[tuple[str, str]]]]:
    """Per kind of change (a differing tail such as ``gamma`` -> ``weight``, or indexes
    joined onto the same words): one rule for all its pairs (None for a single pair),
    and a rule for each pair by its full names."""
    original = after.original
    missing = set(after.unexplained_missing)

    def same_tensor(old: str, new: str) -> bool:
        src, tgt = source[original.get(old, old)], target[new]
        return src.shape == tgt.shape and src.dtype == tgt.dtype

    pairs = [(old, new) for old in after.unexpected for new in _known_partners(old)
             if new in missing and same_tensor(old, new)]  # fmt: skip
    paired = {name for pair in pairs for name in pair}
    pairs += _only_pairs_by_module(
        [k for k in after.unexpected if k not in paired],
        [k for k in missing if k not in paired],
        lambda old, new: same_tensor(old, new) and _one_name_holds_the_other(old, new),
    )
    by_tail: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for old, new in pairs:
        by_tail.setdefault(_differing_tails(old, new), []).append((old, new))
    paired = {name for pair in pairs for name in pair}
    by_index_style = _index_style_pairs(
        [k for k in after.unexpected if k not in paired],
        [k for k in missing if k not in paired],
        same_tensor,
    )
    groups = [
        (
            _tail_rule(old_tail, new_tail, [old for old, _ in group]) if len(group) > 1 else None,
            group,
        )
        for (old_tail, new_tail), group in by_tail.items()
    ]
    groups += [(_index_style_rule(joins, group), group) for joins, group in by_index_style.items()]
    return [
        (general, [(f"^{name_pattern(old)}$", name_replacement(new)) for old, new in group])
        for general, group in groups
    ]


def _joined(name: str) -> tuple[str, list[str]]:
    """``a.norm.1.weight`` -> (``a.norm1.weight``, ["norm"]): each list index written
    onto the module name before it (the words it joined). DenseNet's layers were
    ``norm.1``, ``conv.1`` in old checkpoints and are ``norm1``, ``conv1`` now."""
    segments: list[str] = []
    words: list[str] = []
    for segment in name.split("."):
        if segment.isdigit() and segments and segments[-1][-1:].isalpha():
            words.append(segments[-1])
            segments[-1] += segment
        else:
            segments.append(segment)
    return ".".join(segments), words


def _index_style_pairs(
    unexpected: list[str], missing: list[str], same_tensor: Callable[[str, str], bool]
) -> dict[tuple[bool, tuple[str, ...]], list[tuple[str, str]]]:
    """(unexpected, missing) pairs that differ only in ``norm.1`` against ``norm1``, each
    the only one of its joined form; grouped by direction (True: the checkpoint has the
    dots) and the words involved."""

    def by_joined(names: list[str]) -> dict[str, list[tuple[str, list[str]]]]:
        found: dict[str, list[tuple[str, list[str]]]] = {}
        for name in names:
            joined, words = _joined(name)
            found.setdefault(joined, []).append((name, words))
        return found

    olds, news = by_joined(unexpected), by_joined(missing)
    groups: dict[tuple[bool, tuple[str, ...]], list[tuple[str, str]]] = {}
    for joined, old in olds.items():
        new = news.get(joined, ())
        if len(old) != 1 or len(new) != 1:
            continue
        (old_name, old_words), (new_name, new_words) = old[0], new[0]
        if not same_tensor(old_name, new_name):
            continue
        splits = len(old_words) > len(new_words)  # the checkpoint writes more indexes apart
        words = (
            Counter(old_words) - Counter(new_words)
            if splits
            else Counter(new_words) - Counter(old_words)
        )
        groups.setdefault((splits, tuple(sorted(words))), []).append((old_name, new_name))
    return groups


def _index_style_rule(
    joins: tuple[bool, tuple[str, ...]], group: list[tuple[str, str]]
) -> tuple[str, str] | None:
    """One rename for a group of index-style pairs: ``norm.1`` -> ``norm1`` (or back) for
    the words involved, at the start of a segment, wherever they are."""
    splits, words = joins
    if len(group) < 2 or not words:
        return None
    alternatives = "|".join(map(name_pattern, words))
    # No lookahead: (?= holds an '=', where a --rename flag is split.
    if splits:
        return f"(^|\\.)({alternatives})\\.(\\d+)(\\.|$)", "\\g<1>\\g<2>\\g<3>\\g<4>"
    return f"(^|\\.)({alternatives})(\\d+)(\\.|$)", "\\g<1>\\g<2>.\\g<3>\\g<4>"


def name_pattern(text: str) -> str:
    """``re.escape`` that also hides ``=``: a --rename flag is split at its first ``=``."""
    return re.escape(text).replace("=", "\\x3d")


def _tail_rule(old_tail: str, new_tail: str, olds: list[str]) -> tuple[str, str]:
    """One rename for every name ending in ``old_tail`` under the module name these all
    share (``LayerNorm.weight`` -> ``LayerNorm.gamma``, not every ``.weight``)."""
    modules = [old[: -len(old_tail)].rstrip(".").split(".") for old in olds]
    shared: list[str] = []
    for segments in zip(*(reversed(m) for m in modules), strict=False):
        if len(set(segments)) > 1 or segments[0].isdigit():
            break
        shared.insert(0, segments[0])
    tail = ".".join(filter(None, (*shared, old_tail)))
    replacement = ".".join(filter(None, (*shared, new_tail)))
    return f"(^|\\.){name_pattern(tail)}$", "\\g<1>" + name_replacement(replacement)


def _known_partners(name: str) -> Iterator[str]:
    for old_tail, new_tail in (*KNOWN_RENAMES, *((b, a) for a, b in KNOWN_RENAMES)):
        if name == old_tail or name.endswith("." + old_tail):
            yield name[: len(name) - len(old_tail)] + new_tail


def _only_pairs_by_module(
    unexpected: list[str], missing: list[str], fits: Callable[[str, str], bool]
) -> list[tuple[str, str]]:
    """(unexpected, missing) pairs in one module that ``fits``, where neither name fits
    any other name of its module: a new tensor beside a renamed one (``scale`` added,
    ``weight`` -> ``weight_orig``) does not hide the rename, two candidates do."""

    def by_module(names: list[str]) -> dict[str, list[str]]:
        modules: dict[str, list[str]] = {}
        for name in names:
            modules.setdefault(name.rpartition(".")[0], []).append(name)
        return modules

    olds, news = by_module(unexpected), by_module(missing)
    pairs = []
    for module, old_names in olds.items():
        new_names = news.get(module, [])
        if len(old_names) * len(new_names) > MAX_MODULE_PAIRINGS:  # 100k flat names at the root
            continue
        fitting = [(old, new) for old in old_names for new in new_names if fits(old, new)]
        olds_seen = Counter(old for old, _ in fitting)
        news_seen = Counter(new for _, new in fitting)
        pairs += [(old, new) for old, new in fitting if olds_seen[old] == news_seen[new] == 1]
    return pairs


# Pairs of names tried in one module (each unexpected with each missing key).
MAX_MODULE_PAIRINGS = 64


def _one_name_holds_the_other(old: str, new: str) -> bool:
    """``weight`` and ``weight_orig``, ``var`` and ``running_var``: likely one tensor
    renamed. ``k_bias`` and ``v_bias`` are two tensors of two designs, not paired: a wrong
    guess would load trained values into the wrong place, where a drop re-initialises."""
    old_leaf, new_leaf = old.rpartition(".")[2], new.rpartition(".")[2]
    return old_leaf in new_leaf or new_leaf in old_leaf


def _differing_tails(old: str, new: str) -> tuple[str, str]:
    """The names past their longest common module path: ('a.b.gamma', 'a.b.weight') ->
    ('gamma', 'weight')."""
    common = 0
    for a, b in zip(old.split("."), new.split("."), strict=False):
        if a != b:
            break
        common += 1
    return ".".join(old.split(".")[common:]), ".".join(new.split(".")[common:])


def name_replacement(name: str) -> str:
    """``name`` as a re.sub replacement that inserts it verbatim."""
    return name.replace("\\", "\\\\")


class _RenameBase(NamedTuple):
    """What a rename trial builds on: the transforms so far, the names they rename
    (:func:`renamed_names`, before --drop) and the target's ties (:func:`tie_groups`)."""

    transforms: Transforms
    names: dict[str, str]
    ties: dict[object, list[str]]


def _with_rename(
    source: Mapping[str, TensorMeta],
    target: Mapping[str, TensorMeta],
    base: _RenameBase,
    after: KeyDiff,
    rule: tuple[str, str],
    hooks: HookPlacement | None,
) -> tuple[_RenameBase, KeyDiff, tuple[str, ...]] | None:
    """``base`` plus the rename ``rule``, if it keeps every name matched so far
    (``after``, base's diff) and matches more; with the diff after it and the names it
    newly matches.

    The trial renames base's names once more and compares again only what the rule
    changed (a fix tries up to a dozen rules on 100,000 names)."""
    added = _with_renames(source, target, base, after, [rule], hooks)
    if added is None:
        return None
    trials, trial, (moved,) = added
    return trials, trial, moved


def _with_renames(
    source: Mapping[str, TensorMeta],
    target: Mapping[str, TensorMeta],
    base: _RenameBase,
    after: KeyDiff,
    rules: Sequence[tuple[str, str]],
    hooks: HookPlacement | None,
) -> tuple[_RenameBase, KeyDiff, list[tuple[str, ...]]] | None:
    """``base`` plus all of ``rules`` at once, where that is what ``_with_rename`` gives
    adding them one at a time: no two rules change the same name (so each compares as
    it would alone), none loses a matched name, each matches more; with the diff after
    them and the names each newly matches. None otherwise: they are then tried one at a
    time. A port renaming eight tensors costs one trial over the names, not eight."""
    candidate = dataclasses.replace(base.transforms, rename=(*base.transforms.rename, *rules))
    try:
        each = _changes_in_turn(base.names, rules)
        touched = [frozenset(itertools.chain(c, c.values())) for c in each]
        changed = frozenset().union(*touched)
        if sum(map(len, touched)) != len(changed):
            return None  # two rules change one name: one at a time decides
        renamed = _renamed_by(base.names, each)
        if renamed is None:
            return None  # two names become one: one at a time names the rule that fails
        earlier = _Earlier(after, changed, base.ties)
        trial = _compare(source, target, _drop_covered(renamed, candidate.drop), candidate,
                         hooks, earlier)  # fmt: skip
    except TransformError:
        return None
    # Only the names compared again can have been lost or gained.
    fit_before = set(filter(earlier.recheck.__contains__, after.matched))
    fit_now = set(filter(earlier.recheck.__contains__, trial.matched))
    if fit_before - fit_now:
        return None
    gained = fit_now - fit_before
    gained_in_order = list(filter(gained.__contains__, trial.matched))
    moved = [tuple(filter(names.__contains__, gained_in_order)) for names in touched]
    if not all(moved):
        return None
    return _RenameBase(candidate, renamed, base.ties), trial, moved


def _changes_in_turn(
    current: Mapping[str, str], rules: Sequence[tuple[str, str]]
) -> list[dict[str, str]]:
    """The names each rule changes (old -> new), each rule applied to the names as the
    rules before it left them, without building the renamed dict for each."""
    now: dict[str, str] = {}  # a name of ``current`` -> its name after the rules so far
    each = []
    for pattern, repl in rules:
        changes = _changes(map(now.get, current, current), pattern, repl)
        was = {new: old for old, new in now.items()}  # (a few names)
        now.update((was.get(old, old), new) for old, new in changes.items())
        each.append(changes)
    return each


def _renamed_by(
    current: Mapping[str, str], each: Sequence[dict[str, str]]
) -> dict[str, str] | None:
    """``current`` renamed by changes to names no two of which touch one name (each
    keeps its place), or None where two names would become one."""
    changes = {old: new for changes in each for old, new in changes.items()}
    renamed = dict(zip(map(changes.get, current, current), current.values(), strict=True))
    return renamed if len(renamed) == len(current) else None


def _steps(flag: str, prefixes: Sequence[str], after: KeyDiff) -> list[FixStep]:
    """One step per prefix, naming the keys it fixes (each key looked up once)."""
    index = PrefixIndex(prefixes)
    found: dict[str, tuple[list[str], list[str], list[str]]] = {p: ([], [], []) for p in prefixes}
    for slot, keys in enumerate(
        ([m.key for m in after.shape_mismatch], after.unexpected, after.missing)
    ):
        for key in keys:
            prefix = index.covering(key)
            if prefix is not None:
                found[prefix][slot].append(key)
    steps = []
    for prefix, (mismatched, unexpected, missing) in found.items():
        if mismatched:
            steps.append(FixStep(f"{flag} {prefix}", Reason.SHAPE_MISMATCH, tuple(mismatched)))
        elif unexpected:
            steps.append(FixStep(f"{flag} {prefix}", Reason.UNEXPECTED, tuple(unexpected)))
        else:
            steps.append(FixStep(f"{flag} {prefix}", Reason.MISSING, tuple(missing)))
    return steps


def _cover_remaining(after: KeyDiff) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Module prefixes to --drop (unexpected/mismatched) and --reinit (missing only)."""
    conflicting = set(after.unexpected) | {m.key for m in after.shape_mismatch}
    missing = set(after.unexplained_missing)
    if not conflicting and not missing:
        return (), ()  # (a universe of 100,000 names is not sorted for nothing)
    # Names the hooks place belong to the universe: a prefix must not sweep them up.
    universe = set(after.matched) | set(after.missing) | conflicting
    universe |= set(after.hooked) | set(after.hook_filled)
    ordered = SortedNames(universe)  # once for both
    drop = _covering(conflicting | (missing & _near(conflicting, missing)), universe, ordered)
    reinit = _covering(missing - _covered(missing, drop), universe, ordered)
    return tuple(drop), tuple(reinit)


def _near(conflicting: set[str], missing: set[str]) -> set[str]:
    """Missing keys in the same module as a conflicting key go with the --drop."""
    modules = {k.rpartition(".")[0] for k in conflicting}
    return {k for k in missing if k.rpartition(".")[0] in modules}


def _covered(names: set[str], prefixes: Iterable[str]) -> set[str]:
    index = PrefixIndex(prefixes)
    return set(index.covered(names))


# Up to this many prefixes, PrefixIndex.covers tests them all at once.
MAX_STARTSWITH_PREFIXES = 32


class PrefixIndex:
    """Which of many prefixes covers a name (as :func:`under_prefix` decides), in time
    proportional to the name's depth rather than to the number of prefixes."""

    def __init__(self, prefixes: Iterable[str] = ()) -> None:
        self._below: dict[str, str] = {}  # 'fc' -> 'fc.': covers names below module fc
        self._at: dict[str, str] = {}  # 'fc' -> 'fc': covers fc itself and names below it
        self._starts: tuple[str, ...] | None = None  # 'fc.' for both, built when asked
        for prefix in prefixes:
            self.add(prefix)

    def add(self, prefix: str) -> None:
        if prefix.endswith("."):
            self._below.setdefault(prefix[:-1], prefix)
        else:
            self._at.setdefault(prefix, prefix)
        self._starts = None

    def covers(self, name: str) -> bool:
        """Whether a prefix covers ``name``: with a few prefixes, one ``startswith`` in C
        (asked for every key of a 100k-tensor checkpoint, the walk up its modules costs
        10x more); with many, the walk, whose cost does not grow with their number."""
        if self.many():
            return self.covering(name) is not None
        return name.startswith(self._startswith()) or name in self._at

    def covered(self, names: Iterable[str]) -> list[str]:
        """The ``names`` a prefix covers, in their order; with a few prefixes, every name
        is tested in C (no call per name: a --drop over 100,000 keys asks this)."""
        if not self:
            return []
        if self.many():
            return [name for name in names if self.covering(name) is not None]
        names = list(names)
        below = map(operator.methodcaller("startswith", self._startswith()), names)
        return list(
            itertools.compress(names, map(operator.or_, below, map(self._at.__contains__, names)))
        )

    def many(self) -> bool:
        """Too many prefixes to test at once with ``startswith``."""
        return len(self._below) + len(self._at) > MAX_STARTSWITH_PREFIXES

    def _startswith(self) -> tuple[str, ...]:
        if self._starts is None:
            self._starts = tuple(module + "." for module in (*self._below, *self._at))
        return self._starts

    def __bool__(self) -> bool:
        """Whether it holds any prefix: callers skip asking about every key otherwise."""
        return bool(self._below or self._at)

    def covering(self, name: str) -> str | None:
        """The prefix that covers ``name`` (the outermost if several), or None."""
        if not self:  # asked for every key even with no prefixes
            return None
        for module in _ancestors(name):
            hit = self._below.get(module) or self._at.get(module)
            if hit is not None:
                return hit
        return self._at.get(name)


def _ancestors(name: str) -> Iterator[str]:
    """'a.b.c' -> 'a', 'a.b' (modules strictly above the name)."""
    end = name.find(".")
    while end != -1:
        yield name[:end]
        end = name.find(".", end + 1)


def covering_prefixes(affected: set[str], universe: set[str]) -> list[str]:
    """The fewest module prefixes that cover ``affected`` and nothing else of ``universe``.

    ``{'fc.weight', 'fc.bias'}`` in a ResNet gives ``['fc.']``; ``classifier.6.*`` in a
    VGG gives ``['classifier.6.']`` because ``classifier.0`` is not affected.
    """
    return _covering(affected, universe, SortedNames(universe)) if affected else []


def _covering(affected: set[str], universe: set[str], in_universe: SortedNames) -> list[str]:
    """covering_prefixes, with ``universe`` sorted already."""
    # A module qualifies when every universe name under it is affected: compare counts.
    affected_in_universe = SortedNames(affected & universe)
    chosen = PrefixIndex()
    prefixes: list[str] = []
    for name in sorted(affected):
        if chosen.covering(name) is not None:
            continue
        for module in (*_ancestors(name), name):
            if in_universe.count_under(module) == affected_in_universe.count_under(module):
                prefix = module + "." if module != name else module
                prefixes.append(prefix)
                chosen.add(prefix)
                break
    return prefixes


class SortedNames:
    """Names sorted once, so that how many lie under a prefix is two binary searches
    (a checkpoint may hold hundreds of thousands of names; a fix asks about a few
    modules, or thousands of --drop prefixes)."""

    def __init__(self, names: Iterable[str]) -> None:
        self._ordered = sorted(set(names))

    def count_under(self, prefix: str) -> int:
        """Names ``prefix`` covers, as :func:`under_prefix` decides: those starting with
        ``prefix.`` (``prefix`` when it ends in a dot) and, without the dot, ``prefix``
        itself."""
        below = prefix if prefix.endswith(".") else prefix + "."
        # Every name starting with "m." lies in ["m.", "m/"): "/" follows "." in code order.
        start = bisect.bisect_left(self._ordered, below)
        count = bisect.bisect_left(self._ordered, below[:-1] + "/", lo=start) - start
        if not prefix.endswith("."):
            exact = bisect.bisect_left(self._ordered, prefix)
            count += exact < len(self._ordered) and self._ordered[exact] == prefix
        return count


# --- grouping names for humans -------------------------------------------------------

_NUMBER_SPLIT = re.compile(r"(\d+)")  # split keeps the numbers: text, number, text, ...
# Number positions in one name beyond which it is not folded (real names have under 8).
MAX_FOLDED_NUMBERS = 16


def fold_names(names: Iterable[str]) -> list[str]:
    """Group names for display: ``fc.{weight,bias}``, ``layer{1..4}.{0,1}.conv1.weight``."""
    # Labels only: a report folds 100k matched names to show three rows.
    names = list(names)
    return [label for label, *_ in _folded(names, [None] * len(names), members=False)]


def fold_rows(rows: Iterable[tuple[str, object]]) -> list[tuple[str, list[str]]]:
    """Fold (name, signature) rows; only rows with equal signatures are folded together.

    Returns (label, member names) in first-appearance order. The signature is, for
    example, (shape, dtype) so that a folded row still has one shape.
    """
    return [
        (label, [name for combo in _expand(block) for name in by_numbers[combo]])
        for label, block, by_numbers, _ in _folded(*_columns(rows), members=True)
    ]


def fold_counts(rows: Iterable[tuple[str, Signature]]) -> list[tuple[str, int, Signature]]:
    """As :func:`fold_rows`, with how many names each label folds and their signature
    instead of the names (a table of 100,000 tensors shows a few dozen rows)."""
    return [
        (label, sum(map(len, map(by_numbers.__getitem__, _expand(block)))), signature)
        for label, block, by_numbers, signature in _folded(*_columns(rows), members=True)
    ]


Signature = TypeVar("Signature")
ByNumbers = dict[tuple[str, ...], Sequence[str]]  # a label's names by its numbers


def _columns(rows: Iterable[tuple[str, Signature]]) -> tuple[list[str], list[Signature]]:
    pairs = list(rows)
    return list(map(operator.itemgetter(0), pairs)), list(map(operator.itemgetter(1), pairs))


def _folded(
    names: list[str], signatures: list[Signature], *, members: bool
) -> Iterator[tuple[str, Block, ByNumbers, Signature]]:
    """(label, the block of numbers it folds, the names by their numbers, the
    signature), in first-appearance order; without ``members`` every name list is
    empty (not kept)."""
    templates, numbers, label_signatures, label_names = _merged_labels(names, signatures)
    # A template is the text between the numbers (a tuple: a name may hold any character).
    # Labels are grouped by template and signature, a run of labels at a time: a model
    # names a layer's tensors together, so its runs are long, and each run's numbers go
    # into its group in C.
    groups: dict[tuple[tuple[str, ...], Signature], ByNumbers] = {}
    stored = label_names if members else itertools.repeat(())
    rows = zip(templates, label_signatures, numbers, stored, strict=False)
    for key, run in itertools.groupby(rows, key=_TEMPLATE_AND_SIGNATURE):
        group = groups.get(key)
        if group is None:
            group = groups[key] = {}
        group.update(map(_NUMBERS_AND_NAMES, run))
    for (template, signature), by_numbers in groups.items():
        if len(template) - 1 > MAX_FOLDED_NUMBERS:
            # Folding recurses once per number position: a crafted name with a thousand
            # numbers is shown as it is.
            for numbers_of_one in by_numbers:
                literal = tuple(zip(numbers_of_one))
                yield _render_literal(template, numbers_of_one), literal, by_numbers, signature
            continue
        for block in _product_blocks(list(by_numbers)):
            yield _render(template, block), block, by_numbers, signature


_TEMPLATE_AND_SIGNATURE = operator.itemgetter(0, 1)
_NUMBERS_AND_NAMES = operator.itemgetter(2, 3)


def _render_literal(template: tuple[str, ...], numbers: tuple[str, ...]) -> str:
    return template[0] + "".join(n + text for n, text in zip(numbers, template[1:], strict=True))


Texts = Sequence[tuple[str, ...]]  # one tuple of strings per label
Labels = tuple[Texts, Texts, Sequence[Signature], Sequence[Sequence[str]]]


def _merged_labels(names: list[str], signatures: list[Signature]) -> Labels[Signature]:
    """Each label's template, numbers, signature and member names (four columns), in
    first-appearance order: ``bn1.weight`` and ``bn1.bias`` with equal signatures
    become ``bn1.{weight,bias}``.

    Only named leaves merge: numbered ones (``w0``, ``blocks.7``) fold by number instead,
    which keeps labels short (``w{0..999}``) and the folding linear.
    """
    templates, numbers = _templates_and_numbers(names)
    modules = {template: _module_of(template) for template in dict.fromkeys(templates)}
    # A numbered leaf is keyed by its name's (template, numbers, signature), a named one
    # by its module's (a module's numbers are its names': a named leaf holds none).
    owners = {template: module or template for template, module in modules.items()}
    if len(set(owners.values())) == len(owners) and len(set(names)) == len(names):
        # Each key's template is its owner's only one, and a template and numbers make
        # one name: no two distinct names share a label (flat names, or a leaf per module
        # as in a MoE's experts), and each name is its own label, made in C.
        return templates, numbers, signatures, list(zip(names))
    keys = list(zip(map(owners.__getitem__, templates), numbers, signatures, strict=True))
    if len(set(keys)) == len(keys):  # (bn1.weight, bn2.bias: no module has two leaves)
        return templates, numbers, signatures, list(zip(names))
    # The first name's template (a label of one name is that name) and the names.
    labels: dict[tuple[object, tuple[str, ...], Signature], tuple[tuple[str, ...], list[str]]] = {}
    for key, template, name in zip(keys, templates, names, strict=True):
        entry = labels.get(key)
        if entry is None:
            labels[key] = (template, [name])
        elif modules[template] is not None:
            entry[1].append(name)
    rows = [
        (_module_template(template, modules[template], members), values, signature, members)
        for (_, values, signature), (template, members) in labels.items()
    ]
    return (
        [row[0] for row in rows],
        [row[1] for row in rows],
        [row[2] for row in rows],
        [row[3] for row in rows],
    )


def _module_template(
    template: tuple[str, ...], module: tuple[tuple[str, ...], str] | None, members: list[str]
) -> tuple[str, ...]:
    """The template of a module's label: its texts, then its leaves in braces (the
    first name's ``template`` when it has one leaf)."""
    if module is None or len(members) == 1:
        return template
    texts, dot = module
    leaves = ",".join(name.rpartition(".")[2] for name in members)
    return (*texts[:-1], f"{texts[-1]}{dot}{{{leaves}}}")


def _module_of(template: tuple[str, ...]) -> tuple[tuple[str, ...], str] | None:
    """The texts of ``template`` less its named leaf, and the dot before that leaf (""
    for a name without dots); None when the leaf holds a number."""
    head, dot, _ = template[-1].rpartition(".")
    if not dot and len(template) > 1:
        return None
    return (*template[:-1], head), dot


def _templates_and_numbers(names: list[str]) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """Each name's template (the texts between its numbers) and its numbers.

    A model repeats a few templates over hundreds of thousands of names. ASCII names
    are joined and translated twice, digits to a placeholder and everything else to
    spaces, which gives each name's masked text and every number in C; each distinct
    masked text is split once. Other names (Unicode digits, or holding the separator or
    the placeholder) are split one by one."""
    joined = "\n".join(names)
    if not joined.isascii() or joined.count("\n") != len(names) - 1 or "\x00" in joined:
        pieces = list(map(_NUMBER_SPLIT.split, names))
        return [tuple(p[::2]) for p in pieces], [tuple(p[1::2]) for p in pieces]
    masked = joined.translate(_DIGITS_MASKED).split("\n")
    texts = {m: tuple(_MASKED_RUN.split(m)) for m in dict.fromkeys(masked)}
    templates = list(map(texts.__getitem__, masked))
    del masked
    values = joined.translate(_ALL_BUT_DIGITS_BLANK).split()
    per_name = {len(template) - 1 for template in texts.values()}
    if len(per_name) == 1:  # every name holds as many numbers (t0..t99999): chunked in C
        count = per_name.pop()
        chunks = zip(*[iter(values)] * count, strict=True)
        return templates, list(chunks) if count else [()] * len(names)
    counts = map(operator.sub, map(len, templates), itertools.repeat(1))
    ends = list(itertools.accumulate(counts, initial=0))
    numbers = list(map(tuple, map(values.__getitem__, map(slice, ends, ends[1:]))))
    return templates, numbers


_DIGITS_MASKED = str.maketrans(dict.fromkeys("0123456789", "\x00"))
_ALL_BUT_DIGITS_BLANK = str.maketrans({chr(c): " " for c in range(128) if not "0" <= chr(c) <= "9"})
_MASKED_RUN = re.compile("\x00+")


Block = tuple[tuple[str, ...], ...]  # one set of values per number position


def _product_blocks(combos: list[tuple[str, ...]]) -> list[Block]:
    """Split distinct number tuples into blocks, each the full Cartesian product of its
    value sets."""
    if not combos or not combos[0]:
        return [()] if combos else []
    if len(combos[0]) == 1:  # the last position: one block of its (distinct) values
        return [(tuple(combo[0] for combo in combos),)]
    by_first: dict[str, list[tuple[str, ...]]] = {}
    # Names come grouped (layer 0's, then layer 1's): a run of one first value at a time.
    for first, run in itertools.groupby(combos, key=_FIRST):
        by_first.setdefault(first, []).extend(map(_REST, run))
    # Values of the first position whose remaining blocks are identical merge into one block.
    merged: dict[tuple[Block, ...], list[str]] = {}
    # Layers of a model repeat their rests (every MoE layer has the same experts): each
    # distinct rest is split once.
    blocks_of: dict[tuple[tuple[str, ...], ...], tuple[Block, ...]] = {}
    for first, rests in by_first.items():
        key = tuple(rests)
        rest_blocks = blocks_of.get(key)
        if rest_blocks is None:
            rest_blocks = blocks_of[key] = tuple(_product_blocks(rests))
        merged.setdefault(rest_blocks, []).append(first)
    blocks: list[Block] = []
    for rest_blocks, firsts in merged.items():
        blocks.extend((tuple(firsts), *rest) for rest in rest_blocks)
    return blocks


_FIRST = operator.itemgetter(0)
_REST = operator.itemgetter(slice(1, None))


def _expand(block: Block) -> list[tuple[str, ...]]:
    combos: list[tuple[str, ...]] = [()]
    for values in block:
        combos = [(*c, v) for c in combos for v in values]
    return combos


def _render(template: tuple[str, ...], block: Block) -> str:
    out = [template[0]]
    for values, text in zip(block, template[1:], strict=True):
        out.append(_render_values(values))
        out.append(text)
    return "".join(out)


def _render_values(values: tuple[str, ...]) -> str:
    if len(values) == 1:
        return values[0]
    ordered = sorted(values, key=int)
    ints = [int(v) for v in ordered]
    if len(ints) >= 3 and ints == list(range(ints[0], ints[0] + len(ints))):
        return "{" + f"{ordered[0]}..{ordered[-1]}" + "}"
    return "{" + ",".join(ordered) + "}"
