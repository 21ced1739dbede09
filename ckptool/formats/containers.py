"""Find the tensor dict inside a training checkpoint's nested containers.

Checkpoints wrap the state dict: ``{'state_dict': ..., 'optimizer': ..., 'epoch': 90}``,
``{'model': ..., 'ema': ...}``, Lightning's ``{'state_dict': ..., 'hyper_parameters': ...}``.
The tensor dict is found by shape, not by a list of names, so unknown wrappers work too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from ckptool.errors import AmbiguousContainerError, CheckpointReadError, UsageError, option
from ckptool.formats.bounded import listed, short_repr, short_str
from ckptool.formats.meta import NOT_A_TENSOR, ContainerEntry

T = TypeVar("T")

# How deep to look for tensor dicts: {'a': {'b': {'c': state_dict}}} is as deep as seen.
MAX_DEPTH = 3
# Dict entries examined while looking. A pickle can make one dict appear a million times
# through shared references; real checkpoints examine about one entry per tensor.
MAX_ENTRIES_WALKED = 1_000_000

# Top-level entries listed beside the tensor dict (epoch, optimizer, ...).
MAX_ENTRIES_LISTED = 100


class _WalkBudget:
    """Counts the dict entries a search examines and stops it past the budget."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.walked = 0

    def charge(self, entries: int) -> None:
        self.walked += entries
        if self.walked > MAX_ENTRIES_WALKED:
            raise CheckpointReadError(
                f"{self.path}: over {MAX_ENTRIES_WALKED} container entries walked while "
                "looking for the tensor dict (budget); shared references repeat them"
            )


def select_tensor_dict(
    obj: Any, *, key: str | None, is_tensor: Callable[[Any], bool], path: str
) -> tuple[str | None, dict[str, Any], tuple[ContainerEntry, ...]]:
    """Return (key path, tensor dict, other top-level entries) for a loaded checkpoint.

    Args:
        obj: the unpickled top-level object (tensors may be metadata stand-ins).
        key: a dotted path chosen by the user (``model.ema``), or None to find it.
        is_tensor: tells tensors from other values.
        path: the file, for messages.

    Raises:
        AmbiguousContainerError: several tensor dicts and no ``key``.
        UsageError: ``key`` does not lead to a tensor dict.
        CheckpointReadError: the checkpoint holds no tensor dict at all.
    """
    if key is not None:
        found = _follow_key(obj, key, path)
        if not _is_tensor_dict(found, is_tensor):
            raise UsageError(
                f"{path}: {option('key', key, quoted=True)} is {_describe(found, is_tensor)}, "
                "not a tensor dict"
            )
        chosen_key: str | None = key
    else:
        chosen_key, found = _find_tensor_dict(obj, is_tensor, path)
    tensors = {k: v for k, v in found.items() if is_tensor(v)}
    # Nearly every state dict holds tensors only: then nothing else walks its 100k names.
    others = (
        {} if len(tensors) == len(found) else {k: v for k, v in found.items() if k not in tensors}
    )
    _refuse_extra_state_objects(others, is_tensor, path)
    entries = _other_entries(obj, chosen_key, is_tensor) + _beside_tensors(others, is_tensor)
    return chosen_key, tensors, entries


def _refuse_extra_state_objects(
    found: Mapping[str, Any], is_tensor: Callable[[Any], bool], path: str
) -> None:
    """torch's strict load needs a module's extra state back; a tensor-only copy (every
    write ckptool makes) would silently drop it, so a state dict holding extra state as
    an object is refused, not read without it."""
    objects = _extra_state_objects(found, is_tensor)
    if objects:
        raise CheckpointReadError(f"{path}: {_extra_state_words(found, objects)}")


def _extra_state_objects(found: Mapping[Any, Any], is_tensor: Callable[[Any], bool]) -> list[str]:
    return [
        k
        for k, v in found.items()
        if isinstance(k, str) and k.endswith(EXTRA_STATE) and not is_tensor(v)
    ]


def _extra_state_words(found: Mapping[str, Any], objects: list[str]) -> str:
    return extra_state_refusal(objects, type(found[objects[0]]).__name__)


