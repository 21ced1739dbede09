"""A torch.save state dict's ``data.pkl``, read in one pass.

The general reader takes three passes over a pickle: the budget scan walks every opcode
(``pickle_scan``), the memo stores nothing fetches are cut out, and the restricted
unpickler builds the objects, calling Python twice a tensor. At 100,000 tensors that is
2 s of the 3 s ``inspect x.pt`` spends here. Files with that many tensors are state
dicts: a dict or an OrderedDict of tensors, each pickled by torch.save as the same ~30
opcodes (and maybe a few plain values: a step, a flag), and torch's ``_metadata`` of
module versions after them. This module reads
exactly that shape, one regex match a tensor, and builds the same objects the general
reader builds from it (:class:`Unpickled`: the container, its tensors, their storages).

It decides nothing about a file. Whatever it does not recognise byte for byte (another
protocol, a nested dict, an optimizer's state, a memo fetch of anything but a constant,
a store out of order, a number that is not a count, a pickle of over ``MAX_OPCODES``
bytes) returns None, and the general reader reads the file and gives the verdict. So it
accepts nothing the general reader refuses: within its grammar every budget of the scan
holds (an opcode is at least a byte; a tensor record hashes one key and hands its
constructors at most ~140 nodes), and it never refuses a file the general reader takes.
Tests hold the two to the same objects on real files and on every single-byte mutant of
one.
"""

from __future__ import annotations

import array
import re
import struct
from collections.abc import Callable
from typing import Any, NamedTuple

from ckptool.formats.pickle_scan import MAX_OPCODES
from ckptool.formats.restricted_pickle import (
    MAX_PID_TEXT,
    STORAGE_DTYPES,
    OrderedDictStandIn,
    PickledTensor,
    StorageRef,
    Unpickled,
)

# Persistent ids: torch writes keys like '0' and locations like 'cuda:0' (a fetched key
# may be longer: the general reader's bound on the two together holds then).
_MAX_KEY_DIGITS = 20
_MAX_LOCATION = 64
_LOCATION = rb"[A-Za-z0-9:_-]"

_REBUILD_NAME = "torch._utils._rebuild_tensor_v2"
_ORDERED_DICT_NAME = "collections.OrderedDict"


def _number() -> bytes:
    """BININT1, BININT2, BININT, or LONG1 of up to 8 bytes (so below 2**63)."""
    long1 = b"|".join(re.escape(bytes([n])) + b".{%d}" % n for n in range(9))
    return rb"(?:K.|M..|J....|\x8a(?:" + long1 + b"))"


_NUMBER = _number()
_GET = rb"h.|j...."
_PUT = rb"q.|r...."


def _text_of(characters: bytes, most: int) -> bytes:
    """A BINUNICODE of 1 to ``most`` of ``characters``, its length and text together, so
    the text cannot run on into the opcodes after it ('cuda:0' then BINPUT 52, 'q4')."""
    return (
        b"X(?:"
        + b"|".join(
            re.escape(n.to_bytes(4, "little")) + characters + b"{%d}" % n
            for n in range(1, most + 1)
        )
        + b")"
    )


def _store(name: str) -> bytes:
    """An optional memo store: its bytes, empty when there is none."""
    return rb"(?P<" + name.encode() + rb">(?:" + _PUT + rb")?)"


def _tuple_of_numbers(name: str) -> bytes:
    """An empty tuple, TUPLE1-3 of numbers, or MARK, 4 to 64 numbers, TUPLE; a store."""
    listed = (
        _NUMBER + rb"\x85|" + _NUMBER * 2 + rb"\x86|" + _NUMBER * 3 + rb"\x87|"
        rb"\((?:" + _NUMBER + rb"){4,64}t"
    )
    return rb"(?P<" + name.encode() + rb">\)|" + listed + rb")" + _store(name + "_put")


def _constant(name: str, inline: bytes) -> bytes:
    """A memo fetch, or the constant written out (``inline``) and its store (group
    ``<name>_stored``, None for a fetch)."""
    return (
        rb"(?P<" + name.encode() + rb">" + _GET + rb"|" + inline + _store(name + "_stored") + b")"
    )


