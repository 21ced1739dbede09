"""Budgets for a pickle, checked by a dry run of its opcodes before anything is built.

The C unpickler trusts the file: a memo index of 2**31 allocates gigabytes, and a
tuple built from memo references to itself doubles in size with every level, so a
few hundred bytes can ask for hours of hashing. This scan walks the opcodes without
building objects and tracks, for every object on the stack, how many nodes it
expands to and how deeply it nests; it stops at the first budget exceeded and names
it. torch.save's pickles are far inside every budget.

The same walk notes which memo stores are fetched again: :func:`slimmed_pickle` hands
the unpickler the pickle without the others, so it does not keep every object alive.

The walk decodes the opcode stream itself, from the argument layouts in
``pickletools.opcodes`` (the table the C unpickler's formats are documented by), in
one loop: ``pickletools.genops`` plus a method call per opcode cost 1.2 µs an opcode,
some 3.6 s for a 100,000-tensor state dict's 3 million opcodes.
"""

from __future__ import annotations

import array
import io
import itertools
import operator
import pickle
import pickletools
import re
import struct
from typing import IO, BinaryIO, NamedTuple, cast

from ckptool.errors import CheckpointReadError

# Opcodes: ~30 per tensor in a state dict; 20M covers ~600k tensors.
MAX_OPCODES = 20_000_000
# Nesting of containers: a state dict nests 4-6 deep, DCP metadata about 10.
MAX_NESTING = 200
# Nodes hashed as dict keys or set members, counting shared parts each time they are
# reached (that is what hashing a tuple costs); ~1 per key in real files.
MAX_HASHED_NODES = 5_000_000
# Nodes handed to constructors (REDUCE and friends), counted the same way.
MAX_CONSTRUCTOR_NODES = 50_000_000

# Text opcode arguments: module and class names, decimal numbers.
MAX_LINE_BYTES = 64 * 1024

_SATURATED = 1 << 62


class PickleBudgetError(CheckpointReadError):
    """A pickle exceeds one of the scan's budgets."""


def check_pickle_budgets(data: bytes | BinaryIO) -> None:
    """Dry-run a pickle's opcodes and refuse it if it exceeds a budget.

    A stream is read up to STOP and left there; callers rewind it.

    Raises:
        PickleBudgetError: a budget (opcodes, memo index, nesting, hashed or
            constructor nodes) is exceeded; the message names it.
        CheckpointReadError: the opcode stream itself is malformed.
    """
    _Scan().run(data if isinstance(data, bytes) else _read_one_pickle(data))


def slimmed_pickle(data: bytes) -> bytes:
    """``data`` checked as :func:`check_pickle_budgets` checks it, then without the memo
    stores that nothing fetches back.

    The C unpickler keeps every memoized object alive until the load ends, and
    torch.save memoizes everything it pickles: 8 objects a tensor, 37 MiB of tuples,
    strings and stand-ins at 100,000 tensors, of which only a few (the storage type,
    ``'cpu'``, the rebuild function) are fetched again. An object stored and never
    fetched loads the same without its store. A pickle is left whole where taking a
    store out would move others (MEMOIZE numbers entries by their count, a FRAME's
    length covers them) and where a store's index is not its place among the binary
    stores (a text PUT of protocol 0, an index out of order or numbered from 1): torch
    writes none of these.

    Raises:
        PickleBudgetError, CheckpointReadError: as :func:`check_pickle_budgets`.
    """
    scan = _Scan()
    scan.run(data)
    if scan.renumbers or not scan.in_order or not scan.puts:
        return data
    puts, fetched = scan.puts, scan.fetched
    del scan  # its memo of nodes goes before the slimmed copy is made
    return _without_stores(data, puts, fetched)


def _without_stores(data: bytes, puts: array.array[int], fetched: set[int]) -> bytes:
    """``data`` less the stores at ``puts`` but those of the indexes in ``fetched``,
    where the store at ``puts[k]`` is of index ``k`` (every store appended in order):
    the bytes between the stores taken out, joined in C."""
    # Each store's width (BINPUT 2 bytes, LONG_BINPUT 5); none for those kept.
    widths = bytearray(bytes(map(data.__getitem__, puts)).translate(_STORE_WIDTHS))
    for index in fetched:
        if index < len(widths):
            widths[index] = 0
    starts = itertools.chain((0,), map(operator.add, puts, widths))
    pieces = map(data.__getitem__, map(slice, starts, itertools.chain(puts, (len(data),))))
    # A chunk at a time: the pieces of 800,000 stores at once took 160 MiB.
    slim = bytearray()
    for _ in range(0, len(puts) + 1, _PIECES_AT_ONCE):
        slim += b"".join(itertools.islice(pieces, _PIECES_AT_ONCE))
    return bytes(slim)