def extra_state_refusal(names: Sequence[str], kept_as: str) -> str:
    """Why a state dict holding modules' extra state as an object is not read."""
    return (
        f"{listed(names, 3)} is modules' extra state kept as {kept_as}, not as a tensor; "
        "ckptool reads and writes tensors only, and a copy without it would not load strictly"
    )


def module_versions(obj: Any, key: str | None, path: str) -> dict[str, int] | None:
    """The ``_metadata`` versions torch.save kept on the chosen state dict, if any."""
    container = obj if key is None else _follow_key(obj, key, path)
    raw = getattr(container, "__dict__", {}).get("_metadata")
    if not isinstance(raw, Mapping) or len(raw) > MAX_ENTRIES_LISTED * 1000:
        return None
    versions = {}
    for prefix, entry in raw.items():
        version = entry.get("version") if isinstance(entry, Mapping) else None
        if isinstance(prefix, str) and isinstance(version, int) and not isinstance(version, bool):
            versions[prefix] = version
    return versions


def _is_tensor_dict(
    obj: Any, is_tensor: Callable[[Any], bool], budget: _WalkBudget | None = None
) -> bool:
    """A dict with string keys whose values are tensors, beside a few other values or
    any number of plain scalars (``{"w": t, "b": t, "step": 5}``: a small model's
    counters; inspect lists them and writes say they leave them out)."""
    if not isinstance(obj, Mapping) or not obj:
        return False
    if budget is not None:
        budget.charge(len(obj))
    if not all(isinstance(k, str) for k in obj):
        return False
    tensor_count = sum(1 for v in obj.values() if is_tensor(v))
    if tensor_count == 0:
        return False
    others = (v for v in obj.values() if not is_tensor(v))
    return tensor_count >= 0.9 * len(obj) or all(map(_is_plain_scalar, others))


def _is_plain_scalar(value: Any) -> bool:
    return value is None or type(value) in (int, float, bool, str)


def _candidates(
    obj: Any,
    is_tensor: Callable[[Any], bool],
    budget: _WalkBudget,
    prefix: str = "",
    depth: int = 0,
) -> list[tuple[str, Mapping[str, Any]]]:
    if _is_tensor_dict(obj, is_tensor, budget):
        return [(prefix, obj)]
    if depth >= MAX_DEPTH or not isinstance(obj, Mapping):
        return []
    found: list[tuple[str, Mapping[str, Any]]] = []
    for name, value in obj.items():
        if isinstance(name, str):
            child = f"{prefix}.{name}" if prefix else name
            found.extend(_candidates(value, is_tensor, budget, child, depth + 1))
    return found


def _find_tensor_dict(
    obj: Any, is_tensor: Callable[[Any], bool], path: str
) -> tuple[str | None, Mapping[str, Any]]:
    candidates = _candidates(obj, is_tensor, _WalkBudget(path))
    if not candidates:
        raise CheckpointReadError(
            f"{path}: holds {_describe(obj, is_tensor)} and no dict of tensors"
            f"{_why_not_a_state_dict(obj, is_tensor)}"
        )
    if len(candidates) > 1:
        names = [name for name, _ in candidates]
        listing = listed([f"{n} ({len(d)} tensors)" for n, d in candidates], 5)
        raise AmbiguousContainerError(
            f"{path}: holds several tensor dicts: {listing}; pick one with "
            f"{option('key', names[0])}",
            names,
        )
    name, found = candidates[0]
    return (name or None), found


def _why_not_a_state_dict(obj: Any, is_tensor: Callable[[Any], bool]) -> str:
    """Why a dict holding tensors is not read as a state dict: its keys are not names
    (``{0: t}``), or modules' extra state in it is not a tensor."""
    if not isinstance(obj, Mapping) or not any(map(is_tensor, obj.values())):
        return ""
    key = next((k for k in obj if not isinstance(k, str)), None)
    if key is not None:
        return (
            f": its tensors are keyed by {type(key).__name__} (e.g. {short_repr(key)}), not "
            "by name; a state dict maps names to tensors"
        )
    extra = _extra_state_objects(obj, is_tensor)
    if extra:
        return f": {_extra_state_words(obj, extra)}"
    odd = [(k, v) for k, v in obj.items() if not is_tensor(v) and not _is_plain_scalar(v)]
    if not odd:
        return ""
    shown = ", ".join(f"{short_str(k)}: {_describe(v, is_tensor)}" for k, v in odd[:3])
    return f": beside its tensors it holds {shown}, which are neither tensors nor plain values"


