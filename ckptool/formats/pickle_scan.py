"""Budgets for a pickle, checked by a dry run of its opcodes before anything is built.

The C unpickler trusts the file: a memo index of 2**31 allocates gigabytes, and a
tuple built from memo references to itself doubles in size with every level, so a
few hundred bytes can ask for hours of hashing. This scan walks the opcodes without
building objects (``pickletools.genops``) and tracks, for every object on the stack,
how many nodes it expands to and how deeply it nests; it stops at the first budget
exceeded and names it. torch.save's pickles are far inside every budget.
"""

from __future__ import annotations

import io
import pickletools
from dataclasses import dataclass
from typing import IO, Any, BinaryIO, cast

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

_MARK = None  # the stack entry MARK pushes
_KEY_OPS = {"SETITEM": 1, "SETITEMS": 2, "ADDITEMS": 1, "FROZENSET": 1}
_CALL_OPS = frozenset({"REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ", "INST"})
# Opcodes that modify the object below their arguments and leave it on the stack.
_MUTATORS = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"})
_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})
# Opcodes that take nothing from the stack and push one new object.
_LEAVES = frozenset(
    op.name
    for op in pickletools.opcodes
    if not op.stack_before and len(op.stack_after) == 1 and op.stack_after[0].name != "mark"
) - {"GET", "BINGET", "LONG_BINGET", "GLOBAL", "PERSID", "EXT1", "EXT2", "EXT4"}
_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})


class PickleBudgetError(CheckpointReadError):
    """A pickle exceeds one of the scan's budgets."""


@dataclass(slots=True, eq=False)  # identity: two equal-sized objects are still two
class _Node:
    """What the scan knows of one object: nodes it expands to, nesting depth."""

    size: int
    depth: int


def check_pickle_budgets(data: bytes | BinaryIO) -> None:
    """Dry-run a pickle's opcodes and refuse it if it exceeds a budget.

    A stream is read up to STOP and left there; callers rewind it.

    Raises:
        PickleBudgetError: a budget (opcodes, memo index, nesting, hashed or
            constructor nodes) is exceeded; the message names it.
        CheckpointReadError: the opcode stream itself is malformed.
    """
    scan = _Scan()
    stream = io.BytesIO(data) if isinstance(data, bytes) else _Capped(data)
    try:
        # genops only calls read() and readline(), which _Capped provides.
        opcodes = pickletools.genops(cast("IO[bytes]", stream))
        for count, (opcode, arg, _) in enumerate(opcodes, 1):
            if count > MAX_OPCODES:
                raise PickleBudgetError(f"pickle has more than {MAX_OPCODES} opcodes (budget)")
            scan.step(opcode, arg)
    except (ValueError, IndexError, KeyError, OverflowError) as e:
        raise CheckpointReadError(f"corrupt pickle ({type(e).__name__}: {e})") from e


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


def _stack_effect(opcode: pickletools.OpcodeInfo) -> tuple[bool, int, bool]:
    """(pops a MARK-delimited slice, objects popped below it, pushes a result)."""
    before = [item.name for item in opcode.stack_before]
    takes_slice = "mark" in before
    below = before.index("mark") if takes_slice else len(before)
    return takes_slice, below, bool(opcode.stack_after)


_EFFECTS = {op.name: _stack_effect(op) for op in pickletools.opcodes}


