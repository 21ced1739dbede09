"""Model specs (``torchvision:resnet18``, ``pkg.mod:Factory``, ``file.py:Net``) and heads."""

from __future__ import annotations

import ast
import contextlib
import difflib
import enum
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ckptool.errors import ModelSpecError, UsageError, option
from ckptool.formats.bounded import listed
from ckptool.formats.meta import TensorMeta

if TYPE_CHECKING:
    import torch
    from torch import nn


class Source(str, enum.Enum):
    """Where a model spec's builder comes from."""

    TORCHVISION = "torchvision"
    TIMM = "timm"
    MODULE = "module"
    FILE = "file"


@dataclass(frozen=True)
class ModelSpec:
    """A parsed ``source:name`` model spec with its constructor arguments."""

    source: Source
    target: str  # module path, file path, or model name
    attr: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        if self.source in (Source.TORCHVISION, Source.TIMM):
            return f"{self.source.value}:{self.attr}"
        return f"{self.target}:{self.attr}"


def parse_model_spec(spec: str, model_args: Sequence[str] = ()) -> ModelSpec:
    """Parse ``torchvision:NAME``, ``timm:NAME``, ``package.module:attr`` or ``file.py:attr``.

    Raises:
        ModelSpecError: the spec has no ``:`` or an empty part, or an argument is malformed.
    """
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ModelSpecError(
            f"model spec {spec!r} needs the form SOURCE:NAME, e.g. torchvision:resnet18, "
            "timm:vit_base_patch16_224, mypkg.models:Net or path/to/model.py:Net"
        )
    kwargs = parse_model_args(model_args)
    if target in (Source.TORCHVISION.value, Source.TIMM.value):
        return ModelSpec(Source(target), target, attr, kwargs)
    if target.endswith(".py") or os.sep in target or "/" in target:
        return ModelSpec(Source.FILE, target, attr, kwargs)
    return ModelSpec(Source.MODULE, target, attr, kwargs)


def parse_model_args(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are Python literals where they parse, else strings."""
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            raise ModelSpecError(
                f"{option('model_args', item, quoted=True)} must look like key=value, "
                "e.g. dropout=0.1"
            )
        try:
            kwargs[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            kwargs[key] = raw
    return kwargs


def build_model(
    spec: str | ModelSpec,
    *,
    model_args: Sequence[str] = (),
    num_classes: int | None = None,
    head: str | None = None,
    device: str = "cpu",
    **kwargs: Any,
) -> nn.Module:
    """Build a model from a spec, optionally replacing its classifier head.

    Args:
        spec: ``torchvision:resnet18`` etc., or a parsed :class:`ModelSpec`.
        model_args: ``key=value`` constructor arguments (CLI form).
        num_classes: replace the head with one of this many outputs.
        head: the head module's name; found automatically when None.
        device: ``"meta"`` builds shapes only, costing no memory.
        kwargs: constructor arguments (API form), merged over ``model_args``.

    Raises:
        ModelSpecError: the spec cannot be imported or built.
    """
    parsed = spec if isinstance(spec, ModelSpec) else parse_model_spec(spec, model_args)
    arguments = {**parsed.kwargs, **kwargs}
    with _on_device(device):
        model = _construct(parsed, arguments)
        if num_classes is not None:
            model = replace_head(model, num_classes, head=head)
    return model


@dataclass(frozen=True)
class ShapeModel:
    """A model built to read its state_dict's names and shapes, and how it was built."""

    module: nn.Module
    note: str | None = None  # set when the meta device failed and the CPU was used
    live: bool = False  # the caller's own model: read it, never load into it


def build_for_shapes(
    spec: str | nn.Module,
    *,
    model_args: Sequence[str] = (),
    num_classes: int | None = None,
    head: str | None = None,
) -> ShapeModel:
    """Build on the meta device (no memory, no init), or on the CPU where that fails.

    Some constructors cannot run on meta tensors (they call ``.item()``, copy numpy data
    into a buffer, or ``.to()`` a device); ``model = Factory()`` works for them, so must
    ckptool: it falls back to an ordinary build and says so in ``note``. A live
    ``nn.Module`` is used as it is.

    Raises:
        ModelSpecError: the spec cannot be imported, or the CPU build fails too.
        UsageError: head or constructor options given with a live model.
    """
    if not isinstance(spec, str):
        _refuse_build_options(num_classes, head, model_args)
        return ShapeModel(spec, live=True)
    options: dict[str, Any] = {"model_args": model_args, "num_classes": num_classes, "head": head}
    try:
        return ShapeModel(build_model(spec, device="meta", **options))
    except ModelSpecError as meta_error:
        if not isinstance(meta_error.__cause__, Exception):
            raise  # not a constructor failure (an import, a bad spec): the CPU fares no better
        reason = str(meta_error.__cause__).strip().splitlines()[0][:120]
        module = build_model(spec, device="cpu", **options)
        note = f"{spec} cannot be built on the meta device ({reason}); built on the CPU instead"
        return ShapeModel(module, note)


@contextlib.contextmanager
def _on_device(device: str) -> Iterator[None]:
    import torch

    with torch.device(device), _skip_init() if device == "meta" else contextlib.nullcontext():
        yield


def materialize(module: nn.Module, device: str) -> None:
    """``module.to_empty(device=device, recurse=False)`` without torch's reference kernels.

    ``to_empty`` calls ``torch.empty_like`` on meta tensors, which runs those kernels;
    their first use imports sympy and the meta registrations, 0.3 s of an adapt.
    """
    import torch

    def empty(tensor: torch.Tensor) -> torch.Tensor:
        return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=device)

    # _apply is how to_empty swaps parameters and buffers; torch leaves it unannotated.
    module._apply(empty, recurse=False)  # type: ignore[no-untyped-call]