_PIECES_AT_ONCE = 1 << 14


_STORE_WIDTHS = bytes.maketrans(pickle.BINPUT + pickle.LONG_BINPUT, b"\x02\x05")


# How an opcode's argument is laid out, after the opcode byte.
_NO_ARG, _FIXED, _LINE, _TWO_LINES, _COUNTED = range(5)
# What an opcode does to the stack, for the scan.
(_LEAF, _EMPTY_CONTAINER, _GET, _PUT, _MEMOIZE, _MARK_OP, _POP, _DUP, _APPEND, _NEW,
 _NEW_FROM_MARK, _OTHER) = range(12)  # fmt: skip

_KEY_OPS = {"SETITEM", "SETITEMS", "DICT", "ADDITEMS", "FROZENSET"}
_CALL_OPS = {"REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ", "INST"}
# Opcodes that modify the object below their arguments and leave it on the stack.
_MUTATORS = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}
_GETS = {"GET", "BINGET", "LONG_BINGET"}
_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
# Leaves take nothing from the stack and push one new object; globals and extension
# codes are not counted as leaves (they name code, and the restricted unpickler
# decides about them).
_NOT_LEAVES = _GETS | {"GLOBAL", "PERSID", "EXT1", "EXT2", "EXT4"}
# Leaves that later opcodes may fill; the others (numbers, strings, None, the empty
# tuple) never change, so one node stands for all of them.
_GROWABLE_LEAVES = {"EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET"}
# Opcodes that make a tuple: its node never changes either, so equal ones are shared.
_TUPLE_MAKERS = {"TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"}
_SIMPLE = {"MEMOIZE": _MEMOIZE, "MARK": _MARK_OP, "POP": _POP, "DUP": _DUP, "APPEND": _APPEND}
# Bytes before a counted argument that give its length, and whether they are signed.
_COUNTS = {-2: (1, False), -3: (4, True), -4: (4, False), -5: (8, False)}


class _Op:
    """One opcode as the walk needs it: its argument layout and its stack effect."""

    __slots__ = ("action", "effect", "layout", "makes_tuple", "name", "signed", "span", "width")

    def __init__(self, info: pickletools.OpcodeInfo) -> None:
        self.name = info.name
        self.layout, self.width, self.signed = _layout(info)
        # Bytes of argument when the opcode alone tells (none or fixed), else None: a
        # state dict's opcodes are nine tenths of that kind.
        self.span = self.width if self.layout in (_NO_ARG, _FIXED) else None
        self.action = _action(info)
        self.makes_tuple = info.name in _TUPLE_MAKERS
        self.effect = _Effect(info) if self.action == _OTHER else None
        if self.effect is not None and self.effect.makes_new:
            self.action = _NEW_FROM_MARK if self.effect.takes_slice else _NEW


def _layout(info: pickletools.OpcodeInfo) -> tuple[int, int, bool]:
    """(layout, width, signed): a fixed argument's width in bytes, or a counted one's
    length field."""
    arg = info.arg
    if arg is None:
        return _NO_ARG, 0, False
    if arg.n >= 0:
        return _FIXED, arg.n, False
    if arg.n == pickletools.UP_TO_NEWLINE:
        # GLOBAL and INST read a module line, then a name line.
        return (_TWO_LINES if arg.name == "stringnl_noescape_pair" else _LINE), 0, False
    width, signed = _COUNTS[arg.n]
    return _COUNTED, width, signed


def _action(info: pickletools.OpcodeInfo) -> int:
    if info.name in _GETS:
        return _GET
    if info.name in _PUTS:
        return _PUT
    if info.name in _SIMPLE:
        return _SIMPLE[info.name]
    after = info.stack_after
    pushes_one = not info.stack_before and len(after) == 1 and after[0].name != "mark"
    if not pushes_one or info.name in _NOT_LEAVES:
        return _OTHER
    return _EMPTY_CONTAINER if info.name in _GROWABLE_LEAVES else _LEAF


