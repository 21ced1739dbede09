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
import re
import struct
import sys
import zipfile
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import REPO
from safetensors.torch import save_file

import ckptool
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


@pytest.mark.parametrize("at_once", [1, 2, 7])
def test_slimmed_pickle_is_the_same_cut_in_any_chunks(
    monkeypatch: pytest.MonkeyPatch, at_once: int
) -> None:
    data = _data_pkl({f"w{i}": torch.zeros(2) for i in range(40)})
    whole = pickle_scan.slimmed_pickle(data)
    monkeypatch.setattr(pickle_scan, "_PIECES_AT_ONCE", at_once)
    assert pickle_scan.slimmed_pickle(data) == whole
    assert len(whole) < len(data)


@pytest.mark.parametrize(
    ("ops", "loads_as"),
    [
        # MEMOIZE takes the next index by count: without the BINPUT, BINGET 1 would miss.
        (b"]q\x000}\x940h\x01.", {}),
        # A FRAME's length covers the stores inside it.
        (b"\x95\x04\x00\x00\x00\x00\x00\x00\x00]q\x00.", []),
        # A text PUT takes index 0: the BINPUT, the first binary store, stores index 1.
        (b"]p0\n0]q\x010h\x01.", []),
        # A store over index 0: BINGET 0 fetches the dict stored second.
        (b"]q\x00}q\x000h\x00.", {}),
    ],
    ids=["memoize", "frame", "text-put", "stored-over"],
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


# --- tensor records applied whole ---------------------------------------------------


def _scan_state(scan: pickle_scan._Scan) -> tuple[object, ...]:
    """Everything a scan's verdict and slimmed_pickle depend on, nodes as values."""

    def values(nodes: list) -> list[object]:
        return [None if n is None else (n[0], n[1]) for n in nodes]

    return (
        values(scan.memo),
        values(scan.stack),
        list(scan.puts),
        sorted(scan.fetched),
        scan.constructed,
        scan.hashed,
        scan.count,
        scan.skipped,
        scan.renumbers,
    )


def _scan_both_ways(data: bytes) -> tuple[object, object]:
    """The outcome (state, or the error) of the scan as it runs, and of the walk of every
    opcode one by one."""
    outcomes = []
    for records in (True, False):
        scan = pickle_scan._Scan()
        try:
            if scan._walk(data, 0, len(data), records=records) is not None:
                raise AssertionError("no STOP")
            outcomes.append(_scan_state(scan))
        except CheckpointReadError as e:
            outcomes.append((type(e), str(e)))
    return outcomes[0], outcomes[1]


def _varied_tensors() -> dict[str, torch.Tensor]:
    """Shapes of every form records take (0-d, 1-3 sizes, 4+ sizes), views, ties, and
    several dtypes, past memo index 256 (4-byte stores)."""
    shared = torch.arange(24.0).reshape(2, 3, 4)
    tensors: dict[str, torch.Tensor] = {"scalar": torch.tensor(3.0), "tied": shared}
    tensors |= {"view": shared[1], "strided": shared.transpose(0, 2), "alias": shared}
    tensors |= {f"w{i}": torch.zeros(2, 1, 3, 3, 2 + i % 3) for i in range(40)}
    tensors |= {
        f"b{i}": torch.ones(3, dtype=torch.int64 if i % 2 else torch.bool) for i in range(40)
    }
    # Sizes and strides as 2-byte and 4-byte ints, in 4-dimension tuples (MARK ... TUPLE).
    tensors |= {f"wide{i}": torch.zeros(1, 1, 2, 300) for i in range(3)}
    tensors |= {"long": torch.zeros(1, 1, 1, 70000)}
    return tensors


def _training_checkpoint() -> dict[str, object]:
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1}


@pytest.mark.parametrize(
    "make",
    [
        _varied_tensors,
        _training_checkpoint,
        lambda: torchvision.models.resnet18(weights=None).state_dict(),
    ],
    ids=["varied", "training-checkpoint", "resnet18-state-dict"],
)
def test_tensor_records_applied_whole_leave_the_scan_as_its_walk_does(make) -> None:
    data = _data_pkl(make())
    fast, walked = _scan_both_ways(data)
    assert fast == walked
    assert isinstance(fast, tuple) and len(fast[0]) > 256  # scanned, past 1-byte stores


