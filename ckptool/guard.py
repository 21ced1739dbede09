"""FreezeGuard: prove after every optimizer step that frozen tensors did not change.

Frozen means: ``requires_grad=False`` parameters, parameters whose every optimizer
group has ``lr == 0`` at start, names :func:`ckptool.freeze` was asked to freeze, and
the buffers of modules whose parameters are all frozen (BatchNorm running stats).

Each watched tensor gets an exact fingerprint of its bits, computed on its own
device: the bytes viewed as int64 words, summed with wrap-around (any single changed
element changes the sum), plus sums over every 2nd and 3rd word. All fingerprints of
a device are stacked and compared there; the host waits once per step per device,
never per tensor. The guard only observes: it never changes the model.
"""

from __future__ import annotations

import enum
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ckptool.errors import FrozenParameterError
from ckptool.formats.bounded import listed

if TYPE_CHECKING:
    import torch
    from torch import nn

# Names meant frozen, per model (weakly held: the record goes with the model).
_intended_frozen: weakref.WeakKeyDictionary[Any, frozenset[str]] = weakref.WeakKeyDictionary()


def mark_intended_frozen(model: nn.Module, names: Iterable[str]) -> None:
    """Record the parameter names meant to stay frozen in ``model``. ``ckptool.freeze``
    calls it; a FreezeGuard then also watches a name a tie made trainable again (its
    tensor has ``requires_grad=True``) and reports the tie. Replaces an earlier record."""
    _intended_frozen[model] = frozenset(names)


def intended_frozen(model: nn.Module) -> frozenset[str]:
    """The names :func:`mark_intended_frozen` recorded for ``model`` (none if never)."""
    return _intended_frozen.get(model, frozenset())


def user_model(model: Any) -> Any:
    """The module the user wrote, under torch.compile (``_orig_mod.``) and DDP or
    DataParallel (``module.``) wrappers: names in freezes and reports are its names."""
    while True:
        inner = getattr(model, "_orig_mod", None) if _is_compiled(model) else None
        if inner is None and type(model).__name__ in _DATA_PARALLEL:
            inner = getattr(model, "module", None)
        if inner is None:
            return model
        model = inner


_DATA_PARALLEL = frozenset({"DistributedDataParallel", "DataParallel"})


def _is_compiled(model: Any) -> bool:
    return type(model).__name__ == "OptimizedModule"


class BufferPolicy(str, enum.Enum):
    """Which buffers the guard watches."""

    FROZEN_MODULES = "frozen-modules"  # buffers of modules whose parameters are all frozen
    ALL = "all"
    NONE = "none"


class Cause(str, enum.Enum):
    """The likely reason a frozen tensor changed."""

    STALE_GRADIENT = "stale gradient"
    OPTIMIZER_STATE = "optimizer state"
    LR_CHANGED = "lr changed"
    TIED_TRAINABLE = "tied to a trainable name"
    TRAIN_MODE = "module in train mode"
    AUTOGRAD_WRITE = "in-place write through autograd"
    BYPASSED_AUTOGRAD = "write that bypassed autograd"


_ADVICE = {
    Cause.STALE_GRADIENT: "it still had a .grad from before freezing and is in the optimizer; "
    "call optimizer.zero_grad(set_to_none=True) after freezing, or build the optimizer "
    "over trainable parameters only",
    Cause.OPTIMIZER_STATE: "its optimizer state (momentum, Adam moments, weight decay) from "
    "before freezing keeps moving it; build the optimizer over trainable parameters only",
    Cause.LR_CHANGED: "it was frozen by lr=0 and a scheduler changed its group's lr; "
    "freeze with requires_grad=False instead",
    Cause.TIED_TRAINABLE: "it is the same tensor as a trainable name; untie the weights or "
    "freeze both names",
    Cause.TRAIN_MODE: "its module is in train mode, so forward updates running statistics; "
    "keep frozen BatchNorm in eval mode (ckptool.freeze(..., bn_eval=True))",
    Cause.AUTOGRAD_WRITE: "an in-place operation changed it (its autograd version moved); "
    "look for hooks or code that modify parameters",
    Cause.BYPASSED_AUTOGRAD: "something wrote it without autograd seeing (a .data write, a "
    "fused kernel, an optimizer hook)",
}


@dataclass(frozen=True)
class Violation:
    """A frozen tensor that changed, with every name it has and the likely cause."""

    names: tuple[str, ...]
    kind: str  # "parameter" or "buffer"
    step: int
    cause: Cause
    changed: int | None = None  # elements, with snapshot=True
    max_abs: float | None = None

    @property
    def advice(self) -> str:
        return _ADVICE[self.cause]

    def describe(self) -> str:
        """One line: which tensor, when, how much, why, and what to do."""
        delta = (
            f", {self.changed:,} values changed, max |delta| {self.max_abs:.3g}"
            if self.changed is not None and self.max_abs is not None
            else ""
        )
        return (
            f"changed {self.kind} {' = '.join(self.names)} at step {self.step}{delta}: "
            f"{self.cause.value}: {self.advice}"
        )


