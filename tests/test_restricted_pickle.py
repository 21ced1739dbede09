"""The restricted unpickler, its opcode budget scan, and the stand-ins it builds.

The corpus (test_bad_inputs.py) shows each attack end to end; these tests pin the
mechanisms: every budget is named when exceeded, real torch pickles pass them all, a
pickle cannot write into a stand-in, and copies never reach outside validated bytes.
"""

from __future__ import annotations

import collections
import contextlib
import io
import pickle
import pickletools
import sys
import zipfile
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import REPO

from ckptool.errors import CheckpointReadError
from ckptool.formats import pickle_scan, read_metadata, restricted_pickle
from ckptool.formats.bounded import short_repr, visible
from ckptool.formats.meta import CheckpointMeta, Format, TensorMeta
from ckptool.formats.pickle_scan import PickleBudgetError, check_pickle_budgets
from ckptool.formats.restricted_pickle import (
    PickledTensor,
    StorageRef,
    _bytearray,
    _record_class,
    load_restricted,
)
from ckptool.formats.write import ComputedBytes
from ckptool.surgery import SourceBytes

sys.path.insert(0, str(REPO / "scripts"))
import make_bad_fixtures as craft


def _data_pkl(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with zipfile.ZipFile(buffer) as archive:
        name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        return archive.read(name)


def test_real_training_checkpoint_passes_every_budget() -> None:
    model = torchvision.models.resnet50(weights=None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    optimizer.step()
    checkpoint = {"state_dict": model.state_dict(), "optimizer": optimizer.state_dict()}
    obj, storages, _ = load_restricted(_data_pkl(checkpoint), path="resnet50.pt")
    assert len(obj["state_dict"]) == len(model.state_dict())
    assert len(storages) > len(model.state_dict())  # momentum buffers too


def _memo_stores(data: bytes) -> int:
    return sum(op.name in ("BINPUT", "LONG_BINPUT") for op, _, _ in pickletools.genops(data))


def test_slimmed_pickle_keeps_only_the_memo_stores_fetched_again(
    tmp_path: Path, monkeypatch
) -> None:
    """torch.save memoizes everything it pickles, and the unpickler keeps each memoized
    object alive to the end of the load: only the stores something fetches again stay,
    and the checkpoint reads the same (tied tensors included)."""
    shared = torch.randn(4)
    state = {f"w{i}": torch.randn(3) for i in range(300)} | {"a": shared, "b": shared[1:]}
    data = _data_pkl(state)
    slim = pickle_scan.slimmed_pickle(data)
    fetched = {arg for op, arg, _ in pickletools.genops(data) if op.name.endswith("GET")}
    assert _memo_stores(data) > 8 * 300
    assert _memo_stores(slim) == len(fetched) < 10
    torch.save(state, tmp_path / "tied.pt")
    slimmed = read_metadata(tmp_path / "tied.pt")

    def checked_only(data: bytes) -> bytes:
        check_pickle_budgets(data)
        return data

    monkeypatch.setattr(restricted_pickle, "slimmed_pickle", checked_only)
    assert read_metadata(tmp_path / "tied.pt").tensors == slimmed.tensors


@pytest.mark.parametrize(
    ("ops", "loads_as"),
    [
        # MEMOIZE takes the next index by count: without the BINPUT, BINGET 1 would miss.
        (b"]q\x000}\x940h\x01.", {}),
        # A FRAME's length covers the stores inside it.
        (b"\x95\x04\x00\x00\x00\x00\x00\x00\x00]q\x00.", []),
    ],
    ids=["memoize", "frame"],
)
def test_slimmed_pickle_leaves_stores_that_others_count_on(ops: bytes, loads_as: object) -> None:
    data = b"\x80\x04" + ops
    assert pickle.loads(data) == loads_as
    assert pickle.loads(pickle_scan.slimmed_pickle(data)) == loads_as


@pytest.mark.parametrize(
    ("ops", "loads_as"),
    [
        (craft.i_(1) + craft.MARK + craft.i_(2) + craft.APPENDS, None),  # into a number
        (craft.s_("a") + craft.i_(2) + b"a", None),  # APPEND into a string
        (b")Nb", ()),  # BUILD with a None state leaves the empty tuple as it is
    ],
    ids=["appends-to-int", "append-to-str", "build-tuple"],
)
def test_adding_to_what_cannot_grow_is_left_to_the_unpickler(ops: bytes, loads_as: object) -> None:
    """Numbers, strings and tuples share their scan nodes: an opcode adding to one
    must not change them (the unpickler refuses it, or ignores a None state)."""
    data = craft.PROTO2 + ops + craft.STOP
    if loads_as is None:
        with pytest.raises(CheckpointReadError, match="corrupt pickle"):
            load_restricted(data, path="odd.pt")
    else:
        assert load_restricted(data, path="odd.pt").obj == loads_as


def test_scan_shares_a_bounded_number_of_tuple_nodes(monkeypatch) -> None:
    """Equal tuple nodes are shared (a state dict has three kinds), but a crafted pickle
    of many distinct tuples must not make the scan keep every one of them alive."""
    monkeypatch.setattr(pickle_scan, "_SHARED_TUPLES", 10)
    tuples = b"".join(craft.MARK + craft.i_(1) * n + craft.TUPLE + craft.POP for n in range(50))
    scan = pickle_scan._Scan()
    scan.run(craft.PROTO2 + tuples + b"N" + craft.STOP)  # NONE, STOP
    assert len(scan.tuples) == 10


@pytest.mark.parametrize(
    ("ops", "budget"),
    [
        (craft.EMPTY_LIST + craft.put(5), "memo"),
        ((craft.EMPTY_LIST + craft.MARK) * 300 + craft.APPENDS * 300, "nests"),
        (craft.i_(1) + craft.TUPLE1 * 300, "nests"),
        (craft.EMPTY_DICT + craft.doubling_tuple(40)[0] + craft.i_(1) + craft.SETITEM, "hash"),
        (craft.MARK + craft.doubling_tuple(40)[0] + craft.i_(1) + craft.DICT, "hash"),
        (craft.g_("builtins", "set") + craft.tup(craft.doubling_tuple(40)[0]) + craft.REDUCE,
         "constructors"),
    ],
    ids=["memo-index", "nesting", "nesting-tuples", "hashed-nodes", "hashed-nodes-dict-opcode",
         "constructor-nodes"],
)  # fmt: skip
def test_each_budget_is_named_when_exceeded(ops: bytes, budget: str) -> None:
    with pytest.raises(PickleBudgetError, match=f"{budget}.*budget|budget.*{budget}"):
        check_pickle_budgets(craft.PROTO2 + ops + craft.STOP)


def test_opcode_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pickle_scan, "MAX_OPCODES", 10)
    with pytest.raises(PickleBudgetError, match="more than 10 opcodes"):
        check_pickle_budgets(pickle.dumps(list(range(20)), protocol=2))


def test_opcode_budget_stops_reading_a_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pickle in a stream (torch's legacy format) is read only as far as the budget."""
    monkeypatch.setattr(pickle_scan, "MAX_OPCODES", 10)
    stream = io.BytesIO(pickle.dumps(list(range(200)), protocol=2))
    with pytest.raises(PickleBudgetError, match="more than 10 opcodes"):
        check_pickle_budgets(stream)
    assert stream.tell() < 40  # 11 opcodes in, not at the end (600 bytes)


@pytest.mark.parametrize(
    ("pickle_bytes", "message"),
    [
        # BINSTRING of -5 bytes: stepping back 5 would replay it forever
        (craft.PROTO2 + b"T" + (-5).to_bytes(4, "little", signed=True) + craft.STOP, "negative"),
        (craft.PROTO2 + b"J\x01\x00", "past the end"),  # BININT wants 4 bytes
        (craft.PROTO2 + craft.EMPTY_LIST + b"pabc\n" + craft.STOP, "not a number"),  # text PUT
        (craft.PROTO2 + b"I" + b"9" * 70_000 + b"\n" + craft.STOP, "newline"),  # 70k digits
        (craft.PROTO2 + craft.STOP, "needs an object"),  # PROTO pushes nothing for STOP
    ],
    ids=["negative-length", "cut-argument", "text-memo-index", "long-line", "empty-stack"],
)
def test_malformed_opcode_arguments_are_corrupt(pickle_bytes: bytes, message: str) -> None:
    for data in (pickle_bytes, io.BytesIO(pickle_bytes)):  # in memory and in a stream
        with pytest.raises(CheckpointReadError, match="corrupt pickle"):
            check_pickle_budgets(data)
    with pytest.raises(CheckpointReadError, match=message):
        check_pickle_budgets(pickle_bytes)


def test_node_sizes_saturate_instead_of_growing_without_bound() -> None:
    """Shared references double a size per level (2**70 here, under every budget while
    nothing hashes or constructs it): the scan caps sizes at 2**62, so its sums stay
    machine-sized however the references multiply."""
    scan = pickle_scan._Scan()
    scan.run(craft.PROTO2 + craft.doubling_tuple(70)[0] + craft.STOP)
    assert max(node[0] for node in scan.memo if node) == pickle_scan._SATURATED


@pytest.mark.parametrize(
    "ops",
    [
        craft.i_(1) + craft.TUPLE2,  # two objects wanted, one there
        craft.MARK + craft.i_(1) + craft.TUPLE2,  # a MARK is not an object
        craft.MARK + craft.put(0) + craft.POP + craft.i_(1),  # memoizing a MARK
        craft.TUPLE,  # a slice without a MARK
    ],
    ids=["too-few", "mark-as-object", "memoized-mark", "no-mark"],
)
def test_stack_misuse_is_corrupt(ops: bytes) -> None:
    with pytest.raises(
        CheckpointReadError, match=r"corrupt pickle: (an opcode needs an object|no MARK)"
    ):
        check_pickle_budgets(craft.PROTO2 + ops + craft.STOP)


def test_lengths_beyond_the_file_are_not_allocated(tmp_path: Path) -> None:
    # BINBYTES8 claiming 2**62 bytes: the scan must refuse it without reading that much.
    path = tmp_path / "p.pkl"
    path.write_bytes(craft.PROTO2 + b"\x8e" + (2**62).to_bytes(8, "little") + b"abc")
    with path.open("rb") as f, pytest.raises(CheckpointReadError, match="only 3 remain"):
        check_pickle_budgets(f)


def test_stand_ins_refuse_build() -> None:
    """BUILD would write straight into __dict__, past frozen=True; each stand-in refuses."""
    tensor = PickledTensor(shape=(2,), dtype="float32", storage="0", stride=(1,))
    ref = StorageRef(key="0", dtype="float32", location="cpu", numel=2)
    for stand_in in (tensor, ref):
        with pytest.raises(CheckpointReadError, match="BUILD"):
            stand_in.__setstate__({"file": "/etc/passwd"})
    # The unpickled stand-in becomes a plain TensorMeta: the reader sets its location.
    meta_pkl = _data_pkl({"w": torch.zeros(2)})
    obj = load_restricted(meta_pkl, path="x.pt").obj
    assert type(obj["w"]) is PickledTensor and obj["w"].file is None


def test_protocol_2_bytes_decode(tmp_path: Path) -> None:
    """Python 3 pickles bytes for protocol 2 as _codecs.encode(text, 'latin1')."""
    state = {"state_dict": {"w": torch.zeros(2)}, "note": b"\x00\xffbytes"}
    path = tmp_path / "legacy.pt"
    torch.save(state, path, pickle_protocol=2, _use_new_zipfile_serialization=False)
    meta = read_metadata(path)
    assert list(meta.tensors) == ["w"]
    assert any(entry.name == "note" for entry in meta.containers)


def test_bytearray_only_copies_bytes() -> None:
    assert _bytearray(b"ab") == bytearray(b"ab")
    assert _bytearray("\xff", "latin-1") == bytearray(b"\xff")
    with pytest.raises(CheckpointReadError, match="bytearray"):
        _bytearray(10**10)


@pytest.mark.parametrize(
    ("changes", "copyable"),
    [
        ({}, True),
        ({"storage_offset": 1}, False),  # 4 + 16 bytes > the 16-byte storage
        ({"storage_offset": -1}, False),
        ({"storage_nbytes": None}, False),
        ({"stride": (2,)}, False),
    ],
    ids=["exact", "past-the-end", "negative-offset", "unvalidated", "non-contiguous"],
)
def test_byte_range_stays_inside_the_validated_storage(changes: dict, copyable: bool) -> None:
    fields = {"shape": (4,), "dtype": "float32", "storage": "0", "stride": (1,), "file": "f.pt"}
    tensor = TensorMeta(**{**fields, "file_offset": 100, "storage_nbytes": 16, **changes})
    assert (tensor.byte_range == ("f.pt", 100 + tensor.storage_offset * 4, 16)) is copyable
    assert (tensor.byte_range is not None) is copyable


def test_copies_come_only_from_the_checkpoints_own_files(tmp_path: Path) -> None:
    source = tmp_path / "m.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.arange(4.0)}, source)
    outsider = TensorMeta(
        shape=(4,), dtype="float32", storage="s", stride=(1,), file="/etc/hostname",
        file_offset=0, storage_nbytes=16,
    )  # fmt: skip
    meta = CheckpointMeta(
        path=str(source), format=Format.SAFETENSORS, tensors={"w": outsider}, files=(str(source),)
    )
    with ExitStack() as stack:
        data, _ = SourceBytes(meta, stack).data("w")
        assert isinstance(data, ComputedBytes)  # read through the reader, not copied
        assert data.materialize() == torch.arange(4.0).numpy().tobytes()


def test_short_repr_is_bounded_on_shared_structures() -> None:
    node: object = (1,)
    for _ in range(200):  # 2**200 leaves if expanded
        node = (node, node)
    assert len(short_repr(node)) <= 60


class _Counted:
    """Counts what is asked of it: a stand-in for a structure too costly to walk."""

    reprs = hashes = 0

    def __repr__(self) -> str:
        _Counted.reprs += 1
        return "c"

    def __hash__(self) -> int:
        _Counted.hashes += 1
        return 1


def test_short_repr_is_bounded_inside_dict_subclasses_and_records() -> None:
    many = [_Counted() for _ in range(1000)]
    holders = [
        collections.OrderedDict(a=many),
        collections.Counter({"a": many}),
        _record_class("dataclass.Like")(many),
    ]
    for holder in holders:
        _Counted.reprs = 0
        assert len(short_repr(holder)) <= 60
        assert _Counted.reprs <= 10, type(holder)  # reprlib shows a few items, not 1,000


def test_build_states_keep_only_attribute_names() -> None:
    """torch.save sets a state dict's _metadata by BUILD; a key that is not a name
    (a tuple bomb within the hash budget) would be hashed again on every BUILD."""
    names = craft.EMPTY_DICT + craft.s_("_metadata") + craft.i_(1) + craft.SETITEM + craft.BUILD
    obj = load_restricted(craft.PROTO2 + craft.ORDERED_DICT + names + craft.STOP, path="x").obj
    assert type(obj).__name__ == "OrderedDict" and obj._metadata == 1
    bomb = craft.PROTO2 + craft.repeated_build(craft.ORDERED_DICT, 3, 2) + craft.STOP
    with pytest.raises(
        CheckpointReadError, match=r"corrupt pickle: BUILD sets OrderedDict attributes"
    ):
        load_restricted(bomb, path="x")


@pytest.mark.parametrize("holder", ["record", "ordered-dict"])
def test_build_hashes_no_key_again(holder: str) -> None:
    state = collections.OrderedDict({_Counted(): 1})
    target = (
        _record_class("dataclass.Like")()
        if holder == "record"
        else restricted_pickle._HANDLERS["collections.OrderedDict"]()
    )
    _Counted.hashes = 0
    with contextlib.suppress(CheckpointReadError):
        target.__setstate__(state)
    assert _Counted.hashes == 0


def test_walking_an_unpickled_ordered_dict_hashes_no_key() -> None:
    """collections.OrderedDict's iterator hashes each key; a walk over an OrderedDict
    shared many times would re-hash a bomb key the scan charged once."""
    ordered = restricted_pickle._HANDLERS["collections.OrderedDict"]()
    ordered[_Counted()] = 1
    _Counted.hashes = 0
    assert len(list(ordered.items())) == len(list(ordered)) == len(list(ordered.values())) == 1
    assert _Counted.hashes == 0


def test_a_name_used_many_times_makes_one_class() -> None:
    """Each new class cost 11 µs and 2.5 KB: a pickle calling an opaque object or naming
    a refused global a million times must not make a million classes."""
    called = craft.get(0) + craft.EMPTY_TUPLE + craft.REDUCE
    instance = craft.g_("argparse", "Namespace") + craft.EMPTY_TUPLE + craft.REDUCE
    opaque = instance + craft.put(0) + craft.POP + craft.tup(called, called)
    first, second = load_restricted(craft.PROTO2 + opaque + craft.STOP, path="x").obj
    assert type(first) is type(second) and type(first).__name__ == "argparse.Namespace(...)"
    unpickler = restricted_pickle.MetaUnpickler(io.BytesIO(), records=frozenset({"dcp.Meta"}))
    for module, name in [("os", "system"), ("dcp", "Meta")]:  # refused; an allowed record
        assert unpickler.find_class(module, name) is unpickler.find_class(module, name)


def test_visible_escapes_terminal_controls() -> None:
    assert visible("a\x1b[31mb\x07") == "a\\x1b[31mb\\x07"
    assert visible("a\nb") == "a\nb" and visible("a\nb", one_line=True) == "a\\x0ab"
    assert visible("\x9b2J") == "\\x9b2J"  # C1 CSI


def test_python_2_memo_numbering_from_one_passes() -> None:
    """cPickle of Python 2 numbers memo entries from 1 (lpips' .pth weights do)."""
    ops = craft.EMPTY_DICT + craft.put(1) + craft.s_("a") + craft.put(2) + craft.get(2)
    check_pickle_budgets(craft.PROTO2 + ops + craft.SETITEM + craft.STOP)
    with pytest.raises(PickleBudgetError, match="memo"):
        check_pickle_budgets(craft.PROTO2 + craft.EMPTY_DICT + craft.put(2) + craft.STOP)


def test_a_container_filled_in_many_batches_is_not_deep() -> None:
    """torch.save writes SETITEMS/APPENDS in batches of 1,000: a 300k-entry dict is 300
    batches on one dict, one level deep, not 300 (a false positive of the first scan)."""
    many = {f"k{i}": i for i in range(300_000)}
    check_pickle_budgets(pickle.dumps({"state": many, "list": list(range(300_000))}, protocol=2))
