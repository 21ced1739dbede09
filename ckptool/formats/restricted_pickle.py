"""A pickle reader that turns torch.save pickles into metadata and runs no code.

``find_class`` never imports anything. Globals that ``torch.load(weights_only=True)``
allows and that describe plain tensors map to local stand-ins that build
:class:`TensorMeta`; globals torch allows but we cannot describe (sparse, quantized,
tensor subclasses) ask for the torch fallback.

Every other global is one of two kinds (the rule, in README "Training checkpoints"):

- a code-execution primitive or anything in torch's own namespace off the allowlist
  (:func:`is_refused_global`): recorded as unsafe, the file is refused (exit 4), every
  such name reported at once;
- anything else (``argparse.Namespace``, numpy scalars, ``pathlib`` paths, a training
  script's config classes): an :class:`OpaqueObject` that keeps its arguments and state
  as data. It is never imported and never called; where a tensor needs a real value
  from it (a size, a dtype, a storage), the file is refused as unsafe too.

Nothing from the file is ever called.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import functools
import io
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, NamedTuple, NoReturn

from ckptool.errors import CheckpointReadError, UnsafeCheckpointError
from ckptool.formats.bounded import is_count, listed, short_repr
from ckptool.formats.meta import DTYPE_SIZES, TensorMeta
from ckptool.formats.pickle_scan import check_pickle_budgets, slimmed_pickle

# Legacy typed-storage class names, as pickled by torch.save, -> dtype.
STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64", "QInt8Storage": "qint8", "QUInt8Storage": "quint8",
    "QInt32Storage": "qint32", "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4",
}  # fmt: skip

# Allowed by torch's weights_only unpickler, but not describable without torch.
_TORCH_ONLY_GLOBALS = frozenset(
    {
        "torch._utils._rebuild_qtensor",
        "torch._utils._rebuild_sparse_tensor",
        "torch._utils._rebuild_wrapper_subclass",
        "torch._utils._rebuild_device_tensor_from_numpy",
        "torch._utils._rebuild_device_tensor_from_cpu_tensor",
        "torch._utils._rebuild_nested_tensor",
        "torch.serialization._get_layout",
        "torch.per_tensor_affine",
        "torch.per_channel_affine",
        "torch.per_tensor_symmetric",
        "torch.per_channel_symmetric",
        "torch.per_channel_affine_float_qparams",
    }
)


class NeedsTorchError(Exception):
    """Internal: the pickle is safe but only torch itself can describe it."""

    def __init__(self, names: set[str]) -> None:
        super().__init__(", ".join(sorted(names)))
        self.names = names


class _RefusesBuild:
    """Stand-ins made from a pickle refuse its BUILD opcode.

    BUILD would write the pickle's own dict into the object's ``__dict__``, bypassing
    ``frozen``: a crafted file could point a tensor's ``file``/``file_offset`` at any
    local file. The allowlisted constructor's arguments are all a pickle may set;
    torch.save never emits BUILD for these objects, so refusing costs real files nothing.
    """

    __slots__ = ()  # a PickledTensor is a tuple: no __dict__ for BUILD to fill

    def __setstate__(self, state: Any) -> None:
        raise CheckpointReadError(
            f"the pickle tries to set fields of a {type(self).__name__.lstrip('_')} "
            "(BUILD opcode), which torch.save never writes; the file is crafted or corrupt"
        )


@dataclass(frozen=True, slots=True)  # one per tensor of a state dict: no __dict__ each
class StorageRef(_RefusesBuild):
    """A persistent-id storage reference: the record key, its dtype and element count."""

    # Named here, or dataclass gives a frozen slotted class a __setstate__ of its own
    # that sets the fields from the pickle's BUILD state.
    __setstate__ = _RefusesBuild.__setstate__

    key: str
    dtype: str
    location: str
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES.get(self.dtype, 1)


@dataclass(frozen=True)
class _StorageType(_RefusesBuild):
    dtype: str


class PickledTensor(_RefusesBuild, TensorMeta):
    """A TensorMeta as the unpickler builds it; readers turn it into a plain one."""

    __slots__ = ()


@dataclass(frozen=True)
class _Token(_RefusesBuild):
    """Stand-in for an allowed torch global that is data, not a function (a dtype, Tensor)."""

    name: str


class _Inert:
    """Placeholder for a refused global: accepts any use and does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return _Inert()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass


# One class per name, not per use: a pickle can name a global or call an opaque object
# millions of times, and each new class cost 11 µs and 2.5 KB until the collector ran.
@functools.lru_cache(maxsize=4096)
def _inert_class(qualified_name: str) -> type[_Inert]:
    return type(qualified_name, (_Inert,), {})


def _names_only(state: Any) -> bool:
    """A dict whose keys are all strings.

    BUILD merges a state dict into an object, and merging hashes the keys again unless
    they are strings (a string caches its hash) or the state is a plain dict (its
    stored hashes are reused). A key can be a tuple of shared tuples: 4 million nodes
    to hash from a few hundred bytes, within the scan's budget once, and again for every
    BUILD that names the state. The keys are read through ``dict.keys``: an OrderedDict's
    own iterator hashes each key to find it.
    """
    return isinstance(state, dict) and set(map(type, dict.keys(state))) <= {str}


class _AttributesByName:
    """BUILD on an OrderedDict or a Counter sets instance attributes: torch.save keeps a
    state dict's ``_metadata`` that way. Only attribute names are set (see
    ``_names_only``); the C unpickler would hash any other key again on every BUILD."""

    def __setstate__(self, state: Any) -> None:
        if not _names_only(state):
            raise CheckpointReadError(
                f"corrupt pickle: BUILD sets {type(self).__name__} attributes from "
                f"{short_repr(state)}; torch.save writes only names there"
            )
        vars(self).update(state)


class OrderedDictStandIn(_AttributesByName, dict[Any, Any]):
    """What the pickle's OrderedDict becomes: a dict in the same order (an unpickled
    OrderedDict is only ever appended to). Not collections.OrderedDict: its iterator
    hashes every key to find it, so each walk over one shared a thousand times re-hashed
    a key the scan had charged once (35 ms a visit for a key of 3M nodes)."""


class _Counter(_AttributesByName, collections.Counter[Any]):
    pass


# Listings name a container by its class: these are what the pickle named.
OrderedDictStandIn.__name__ = OrderedDictStandIn.__qualname__ = "OrderedDict"
_Counter.__name__ = _Counter.__qualname__ = "Counter"


class Record:
    """A plain-data stand-in for an allowlisted dataclass (DCP metadata): args and state."""

    record_name = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Record:
        record = super().__new__(cls)
        record.args = args
        record.state = {}
        return record

    args: tuple[Any, ...]
    state: dict[str, Any]

    def __setstate__(self, state: Any) -> None:
        # Dataclasses pickle a dict, or (None, {slot: value}) with __slots__; classes with
        # their own __getstate__ (DCP's TensorProperties) a plain tuple, kept as "values".
        parts = state if isinstance(state, tuple) else (state,)
        dicts = list(filter(_names_only, parts))  # other keys would be hashed again
        for part in dicts:
            self.state.update(part)
        if not dicts:
            self.state["values"] = state

    def __repr__(self) -> str:
        # Bounded: the arguments and state come from the file (see short_repr).
        args = short_repr(self.args, limit=200) if self.args else ""
        return f"{self.record_name}{args}{short_repr(self.state, limit=200) if self.state else ''}"


@functools.lru_cache(maxsize=4096)  # as _inert_class
def _record_class(qualified_name: str) -> type[Record]:
    return type(qualified_name, (Record,), {"record_name": qualified_name})