# One tensor of the state dict, from its name's store: _rebuild_tensor_v2((storage id),
# offset, sizes, strides, requires_grad, OrderedDict()) as torch.save pickles it. Every
# tensor after the first of its kind fetches the rebuild function, the 'storage' tag, the
# storage type, the location and OrderedDict from the memo.
_RECORD = re.compile(
    _store("name_put")
    + _constant("rebuild", rb"ctorch\._utils\n_rebuild_tensor_v2\n")
    + rb"\(\("
    + _constant("tag", rb"X\x07\x00\x00\x00storage")
    + _constant("storage_type", rb"ctorch\n(?P<storage_class>[A-Za-z0-9]{1,32})\n")
    + rb"(?:(?P<key_get>" + _GET + rb")|(?P<key>" + _text_of(b"[0-9]", _MAX_KEY_DIGITS) + b")"
    + _store("key_put")
    + rb")"
    + _constant("location", b"(?P<location_text>" + _text_of(_LOCATION, _MAX_LOCATION) + b")")
    + rb"(?P<numel>" + _NUMBER + rb")t" + _store("pid_put") + b"Q"
    + rb"(?P<offset>" + _NUMBER + rb")"
    + _tuple_of_numbers("shape")
    + _tuple_of_numbers("stride")
    + rb"[\x88\x89]"
    + _constant("hooks", rb"ccollections\nOrderedDict\n")
    + rb"\)R" + _store("hooks_put")
    + rb"t" + _store("args_put")
    + rb"R" + _store("tensor_put"),
    re.DOTALL,
)  # fmt: skip
# Its groups in order, as _tensors unpacks them (checked at import).
_RECORD_GROUPS = (
    "name_put", "rebuild", "rebuild_stored", "tag", "tag_stored", "storage_type",
    "storage_class", "storage_type_stored", "key_get", "key", "key_put",
    "location", "location_text", "location_stored", "numel", "pid_put",
    "offset", "shape", "shape_put", "stride", "stride_put", "hooks", "hooks_stored",
    "hooks_put", "args_put", "tensor_put",
)  # fmt: skip
assert tuple(sorted(_RECORD.groupindex, key=_RECORD.groupindex.__getitem__)) == _RECORD_GROUPS
_NUMBERS = re.compile(_NUMBER, re.DOTALL)
_DOUBLE = struct.Struct(">d")
_PLAIN_CONSTANTS = {b"N": None, b"\x88": True, b"\x89": False}
_FETCHES = frozenset(b"hj")


class _Global(NamedTuple):
    """A memo entry that holds a global, by its qualified name (never equal to a string)."""

    qualified: str


_REBUILD, _ORDERED_DICT = _Global(_REBUILD_NAME), _Global(_ORDERED_DICT_NAME)
_STORAGE_TYPES = {_Global(f"torch.{name}"): dtype for name, dtype in STORAGE_DTYPES.items()}


class _Decline(Exception):
    """Not the shape this module reads: the general reader decides."""


def read_state_dict_pickle(data: bytes, *, storage_scope: str) -> Unpickled | None:
    """The objects the restricted unpickler would build from ``data``, if ``data`` is a
    torch.save state dict pickle of the shape this module reads; None otherwise."""
    if len(data) > MAX_OPCODES or not data.startswith(b"\x80\x02"):
        return None
    reader = _OnePass(data, storage_scope)
    try:
        container = reader.read()
    except _Decline:
        return None
    return Unpickled(container, reader.storages, frozenset())