@dataclass(frozen=True)
class Finding:
    """Something suspicious seen before a step that has not (yet) changed a frozen tensor."""

    kind: str  # "grad", "optimizer state", "not in optimizer", "tied"
    names: tuple[str, ...]
    message: str


@dataclass(frozen=True)
class GuardReport:
    """What the guard watched and saw."""

    steps_checked: int
    parameters_watched: int
    buffers_watched: int
    elements_watched: int
    violations: tuple[Violation, ...] = ()
    findings: tuple[Finding, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.violations

    def headline(self) -> str:
        """The verdict and what was watched, in one line."""
        watched = (
            f"{self.parameters_watched} frozen parameters and {self.buffers_watched} buffers "
            f"({self.elements_watched:,} values) over {self.steps_checked} steps"
        )
        return f"guard: {'ok' if self.ok else 'VIOLATED'}: {watched}"

    def to_json(self) -> dict[str, Any]:
        """The report as the --json documents and finetune's report.json give it."""
        return {
            "verdict": "ok" if self.ok else "violated",
            "steps_checked": self.steps_checked,
            "parameters_watched": self.parameters_watched,
            "buffers_watched": self.buffers_watched,
            "elements_watched": self.elements_watched,
            "violations": [
                {
                    "names": list(v.names),
                    "kind": v.kind,
                    "step": v.step,
                    "cause": v.cause.value,
                    "advice": v.advice,
                    "changed": v.changed,
                    "max_abs": v.max_abs,
                }
                for v in self.violations
            ],
            "findings": [
                {"kind": f.kind, "names": list(f.names), "message": f.message}
                for f in self.findings
            ],
        }

    def __str__(self) -> str:
        # print(guard.report()) in a notebook or a log: the verdict, not a dataclass repr.
        return "\n".join([self.headline(), *(f"  {v.describe()}" for v in self.violations)])


@dataclass
class _Watched:
    tensor: torch.Tensor
    names: tuple[str, ...]
    kind: str
    module: Any
    version: int
    lr_frozen: bool = False
    snapshot: torch.Tensor | None = None


@dataclass
class _StepContext:
    """What the pre-step hook saw, used to explain a violation after the step."""

    had_grad: set[int] = field(default_factory=set)
    had_state: set[int] = field(default_factory=set)


def violation_error(report: GuardReport) -> FrozenParameterError:
    """The error for a report with violations (e.g. after a recorded, distributed run)."""
    first_step = [v for v in report.violations if v.step == report.violations[0].step]
    return FrozenParameterError(
        _violation_message(first_step, first_step[0].step), report.violations, report
    )


class FreezeGuard:
    """Check, after every optimizer step, that frozen parameters and buffers are bit-identical.

    Args:
        model: the model being trained.
        optimizers: one optimizer or several.
        buffers: which buffers to watch (default: those of fully frozen modules).
        on_violation: ``"raise"`` (FrozenParameterError), ``"warn"``, or ``"record"``
            (only the report; distributed runs agree on a verdict across ranks first).
        snapshot: keep a host copy of watched tensors to count changed elements.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizers: Any,
        *,
        buffers: BufferPolicy | str = BufferPolicy.FROZEN_MODULES,
        on_violation: str = "raise",
        snapshot: bool = False,
    ) -> None:
        if on_violation not in ("raise", "warn", "record"):
            raise ValueError(
                f"on_violation must be 'raise', 'warn' or 'record', got {on_violation!r}"
            )
        self.model = user_model(model)
        self.optimizers = list(optimizers) if isinstance(optimizers, list | tuple) else [optimizers]
        self.buffer_policy = BufferPolicy(buffers)
        self.on_violation = on_violation
        self.snapshot = snapshot
        self._watched: list[_Watched] = []
        self._rows: dict[Any, list[int]] = {}
        self._baseline: dict[Any, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._context = _StepContext()
        self._steps = 0
        self._violations: list[Violation] = []
        self._findings: dict[tuple[str, tuple[str, ...]], Finding] = {}

    # --- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> FreezeGuard:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Record what is frozen and its fingerprints; hook every optimizer's step."""
        self._watched = _collect_watched(self.model, self.optimizers, self.buffer_policy)
        self._rows = rows_by_device(self._watched)
        for item in self._watched:
            if self.snapshot:
                item.snapshot = item.tensor.detach().to("cpu", copy=True)
        self._baseline = self._fingerprints()
        self._note_static_findings()
        for optimizer in self.optimizers:
            self._handles.append(optimizer.register_step_pre_hook(self._before_step))
            self._handles.append(optimizer.register_step_post_hook(self._after_step))

    def stop(self) -> None:
        """Remove the hooks; the report stays available."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def report(self) -> GuardReport:
        params = [w for w in self._watched if w.kind == "parameter"]
        return GuardReport(
            steps_checked=self._steps,
            parameters_watched=len(params),
            buffers_watched=len(self._watched) - len(params),
            elements_watched=sum(w.tensor.numel() for w in self._watched),
            violations=tuple(self._violations),
            findings=tuple(self._findings.values()),
        )

    # --- hooks -----------------------------------------------------------------------

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        in_optimizer = _optimizer_tensors(self.optimizers)
        context = _StepContext()
        for item in self._watched:
            if item.kind != "parameter" or id(item.tensor) not in in_optimizer:
                continue
            if item.tensor.grad is not None:
                context.had_grad.add(id(item.tensor))
                self._note(
                    "grad", item.names, "frozen parameter has a .grad and is in the optimizer"
                )
            if _has_state(self.optimizers, item.tensor):
                context.had_state.add(id(item.tensor))
                self._note("optimizer state", item.names, "frozen parameter has optimizer state")
        self._context = context

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._steps += 1
        current = self._fingerprints()
        changed = _changed_indices(self._baseline, current, self._rows)
        if not changed:
            return
        violations = [self._explain(self._watched[i]) for i in changed]
        self._violations.extend(violations)
        self._baseline = current  # with on_violation="warn", report only new changes next
        message = _violation_message(violations, self._steps)
        if self.on_violation == "record":
            return
        if self.on_violation == "warn":
            warnings.warn(message, stacklevel=2)
            return
        raise FrozenParameterError(message, violations, self.report())

    # --- internals -------------------------------------------------------------------

    def _fingerprints(self) -> dict[Any, torch.Tensor]:
        """Per device: a (tensors, 3) int64 tensor of fingerprints, computed there, one
        row per index of ``self._rows[device]``."""
        import torch

        return {
            device: torch.stack([fingerprint(self._watched[i].tensor) for i in rows])
            for device, rows in self._rows.items()
        }

    def _explain(self, item: _Watched) -> Violation:
        key = id(item.tensor)
        if item.kind == "buffer":
            in_train = bool(getattr(item.module, "training", False))
            cause = Cause.TRAIN_MODE if in_train else Cause.BYPASSED_AUTOGRAD
        elif item.tensor.requires_grad and not item.lr_frozen:
            cause = Cause.TIED_TRAINABLE
        elif item.lr_frozen and _current_lr(self.optimizers, item.tensor) != 0:
            cause = Cause.LR_CHANGED
        elif key in self._context.had_grad:
            cause = Cause.STALE_GRADIENT
        elif key in self._context.had_state:
            cause = Cause.OPTIMIZER_STATE
        elif item.tensor._version != item.version:
            cause = Cause.AUTOGRAD_WRITE
        else:
            cause = Cause.BYPASSED_AUTOGRAD
        changed, max_abs = _delta(item)
        return Violation(item.names, item.kind, self._steps, cause, changed, max_abs)

    def _note(self, kind: str, names: tuple[str, ...], message: str) -> None:
        self._findings.setdefault((kind, names), Finding(kind, names, message))

    def _note_static_findings(self) -> None:
        in_optimizer = _optimizer_tensors(self.optimizers)
        orphans = [
            name
            for name, p in self.model.named_parameters()
            if p.requires_grad and id(p) not in in_optimizer
        ]
        if orphans:
            message = "trainable parameters that no optimizer group holds will never train"
            self._note("not in optimizer", tuple(orphans), message)
        for item in self._watched:
            if item.kind == "parameter" and item.tensor.requires_grad and not item.lr_frozen:
                self._note(
                    "tied", item.names, "a name frozen by ckptool.freeze is trainable through a tie"
                )


def fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """Three int64 sums over the tensor's bytes as 64-bit words, on its own device.

    Exact for any single changed element (its word changes by a nonzero amount below
    2**64); the strided sums make cancellation across elements implausible. NaN
    payloads and -0.0 are bits like any other.
    """
    import torch

    data = tensor.detach()
    if not data.is_contiguous():
        data = data.contiguous()
    raw = data.reshape(-1).view(torch.uint8)
    whole = raw.numel() // 8 * 8
    try:
        words = raw[:whole].view(torch.int64)
    except RuntimeError:  # a view at an offset not aligned to 8 bytes
        words = raw[:whole].clone().view(torch.int64)
    tail = raw[whole:].to(torch.int64).sum() * 0x9E3779B1
    return torch.stack([words.sum() + tail, words[::2].sum(), words[::3].sum()])


def rows_by_device(watched: Sequence[_Watched]) -> dict[Any, list[int]]:
    """Indices into ``watched`` per device, in order: the fingerprints of one device are
    stacked there, so row r of a device's stack is watched[rows[device][r]] (frozen
    tensors may alternate between devices; rows are not a running offset)."""
    rows: dict[Any, list[int]] = {}
    for index, item in enumerate(watched):
        rows.setdefault(item.tensor.device, []).append(index)
    return rows


def _changed_indices(
    before: Mapping[Any, torch.Tensor],
    after: Mapping[Any, torch.Tensor],
    rows: Mapping[Any, list[int]],
) -> list[int]:
    """Indices (into the watched list) whose fingerprint differs: one host sync per device."""
    changed: list[int] = []
    for device, prints in after.items():
        differs = (prints != before[device]).any(dim=1)
        if bool(differs.any()):
            changed.extend(rows[device][int(r)] for r in differs.nonzero().flatten().tolist())
    return sorted(changed)


def tied_parameters(model: nn.Module) -> list[tuple[Any, tuple[str, ...]]]:
    """Each distinct parameter once, with every name it has (tied weights have several),
    in the order the model lists them."""
    names: dict[int, list[str]] = {}
    tensors: dict[int, Any] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
        tensors[id(param)] = param
    return [(param, tuple(names[key])) for key, param in tensors.items()]


def _collect_watched(
    model: nn.Module, optimizers: Sequence[Any], policy: BufferPolicy
) -> list[_Watched]:
    intended = intended_frozen(model)
    lr_zero = _lr_zero_tensors(optimizers)
    watched = []
    for param, names in tied_parameters(model):
        frozen_flag = not param.requires_grad
        by_name = any(n in intended for n in names)
        if frozen_flag or id(param) in lr_zero or by_name:
            watched.append(
                _Watched(
                    param,
                    names,
                    "parameter",
                    None,
                    param._version,
                    lr_frozen=id(param) in lr_zero and param.requires_grad,
                )
            )
    watched.extend(_frozen_buffers(model, policy))
    return watched


def _frozen_buffers(model: nn.Module, policy: BufferPolicy) -> list[_Watched]:
    if policy is BufferPolicy.NONE:
        return []
    found: dict[int, _Watched] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        params = list(module.parameters(recurse=False))
        fully_frozen = bool(params) and all(not p.requires_grad for p in params)
        if policy is BufferPolicy.FROZEN_MODULES and not fully_frozen:
            continue
        for buffer_name, buffer in module.named_buffers(recurse=False):  # (never None)
            full = f"{module_name}.{buffer_name}" if module_name else buffer_name
            if id(buffer) in found:
                found[id(buffer)].names += (full,)
            else:
                found[id(buffer)] = _Watched(buffer, (full,), "buffer", module, buffer._version)
    return list(found.values())


def _optimizer_tensors(optimizers: Iterable[Any]) -> set[int]:
    return {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}


def _lr_zero_tensors(optimizers: Iterable[Any]) -> set[int]:
    """Parameters whose every group has lr == 0: frozen by learning rate."""
    zero: set[int] = set()
    moving: set[int] = set()
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            target = zero if float(group.get("lr", 0.0)) == 0.0 else moving
            target.update(id(p) for p in group["params"])
    return zero - moving


def _current_lr(optimizers: Iterable[Any], tensor: Any) -> float:
    rates = [
        float(g.get("lr", 0.0))
        for opt in optimizers
        for g in opt.param_groups
        if any(p is tensor for p in g["params"])
    ]
    return max(rates, default=0.0)


def _has_state(optimizers: Iterable[Any], tensor: Any) -> bool:
    return any(bool(opt.state.get(tensor)) for opt in optimizers)


def _delta(item: _Watched) -> tuple[int | None, float | None]:
    if item.snapshot is None:
        return None, None
    import torch

    now = item.tensor.detach().to("cpu")
    before = item.snapshot
    differs = fingerprint_elementwise(before) != fingerprint_elementwise(now)
    changed = int(differs.sum())
    if before.is_floating_point():
        # Over the changed elements only: a NaN that stayed NaN differs from itself as a
        # number, and had made every such tensor's largest change infinite.
        moved = (now.double() - before.double()).abs().reshape(-1)[differs]
        return changed, float(
            torch.nan_to_num(moved, nan=float("inf")).max()
        ) if moved.numel() else 0.0
    return changed, None


def fingerprint_elementwise(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's elements as integers of the same width (bit patterns, NaN-safe)."""
    import torch

    widths = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    flat = tensor.contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        return flat
    return flat.view(widths.get(flat.element_size(), torch.uint8))


def _violation_message(violations: Sequence[Violation], step: int) -> str:
    first = violations[0]
    names = listed([" = ".join(v.names) for v in violations], 4)
    return (
        f"frozen tensors changed at optimizer step {step}: {names}; "
        f"likely cause for {first.names[0]}: {first.cause.value}: {first.advice}"
    )