# Modules whose globals can run code, touch files, processes or the network, or load
# more pickles: a file naming one is hostile, whatever it does with it.
_REFUSED_MODULES = frozenset({
    "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "builtins", "__builtin__",
    "importlib", "imp", "runpy", "pickle", "_pickle", "cPickle", "copyreg", "copy_reg",
    "marshal", "shelve", "dill", "cloudpickle", "joblib", "shutil", "socket", "ssl", "sys",
    "codecs", "_codecs", "functools", "operator", "_operator", "types", "ctypes", "io",
    "_io", "tempfile", "signal", "multiprocessing", "threading", "_thread", "asyncio",
    "concurrent", "code", "codeop", "pdb", "bdb", "inspect", "gc", "platform", "pty",
    "commands", "webbrowser", "urllib", "http", "ftplib", "smtplib", "telnetlib", "requests",
    "glob", "zipfile", "tarfile", "zipimport", "pkgutil", "site", "sysconfig",
    "distutils", "setuptools", "pip", "yaml", "timeit", "trace", "atexit", "weakref",
    "contextlib", "logging", "sqlite3", "dbm", "mmap", "resource", "fcntl", "termios",
    "select", "selectors", "xmlrpc", "venv", "ensurepip", "numpy.f2py", "numpy.distutils",
    "numpy.ctypeslib", "numpy.testing", "numpy.lib.npyio", "numpy.load",
})  # fmt: skip


# Builtin types that configs name as data (``defaultdict(list)``, omegaconf's type
# hints); every other builtin (eval, getattr, __import__, open, ...) is refused.
_DATA_BUILTINS = frozenset(
    {"list", "dict", "tuple", "int", "float", "str", "bool", "bytes", "object", "slice",
     "range", "NoneType", "Ellipsis", "NotImplemented"}
)  # fmt: skip


def is_refused_global(module: str, name: str) -> bool:
    """A global no checkpoint needs as data: a code-execution primitive (os, subprocess,
    builtins, importlib, pickle, functools.partial, operator.attrgetter, ...) or anything
    in torch's own namespace off the allowlist (torch.load, torch.hub, a pickled Module,
    lookalikes such as torch_evil). Everything else may become an inert OpaqueObject."""
    top = module.split(".", 1)[0]
    if top.startswith("torch"):
        return True
    if module == "builtins" and name in _DATA_BUILTINS:
        return False  # a type named as data (defaultdict(list)), never called here
    parts = module.split(".")
    prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
    return bool(prefixes & _REFUSED_MODULES) or f"{module}.{name}" in _REFUSED_MODULES