class _Scan:
    def __init__(self) -> None:
        self.stack: list[_Node | None] = []
        self.marks: list[int] = []  # stack positions of the MARKs, innermost last
        self.memo: dict[int, _Node] = {}
        self.hashed = 0
        self.constructed = 0

    def step(self, opcode: pickletools.OpcodeInfo, arg: Any) -> None:
        name = opcode.name
        if name in _LEAVES:  # most opcodes: a new int, string, None or empty container
            self.stack.append(_Node(1, 1))
        elif name == "POP":
            if self.stack and self.stack[-1] is _MARK:  # as the C unpickler: POP drops a MARK
                self.marks.pop()
                self.stack.pop()
            else:
                self._pop()
        elif name == "APPEND":  # one item into the list below it, often a million times
            self._grow(self._top_below(), (self._pop(),))
        elif name in _GETS:
            self.stack.append(self._memo_get(arg))
        elif name in _PUTS:
            self._memo_put(arg)
        elif name == "MEMOIZE":
            self._memo_put(len(self.memo))
        elif name == "MARK":
            self.marks.append(len(self.stack))
            self.stack.append(_MARK)
        elif name == "DUP":
            self.stack.append(self._top())
        else:
            self._apply(opcode)

    def _apply(self, opcode: pickletools.OpcodeInfo) -> None:
        name = opcode.name
        takes_slice, below, pushes = _EFFECTS[name]
        args = self._pop_slice() if takes_slice else []
        popped = self._pop_many(below)
        if name in _KEY_OPS:
            self._charge_keys(name, popped, args)
        if name in _CALL_OPS:
            self.constructed += sum(node.size for node in (*popped, *args))
            if self.constructed > MAX_CONSTRUCTOR_NODES:
                raise PickleBudgetError(
                    f"pickle hands constructors over {MAX_CONSTRUCTOR_NODES} nodes "
                    "(budget); shared references expand it"
                )
        if not pushes:
            return
        if name in _MUTATORS and popped:
            self._grow(popped[0], (*popped[1:], *args))
            self.stack.append(popped[0])
            return
        parts = (*popped, *args)
        node = _Node(
            min(_SATURATED, 1 + sum(node.size for node in parts)),
            1 + max((node.depth for node in parts), default=0),
        )
        self._check_depth(node.depth)
        self.stack.append(node)

    def _grow(self, target: _Node, added: tuple[_Node, ...]) -> None:
        # The container keeps its identity, so memo references to it see it grow; it
        # nests one deeper than what it holds, however many times it is added to.
        target.size = min(_SATURATED, target.size + sum(node.size for node in added))
        target.depth = max(target.depth, 1 + max((n.depth for n in added), default=0))
        self._check_depth(target.depth)

    def _top_below(self) -> _Node:
        """The object under the top of the stack (the list APPEND adds to)."""
        below = self.stack[-2] if len(self.stack) >= 2 else _MARK
        if below is _MARK:
            raise CheckpointReadError("corrupt pickle: APPEND needs a list on the stack")
        return below

    @staticmethod
    def _check_depth(depth: int) -> None:
        if depth > MAX_NESTING:
            raise PickleBudgetError(f"pickle nests containers over {MAX_NESTING} deep (budget)")

    def _charge_keys(self, name: str, popped: list[_Node], args: list[_Node]) -> None:
        if name == "SETITEM":
            keys = popped[1:2]
        elif name == "SETITEMS":
            keys = args[0::2]
        else:
            keys = args
        self.hashed += sum(key.size for key in keys)
        if self.hashed > MAX_HASHED_NODES:
            raise PickleBudgetError(
                f"pickle asks to hash over {MAX_HASHED_NODES} nodes as dict keys or set "
                "members (budget); shared references expand them"
            )

    def _memo_get(self, index: Any) -> _Node:
        node = self.memo.get(index) if isinstance(index, int) else None
        if node is None:
            raise CheckpointReadError(f"corrupt pickle: memo index {index!r} was never stored")
        return node

    def _memo_put(self, index: Any) -> None:
        # Picklers number memo entries in order (from 0; Python 2's cPickle from 1). The
        # C unpickler sizes its memo by the largest index, so a larger one only reserves
        # memory: 2**31 would be 16 GB.
        if not isinstance(index, int) or not 0 <= index <= len(self.memo) + 1:
            raise PickleBudgetError(
                f"pickle stores memo index {index!r} with {len(self.memo)} entries in use "
                "(memo budget: indices are assigned in order)"
            )
        self.memo[index] = self._top()

    def _top(self) -> _Node:
        top = self.stack[-1] if self.stack else _MARK
        if top is _MARK:
            raise CheckpointReadError("corrupt pickle: an opcode needs an object on the stack")
        return top

    def _pop(self) -> _Node:
        node = self._top()
        self.stack.pop()
        return node

    def _pop_many(self, count: int) -> list[_Node]:
        if not count:
            return []
        popped = self.stack[-count:]
        if len(popped) < count or _MARK in popped:
            raise CheckpointReadError("corrupt pickle: an opcode needs an object on the stack")
        del self.stack[-count:]
        return popped  # type: ignore[return-value]  # no MARK among them, checked above

    def _pop_slice(self) -> list[_Node]:
        if not self.marks:
            raise CheckpointReadError("corrupt pickle: no MARK for a stack slice")
        start = self.marks.pop()
        items = self.stack[start + 1 :]
        del self.stack[start:]
        return items  # type: ignore[return-value]  # MARKs above the last one were popped
