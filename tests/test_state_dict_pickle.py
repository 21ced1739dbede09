"""The one-pass reader of state dict pickles builds what the restricted unpickler builds.

``read_state_dict_pickle`` is a second reader of the same bytes, so every test here holds
it to the general reader (pickle budget scan, slimming, restricted unpickler): on real
state dicts, on pickles written to reach its rarer branches, and on every single-byte
mutant of one. Where it declines, the general reader's verdict is the only one.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from ckptool.formats import read_metadata, torch_pickle
from ckptool.formats import state_dict_pickle as one_pass
from ckptool.formats.restricted_pickle import Unpickled
from ckptool.formats.state_dict_pickle import read_state_dict_pickle

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from compare_state_dict_reader import (
    SCOPE,
    Storage,
    Tensor,
    data_pkl,
    general,
    same,
    torch_like_pickle,
)


def assert_same(fast: Unpickled | None, slow: Unpickled | Exception) -> None:
    """The same container (type, items in order, attributes), tensors and storages."""
    assert fast is not None
    assert not isinstance(slow, Exception), slow
    assert same(fast, slow), (fast, slow)


def read_both(data: bytes) -> tuple[Unpickled | None, Unpickled | Exception]:
    return read_state_dict_pickle(data, storage_scope=SCOPE), general(data)


def small_state() -> dict[str, torch.Tensor]:
    """A state_dict() with _metadata, int64 buffers and views that share a storage."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5), torch.nn.BatchNorm1d(5)
    )
    state = model.state_dict()
    state["tied"] = state["0.weight"].view(-1)  # its storage key is a memo fetch
    state["view"] = state["1.bias"][1:]  # an offset
    state["half"] = torch.zeros(2, 2, dtype=torch.half)
    state["five_dims"] = torch.zeros(1, 2, 1, 2, 1)  # sizes as MARK ... TUPLE
    state["scalar"] = torch.tensor(3.0)  # empty sizes and strides
    state["transposed"] = torch.zeros(3, 4).T
    state.update(step=5, lr=0.5)  # plain values beside the tensors
    return state


@pytest.mark.parametrize("architecture", ["resnet18", "mobilenet_v3_small", "squeezenet1_0"])
def test_real_state_dicts_read_as_the_unpickler_reads_them(architecture: str) -> None:
    state = getattr(torchvision.models, architecture)(weights=None).state_dict()
    for obj in (state, dict(state)):  # torch.save of state_dict(), and of a plain dict
        fast, slow = read_both(data_pkl(obj))
        assert_same(fast, slow)
        assert fast is not None
        assert bool(getattr(fast.obj, "_metadata", None)) == (obj is state)


def test_a_language_model_with_tied_embeddings_reads_as_the_unpickler_reads_it() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100)
    state = transformers.GPT2LMHeadModel(config).state_dict()
    fast, slow = read_both(data_pkl(state))
    assert_same(fast, slow)
    assert fast is not None
    # lm_head.weight is transformer.wte.weight: its storage key is a memo fetch
    assert fast.obj["lm_head.weight"].storage == fast.obj["transformer.wte.weight"].storage


def test_views_tied_storages_and_dtypes_read_as_the_unpickler_reads_them() -> None:
    fast, slow = read_both(data_pkl(small_state()))
    assert_same(fast, slow)
    assert fast is not None
    assert fast.obj["tied"].storage == fast.obj["0.weight"].storage
    assert fast.obj["view"].storage_offset == 1
    assert fast.obj["five_dims"].shape == (1, 2, 1, 2, 1)
    assert fast.obj["scalar"].shape == ()
    assert fast.obj["half"].dtype == "float16"
    assert vars(fast.obj)["_metadata"]["1"] == {"version": 1}


def test_plain_values_beside_the_tensors_read_as_the_unpickler_reads_them() -> None:
    state = small_state()
    values = {"step": 5, "big": -(2**40), "lr": 0.5, "nan": float("nan"), "tag": "best"}
    state.update(values, done=True, skip=False, parent=None)
    state["after"] = torch.ones(2)  # a tensor after them
    fast, slow = read_both(data_pkl(state))
    assert_same(fast, slow)
    assert fast is not None
    assert fast.obj["step"] == 5 and fast.obj["tag"] == "best" and fast.obj["done"] is True
    assert fast.obj["after"].shape == (2,)


def test_a_plain_value_with_a_store_of_its_own_reads_as_the_unpickler_reads_it() -> None:
    # torch's pickler memoizes no int; another pickler may, with the next index.
    data = data_pkl({"w": torch.ones(2), "step": 5})
    stored = data.index(b"stepq") + len(b"stepq") + 1  # after the name and its store
    assert data[stored : stored + 2] == b"K\x05"
    index = data[stored - 1] + 1
    crafted = data[: stored + 2] + b"q" + bytes([index]) + data[stored + 2 :]
    fast, slow = read_both(crafted)
    assert_same(fast, slow)