class _Effect:
    """The stack effect of an opcode the walk applies generically."""

    __slots__ = ("below", "calls", "keys", "makes_new", "mutates", "pushes", "takes_slice")

    def __init__(self, info: pickletools.OpcodeInfo) -> None:
        before = [item.name for item in info.stack_before]
        self.takes_slice = "mark" in before  # pops a MARK-delimited slice
        self.below = before.index("mark") if self.takes_slice else len(before)
        self.pushes = bool(info.stack_after)
        self.keys = info.name if info.name in _KEY_OPS else None
        self.calls = info.name in _CALL_OPS
        self.mutates = info.name in _MUTATORS
        # A new object from what it pops, hashing nothing (TUPLE1, REDUCE, BINPERSID...):
        # a quarter of a state dict's opcodes, so the walk applies these inline. Those
        # with a slice take nothing below it (TUPLE, LIST), so the slice is all they pop.
        self.makes_new = (
            self.pushes
            and not self.mutates
            and self.keys is None
            and (self.below > 0 if not self.takes_slice else self.below == 0)
        )


_OPS: list[_Op | None] = [None] * 256  # by opcode byte
for _info in pickletools.opcodes:
    _OPS[ord(_info.code)] = _Op(_info)

_MARK = None  # the stack entry MARK pushes
# A node is [size, depth]: the nodes the object expands to and how deeply it nests. A
# list, so that a container grown after it was memoized grows for every reference; a
# tuple for an object that never grows (a number, a string, a tuple), shared by all
# equal ones: a state dict memoizes 8 objects a tensor, and a list each was 64 MiB of
# the scan at 100,000 tensors.
Node = list[int] | tuple[int, int]
_LEAF_NODE = (1, 1)
# Distinct tuple nodes kept for sharing: a state dict has three; a crafted pickle can
# make millions, which the scan must not keep alive when nothing else refers to them.
_SHARED_TUPLES = 4096
_SIZE, _DEPTH = operator.itemgetter(0), operator.itemgetter(1)

_MARK_BYTE = pickle.MARK * 2  # a tensor's rebuild arguments open with two MARKs


class _RecordEffect(NamedTuple):
    """What walking one tensor record did: the nodes it stored, in order, the node it
    left on the stack (stored last, where the record stores), the constructor nodes it
    charged, the opcodes it counted; the record's groups that stored them, and the
    scan's ``changes`` then."""

    stored: tuple[Node, ...]
    growable: tuple[int, ...]  # where ``stored`` holds nodes that can grow (lists)
    pushed: Node  # the node left on the stack (the tensor's), stored last if any is
    constructed: int
    opcodes: int
    stores: tuple[str, ...]
    changes: int


def _record_pattern(*, stores: bool) -> re.Pattern[bytes]:
    """A torch.save tensor after the first, opcode by opcode, from its rebuild call::

        GET rebuild; MARK MARK GET 'storage', GET storage type, BINUNICODE key, PUT,
        GET location, int numel, TUPLE, PUT; BINPERSID; int offset; sizes; strides;
        NEWFALSE|NEWTRUE; GET OrderedDict, EMPTY_TUPLE, REDUCE, PUT; TUPLE, PUT; REDUCE, PUT

    Integers are any of the binary int opcodes; sizes and strides an empty tuple, or 1
    to 64 ints as a tuple, then a PUT. Fetches and stores are named groups. Without
    ``stores``, the same without the PUTs: as ckptool writes a tensor.
    """
    # BININT1, BININT2, BININT, and LONG1 with its byte count (up to 8).
    long1 = b"|".join(re.escape(bytes([n])) + b".{%d}" % n for n in range(1, 9))
    number = rb"(?:K.|M..|J....|\x8a(?:" + long1 + b"))"

    def get(name: str) -> bytes:
        return b"(?P<" + name.encode() + rb">h.|j....)"

    def put(name: str) -> bytes:
        return b"(?P<" + name.encode() + rb">q.|r....)" if stores else b""

    def ints(name: str) -> bytes:
        listed = (
            rb"(?:" + number + rb"\x85|" + number * 2 + rb"\x86|" + number * 3 + rb"\x87|"
            rb"\((?:" + number + rb"){4,64}t)"
        )
        return rb"(?:\)|(?P<" + name.encode() + b">" + listed + b")" + put(name + "_put") + b")"

    return re.compile(
        get("rebuild")
        + rb"\(\("
        + get("storage")
        + get("storage_type")
        + rb"X(?P<key_length>....)(?P<key>[0-9]{1,20})"
        + put("key_put")
        + get("location")
        + number
        + b"t"
        + put("storage_put")
        + b"Q"
        + number
        + ints("shape")
        + ints("stride")
        + rb"[\x88\x89]"
        + get("hooks")
        + rb"\)R"
        + put("hooks_put")
        + b"t"
        + put("args_put")
        + b"R"
        + put("tensor_put"),
        re.DOTALL,
    )