def test_each_kind_of_tensor_record_is_walked_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The speed: of 500 tensors of one shape, the first is walked as any pickle, the
    second opcode by opcode as its kind is learned, the rest applied whole but one (its
    stores cross memo index 256, from 1-byte to 4-byte indexes, and it is walked)."""
    calls: collections.Counter[str] = collections.Counter()
    for method in ("_learn", "_replay"):
        original = getattr(pickle_scan._Scan, method)
        monkeypatch.setattr(pickle_scan._Scan, method, _counting(calls, method, original))
    check_pickle_budgets(_data_pkl({f"layer{i}.weight": torch.zeros(4, 4) for i in range(500)}))
    assert calls == {"_learn": 1, "_replay": 497}


def _counting(calls: collections.Counter[str], name: str, method):
    def counted(*args):
        calls[name] += 1
        return method(*args)

    return counted


def _records(data: bytes) -> list[re.Match[bytes]]:
    return list(pickle_scan._TENSOR_RECORD.finditer(data))


def _same_shape_pickle() -> bytes:
    return _data_pkl({f"t{i}": torch.zeros(2, 2) for i in range(6)})


@pytest.mark.parametrize("which", [0, 3], ids=["first-of-its-kind", "later"])
def test_a_record_storing_out_of_order_is_walked(which: int) -> None:
    data = bytearray(_same_shape_pickle())
    record = _records(bytes(data))[which]
    key, storage = record.start("key_put") + 1, record.start("storage_put") + 1
    data[key], data[storage] = data[storage], data[key]
    fast, walked = _scan_both_ways(bytes(data))
    assert fast == walked
    assert isinstance(fast, tuple)  # the scan passes it; the nodes sit where it stored them


def test_a_record_without_stores_after_stored_ones_is_its_own_kind() -> None:
    """torch's records store their nodes and ckptool's do not: in a crafted pickle with
    both, fetching the same nodes, one's stores are not replayed for the other."""
    data = _same_shape_pickle()
    last = _records(data)[-1]
    cut = bytearray(data)
    for group in reversed(pickle_scan._RECORD_PUTS):  # later ones first: offsets hold
        if last[group]:
            del cut[last.start(group) : last.end(group)]
    crafted = bytes(cut)
    assert pickle_scan._BARE_TENSOR_RECORD.match(crafted, last.start())
    fast, walked = _scan_both_ways(crafted)
    assert fast == walked
    assert isinstance(fast, tuple)


def test_a_record_after_a_node_it_fetches_grew_is_walked() -> None:
    """A crafted pickle appends to the rebuild function's node between two tensors: the
    next tensor, built from a larger node, charges more than the first did."""
    data = _same_shape_pickle()
    record = _records(data)[3]
    grow = record["rebuild"] + b"Na0"  # GET rebuild, NONE, APPEND, POP
    crafted = data[: record.start()] + grow + data[record.start() :]
    fast, walked = _scan_both_ways(crafted)
    assert fast == walked
    plain, _ = _scan_both_ways(data)
    assert isinstance(fast, tuple) and isinstance(plain, tuple) and fast[4] > plain[4]


def test_a_record_whose_key_length_disagrees_is_walked() -> None:
    data = bytearray(_same_shape_pickle())
    record = _records(bytes(data))[3]
    data[record.start("key_length")] += 1  # the key swallows the next opcode
    fast, walked = _scan_both_ways(bytes(data))
    assert fast == walked
    assert fast[0] is CheckpointReadError


@pytest.mark.parametrize("budget", ["MAX_OPCODES", "MAX_CONSTRUCTOR_NODES"])
def test_records_applied_whole_count_against_the_budgets(
    monkeypatch: pytest.MonkeyPatch, budget: str
) -> None:
    data = _same_shape_pickle()
    walked = pickle_scan._Scan()
    walked._walk(data, 0, len(data), records=False)
    used = walked.count if budget == "MAX_OPCODES" else walked.constructed
    monkeypatch.setattr(pickle_scan, budget, used - 1)
    with pytest.raises(PickleBudgetError, match="budget"):
        check_pickle_budgets(data)
    monkeypatch.setattr(pickle_scan, budget, used)
    check_pickle_budgets(data)


def test_a_tensor_applied_whole_grows_alone() -> None:
    """Tensors applied whole get nodes of their own: a crafted pickle that appends to one
    tensor's node grows no other tensor's."""
    data = _same_shape_pickle()
    records = _records(data)
    tensor = records[3]["tensor_put"].replace(b"q", b"h", 1)  # GET where it was stored
    crafted = data[: records[4].start()] + tensor + b"Na0" + data[records[4].start() :]
    fast, walked = _scan_both_ways(crafted)
    assert fast == walked
    assert isinstance(fast, tuple)
    memo = fast[0]
    grown, other = (memo[records[i]["tensor_put"][1]] for i in (3, 2))
    assert grown[0] > other[0]  # type: ignore[index]


def test_records_numbered_from_one_are_applied_whole_as_walked() -> None:
    """A memo numbered from 1 (cPickle of Python 2) leaves one slot skipped."""
    data = bytearray(_same_shape_pickle())
    for op, _, pos in pickletools.genops(bytes(data)):
        if op.name in ("BINPUT", "BINGET"):
            data[pos + 1] += 1
    fast, walked = _scan_both_ways(bytes(data))
    assert fast == walked
    assert isinstance(fast, tuple) and fast[7] == 1  # one slot skipped