def test_a_pickle_cut_inside_a_float_is_left_to_the_general_reader() -> None:
    data = data_pkl({"w": torch.ones(2), "lr": 0.5})
    cut = data[: data.index(b"lrq") + len(b"lrq") + 1 + 5]  # BINFLOAT and 4 of its 8 bytes
    assert cut.endswith(b"G?\xe0\x00\x00")
    assert read_state_dict_pickle(cut, storage_scope=SCOPE) is None
    assert isinstance(general(cut), Exception)


def test_every_single_byte_mutant_reads_as_the_unpickler_reads_it_or_is_left_to_it() -> None:
    data = data_pkl(small_state())
    accepted = 0
    for at, byte in enumerate(data):
        for value in {byte ^ 0x01, byte ^ 0x40, byte ^ 0x80, 0x00, 0xFF} - {byte}:
            mutant = data[:at] + bytes([value]) + data[at + 1 :]
            fast = read_state_dict_pickle(mutant, storage_scope=SCOPE)
            if fast is None:
                continue
            accepted += 1
            assert_same(fast, general(mutant))
    # Mutants of names, sizes, strides, offsets and keys are still state dicts.
    assert accepted > 300


def test_a_location_followed_by_a_store_that_looks_like_text_reads_as_the_unpickler_reads_it() -> (
    None
):
    # 'cuda:0' then BINPUT 52 is b"cuda:0q4": the text's length, not its characters,
    # says where it ends (a real easyocr checkpoint has exactly this).
    state = {
        f"layer{i}.weight": Tensor(Storage(str(i), 2**31 + i), i, (2**31 + i,)) for i in range(200)
    }
    data = torch_like_pickle(state)
    assert b"cuda:0q4" in data
    fast, slow = read_both(data)
    assert_same(fast, slow)
    assert fast is not None
    assert fast.storages[f"{SCOPE}7"].location == "cuda:0"
    assert fast.obj["layer7.weight"].shape == (2**31 + 7,)  # a LONG1 size


def test_a_store_out_of_order_is_left_to_the_general_reader() -> None:
    data = data_pkl(small_state())
    assert read_state_dict_pickle(data, storage_scope=SCOPE) is not None
    # The storage key's store of the second tensor names the index after it.
    second = data.index(b"X\x01\x00\x00\x001q")
    index = data[second + 7]
    crafted = data[: second + 7] + bytes([index + 1]) + data[second + 8 :]
    assert read_state_dict_pickle(crafted, storage_scope=SCOPE) is None


@pytest.mark.parametrize(
    "case",
    [
        "bytes after STOP",
        "a training checkpoint",
        "one tensor twice",
        "protocol 4",
        "empty",
        "a plain dict with _metadata",
    ],
)
def test_other_shapes_are_left_to_the_general_reader(case: str) -> None:
    state = small_state()
    data = {
        "bytes after STOP": lambda: data_pkl(state) + b"N",
        "a training checkpoint": lambda: data_pkl({"model": state, "epoch": 3}),
        "one tensor twice": lambda: data_pkl({"a": state["1.bias"], "b": state["1.bias"]}),
        "protocol 4": lambda: pickle.dumps({"a": 1}, protocol=4),
        "empty": lambda: data_pkl({}),
        # BUILD of module versions on a dict, which has no attributes to set
        "a plain dict with _metadata": lambda: (
            data_pkl(dict(state))[:-1]
            + b"}X\x09\x00\x00\x00_metadataccollections\nOrderedDict\n)RX\x00\x00\x00\x00}ssb."
        ),
    }[case]()
    assert read_state_dict_pickle(data, storage_scope=SCOPE) is None