# torch.nn.init functions that fill tensors in place.
_INIT_FUNCTIONS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_",
    "dirac_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_",
    "orthogonal_", "sparse_",
)  # fmt: skip


@contextlib.contextmanager
def _skip_init() -> Iterator[None]:
    """Make torch.nn.init a no-op while building on the meta device.

    Meta tensors hold no values, so initialising them only costs time (the first
    meta ``normal_`` imports torch's reference kernels: 1.6 s here).
    """
    from torch.nn import init

    saved = {name: getattr(init, name) for name in _INIT_FUNCTIONS if hasattr(init, name)}

    def keep(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        return tensor

    try:
        for name in saved:
            setattr(init, name, keep)
        yield
    finally:
        for name, function in saved.items():
            setattr(init, name, function)


def _construct(spec: ModelSpec, kwargs: Mapping[str, Any]) -> nn.Module:
    factory = _resolve_factory(spec)
    try:
        model = factory(**kwargs) if callable(factory) and not _is_module(factory) else factory
    except Exception as e:  # user constructors raise anything; report it on one line
        raise ModelSpecError(f"building {spec} failed: {type(e).__name__}: {e}") from e
    if not _is_module(model):
        raise ModelSpecError(f"{spec} gave a {type(model).__name__}, not a torch.nn.Module")
    return model  # type: ignore[no-any-return]


def _resolve_factory(spec: ModelSpec) -> Any:
    if spec.source is Source.TORCHVISION:
        return _torchvision_factory(spec.attr)
    if spec.source is Source.TIMM:
        return _timm_factory(spec.attr)
    module = _load_file(spec.target) if spec.source is Source.FILE else _import(spec.target)
    if not hasattr(module, spec.attr):
        public = [n for n in dir(module) if not n.startswith("_")][:10]
        raise ModelSpecError(
            f"{spec.target} has no attribute {spec.attr!r}; it has {', '.join(public)}"
        )
    return getattr(module, spec.attr)


def _torchvision_factory(name: str) -> Any:
    import functools

    from torchvision import models

    available = models.list_models()
    if name not in available:
        close = difflib.get_close_matches(name, available, n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelSpecError(f"torchvision has no model {name!r}{hint}")
    # weights=None always: ckptool never downloads at run time.
    return functools.partial(models.get_model, name, weights=None)


def _timm_factory(name: str) -> Any:
    import functools

    try:
        import timm
    except ImportError as e:
        raise ModelSpecError(f"timm:{name} needs timm; pip install timm") from e
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelSpecError(f"timm has no model {name!r}{hint}")
    return functools.partial(timm.create_model, name, pretrained=False)


def _import(module_name: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        raise ModelSpecError(f"cannot import {module_name!r}: {e}") from e


def _load_file(path: str) -> Any:
    if not os.path.isfile(path):
        raise ModelSpecError(f"model file {path!r} does not exist")
    name = f"_ckptool_user_model_{abs(hash(os.path.abspath(path)))}"
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ModelSpecError(f"cannot load {path!r} as a Python module")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up here
    try:
        loader_spec.loader.exec_module(module)
    except Exception as e:  # the user's file may raise anything at import
        del sys.modules[name]
        raise ModelSpecError(f"importing {path!r} failed: {type(e).__name__}: {e}") from e
    return module


def _is_module(obj: Any) -> bool:
    from torch import nn

    return isinstance(obj, nn.Module)


def find_head(model: nn.Module) -> str:
    """Name of the classifier head: the last ``nn.Linear`` in registration order.

    Raises:
        UsageError: the model has no Linear layer.
    """
    from torch import nn

    linears: list[str] = [
        name for name, module in model.named_modules() if isinstance(module, nn.Linear)
    ]
    if not linears:
        raise UsageError(
            f"{type(model).__name__} has no nn.Linear head; name one with {option('head')}"
        )
    return linears[-1]


def replace_head(model: nn.Module, num_classes: int, *, head: str | None = None) -> nn.Module:
    """Replace the classifier head with a fresh ``nn.Linear(in_features, num_classes)``.

    The new layer keeps the old one's bias setting, dtype and device. Returns ``model``.

    Raises:
        UsageError: ``num_classes`` < 1, or ``head`` names no Linear layer.
    """
    from torch import nn

    if num_classes < 1:
        raise UsageError(f"{option('num_classes')} must be at least 1, got {num_classes}")
    name = head or find_head(model)
    old = dict(model.named_modules()).get(name)
    if not isinstance(old, nn.Linear):
        kind = type(old).__name__ if old is not None else "nothing"
        raise UsageError(
            f"{option('head', name, quoted=True)} is {kind}, not an nn.Linear; "
            f"heads: {find_head(model)}"
        )
    new = nn.Linear(
        old.in_features,
        num_classes,
        bias=old.bias is not None,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    return model


def model_tensor_meta(model: nn.Module) -> dict[str, TensorMeta]:
    """The model's ``state_dict()`` keys as metadata (works on the meta device).

    Names that are one tensor in the model (a weight tied to another, a module reachable
    under two paths) get the first such name as ``storage``, so the key logic sees ties.
    """
    from torch.nn import Parameter

    state = model.state_dict(keep_vars=True)  # the Parameter objects: identity is a tie
    _refuse_extra_state_objects(state)
    # A model built with every parameter frozen (a metric such as LPIPS) says nothing
    # about which values are learned: then every parameter counts.
    any_trainable = any(isinstance(t, Parameter) and t.requires_grad for t in state.values())
    first_name: dict[int, str] = {}
    counts: dict[int, int] = {}
    for name, tensor in state.items():
        first_name.setdefault(id(tensor), name)
        counts[id(tensor)] = counts.get(id(tensor), 0) + 1
    return {
        name: TensorMeta(
            shape=tuple(t.shape),
            dtype=str(t.dtype).removeprefix("torch."),
            storage=first_name[id(t)] if counts[id(t)] > 1 else None,
            learned=isinstance(t, Parameter) and (t.requires_grad or not any_trainable),
        )
        for name, t in state.items()
    }


def _refuse_extra_state_objects(state: Mapping[str, object]) -> None:
    """A module's ``get_extra_state()`` may return any object, and torch's strict load
    then needs that key too; ckptool reads, compares and writes tensors only, so it can
    neither judge nor produce a file that loads into such a model (it crashed here)."""
    from torch import Tensor

    objects = [name for name, value in state.items() if not isinstance(value, Tensor)]
    if objects:
        kind = type(state[objects[0]]).__name__
        raise ModelSpecError(
            f"the model's state_dict() holds {listed(objects, 3)}: extra state its modules "
            f"keep as {kind}, not as a tensor; ckptool compares and writes tensors only, so "
            "it cannot promise a strict load into this model"
        )


def build_or_copy(
    model: str | nn.Module,
    *,
    model_args: Sequence[str] = (),
    num_classes: int | None = None,
    head: str | None = None,
) -> nn.Module:
    """A model of one's own to change: built from a spec on the CPU, or a deep copy of a
    live model (a check trains a step; the caller's model stays as it was)."""
    import copy

    if isinstance(model, str):
        return build_model(model, model_args=model_args, num_classes=num_classes, head=head)
    _refuse_build_options(num_classes, head, model_args)
    return copy.deepcopy(model)


def _refuse_build_options(
    num_classes: int | None, head: str | None, model_args: Sequence[str]
) -> None:
    if num_classes is not None or head or model_args:
        # Replacing the head of the caller's own model behind its back would be a surprise.
        raise UsageError(
            "num_classes, head and model_args build a model from a spec; with a live "
            "model, call ckptool.replace_head(model, n) on it first"
        )


def model_label(model: str | nn.Module) -> str:
    """How reports name a model: its spec, or the class of a live module."""
    return model if isinstance(model, str) else f"{type(model).__name__} (a live nn.Module)"