class _OnePass:
    def __init__(self, data: bytes, storage_scope: str) -> None:
        self.data = data
        self.pos = 2  # after PROTO 2
        self.scope = storage_scope
        # The constants a fetch may find (strings and globals), by memo index. Every
        # store is read as the index it names; read() checks at the end that they name
        # 0, 1, 2... in order, as the general reader's budget and this memo assume.
        self.memo: dict[int, str | _Global] = {}
        self.stores = bytearray()  # every store's bytes, in order (not 800,000 objects)
        self.storages: dict[str, StorageRef] = {}
        # A record's five constant fetches -> (dtype, location), once all were checked.
        self.kinds: dict[tuple[bytes, ...], tuple[str, str]] = {}
        self.counts = _Counts()
        self.count_tuples = _CountTuples(self.counts)

    def read(self) -> dict[str, Any]:
        container: dict[str, Any]
        data = self.data
        if data.startswith(b"}", self.pos):  # torch.save of a dict
            self.pos += 1
            container = {}
        elif data.startswith(b"ccollections\nOrderedDict\n", self.pos):  # a state_dict()
            self.pos += 25
            self._store(_ORDERED_DICT)
            self._expect(b")R")
            container = OrderedDictStandIn()
        else:
            raise _Decline
        self._store(None)
        self._items(container, self._tensors)
        if not container:
            raise _Decline  # nothing to gain
        if isinstance(container, OrderedDictStandIn) and data.startswith(b"}", self.pos):
            vars(container).update(_metadata=self._module_versions())
        self._expect(b".")
        if self.pos != len(data):
            raise _Decline  # bytes after STOP: the general reader says what they are
        self.memo.clear()  # before the check builds the stores it expects, as many bytes again
        if not _numbered_in_order(self.stores):
            raise _Decline
        return container

    def _items(self, target: dict[str, Any], entries: Callable[..., None]) -> None:
        """SETITEMS batches: MARK, entries, SETITEMS; or one entry, SETITEM."""
        data = self.data
        while True:
            if data.startswith(b"(", self.pos):
                self.pos += 1
                entries(target, single=False)
                self._expect(b"u")
            elif data.startswith(b"X", self.pos):
                entries(target, single=True)
                self._expect(b"s")
            else:
                return

    def _tensors(self, target: dict[str, Any], *, single: bool) -> None:
        """Names and tensor records (or plain values) into ``target``, up to the first
        that is neither."""
        # One pass of this loop per tensor: locals, positional groups, cached numbers.
        data, pos, memo, kinds, stores = self.data, self.pos, self.memo, self.kinds, self.stores
        storages, scope, match = self.storages, self.scope, _RECORD.match
        from_bytes = int.from_bytes
        counts, count_tuples = self.counts, self.count_tuples
        while data.startswith(b"X", pos):
            end = pos + 5 + from_bytes(data[pos + 1 : pos + 5], "little")
            try:  # as the C unpickler decodes it
                name = data[pos + 5 : end].decode("utf-8", "surrogatepass")
            except UnicodeDecodeError:
                raise _Decline from None
            record = match(data, end)
            if record is None:  # a plain value beside the tensors, or not this shape
                self.pos = end
                target[name] = self._plain_value()
                pos = self.pos
                if single:
                    break
                continue
            (name_put, rebuild, _, tag, _, storage_type, _, _, key_get, key, key_put, location,
             _, _, numel, pid_put, offset, shape, shape_put, stride, stride_put, hooks, _,
             hooks_put, args_put, tensor_put) = record.groups()  # fmt: skip
            kind = kinds.get((rebuild, tag, storage_type, location, hooks))
            if kind is None:
                kind = self._learn(record)  # writes out a constant, or the first of a kind
            else:
                stores += b"".join((name_put, key_put or b"", pid_put, shape_put, stride_put,
                                    hooks_put, args_put, tensor_put))  # fmt: skip
            dtype, location = kind
            if key is None:
                key = memo.get(from_bytes(key_get[1:], "little"))
                if type(key) is not str or len(key) + len(location) > MAX_PID_TEXT:
                    raise _Decline  # not a string constant: the general reader follows it
            else:
                key = key[5:].decode("ascii")  # after BINUNICODE and its length
                if key_put:
                    memo[from_bytes(key_put[1:], "little")] = key
            scoped = scope + key
            storages[scoped] = StorageRef(scoped, dtype, location, counts[numel])
            sizes, strides = count_tuples[shape], count_tuples[stride]
            if len(sizes) != len(strides):
                raise _Decline
            target[name] = PickledTensor(sizes, dtype, scoped, counts[offset], strides)
            pos = record.end()
            if single:
                break
        self.pos = pos

    def _plain_value(self) -> int | float | bool | str | None:
        """A value beside the tensors (a step, a flag, a name), after its name's store:
        what the unpickler builds from it."""
        self._store(None)  # the name's
        data, pos = self.data, self.pos
        value: int | float | bool | str | None
        number = _NUMBERS.match(data, pos)
        if number is not None:
            value, self.pos = _decode_number(number[0]), number.end()
        elif data.startswith(b"G", pos) and len(data) >= pos + 9:  # BINFLOAT
            (value,) = _DOUBLE.unpack_from(data, pos + 1)
            self.pos = pos + 9
        elif data.startswith(b"X", pos):
            return self._text()  # kept with its store: a later fetch may find it
        elif data[pos : pos + 1] in _PLAIN_CONSTANTS:  # None, True, False
            value = _PLAIN_CONSTANTS[data[pos : pos + 1]]
            self.pos = pos + 1
        else:
            raise _Decline
        self._store(None)
        return value

    def _learn(self, record: re.Match[bytes]) -> tuple[str, str]:
        """The dtype and location a record's constants give, each fetched or written out
        (and stored) in turn; remembered by its fetches when all five are fetched."""
        stores = self.stores
        stores += record["name_put"]
        values = []
        for slot in ("rebuild", "tag", "storage_type", "location", "hooks"):
            if slot == "location":
                stores += record["key_put"] or b""  # the key comes before it
            elif slot == "hooks":
                stores += b"".join(record.group("pid_put", "shape_put", "stride_put"))
            token = record[slot]
            value: str | _Global | None
            if token[0] in _FETCHES:
                value = self.memo.get(_index(token))  # None: not a constant, declined below
            else:
                value = _written_out(slot, record)
                stored = record[slot + "_stored"]
                if stored:
                    self.memo[_index(stored)] = value
                    stores += stored
            values.append(value)
        stores += b"".join(record.group("hooks_put", "args_put", "tensor_put"))
        rebuild, tag, storage_type, location, hooks = values
        dtype = _STORAGE_TYPES.get(storage_type)  # type: ignore[arg-type]  # None for a str
        well_formed = (
            rebuild == _REBUILD
            and tag == "storage"
            and dtype is not None
            and type(location) is str
            and hooks == _ORDERED_DICT
        )
        if not well_formed:
            raise _Decline
        kind = (dtype, location)
        fetches = record.group("rebuild", "tag", "storage_type", "location", "hooks")
        if all(token[0] in _FETCHES for token in fetches):
            self.kinds[fetches] = kind  # type: ignore[assignment]  # dtype is set, checked
        return kind  # type: ignore[return-value]

    def _module_versions(self) -> dict[str, dict[str, int]]:
        """BUILD's state after the items, {'_metadata': OrderedDict(prefix -> {'version':
        n} or {})} as ``Module.state_dict`` keeps it; returns the OrderedDict."""
        self._expect(b"}")
        self._store(None)
        if self._text() != "_metadata":
            raise _Decline
        self._constant_at_pos(_ORDERED_DICT)
        self._expect(b")R")
        self._store(None)
        versions = OrderedDictStandIn()
        self._items(versions, self._module_version)
        self._expect(b"sb")
        return versions

    def _module_version(self, target: dict[str, Any], *, single: bool) -> None:
        while self.data.startswith(b"X", self.pos):
            prefix = self._text()
            self._expect(b"}")
            self._store(None)
            entry: dict[str, int] = {}
            if self.data.startswith((b"X", b"h", b"j"), self.pos):  # its one item
                name = self._text() if self.data.startswith(b"X", self.pos) else self._fetch()
                number = _NUMBERS.match(self.data, self.pos)
                if name != "version" or number is None:
                    raise _Decline
                self.pos = number.end()
                entry["version"] = _decode_number(number[0])
                self._expect(b"s")
            target[prefix] = entry
            if single:
                return

    def _text(self) -> str:
        """A BINUNICODE string and its store."""
        data, pos = self.data, self.pos
        if not data.startswith(b"X", pos):
            raise _Decline
        end = pos + 5 + int.from_bytes(data[pos + 1 : pos + 5], "little")
        try:  # (past the end: STOP is then missing)
            text = data[pos + 5 : end].decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise _Decline from None
        self.pos = end
        self._store(text)
        return text

    def _constant_at_pos(self, constant: _Global) -> None:
        """A fetch of the global ``constant``, or the GLOBAL itself and its store."""
        if self.data.startswith((b"h", b"j"), self.pos):
            if self._fetch() != constant:
                raise _Decline
            return
        module, name = constant.qualified.rsplit(".", 1)
        self._expect(b"c%s\n%s\n" % (module.encode(), name.encode()))
        self._store(constant)

    def _fetch(self) -> str | _Global | None:
        """The constant the fetch at ``pos`` names (None: not a constant)."""
        width = 2 if self.data.startswith(b"h", self.pos) else 5
        self.pos += width
        return self.memo.get(_index(self.data[self.pos - width : self.pos]))

    def _store(self, value: str | _Global | None) -> None:
        """An optional store at ``pos``; ``value`` is kept when it is a constant."""
        data, pos = self.data, self.pos
        width = 2 if data.startswith(b"q", pos) else 5 if data.startswith(b"r", pos) else 0
        if not width:
            return
        token = data[pos : pos + width]  # (cut short at the end: STOP is then missing)
        if value is not None:
            self.memo[_index(token)] = value
        self.stores += token
        self.pos += width

    def _expect(self, opcodes: bytes) -> None:
        if not self.data.startswith(opcodes, self.pos):
            raise _Decline
        self.pos += len(opcodes)