def test_a_pickle_longer_than_the_opcode_budget_is_left_to_the_general_reader(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = data_pkl(small_state())
    monkeypatch.setattr(one_pass, "MAX_OPCODES", len(data) - 1)
    assert read_state_dict_pickle(data, storage_scope=SCOPE) is None
    monkeypatch.setattr(one_pass, "MAX_OPCODES", len(data))
    assert read_state_dict_pickle(data, storage_scope=SCOPE) is not None


def test_read_metadata_is_the_same_with_and_without_the_one_pass_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "resnet.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    calls: list[bool] = []

    def counted(data: bytes, *, storage_scope: str) -> Unpickled | None:
        result = read_state_dict_pickle(data, storage_scope=storage_scope)
        calls.append(result is not None)
        return result

    monkeypatch.setattr(torch_pickle, "read_state_dict_pickle", counted)
    fast = read_metadata(str(path))
    assert calls == [True]
    monkeypatch.setattr(torch_pickle, "read_state_dict_pickle", lambda data, **_: None)
    assert read_metadata(str(path)) == fast
    assert fast.module_versions and fast.module_versions["bn1"] == 2


@pytest.mark.parametrize(
    "tensor",
    [
        Tensor(Storage("0", 4), -1, (4,)),  # a negative offset (BININT)
        Tensor(Storage("0", 4), 0, (-4,)),  # a negative size
        Tensor(Storage("0", 4), 0, (4,), (-1,)),  # a negative stride
        Tensor(Storage("0", -4), 0, (4,)),  # a negative element count
        Tensor(Storage("0", 4), 0, (2, 2), (1,)),  # fewer strides than sizes
    ],
    ids=["offset", "size", "stride", "numel", "strides"],
)
def test_a_tensor_the_unpickler_refuses_is_left_to_it(tensor: Tensor) -> None:
    data = torch_like_pickle({"first": Tensor(Storage("1", 4), 0, (4,)), "w": tensor})
    assert read_state_dict_pickle(data, storage_scope=SCOPE) is None
    assert isinstance(general(data), Exception)


def test_a_fetched_storage_key_too_long_for_the_unpickler_is_left_to_it() -> None:
    # The same string object as a plain value, then as a storage key: the key is a
    # fetch, and with the location it runs over the general reader's 256 characters.
    fits, key = "9" * 250, "9" * 251  # with 'cuda:0': 256 characters, and one more
    ok = torch_like_pickle({"note": fits, "w": Tensor(Storage(fits, 4), 0, (4,))})
    too_long = torch_like_pickle({"note": key, "w": Tensor(Storage(key, 4), 0, (4,))})
    assert too_long.count(key.encode()) == 1  # written once, then fetched
    assert_same(*read_both(ok))
    assert read_state_dict_pickle(too_long, storage_scope=SCOPE) is None
    assert isinstance(general(too_long), Exception)


# torch.save's memo, after the first tensor of small_state(): 0 OrderedDict, 3 the
# rebuild function, 4 'storage', 5 FloatStorage, 7 'cpu'.
@pytest.mark.parametrize(
    ("second_tensor", "crafted"),
    [
        (b"h\x03((h\x04", b"h\x03((h\x07"),  # the 'storage' tag fetches 'cpu'
        (b"h\x03((h\x04h\x05", b"h\x03((h\x04h\x07"),  # the storage type fetches 'cpu'
        (b"h\x03((h\x04h\x05", b"h\x03((h\x04h\x00"),  # ... fetches OrderedDict
        (b"h\x03((", b"h\x05(("),  # the rebuild call fetches FloatStorage
        (b"\x89h\x00)R", b"\x89h\x05)R"),  # backward hooks: FloatStorage()
        (b"\x89h\x00)R", b"\x89h\x07)R"),  # backward hooks: 'cpu'()
    ],
    ids=["tag", "storage type", "storage type global", "rebuild", "hooks", "hooks text"],
)
def test_a_fetch_of_the_wrong_constant_is_left_to_the_general_reader(
    second_tensor: bytes, crafted: bytes
) -> None:
    data = data_pkl(small_state())
    after_first = data.index(b"X\x08\x00\x00\x000.weight") + 1  # the first tensor's name
    at = data.index(second_tensor, data.index(b"h\x03((", after_first))
    mutant = data[:at] + crafted + data[at + len(second_tensor) :]
    assert read_state_dict_pickle(data, storage_scope=SCOPE) is not None
    assert read_state_dict_pickle(mutant, storage_scope=SCOPE) is None
    assert isinstance(general(mutant), Exception)


def test_a_store_named_twice_is_left_to_the_general_reader() -> None:
    # The second tensor writes out its constants again with the first one's stores: the
    # same objects at the same indexes, so the general reader builds the same state
    # dict; the one-pass reader holds every store to the next index all the same.
    data = data_pkl(small_state())
    second = data.index(b"h\x03((h\x04h\x05X\x01\x00\x00\x001")
    key_end = second + len(b"h\x03((h\x04h\x05X\x01\x00\x00\x001") + 2  # and its store
    assert data[key_end : key_end + 2] == b"h\x07"
    rewritten = (
        b"ctorch._utils\n_rebuild_tensor_v2\nq\x03((X\x07\x00\x00\x00storageq\x04"
        b"ctorch\nFloatStorage\nq\x05" + data[second + 8 : key_end] + b"X\x03\x00\x00\x00cpuq\x07"
    )
    crafted = data[:second] + rewritten + data[key_end + 2 :]
    assert_same(read_state_dict_pickle(data, storage_scope=SCOPE), general(crafted))
    assert read_state_dict_pickle(crafted, storage_scope=SCOPE) is None