# torch's state_dict key for what a module's get_extra_state() returns (any object).
EXTRA_STATE = "_extra_state"


def _follow_key(obj: Any, key: str, path: str) -> Any:
    """Follow a dotted path; a segment may itself contain dots (``'model.ema'``)."""
    if isinstance(obj, Mapping) and key in obj:
        return obj[key]
    if isinstance(obj, Mapping):
        parts = key.split(".")
        for split in range(len(parts) - 1, 0, -1):
            head = ".".join(parts[:split])
            if head in obj:
                return _follow_key(obj[head], ".".join(parts[split:]), path)
        available = ", ".join(short_repr(k) for k in list(obj)[:12])
        raise UsageError(
            f"{path}: no entry {key!r} for {option('key')}; top-level entries: {available}"
        )
    raise UsageError(
        f"{path}: {option('key', key, quoted=True)} cannot index {_describe(obj, lambda _: False)}"
    )


def _other_entries(
    obj: Any, chosen: str | None, is_tensor: Callable[[Any], bool]
) -> tuple[ContainerEntry, ...]:
    if chosen is None or not isinstance(obj, Mapping):
        return ()

    def entry(item: tuple[Any, Any]) -> ContainerEntry:
        label = short_str(item[0])
        role = "tensors" if label == chosen or chosen.startswith(f"{label}.") else "other"
        return ContainerEntry(label, role, _describe(item[1], is_tensor))

    return capped_entries(list(obj.items()), entry, "other")


def capped_entries(
    items: Sequence[T], entry: Callable[[T], ContainerEntry], kind: str
) -> tuple[ContainerEntry, ...]:
    """The first MAX_ENTRIES_LISTED items as entries, then one that stands for the rest
    (described only as listed: a crafted file may hold millions)."""
    entries = [entry(item) for item in items[:MAX_ENTRIES_LISTED]]
    if len(items) > MAX_ENTRIES_LISTED:
        more = len(items) - MAX_ENTRIES_LISTED
        entries.append(ContainerEntry("...", kind, f"and {more} more entries", count=more))
    return tuple(entries)


def _beside_tensors(
    others: Mapping[str, Any], is_tensor: Callable[[Any], bool]
) -> tuple[ContainerEntry, ...]:
    """The values among the tensors that are not tensors (a counter, a step), which
    would otherwise vanish from the report and from every copy without a word."""

    def entry(item: tuple[str, Any]) -> ContainerEntry:
        return ContainerEntry(short_str(item[0]), NOT_A_TENSOR, _describe(item[1], is_tensor))

    return capped_entries(list(others.items()), entry, NOT_A_TENSOR)


def _describe(value: Any, is_tensor: Callable[[Any], bool]) -> str:
    """A one-line human summary of a non-tensor checkpoint entry."""
    if is_tensor(value):
        return f"tensor {list(getattr(value, 'shape', ()))}"
    if isinstance(value, Mapping):
        if _looks_like_optimizer(value):
            groups = value.get("param_groups")
            return (
                f"optimizer state ({len(groups) if isinstance(groups, list) else '?'} param groups)"
            )
        tensors = sum(1 for v in value.values() if is_tensor(v))
        suffix = f", {tensors} tensors" if tensors else ""
        entries = "entry" if len(value) == 1 else "entries"
        return f"dict ({len(value)} {entries}{suffix})"
    if isinstance(value, list | tuple):
        return f"{type(value).__name__} of {len(value)}"
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    if isinstance(value, int | float | bool) or value is None:
        return repr(value)
    name = getattr(value, "record_name", "")
    if name:  # an OpaqueObject: the pickle's global, kept as data
        return f"{name} (not executed)"
    return type(value).__name__


def _looks_like_optimizer(value: Mapping[Any, Any]) -> bool:
    return "param_groups" in value and "state" in value