class _Counts(dict[bytes, int]):
    """Number opcodes (with their arguments) -> the counts they hold, each decoded once
    (a state dict repeats a few hundred); one that is not a count declines."""

    def __missing__(self, token: bytes) -> int:
        value = _decode_number(token)
        if value < 0:
            raise _Decline
        self[token] = value
        return value


class _CountTuples(dict[bytes, tuple[int, ...]]):
    """Sizes or strides as pickled -> their counts, each decoded once."""

    def __init__(self, counts: _Counts) -> None:
        super().__init__()
        self.counts = counts

    def __missing__(self, token: bytes) -> tuple[int, ...]:
        # (findall steps over the MARK before 4 or more, and the TUPLE opcode after)
        value = self[token] = tuple(map(self.counts.__getitem__, _NUMBERS.findall(token)))
        return value


def _written_out(slot: str, record: re.Match[bytes]) -> str | _Global:
    """The constant a record writes out in ``slot`` (its pattern fixes all but two)."""
    if slot == "storage_type":
        return _Global("torch." + record["storage_class"].decode("ascii"))
    if slot == "location":
        return record["location_text"][5:].decode("ascii")
    if slot == "tag":
        return "storage"
    return _REBUILD if slot == "rebuild" else _ORDERED_DICT


def _numbered_in_order(stores: bytearray) -> bool:
    """The stores name indexes 0, 1, 2... in order: as torch's pickler writes them
    (BINPUT below 256, LONG_BINPUT after) in C, any other widths one by one."""
    short = min(len(stores) // 2, 256)
    longs = (len(stores) - 2 * short) // 5
    expected = bytearray(2 * short + 5 * longs)
    expected[0 : 2 * short : 2] = b"q" * short
    expected[1 : 2 * short : 2] = bytes(range(short))
    indexes = array.array("I", range(256, 256 + longs)).tobytes()
    expected[2 * short :: 5] = b"r" * longs
    for byte in range(4):
        expected[2 * short + 1 + byte :: 5] = indexes[byte::4]
    if stores == expected:
        return True
    at, index = 0, 0
    while at < len(stores):
        width = 2 if stores[at : at + 1] == b"q" else 5
        if _index(stores[at : at + width]) != index:
            return False
        at, index = at + width, index + 1
    return True


def _decode_number(token: bytes) -> int:
    opcode = token[0]
    if opcode == ord("K") or opcode == ord("M"):
        return int.from_bytes(token[1:], "little")
    if opcode == ord("J"):
        return int.from_bytes(token[1:], "little", signed=True)
    return int.from_bytes(token[2:], "little", signed=True)  # LONG1: its length, then bytes


def _index(token: bytes | bytearray) -> int:
    """The memo index a BINGET/BINPUT (one byte) or LONG_BINGET/LONG_BINPUT names."""
    return int.from_bytes(token[1:], "little")