_TENSOR_RECORD = _record_pattern(stores=True)
_BARE_TENSOR_RECORD = _record_pattern(stores=False)
# The key's length and digits, the sizes and strides, then the memo fetches.
_RECORD_FIELDS = ("key_length", "key", "shape", "stride", "rebuild", "storage", "storage_type",
                  "location", "hooks")  # fmt: skip
# In the order the record stores them (sizes and strides store nothing when empty).
_RECORD_PUTS = (
    "key_put", "storage_put", "shape_put", "stride_put", "hooks_put", "args_put", "tensor_put"
)  # fmt: skip


def _stored_in_order(match: re.Match[bytes], first: int, effect: _RecordEffect) -> bool:
    """The record's memo stores name ``first``, ``first + 1``, ... as the learned ones
    did (a store elsewhere would put a node where another fetch finds it)."""
    tokens = b"".join(map(match.__getitem__, effect.stores))  # none for ckptool's own
    count = len(effect.stores)
    if len(tokens) == 5 * count:  # every store a LONG_BINPUT: one unpack
        return _LONG_PUTS[count].unpack(tokens) == tuple(range(first, first + count))
    if len(tokens) == 2 * count:  # every store a BINPUT
        return tokens[1::2] == bytes(range(first, first + count)) if first + count <= 256 else False
    return False  # mixed widths: only around index 256, walked


_LONG_PUTS = [struct.Struct("<" + "xI" * n) for n in range(len(_RECORD_PUTS) + 1)]


def _tuple_length(ints: bytes | None) -> int:
    """How many ints a record's sizes or strides tuple holds (None: the empty tuple)."""
    if ints is None:
        return 0
    if ints[:1] != b"(":
        return ints[-1] - pickle.TUPLE1[0] + 1  # TUPLE1, TUPLE2, TUPLE3
    count, pos = 0, 1
    while ints[pos : pos + 1] not in (b"t", b""):  # the pattern ends it with TUPLE
        width = _INT_WIDTHS.get(ints[pos])
        pos += width if width is not None else 2 + ints[pos + 1]  # LONG1: its byte count
        count += 1
    return count


# Opcode and argument bytes of BININT1, BININT2 and BININT.
_INT_WIDTHS = {pickle.BININT1[0]: 2, pickle.BININT2[0]: 3, pickle.BININT[0]: 5}


def _corrupt(what: str) -> CheckpointReadError:
    return CheckpointReadError(f"corrupt pickle: {what}")