class OpaqueObject(Record):
    """An object of a class (or the result of a function) the file names but ckptool
    never imports or calls: its constructor arguments, state and items kept as data.

    ``torch.load`` would rebuild an ``argparse.Namespace`` or a numpy scalar here;
    ckptool keeps what the pickle says about it, which is enough to list it and to find
    the tensors next to it.
    """

    items: dict[Any, Any]
    values: list[Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> OpaqueObject:
        obj = super().__new__(cls, *args)
        assert isinstance(obj, OpaqueObject)
        obj.items, obj.values = {}, []
        return obj

    def __call__(self, *args: Any, **kwargs: Any) -> OpaqueObject:
        # REDUCE with this object as the callable: its result is just as opaque.
        return _opaque_class(f"{self.record_name}(...)")(*args)

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEM(S): a dict subclass
        self.items[key] = value

    def append(self, item: Any) -> None:  # APPEND(S): a list subclass
        self.values.append(item)

    def extend(self, items: Any) -> None:
        self.values.extend(items)

    def __repr__(self) -> str:
        return f"{self.record_name} (not executed)"


@functools.lru_cache(maxsize=4096)  # as _inert_class
def _opaque_class(qualified_name: str) -> type[OpaqueObject]:
    return type(qualified_name, (OpaqueObject,), {"record_name": qualified_name})


def _needs_data(value: Any, what: str) -> None:
    """A tensor needs a real value here (a storage, size, dtype): an opaque object's
    would only exist by running code, so a file that puts one there is refused."""
    opaque = _find_opaque(value)
    if opaque is not None:
        raise UnsafeCheckpointError(
            f"the pickle builds a tensor's {what} from {opaque.record_name}, which would "
            "have to be executed (nothing was)",
            [opaque.record_name],
        )


def _find_opaque(value: Any, depth: int = 0) -> OpaqueObject | type[OpaqueObject] | None:
    if type(value) in _PLAIN:  # most values (an offset, a key), asked 500k times at 100k tensors
        return None
    if isinstance(value, OpaqueObject):
        return value
    if isinstance(value, type) and issubclass(value, OpaqueObject):
        return value  # a class named where a dtype or storage type belongs
    if isinstance(value, tuple | list) and depth < 2:  # sizes and strides: small tuples
        for item in value[:64]:
            found = _find_opaque(item, depth + 1)
            if found is not None:
                return found
    return None


_PLAIN = frozenset({int, str, bool, float, type(None)})


def _meta_from_storage(storage: Any, offset: Any, size: Any, stride: Any, dtype: str) -> TensorMeta:
    well_formed = (
        isinstance(storage, StorageRef)
        and is_count(offset)
        and _int_tuple(size)
        and _int_tuple(stride)
    )
    if not well_formed:  # (a storage, ints and tuples of ints hold no opaque object)
        _refuse_malformed_tensor(storage, offset, size, stride)
    if len(size) != len(stride):
        raise CheckpointReadError(f"tensor has {len(size)} sizes but {len(stride)} strides")
    # Positional: 100,000 tensors are made here; keywords cost a fifth more.
    return PickledTensor(tuple(size), dtype, storage.key, offset, tuple(stride))


def _refuse_malformed_tensor(storage: Any, offset: Any, size: Any, stride: Any) -> NoReturn:
    """Why these tensor arguments are refused: an opaque object among them is unsafe
    (it would have to run), anything else is corrupt."""
    for value, what in (
        (storage, "storage"),
        (offset, "offset"),
        (size, "size"),
        (stride, "stride"),
    ):
        _needs_data(value, what)
    if not isinstance(storage, StorageRef):
        raise CheckpointReadError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
    raise CheckpointReadError(
        f"tensor has malformed size {short_repr(size)}, stride {short_repr(stride)} "
        f"or storage offset {short_repr(offset)}"
    )


def _int_tuple(value: Any) -> bool:
    """A tuple or list of counts (``is_count``)."""
    if not isinstance(value, tuple | list):
        return False
    # Sizes and strides, asked twice a tensor: plain ints are checked in C.
    if set(map(type, value)) <= {int}:
        return not value or (min(value) >= 0 and max(value) < 2**63)
    return all(map(is_count, value))


def _size(dims: Any = ()) -> tuple[int, ...]:
    _needs_data(dims, "torch.Size")
    if not _int_tuple(dims):
        raise CheckpointReadError(f"torch.Size of {short_repr(dims)}; expected non-negative ints")
    return tuple(dims)


def _device(*parts: Any) -> str:
    _needs_data(parts, "torch.device")
    if not all(isinstance(p, str | int) and not isinstance(p, bool) for p in parts):
        raise CheckpointReadError(f"torch.device of {short_repr(parts)}; expected a name and index")
    return ":".join(str(p) for p in parts)[:64]


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> TensorMeta:
    dtype = storage.dtype if isinstance(storage, StorageRef) else "?"
    return _meta_from_storage(storage, offset, size, stride, dtype)


def _rebuild_tensor_v3(
    storage: Any, offset: Any, size: Any, stride: Any, grad: Any, hooks: Any, dtype: Any, *_: Any
) -> TensorMeta:
    _needs_data(dtype, "dtype")
    if not isinstance(dtype, _Token) or dtype.name not in DTYPE_SIZES:
        raise CheckpointReadError(f"tensor has unknown dtype {short_repr(dtype)}")
    return _meta_from_storage(storage, offset, size, stride, dtype.name)


def _rebuild_meta_no_storage(dtype: Any, size: Any, stride: Any, *_: Any) -> TensorMeta:
    _needs_data((dtype, size, stride), "dtype or size")
    if not isinstance(dtype, _Token) or not _int_tuple(size) or not _int_tuple(stride):
        raise CheckpointReadError(
            f"meta tensor has malformed dtype {short_repr(dtype)} or size {short_repr(size)}"
        )
    return PickledTensor(shape=tuple(size), dtype=dtype.name, stride=tuple(stride))


def _first_arg(data: Any, *_: Any) -> Any:
    return data


def _rebuild_from_type(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    _needs_data((func, new_type), "type")
    # Parameter and plain Tensor subclasses describe the same bytes as the tensor.
    if isinstance(new_type, _Token) and new_type.name in {
        "torch.Tensor",
        "torch.nn.parameter.Parameter",
    }:
        return func(*args)
    raise NeedsTorchError({"torch._tensor._rebuild_from_type_v2"})


def _encode_latin1(text: Any, encoding: str = "utf-8") -> bytes:
    # Protocol-2 pickles store bytes as _codecs.encode(str, 'latin1'); other codecs
    # (zlib, bz2) could expand a small file into huge memory, so only these are honoured.
    if not isinstance(text, str) or codecs.lookup(encoding).name not in {"iso8859-1", "utf-8"}:
        raise CheckpointReadError(f"pickle asks for unsupported encoding {short_repr(encoding)}")
    return text.encode(encoding)


def _bytearray(source: Any = b"", *encoding: Any) -> bytearray:
    # bytearray(10**10) would allocate 10 GB from a few bytes of pickle: only copies.
    if isinstance(source, bytes | bytearray) and not encoding:
        return bytearray(source)
    if isinstance(source, str) and encoding in {("latin-1",), ("latin1",)}:
        return bytearray(_encode_latin1(source, "latin-1"))
    raise CheckpointReadError(f"pickle builds a bytearray from {short_repr(source)}; not supported")


_HANDLERS: dict[str, Callable[..., Any]] = {
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _first_arg,
    "torch._utils._rebuild_parameter_with_state": _first_arg,
    "torch._utils._rebuild_meta_tensor_no_storage": _rebuild_meta_no_storage,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type,
    "torch.Size": _size,
    "torch.device": _device,
    "collections.OrderedDict": OrderedDictStandIn,
    "collections.Counter": _Counter,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.bytearray": _bytearray,
    "builtins.complex": complex,
    "_codecs.encode": _encode_latin1,
}

# torch writes record keys like '0' or '94418944' and locations like 'cuda:0'.
MAX_PID_TEXT = 256

# Module-level names that torch pickles as data (dtype objects, classes used as tags).
_TOKENS = frozenset({"torch.Tensor", "torch.nn.parameter.Parameter"})


class MetaUnpickler(pickle.Unpickler):
    """Unpickle a torch.save pickle into plain containers of TensorMeta, safely.

    Args:
        file: binary stream positioned at the pickle.
        storage_scope: prefix for storage keys, so keys from different files differ.
        legacy: the pickle uses the pre-1.6 persistent id layout.
    """

    def __init__(
        self,
        file: BinaryIO,
        *,
        storage_scope: str = "",
        records: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(file)
        self.storage_scope = storage_scope
        self.records = records
        self.unsafe: set[str] = set()
        self.opaque: set[str] = set()  # kept as data, never imported or called
        self.torch_only: set[str] = set()
        self.storages: dict[str, StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        module, name = _python3_name(module, name)
        qualified = f"{module}.{name}"
        if qualified in _HANDLERS:
            return _HANDLERS[qualified]
        if qualified in _TOKENS:
            return _Token(qualified)
        storage_name = name if module in {"torch", "torch.cuda"} else None
        if storage_name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[storage_name])
        if qualified == "torch.storage.UntypedStorage":
            return _StorageType("uint8")
        if module == "torch" and name in DTYPE_SIZES:
            return _Token(name)
        if qualified in self.records:
            return _record_class(qualified)
        if qualified in _TORCH_ONLY_GLOBALS:
            self.torch_only.add(qualified)
            return _inert_class(qualified)
        if is_refused_global(module, name):
            self.unsafe.add(qualified)
            return _inert_class(qualified)
        self.opaque.add(qualified)
        return _opaque_class(qualified)

    def persistent_load(self, pid: Any) -> StorageRef:
        # ('storage', storage_type, key, location, numel[, view_metadata (legacy)])
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise CheckpointReadError(f"unsupported persistent id {short_repr(pid)}")
        storage_type, key, location, numel = pid[1:5]
        well_formed = (
            isinstance(storage_type, _StorageType)
            and isinstance(key, str)
            and isinstance(location, str)
            and is_count(numel)
            and len(key) + len(location) <= MAX_PID_TEXT
        )
        if not well_formed:  # (a storage type, strings and an int hold no opaque object)
            _needs_data(pid[1:5], "storage reference")
            if isinstance(storage_type, type) and issubclass(storage_type, _Inert):
                # An unsafe storage type, already recorded by find_class: keep scanning.
                return StorageRef(key="?", dtype="?", location="?", numel=0)
            raise CheckpointReadError(
                f"malformed storage reference (type, key, location, numel) = {short_repr(pid[1:5])}"
            )
        ref = StorageRef(
            key=f"{self.storage_scope}{key}",
            dtype=storage_type.dtype,
            location=str(location),
            numel=numel,
        )
        self.storages[ref.key] = ref
        return ref


def _python3_name(module: str, name: str) -> tuple[str, str]:
    """Map Python 2 names (``__builtin__.set``, ``commands.Popen``) as protocol-2 pickles
    spell them, exactly as ``pickle.Unpickler(fix_imports=True)`` would before importing."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class Unpickled(NamedTuple):
    obj: Any
    storages: dict[str, StorageRef]
    opaque: frozenset[str]  # globals kept as inert OpaqueObjects (never imported or called)


def load_restricted(
    data: bytes | BinaryIO,
    *,
    path: str,
    storage_scope: str = "",
    records: frozenset[str] = frozenset(),
) -> Unpickled:
    """Unpickle ``data`` into metadata; return (object, storages it referenced, the
    names of the globals kept as opaque objects).

    ``records`` names further globals (dataclasses such as DCP's metadata) that are
    rebuilt as inert :class:`Record` objects holding their arguments and state.

    Raises:
        UnsafeCheckpointError: the pickle references globals outside the allowlist.
        NeedsTorchError: only torch can describe the contents (safe, allowlisted).
        CheckpointReadError: the pickle is corrupt.
    """
    try:
        # Bytes are scanned in place (and slimmed), a stream up to its STOP.
        if isinstance(data, bytes):
            stream: BinaryIO = io.BytesIO(slimmed_pickle(data))
        else:
            stream, start = data, data.tell()
            check_pickle_budgets(data)
            stream.seek(start)
    except CheckpointReadError as e:
        raise type(e)(f"{path}: {e}") from e
    unpickler = MetaUnpickler(stream, storage_scope=storage_scope, records=records)
    try:
        obj = unpickler.load()
    except (UnsafeCheckpointError, NeedsTorchError):
        raise
    except CheckpointReadError as e:
        _raise_if_unsafe(unpickler, path)
        raise CheckpointReadError(f"{path}: {e}") from e
    except Exception as e:  # the C unpickler raises many types on corrupt input
        _raise_if_unsafe(unpickler, path)
        raise CheckpointReadError(f"{path}: corrupt pickle ({type(e).__name__}: {e})") from e
    _raise_if_unsafe(unpickler, path)
    if unpickler.torch_only:
        raise NeedsTorchError(unpickler.torch_only)
    return Unpickled(obj, unpickler.storages, frozenset(unpickler.opaque))


def _raise_if_unsafe(unpickler: MetaUnpickler, path: str) -> None:
    if not unpickler.unsafe:
        return
    names = sorted(unpickler.unsafe)
    shown = listed(names, 8)
    raise UnsafeCheckpointError(
        f"{path}: refused, the pickle wants to import {shown}, which is outside the "
        "tensor allowlist (nothing was executed); if you trust the file, re-save its "
        "state_dict() with torch.save or convert it to safetensors",
        names,
    )