def test_tensors_as_ckptool_writes_them_are_applied_whole_as_walked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ckptool's own .pt stores only globals and constant strings: its tensors are the
    same records without stores."""
    state = {"n": torch.tensor(4)} | {f"w{i}": torch.zeros(2, 3) for i in range(300)}
    save_file(state, tmp_path / "in.safetensors")
    ckptool.convert(tmp_path / "in.safetensors", str(tmp_path / "out.pt"))
    with zipfile.ZipFile(tmp_path / "out.pt") as archive:
        data = archive.read("archive/data.pkl")
    fast, walked = _scan_both_ways(data)
    assert fast == walked
    calls: collections.Counter[str] = collections.Counter()
    for method in ("_learn", "_replay"):
        original = getattr(pickle_scan._Scan, method)
        monkeypatch.setattr(pickle_scan._Scan, method, _counting(calls, method, original))
    check_pickle_budgets(data)
    # n and w0 name new globals (walked), w1 is learned, the rest applied whole.
    assert calls == {"_learn": 1, "_replay": 298}


def test_a_tensor_applied_whole_without_stores_grows_alone(tmp_path: Path) -> None:
    """In ckptool's own layout nothing stores a tensor, but one still on the stack can
    be appended to: the tensors applied whole before it, in the same batch, keep their
    size."""
    save_file({f"w{i}": torch.zeros(2) for i in range(8)}, tmp_path / "in.safetensors")
    ckptool.convert(tmp_path / "in.safetensors", str(tmp_path / "out.pt"))
    with zipfile.ZipFile(tmp_path / "out.pt") as archive:
        data = archive.read("archive/data.pkl")
    end = list(pickle_scan._BARE_TENSOR_RECORD.finditer(data))[4].end()
    crafted = data[:end] + b"Na" + data[end:-1]  # NONE, APPEND into the tensor just built
    # The dict made a set member (MARK ... FROZENSET): its size, tensors and all, hashed.
    crafted = crafted[:2] + b"(" + crafted[2:] + b"\x91."
    fast, walked = _scan_both_ways(crafted)
    assert fast == walked
    plain, _ = _scan_both_ways(data[:2] + b"(" + data[2:-1] + b"\x91.")
    assert isinstance(fast, tuple) and isinstance(plain, tuple) and fast[5] > plain[5]


@pytest.mark.parametrize(
    ("token", "length"),
    [
        (None, 0),  # the empty tuple
        (b"K\x02\x86", 2),  # TUPLE2
        (b"(J\x00\x00\x01\x00M\x00\x02K\x03\x8a\x05\x00\x00\x00\x00\x01t", 4),
        (b"(" + b"M\x01\x01" * 6 + b"t", 6),
    ],
    ids=["empty", "tuple2", "every-int-width", "six-2-byte"],
)
def test_a_records_sizes_are_counted_whatever_their_widths(
    token: bytes | None, length: int
) -> None:
    """Sizes and strides are part of a record's kind: 4 ints of 2 bytes each must not count
    as some other number of 1-byte ones."""
    assert pickle_scan._tuple_length(token) == length


def _call(module: str, name: str, *args: bytes) -> bytes:
    """A pickle whose object is ``module.name(*args)``, each argument given as ops."""
    return craft.PROTO2 + craft.g_(module, name) + craft.tup(*args) + craft.REDUCE + craft.STOP


_FLOAT = b"G" + struct.pack(">d", 1.5)  # BINFLOAT


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_call("torch", "Size", craft.tup(craft.s_("a"))), r"torch.Size of \('a',\); expected"),
        (_call("torch", "Size", craft.tup(craft.i_(-1))), r"torch.Size of \(-1,\); expected"),
        (_call("torch", "device", _FLOAT), r"torch.device of \(1.5,\); expected a name"),
        (
            _call(
                "torch._utils",
                "_rebuild_meta_tensor_no_storage",
                craft.g_("torch", "float32"),
                craft.tup(craft.s_("a")),
                craft.tup(),
            ),
            "meta tensor has malformed dtype",
        ),
        (_call("_codecs", "encode", craft.s_("abc"), craft.s_("utf-16")), "encoding 'utf-16'"),
        (_call("_codecs", "encode", craft.i_(5), craft.s_("latin1")), "encoding 'latin1'"),
    ],
    ids=["size-of-text", "negative-size", "device-of-float", "meta-size", "codec", "not-text"],
)
def test_allowlisted_calls_refuse_arguments_torch_never_pickles(data: bytes, message: str) -> None:
    """The stand-ins of allowlisted torch calls check their arguments: each refusal
    names what it got."""
    with pytest.raises(CheckpointReadError, match=message):
        restricted_pickle.load_restricted(data, path="crafted.pt")
    good = _call("torch", "Size", craft.tup(craft.i_(2), craft.i_(3)))
    assert restricted_pickle.load_restricted(good, path="good.pt").obj == (2, 3)