class _Scan:
    def __init__(self) -> None:
        self.stack: list[Node | None] = []
        self.marks: list[int] = []  # stack positions of the MARKs, innermost last
        # A list, as picklers number memo entries in order: a state dict memoizes ~8
        # objects per tensor, and int keys in a dict cost ten times the memory.
        self.memo: list[Node | None] = []  # None: a slot skipped (numbering from 1)
        self.skipped = 0  # slots of ``memo`` that are None
        self.hashed = 0
        self.constructed = 0
        self.tuples: dict[tuple[int, int], tuple[int, int]] = {}  # one node per (size, depth)
        # For slimmed_pickle: where the binary memo stores are, the indexes fetched, and
        # whether an opcode numbers or frames the stores (none may then be taken out).
        self.puts = array.array("Q")
        self.fetched: set[int] = set()
        self.renumbers = False
        self.count = 0  # opcodes walked
        self.changes = 0  # nodes grown or memo entries replaced: a learned record is stale
        # Whether every memo entry was appended by a binary store, the k-th by the k-th.
        self.in_order = True
        # What a tensor record did, by what determines it (see _tensor_record).
        self.records: dict[tuple[object, ...], _RecordEffect | None] = {}

    def run(self, data: bytes) -> None:
        """Walk the opcodes of the pickle in ``data`` up to its STOP."""
        if self._walk(data, 0, len(data), records=True) is not None:
            raise _corrupt("it ends before its STOP opcode")

    def _walk(self, data: bytes, pos: int, end: int, *, records: bool) -> int | None:
        """Walk the opcodes from ``pos``: None at STOP, else ``end`` once reached.

        One loop decodes each opcode and applies the common ones inline (a call per
        opcode is most of the cost at 3 million opcodes); the rest go to ``_apply``.
        With ``records``, a torch.save tensor pickled after the first is applied as a
        whole (``_tensor_record``).
        """
        stack, memo, ops, marks = self.stack, self.memo, _OPS, self.marks
        puts, fetched = self.puts, self.fetched
        count, gaps = self.count, self.skipped
        # Locals: the loop runs 30 times per tensor of a state dict.
        max_opcodes, fixed, from_bytes, mark_ = MAX_OPCODES, _FIXED, int.from_bytes, _MARK
        leaf, put, get, new, new_from_mark = _LEAF, _PUT, _GET, _NEW, _NEW_FROM_MARK
        leaf_node, mark_byte = _LEAF_NODE, _MARK_BYTE
        while True:
            if pos >= end:
                self.count = count
                return end
            op = ops[data[pos]]
            if op is None:
                raise _corrupt(f"unknown opcode {data[pos]:#04x} at byte {pos}")
            count += 1
            if count > max_opcodes:
                raise PickleBudgetError(f"pickle has more than {MAX_OPCODES} opcodes (budget)")
            start = pos + 1
            binary = op.layout == fixed
            span = op.span
            pos = start + span if span is not None else _argument_end(op, data, start)
            if pos > end:
                raise _corrupt(f"{op.name} argument runs past the end of the pickle")
            action = op.action
            if action == put:
                index = (
                    from_bytes(data[start:pos], "little")
                    if binary
                    else _text_index(data, start, pos)
                )
                if index == len(memo) and not gaps and stack and stack[-1] is not mark_:
                    memo.append(stack[-1])  # in order; not a MARK, checked
                else:
                    gaps = self._memo_put(index)
                if binary:
                    puts.append(start - 1)
                else:  # slimmed_pickle counts on the stores' places to know their indexes
                    self.in_order = False
            elif action == leaf:  # a new int, string, None or empty tuple
                stack.append(leaf_node)
            elif action == new:  # TUPLE1, REDUCE, BINPERSID...: from the objects below
                below = op.effect.below  # type: ignore[union-attr]  # set for _NEW
                parts = stack[-below:]
                if len(parts) < below or mark_ in parts:
                    raise _corrupt("an opcode needs an object on the stack")
                del stack[-below:]
                stack.append(self._new_node(op, parts))  # type: ignore[arg-type]
            elif action == get:
                if records and data[pos : pos + 2] == mark_byte:  # a tensor's rebuild call
                    self.count = count - 1  # the record counts its GET
                    after = self._tensor_record(data, start - 1)
                    if after is not None:
                        # The opcodes it counted meet the budget at the next opcode (a
                        # pickle ends with STOP), some 30 opcodes later at most.
                        pos, count, gaps = after, self.count, self.skipped
                        continue
                index = (
                    from_bytes(data[start:pos], "little")
                    if binary
                    else _text_index(data, start, pos)
                )
                node = memo[index] if 0 <= index < len(memo) else None
                if node is None:
                    raise _corrupt(f"memo index {index!r} was never stored")
                stack.append(node)
                fetched.add(index)
            elif action == new_from_mark:  # TUPLE, LIST: from the objects above the MARK
                if not marks:
                    raise _corrupt("no MARK for a stack slice")
                mark = marks.pop()
                parts = stack[mark + 1 :]  # no MARK among them: it was the innermost
                del stack[mark:]
                stack.append(self._new_node(op, parts))  # type: ignore[arg-type]
            elif action == _MARK_OP:
                marks.append(len(stack))
                stack.append(mark_)
            elif action == _OTHER:
                self._apply(op)
                if op.name == "STOP":
                    self.count = count
                    return None
            else:
                self._step(action)
                gaps = self.skipped  # MEMOIZE may fill a skipped slot

    def _tensor_record(self, data: bytes, start: int) -> int | None:
        """Apply the tensor record at ``start`` as a whole and return where it ends, or
        None to leave it to the loop (no record there, or one that must be walked).

        torch.save pickles each tensor as the same 26 to 40 opcodes (ckptool the same
        without stores): the rebuild call, the storage's persistent id, offset, sizes,
        strides. After the first tensor its globals and constant strings are memo
        fetches, and what the walk does with a record depends only on the nodes it
        fetches and on how many sizes and strides it has, not on the numbers. So the
        first record of each kind is walked and what it did is kept; the next ones of
        that kind get the same new nodes (fresh copies of those that can grow), memo
        stores at the same places and the same charges, as long as no node changed
        since (``changes``) and their stores are in order.
        """
        match = _TENSOR_RECORD.match(data, start) or _BARE_TENSOR_RECORD.match(data, start)
        if match is None:
            return None
        length, key, shape, stride, *fetches = match.group(*_RECORD_FIELDS)
        if int.from_bytes(length, "little") != len(key):
            return None  # the key's length says the record is laid out otherwise
        # Which pattern matched, as a bool: a compiled pattern hashes and compares its
        # whole program, which cost more than the rest of the record's lookup.
        stores = match.re is _TENSOR_RECORD
        kind = (stores, *fetches, _tuple_length(shape), _tuple_length(stride))
        effect = self.records.get(kind)
        if effect is None or effect.changes != self.changes:
            self.records[kind] = self._learn(data, match)  # walked
            return match.end()
        # (A slot skipped, as numbering from 1 does, changes nothing: there is one at
        # most, and a store at the end of the memo appends either way.)
        if not _stored_in_order(match, len(self.memo), effect):
            return None
        self._replay(effect, match)
        return match.end()

    def _learn(self, data: bytes, match: re.Match[bytes]) -> _RecordEffect | None:
        """Walk the record ``match`` found and note what it did.

        The pattern makes it so: the walk leaves one new node on the stack, the
        tensor's (which its last store stores, if it stores), and stores each new node
        once. Stores out of order (over an entry, or skipping one) are not replayed:
        the first changes the scan, so the record learned is stale at once, and the
        second leaves a skipped slot, which no replay fills."""
        memo, before, memo_from = self.memo, self.count, len(self.memo)
        constructed, changes = self.constructed, self.changes
        if self._walk(data, match.start(), match.end(), records=False) is None:
            return None  # a STOP inside: impossible for a match
        stored = memo[memo_from:]
        return _RecordEffect(
            stored=tuple(stored),  # type: ignore[arg-type]  # None only with a slot skipped
            growable=tuple(at for at, node in enumerate(stored) if type(node) is list),
            pushed=self.stack[-1],  # type: ignore[arg-type]  # the tensor's node
            constructed=self.constructed - constructed,
            opcodes=self.count - before,
            stores=tuple(n for n in _RECORD_PUTS if n in match.re.groupindex and match[n]),
            changes=changes,
        )

    def _replay(self, effect: _RecordEffect, match: re.Match[bytes]) -> None:
        stored = list(effect.stored)
        for at in effect.growable:  # fresh copies of the nodes that can grow
            stored[at] = [*stored[at]]
        self.memo.extend(stored)
        pushed = effect.pushed
        if stored:  # the tensor's node, stored last
            pushed = stored[-1]
        elif type(pushed) is list:
            pushed = [*pushed]
        self.stack.append(pushed)
        self.puts.extend(map(match.start, effect.stores))
        self.count += effect.opcodes
        self._charge_constructor(effect.constructed)

    def _step(self, action: int) -> None:
        stack = self.stack
        if action == _APPEND:  # one item into the list below it, often a million times
            item = self._pop()
            self._grow(self._top(), (item,))
        elif action == _MEMOIZE:  # the C unpickler's next index: the entries stored
            self._memo_put(len(self.memo) - self.skipped)
            self.renumbers = True
        elif action == _DUP:
            stack.append(self._top())
        elif action == _EMPTY_CONTAINER:  # an empty list, dict or set: it may grow
            stack.append([1, 1])
        elif stack and stack[-1] is _MARK:  # POP; as the C unpickler, POP drops a MARK
            self.marks.pop()
            stack.pop()
        else:
            self._pop()

    def _apply(self, op: _Op) -> None:
        effect = op.effect
        assert effect is not None  # every _OTHER opcode has one
        if op.name == "FRAME":
            self.renumbers = True
        args = self._pop_slice() if effect.takes_slice else []
        popped = self._pop_many(effect.below)
        if effect.keys is not None:
            self._charge_keys(effect.keys, popped, args)
        if effect.calls:
            self._charge_constructor(sum(map(_SIZE, popped)) + sum(map(_SIZE, args)))
        if not effect.pushes:
            return
        if effect.mutates and popped:
            self._grow(popped[0], popped[1:] + args)
            self.stack.append(popped[0])
            return
        parts = popped + args
        node = [
            min(_SATURATED, 1 + sum(map(_SIZE, parts))),
            1 + max(map(_DEPTH, parts), default=0),
        ]
        self._check_depth(node[1])
        self.stack.append(node)

    def _new_node(self, op: _Op, parts: list[Node]) -> Node:
        """The node of a new object made from ``parts`` (what ``op`` popped)."""
        # A loop, not sum/max over maps: a state dict makes 7 of these per tensor, each
        # from one to five parts, where building the maps cost more than the sums.
        size = depth = 0
        for part_size, part_depth in parts:
            size += part_size
            if part_depth > depth:
                depth = part_depth
        if op.effect.calls:  # type: ignore[union-attr]  # every _NEW opcode has an effect
            self._charge_constructor(size)
        depth += 1
        if depth > MAX_NESTING:
            self._check_depth(depth)
        size = size + 1 if size < _SATURATED else _SATURATED
        if op.makes_tuple:
            node = (size, depth)
            if len(self.tuples) < _SHARED_TUPLES:
                return self.tuples.setdefault(node, node)
            return self.tuples.get(node, node)
        return [size, depth]

    def _charge_constructor(self, nodes: int) -> None:
        self.constructed += nodes
        if self.constructed > MAX_CONSTRUCTOR_NODES:
            raise PickleBudgetError(
                f"pickle hands constructors over {MAX_CONSTRUCTOR_NODES} nodes "
                "(budget); shared references expand it"
            )

    def _grow(self, target: Node, added: list[Node] | tuple[Node, ...]) -> None:
        # The container keeps its identity, so memo references to it see it grow; it
        # nests one deeper than what it holds, however many times it is added to.
        if isinstance(target, tuple):
            # A number, string or tuple: the unpickler adds nothing to it (it refuses
            # APPEND and the like; BUILD with a None state leaves it as it is).
            return
        self.changes += 1
        target[0] = min(_SATURATED, target[0] + sum(map(_SIZE, added)))
        target[1] = max(target[1], 1 + max(map(_DEPTH, added), default=0))
        self._check_depth(target[1])

    @staticmethod
    def _check_depth(depth: int) -> None:
        if depth > MAX_NESTING:
            raise PickleBudgetError(f"pickle nests containers over {MAX_NESTING} deep (budget)")

    def _charge_keys(self, name: str, popped: list[Node], args: list[Node]) -> None:
        if name == "SETITEM":
            keys = popped[1:2]
        elif name in ("SETITEMS", "DICT"):  # key, value, key, value...
            keys = args[0::2]
        else:
            keys = args
        self.hashed += sum(map(_SIZE, keys))
        if self.hashed > MAX_HASHED_NODES:
            raise PickleBudgetError(
                f"pickle asks to hash over {MAX_HASHED_NODES} nodes as dict keys or set "
                "members (budget); shared references expand them"
            )

    def _memo_put(self, index: int | None) -> int:
        # Picklers number memo entries in order (from 0; Python 2's cPickle from 1). The
        # C unpickler sizes its memo by the largest index, so a larger one only reserves
        # memory: 2**31 would be 16 GB.
        memo = self.memo
        stored = len(memo) - self.skipped
        if index != len(memo):  # over an entry, or skipping one
            self.in_order = False
        if index is None or not 0 <= index <= stored + 1:
            raise PickleBudgetError(
                f"pickle stores memo index {index!r} with {stored} entries in use "
                "(memo budget: indices are assigned in order)"
            )
        top = self._top()
        if index < len(memo):
            if memo[index] is None:
                self.skipped -= 1
            memo[index] = top
            self.changes += 1
        else:  # index <= stored + 1 <= len(memo) + 1
            if index > len(memo):
                memo.append(None)  # a slot skipped, as numbering from 1 does
                self.skipped += 1
            memo.append(top)
        return self.skipped

    def _top(self) -> Node:
        top = self.stack[-1] if self.stack else _MARK
        if top is _MARK:
            raise _corrupt("an opcode needs an object on the stack")
        return top

    def _pop(self) -> Node:
        node = self._top()
        self.stack.pop()
        return node

    def _pop_many(self, count: int) -> list[Node]:
        if not count:
            return []
        popped = self.stack[-count:]
        if len(popped) < count or _MARK in popped:
            raise _corrupt("an opcode needs an object on the stack")
        del self.stack[-count:]
        return popped  # type: ignore[return-value]  # no MARK among them, checked above

    def _pop_slice(self) -> list[Node]:
        if not self.marks:
            raise _corrupt("no MARK for a stack slice")
        start = self.marks.pop()
        items = self.stack[start + 1 :]
        del self.stack[start:]
        return items  # type: ignore[return-value]  # MARKs above the last one were popped


def _argument_end(op: _Op, data: bytes, pos: int) -> int:
    """Where the argument of ``op``, starting at ``pos``, ends: the next opcode (past the
    end of ``data`` if it is cut short)."""
    layout = op.layout  # a line or a counted string (the loop steps over the others)
    if layout == _COUNTED:
        length = int.from_bytes(data[pos : pos + op.width], "little", signed=op.signed)
        if length < 0:
            raise _corrupt(f"{op.name} has a negative length")
        return pos + op.width + length
    for _ in range(2 if layout == _TWO_LINES else 1):
        newline = data.find(b"\n", pos, pos + MAX_LINE_BYTES)
        if newline < 0:
            raise _corrupt(f"{op.name} argument has no newline within {MAX_LINE_BYTES} bytes")
        pos = newline + 1
    return pos


def _text_index(data: bytes, start: int, end: int) -> int:
    """The memo index a text GET or PUT names: data[start:end] is decimal, then a newline."""
    text = data[start : end - 1]
    try:
        return int(text)
    except ValueError:
        raise _corrupt(f"memo index {text[:20]!r} is not a number") from None


def _read_one_pickle(stream: BinaryIO) -> bytes:
    """The bytes of the pickle at the stream's position, up to its STOP, leaving the
    stream after it (torch's legacy format is several pickles, then raw storages, so
    where one ends is found by walking it; ``genops`` reads only what it decodes)."""
    start = stream.tell()
    capped = _Capped(stream)
    try:
        for count, _ in enumerate(pickletools.genops(cast("IO[bytes]", capped)), 1):
            if count > MAX_OPCODES:
                raise PickleBudgetError(f"pickle has more than {MAX_OPCODES} opcodes (budget)")
    except (ValueError, IndexError, KeyError, OverflowError) as e:
        raise _corrupt(f"{type(e).__name__}: {e}") from e
    end = stream.tell()
    stream.seek(start)
    return stream.read(end - start)


class _Capped:
    """A file that never reads past its end: ``read(2**62)``, as a length field of a
    crafted BINBYTES8 asks, must not allocate 2**62 bytes before finding out."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        start = stream.tell()
        self._end = stream.seek(0, io.SEEK_END)
        stream.seek(start)

    def read(self, size: int = -1) -> bytes:
        left = max(0, self._end - self._stream.tell())
        return self._stream.read(left if size < 0 else min(size, left))

    def readline(self) -> bytes:
        # Text opcodes (GLOBAL, INT) end at a newline; a line longer than any real one
        # comes back without it, which genops reports as malformed.
        return self._stream.readline(MAX_LINE_BYTES)
