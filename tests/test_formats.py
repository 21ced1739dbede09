"""Readers: every format and container shape, metadata equal to what torch loads."""

from __future__ import annotations

import json
import operator
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import MLP, ConvBN, Tied, WriteCheckpoint, seeded_state, wrap

from ckptool import (
    AmbiguousContainerError,
    CheckpointReadError,
    UnsafeCheckpointError,
    UsageError,
    load_state_dict,
    read_metadata,
)
from ckptool.formats import Format, safetensors_header
from ckptool.formats import meta as meta_module


def assert_meta_matches(path: Path, expected: dict[str, torch.Tensor], **kwargs: str) -> None:
    meta = read_metadata(path, **kwargs)
    assert set(meta.tensors) == set(expected)
    if meta.format is not Format.SAFETENSORS:  # torch files keep state_dict order
        assert list(meta.tensors) == list(expected)
    for name, tensor in expected.items():
        assert meta.tensors[name].shape == tuple(tensor.shape), name
        assert meta.tensors[name].dtype == str(tensor.dtype).removeprefix("torch."), name


@pytest.mark.parametrize(
    ("name", "file_format"),
    [
        ("m.safetensors", Format.SAFETENSORS),
        ("m.pth", Format.TORCH_ZIP),
        ("m.bin", Format.TORCH_ZIP),
        ("m.legacy.pt", Format.TORCH_LEGACY),
    ],
    ids=["safetensors", "zip-pth", "zip-bin", "legacy"],
)
def test_resnet18_metadata_matches_torch(
    write_checkpoint: WriteCheckpoint, name: str, file_format: Format
) -> None:
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = write_checkpoint(state, name)
    meta = read_metadata(path)
    assert meta.format is file_format
    assert meta.num_params == sum(t.numel() for t in state.values())
    assert_meta_matches(path, state)


@pytest.mark.parametrize(
    "dtype",
    [
        torch.bfloat16,
        torch.float16,
        torch.float64,
        torch.int8,
        torch.bool,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.complex64,
        torch.uint8,
    ],
)
@pytest.mark.parametrize("name", ["t.pt", "t.legacy.pt", "t.safetensors"])
def test_dtypes_and_empty_tensors(
    write_checkpoint: WriteCheckpoint, dtype: torch.dtype, name: str
) -> None:
    if name.endswith(".legacy.pt") and dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        pytest.skip("legacy format predates float8")
    if name.endswith(".safetensors") and dtype is torch.complex64:
        pytest.skip("safetensors' torch writer has no complex64")
    state = {
        "a": torch.zeros(3, 2).to(dtype),
        "empty": torch.zeros(0, 4).to(dtype),
        "scalar": torch.tensor(1).to(dtype),
    }
    path = write_checkpoint(state, name)
    assert_meta_matches(path, state)
    assert read_metadata(path).tensors["empty"].nbytes == 0


def _raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data)
    return path


def _one_float_each(path: Path, names: list[str]) -> Path:
    """A safetensors file of one float32 under each name, in the header in that order."""
    entries = {n: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
               for i, n in enumerate(names)}  # fmt: skip
    return _raw_safetensors(path, entries, bytes(4 * len(names)))


def test_float4_and_fnuz_float8_safetensors_read_as_safetensors_reads_them(
    run_cli, tmp_path: Path
) -> None:
    """safetensors 0.8 writes F4 (its header counts 4-bit values: the last dimension is
    twice torch's float4_e2m1fn_x2), F8_E4M3FNUZ and F8_E5M2FNUZ; ckptool refused them
    as unknown dtypes."""
    from safetensors.torch import load_file, save_file

    state = {
        "f4": torch.randint(0, 256, (3, 5), dtype=torch.uint8).view(torch.float4_e2m1fn_x2),
        # no bytes, so only the shape mapping tells [0, 6] in the header from torch's [0, 3]
        "f4_empty": torch.zeros((0, 3), dtype=torch.uint8).view(torch.float4_e2m1fn_x2),
        "e4": torch.linspace(-2, 2, 6).to(torch.float8_e4m3fnuz),
        "e5": torch.linspace(-2, 2, 6).to(torch.float8_e5m2fnuz),
    }
    source = tmp_path / "packed.safetensors"
    try:
        save_file(state, str(source))
    except (KeyError, TypeError, ValueError) as e:
        pytest.skip(f"this safetensors cannot write these dtypes: {e}")
    theirs = load_file(str(source))
    meta = read_metadata(source)
    for name, tensor in theirs.items():
        assert meta.tensors[name].shape == tuple(tensor.shape)
        assert meta.tensors[name].dtype == str(tensor.dtype).removeprefix("torch.")
    for out in (tmp_path / "out.pt", tmp_path / "out.safetensors"):
        assert run_cli("convert", source, "-o", out).exit_code == 0
        back = load_state_dict(out)
        for name, tensor in theirs.items():
            assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape
            assert torch.equal(back[name].view(torch.uint8), tensor.view(torch.uint8))
    assert load_file(str(tmp_path / "out.safetensors")).keys() == theirs.keys()
    # Without a non-empty F4 beside it, every byte count agrees with the header's shape.
    empty = tmp_path / "empty.safetensors"
    save_file({"f4_empty": state["f4_empty"], "e4": state["e4"]}, str(empty))
    assert read_metadata(empty).tensors["f4_empty"].shape == (0, 3)


@pytest.mark.parametrize("shape", [[3], [2, 3], []])
def test_f4_with_half_a_pair_is_refused(tmp_path: Path, shape: list[int]) -> None:
    path = _raw_safetensors(
        tmp_path / "odd.safetensors",
        {"t": {"dtype": "F4", "shape": shape, "data_offsets": [0, 2]}},
        b"\0\0",
    )
    with pytest.raises(CheckpointReadError, match="must count whole pairs of 4-bit values"):
        read_metadata(path)


def test_a_0_dim_float4_tensor_is_not_written_as_safetensors(
    run_cli, write_checkpoint: WriteCheckpoint, tmp_path: Path
) -> None:
    scalar = torch.zeros((), dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    source = write_checkpoint({"s": scalar}, "scalar.pt")
    result = run_cli("convert", source, "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 5 and "'s' has none (0-dim); write a .pt file" in result.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_metadata_path_does_not_import_torch(write_checkpoint: WriteCheckpoint) -> None:
    paths = [
        write_checkpoint(seeded_state(ConvBN), n) for n in ("a.pt", "a.legacy.pt", "a.safetensors")
    ]
    code = (
        "import sys, ckptool\n"
        f"for p in {[str(p) for p in paths]!r}: ckptool.read_metadata(p)\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("command", ["inspect", "diff"])
def test_a_safetensors_read_imports_no_pickle_reader(
    write_checkpoint: WriteCheckpoint, command: str
) -> None:
    """The pickle, DCP and ZeRO readers (about 70 ms of imports) load only for files
    that need them: `inspect` and `diff` of .safetensors files import none of them."""
    single = str(write_checkpoint(seeded_state(ConvBN), "a.safetensors"))
    files = [single] if command == "inspect" else [single, single]
    code = (
        "import sys\n"
        "from ckptool.cli import cli\n"
        f"try: cli([{command!r}, *{files!r}, '--json'])\n"
        "except SystemExit: pass\n"
        "print(sorted(m for m in sys.modules if m.startswith('ckptool.formats.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = out.stdout.strip().splitlines()[-1]
    assert "ckptool.formats.safetensors_header" in loaded
    for reader in ("torch_pickle", "restricted_pickle", "pickle_scan", "dcp", "zero"):
        assert f"ckptool.formats.{reader}'" not in loaded


def test_a_big_endian_archive_gives_no_byte_locations(tmp_path: Path) -> None:
    """Its bytes need torch to swap them: no tensor may point at them to be copied."""
    import io
    import zipfile

    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2, 3), "b": torch.zeros(3)}, buffer)
    crafted = io.BytesIO()
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(crafted, "w") as dst:
        for info in src.infolist():
            big = info.filename.endswith("/byteorder")
            dst.writestr(info, b"big" if big else src.read(info))
    path = tmp_path / "big.pt"
    path.write_bytes(crafted.getvalue())
    tensors = read_metadata(path).tensors
    assert {n: t.shape for n, t in tensors.items()} == {"w": (2, 3), "b": (3,)}
    assert all(t.file is None and t.storage_nbytes is None for t in tensors.values())
    assert all(t.byte_range is None for t in tensors.values())


def test_tensors_the_bulk_check_cannot_vouch_for_are_left_to_the_one_by_one_check() -> None:
    """A dtype of unknown size, an unknown storage, a storage without a location: the
    bulk pass replaces nothing, and the one-by-one check decides (and names the fault)."""
    from ckptool.formats.meta import TensorMeta
    from ckptool.formats.restricted_pickle import PickledTensor, StorageRef
    from ckptool.formats.torch_pickle import _located_in_bulk

    storages = {"k": StorageRef("k", "float32", "cpu", 4)}
    good = PickledTensor((4,), "float32", "k", 0, (1,))
    cases = [
        ({"w": PickledTensor((4,), "?", "k", 0, (1,))}, {"k": 64}),
        ({"w": good, "v": PickledTensor((4,), "float32", "gone", 0, (1,))}, {"k": 64}),
        ({"w": good}, {}),
    ]
    for tensors, offsets in cases:
        before = dict(tensors)
        assert not _located_in_bulk("x.pt", tensors, storages, offsets)
        assert tensors == before and all(map(operator.is_, tensors.values(), before.values()))
    tensors = {"w": good}
    assert _located_in_bulk("x.pt", tensors, storages, {"k": 64})
    assert tensors["w"] == TensorMeta((4,), "float32", "k", 0, (1,), "x.pt", 64, 16)
    assert type(tensors["w"]) is TensorMeta


def test_shared_storage_is_reported(write_checkpoint: WriteCheckpoint) -> None:
    path = write_checkpoint(Tied().state_dict(), "tied.pt")
    meta = read_metadata(path)
    assert meta.shared_groups() == [["embed.weight", "out.weight"]]
    assert meta.nbytes == 10 * 6 * 4  # counted once


def test_tied_names_without_strides_are_counted_once() -> None:
    """A model's metadata gives no strides (as a safetensors header) but marks ties by
    storage: the tie's bytes count once there too."""
    from ckptool.formats.meta import CheckpointMeta
    from ckptool.models import model_tensor_meta

    tensors = model_tensor_meta(Tied())
    assert {t.stride for t in tensors.values()} == {None}
    meta = CheckpointMeta(path="model", format=Format.SAFETENSORS, tensors=tensors)
    assert meta.nbytes == distinct_bytes(Tied().state_dict()) == 10 * 6 * 4


def test_a_dtype_of_unknown_size_counts_no_bytes_in_the_total() -> None:
    """The totals agree with each tensor's own ``nbytes``, which knows no size for a
    dtype it has no table entry for."""
    from ckptool.formats.meta import CheckpointMeta, TensorMeta

    tensors = {"a": TensorMeta((2,), "float32"), "b": TensorMeta((3,), "a_future_dtype")}
    meta = CheckpointMeta(path="p", format=Format.SAFETENSORS, tensors=tensors)
    assert meta.nbytes == sum(t.nbytes for t in tensors.values()) == 8


def _flat_lstm_state() -> dict[str, torch.Tensor]:
    """An LSTM's weights as cuDNN's flatten_parameters() leaves them: slices of one buffer."""
    lstm = torch.nn.LSTM(8, 16, num_layers=2)
    params = dict(lstm.named_parameters())
    flat = torch.empty(sum(p.numel() for p in params.values()))
    state, offset = {}, 0
    for name, p in params.items():
        state[f"lstm.{name}"] = flat[offset : offset + p.numel()].view_as(p).copy_(p.detach())
        offset += p.numel()
    return state


def distinct_bytes(state: dict[str, torch.Tensor]) -> int:
    """What torch says the tensors occupy: the union of their byte ranges per storage."""
    covered: dict[int, set[int]] = {}
    for t in state.values():
        start = t.storage_offset() * t.element_size()
        covered.setdefault(t.untyped_storage().data_ptr(), set()).update(
            range(start, start + t.nbytes)
        )
    return sum(len(c) for c in covered.values())


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_flat_lstm_views_are_not_tied(write_checkpoint: WriteCheckpoint, suffix: str) -> None:
    state = {**_flat_lstm_state(), "head.weight": torch.zeros(2, 16)}
    if suffix == ".pt":
        state["head.alias"] = state["head.weight"]  # a real tie beside the slices
    else:  # safetensors stores no views: each slice becomes its own range of the file
        state = {k: v.clone() for k, v in state.items()}
    path = write_checkpoint(state, "lstm" + suffix)
    meta = read_metadata(path)
    assert meta.shared_groups() == ([["head.weight", "head.alias"]] if suffix == ".pt" else [])
    # Exactly the bytes the slices cover: a half-used buffer would make the storage
    # size (or a sum that counts the tie twice) wrong.
    half = {k: v for k, v in state.items() if "l1" not in k}
    assert meta.nbytes == distinct_bytes(state)
    assert read_metadata(write_checkpoint(half, "half" + suffix)).nbytes == distinct_bytes(half)


def test_occupied_bytes_of_strided_and_broadcast_views(write_checkpoint: WriteCheckpoint) -> None:
    base = torch.arange(48.0).reshape(6, 8)
    state = {
        "every_other": base[:, ::2],  # gaps between runs
        "transposed": base.t(),  # all of base, permuted
        "row": base[5],
        "broadcast": base[0].expand(4, 8),  # one row's bytes, seen 4 times
    }
    path = write_checkpoint(state, "views.pt")
    meta = read_metadata(path)
    assert meta.nbytes == distinct_bytes(state) == 48 * 4
    assert sorted(meta.tensors["every_other"].occupied_spans())[:2] == [(0, 4), (8, 12)]
    assert sum(e - s for s, e in meta.tensors["broadcast"].occupied_spans()) == 8 * 4
    alone = read_metadata(write_checkpoint({"broadcast": base[0].expand(4, 8)}, "bc.pt"))
    assert alone.nbytes == 8 * 4  # the one row it shows 4 times, alone in its storage


def test_views_keep_offset_and_stride(write_checkpoint: WriteCheckpoint) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    path = write_checkpoint({"base": base, "row": base[1], "col": base[:, 2]}, "views.pt")
    tensors = read_metadata(path).tensors
    assert tensors["row"].storage_offset == 4 and tensors["row"].shape == (4,)
    assert tensors["col"].stride == (4,) and tensors["base"].storage is not None
    assert not tensors["col"].is_contiguous and tensors["row"].is_contiguous


@pytest.mark.parametrize(
    ("wrapper", "key"),
    [
        (
            lambda sd: {
                "state_dict": sd,
                "epoch": 3,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
            },
            "state_dict",
        ),
        (lambda sd: {"model": sd, "args": {"lr": 0.1}}, "model"),
        (lambda sd: {"module": sd}, "module"),
        (lambda sd: {"checkpoint": {"ema": sd}, "step": 10}, "checkpoint.ema"),
        (lambda sd: {**sd, "n_averaged": 3}, None),
    ],
    ids=["lightning-like", "model", "deepspeed-module", "nested-ema", "flat-with-counter"],
)
def test_containers_found_by_shape(
    write_checkpoint: WriteCheckpoint, wrapper, key: str | None
) -> None:
    state = seeded_state(ConvBN)
    path = write_checkpoint(wrapper(state), "wrapped.pt")
    meta = read_metadata(path)
    assert meta.key == key
    assert set(meta.tensors) == set(state)


def test_container_summary_lists_other_entries(write_checkpoint: WriteCheckpoint) -> None:
    state = seeded_state(MLP)
    optimizer = torch.optim.SGD(MLP().parameters(), lr=0.1, momentum=0.9)
    path = write_checkpoint(
        {"state_dict": state, "optimizer": optimizer.state_dict(), "epoch": 7}, "ckpt.pt"
    )
    entries = {e.name: e for e in read_metadata(path).containers}
    assert entries["state_dict"].kind == "tensors"
    assert entries["optimizer"].summary.startswith("optimizer state (1 param groups)")
    assert entries["epoch"].summary == "7"


def test_ambiguous_containers_need_key(write_checkpoint: WriteCheckpoint) -> None:
    state = seeded_state(MLP)
    path = write_checkpoint({"model": state, "ema": state}, "two.pt")
    with pytest.raises(
        AmbiguousContainerError, match=r"several tensor dicts: model .*ema.*key='model'"
    ) as info:
        read_metadata(path)
    assert info.value.candidates == ("model", "ema")
    assert read_metadata(path, key="ema").key == "ema"


def test_dotted_key_with_dots_in_names(write_checkpoint: WriteCheckpoint) -> None:
    state = seeded_state(MLP)
    path = write_checkpoint({"model.ema": state, "model": {"x": 1}}, "dots.pt")
    assert set(read_metadata(path, key="model.ema").tensors) == set(state)


@pytest.mark.parametrize(
    ("keys", "words"),
    [((0, 1), "keyed by int (e.g. 0)"), ((("a", 1),), "keyed by tuple (e.g. ('a', 1))")],
)
def test_tensors_under_keys_that_are_not_names_say_so(
    write_checkpoint: WriteCheckpoint, keys: tuple, words: str
) -> None:
    """{0: t, 1: t} is a dict of tensors, but not a state dict: the refusal says why."""
    path = write_checkpoint({k: torch.ones(2) for k in keys}, "unnamed.pt")
    with pytest.raises(CheckpointReadError, match=re.escape(words) + ", not by name") as info:
        read_metadata(path)
    assert "and no dict of tensors" in str(info.value)
    # Keys that are not names but hold no tensors directly: no hint about them.
    nested = write_checkpoint({"layers": [torch.ones(2)], 3: "step"}, "nested.pt")
    with pytest.raises(CheckpointReadError, match=r"and no dict of tensors$"):
        read_metadata(nested)


def test_values_beside_the_tensors_are_listed_and_writes_say_they_leave_them_out(
    run_cli, write_checkpoint: WriteCheckpoint, tmp_path: Path
) -> None:
    """{12 tensors, 'step': 5}: inspect showed nothing of 'step', and convert dropped it
    without a word."""
    state: dict = {f"l{i}.weight": torch.ones(2) for i in range(12)} | {"step": 5}
    path = write_checkpoint(state, "flat.pt")
    document = json.loads(run_cli("inspect", path, "--json").stdout)
    assert {"name": "step", "kind": "not_tensor", "summary": "5"} in document["containers"]
    assert "not tensor  step: 5 (beside the tensors" in run_cli("inspect", path).stdout
    converted = run_cli("convert", path, "-o", tmp_path / "out.safetensors", "--json")
    assert converted.exit_code == 0, converted.stderr
    (note,) = json.loads(converted.stdout)["notes"]
    assert note == "left out 1 value(s) beside the tensors that are not tensors (step: 5)"
    plain = write_checkpoint({"w": torch.ones(2)}, "plain.pt")
    assert json.loads(run_cli("inspect", plain, "--json").stdout)["containers"] == []
    # Past the 100 entries inspect lists, the note still counts them all.
    many = write_checkpoint(state | {f"s{i}": i for i in range(150)}, "many.pt")
    counted = run_cli("convert", many, "-o", tmp_path / "many.safetensors", "--json")
    (note,) = json.loads(counted.stdout)["notes"]
    assert note.startswith("left out 151 value(s)") and note.endswith("and 148 more)")


def test_a_small_state_dict_with_counters_is_read_and_one_with_a_config_says_why_not(
    run_cli, write_checkpoint: WriteCheckpoint, tmp_path: Path
) -> None:
    """{'w': t, 'b': t, 'step': 5}: two tensors of three entries fell under the 90% rule
    and torch's own file was refused as 'no dict of tensors'."""
    small = write_checkpoint({"w": torch.ones(2), "b": torch.ones(2), "step": 5}, "small.pt")
    meta = read_metadata(small)
    assert set(meta.tensors) == {"w", "b"}
    assert [(c.name, c.kind) for c in meta.containers] == [("step", "not_tensor")]
    out = tmp_path / "small.safetensors"
    converted = run_cli("convert", small, "-o", out)
    assert converted.exit_code == 0 and "left out 1 value(s)" in converted.stdout
    odd = write_checkpoint({"w": torch.ones(2), "b": torch.ones(2), "cfg": {"a": 1}}, "cfg.pt")
    with pytest.raises(CheckpointReadError) as info:
        read_metadata(odd)
    assert str(info.value).endswith(
        "holds dict (3 entries, 2 tensors) and no dict of tensors: beside its tensors it "
        "holds cfg: dict (1 entry), which are neither tensors nor plain values"
    )


@pytest.mark.parametrize("tensors", [3, 30], ids=["few-tensors", "many-tensors"])
def test_extra_state_kept_as_an_object_is_refused_not_dropped(
    run_cli, write_checkpoint: WriteCheckpoint, tmp_path: Path, tensors: int
) -> None:
    """torch's strict load needs a module's extra state back; among 30 tensors the entry
    was dropped without a word (convert wrote a file the model refuses), among 3 the
    refusal did not say why."""
    state: dict = {f"l{i}.weight": torch.ones(2) for i in range(tensors)}
    state["l0._extra_state"] = {"calls": 3}
    path = write_checkpoint(state, "extra.pt")
    words = "l0._extra_state is modules' extra state kept as dict, not as a tensor"
    with pytest.raises(CheckpointReadError, match=re.escape(words)):
        read_metadata(path)
    converted = run_cli("convert", path, "-o", tmp_path / "out.safetensors")
    assert converted.exit_code == 3 and words in converted.stderr
    assert not (tmp_path / "out.safetensors").exists()
    state["l0._extra_state"] = torch.tensor([7.0])  # as a tensor it is read like any other
    assert read_metadata(write_checkpoint(state, "tensor.pt")).tensors["l0._extra_state"].shape == (
        1,
    )


@pytest.mark.parametrize("key", ["nope", "epoch"], ids=["absent", "not-a-tensor-dict"])
def test_bad_key_is_usage_error(write_checkpoint: WriteCheckpoint, key: str) -> None:
    path = write_checkpoint({"state_dict": seeded_state(MLP), "epoch": 1}, "c.pt")
    with pytest.raises(UsageError, match=repr(key)):
        read_metadata(path, key=key)


def write_sharded(tmp_path: Path, state: dict[str, torch.Tensor], suffix: str) -> Path:
    from safetensors.torch import save_file

    names = list(state)
    halves = {f"model-0000{i + 1}-of-00002{suffix}": names[i::2] for i in range(2)}
    weight_map = {}
    for shard, keys in halves.items():
        part = {k: state[k].contiguous() for k in keys}
        if suffix == ".safetensors":
            save_file(part, str(tmp_path / shard))
        else:
            torch.save(part, tmp_path / shard)
        weight_map.update(dict.fromkeys(keys, shard))
    weight_map = {k: weight_map[k] for k in names}  # the index lists names in model order
    index = tmp_path / f"model{suffix}.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_sharded_checkpoint(tmp_path: Path, suffix: str) -> None:
    state = seeded_state(ConvBN)
    index = write_sharded(tmp_path, state, suffix)
    meta = read_metadata(index)
    assert meta.format is Format.SHARDED and len(meta.files) == 3
    assert_meta_matches(index, state)
    assert read_metadata(tmp_path).path == str(index)  # the directory resolves to its index
    loaded = load_state_dict(index)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_torch_save_without_crc32s_reads_as_torch_reads_it(run_cli, tmp_path: Path) -> None:
    """torch.utils.serialization.config.save.compute_crc32 = False records every CRC-32
    as 0; torch's reader never checks them, so the file loads in torch. It was refused
    as a corrupt zip (exit 3)."""
    import zipfile

    from torch.utils.serialization import config

    state = seeded_state(ConvBN)
    path = tmp_path / "nocrc.pt"
    config.save.compute_crc32 = False
    try:
        torch.save(state, path)
    finally:
        config.save.compute_crc32 = True
    assert {info.CRC for info in zipfile.ZipFile(path).infolist()} == {0}
    assert_meta_matches(path, state)
    loaded = load_state_dict(path)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    out = tmp_path / "out.safetensors"
    assert run_cli("convert", path, "-o", out).exit_code == 0
    assert all(torch.equal(load_state_dict(out)[k], v) for k, v in state.items())


def test_an_index_may_name_shards_as_dot_slash_paths(tmp_path: Path) -> None:
    """Writers that join paths write './model-00001-of-00002.safetensors' (transformers
    loads it); a path that leaves the folder is still refused."""
    state = seeded_state(ConvBN)
    index = write_sharded(tmp_path, state, ".safetensors")
    document = json.loads(index.read_text())
    document["weight_map"] = {k: f"./{v}" for k, v in document["weight_map"].items()}
    index.write_text(json.dumps(document))
    meta = read_metadata(index)
    assert len(meta.files) == 3 and set(meta.tensors) == set(state)
    loaded = load_state_dict(index)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    second, third = list(document["weight_map"])[1:3]
    outside = "./../" + document["weight_map"][second][2:]
    for name in (second, third):  # the refusal names the first tensor that shard holds
        document["weight_map"][name] = outside
    index.write_text(json.dumps(document))
    with pytest.raises(CheckpointReadError, match=rf"for {second!r} is not a plain file name"):
        read_metadata(index)


@pytest.mark.parametrize("name", ["s.pt", "s.legacy.pt", "s.safetensors"])
def test_load_state_dict_is_bit_exact(write_checkpoint: WriteCheckpoint, name: str) -> None:
    state = seeded_state(ConvBN)
    loaded = load_state_dict(write_checkpoint(state, name))
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_load_state_dict_refuses_unsafe_before_torch_sees_it(
    write_checkpoint: WriteCheckpoint,
) -> None:
    """A whole pickled Module: the script's own class would be kept as data, but the
    torch.nn layers inside it are in torch's namespace off the allowlist: refused."""
    path = write_checkpoint({"state_dict": seeded_state(MLP), "model": MLP()}, "unsafe.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"torch\.nn\.modules\.linear\.Linear") as info:
        load_state_dict(path)
    assert "torch.nn.modules.linear.Linear" in info.value.globals_wanted


def test_sparse_tensor_falls_back_to_torch(write_checkpoint: WriteCheckpoint) -> None:
    sparse = torch.eye(3).to_sparse()
    path = write_checkpoint({"dense": torch.ones(2), "sparse": sparse}, "sparse.pt")
    meta = read_metadata(path)
    assert meta.tensors["sparse"].shape == (3, 3)
    assert meta.tensors["dense"].dtype == "float32"


def test_directory_with_several_checkpoints_is_refused(
    write_checkpoint: WriteCheckpoint, tmp_path: Path
) -> None:
    write_checkpoint(seeded_state(MLP), "a.pt")
    write_checkpoint(seeded_state(MLP), "b.safetensors")
    with pytest.raises(CheckpointReadError, match="several checkpoints"):
        read_metadata(tmp_path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointReadError, match="no such file"):
        read_metadata(tmp_path / "nope.pt")


def test_reading_never_modifies_the_input(write_checkpoint: WriteCheckpoint) -> None:
    path = write_checkpoint({"state_dict": wrap(seeded_state(ConvBN), "module.")}, "in.pt")
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    read_metadata(path)
    load_state_dict(path)
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before


def save_dcp(obj: dict, folder: Path) -> Path:
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(obj, checkpoint_id=str(folder))
    return folder


@pytest.mark.parametrize("nested", [True, False], ids=["model-container", "bare-state-dict"])
def test_distributed_checkpoint_directory(tmp_path: Path, nested: bool) -> None:
    state = seeded_state(ConvBN)
    folder = save_dcp({"model": state, "step": 3} if nested else dict(state), tmp_path / "dcp")
    meta = read_metadata(folder)
    assert meta.format is Format.DCP and meta.key == ("model" if nested else None)
    assert {n: t.shape for n, t in meta.tensors.items()} == {
        n: tuple(t.shape) for n, t in state.items()
    }
    loaded = load_state_dict(folder)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_distributed_checkpoint_values_are_listed_and_extra_state_refused(
    run_cli, tmp_path: Path
) -> None:
    """DCP keeps non-tensors as pickled bytes items: ckptool showed nothing of 'step' or
    'note', and a module's extra state inside the model vanished from every write."""
    state = seeded_state(ConvBN)
    folder = save_dcp({"model": state, "step": 3, "note": "x"}, tmp_path / "dcp")
    meta = read_metadata(folder)
    summary = "a pickled value (not read)"
    assert [(c.name, c.kind, c.summary) for c in meta.containers][1:] == [
        ("step", "other", summary),
        ("note", "other", summary),
    ]
    with pytest.raises(UsageError, match=r"key='step' is a pickled value \(not read\)"):
        read_metadata(folder, key="step")
    bare = save_dcp(dict(state) | {"counter": 7}, tmp_path / "bare")
    converted = run_cli("convert", bare, "-o", tmp_path / "bare.safetensors")
    assert converted.exit_code == 0 and "left out 1 value(s)" in converted.stdout
    assert "(counter: a pickled value (not read))" in converted.stdout
    extra = save_dcp({"model": dict(state) | {"bn._extra_state": {"calls": 2}}}, tmp_path / "x")
    with pytest.raises(CheckpointReadError, match=r"bn\._extra_state is modules' extra state"):
        read_metadata(extra)


def test_distributed_checkpoint_with_hostile_metadata_is_refused(tmp_path: Path) -> None:
    import os
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    folder = save_dcp(seeded_state(MLP), tmp_path / "dcp")
    (folder / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": Payload()}))
    with pytest.raises(UnsafeCheckpointError, match=r"posix\.system"):
        read_metadata(folder)


@pytest.mark.parametrize("header_len", [128, 384, 640])
def test_safetensors_whose_header_length_starts_like_a_pickle(
    tmp_path: Path, header_len: int
) -> None:
    """A header length of 384 is b'\\x80\\x01...': it must not be sniffed as a pickle."""
    import struct

    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    header += b" " * (header_len - len(header))
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", header_len) + header + bytes(4))
    assert read_metadata(path).format is Format.SAFETENSORS


def test_trainer_output_folder_picks_the_weights(tmp_path: Path) -> None:
    """A Hugging Face Trainer checkpoint folder: one weight file among training state."""
    import argparse

    folder = tmp_path / "checkpoint-500"
    folder.mkdir()
    state = seeded_state(MLP)
    torch.save(state, folder / "pytorch_model.bin")
    torch.save(argparse.Namespace(lr=0.1), folder / "training_args.bin")  # unsafe to read
    torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")
    torch.save({"last_epoch": 3}, folder / "scheduler.pt")
    torch.save({"python": 1}, folder / "rng_state.pth")
    (folder / "trainer_state.json").write_text("{}")
    meta = read_metadata(folder)
    assert meta.path == str(folder / "pytorch_model.bin") and set(meta.tensors) == set(state)
    # transformers' own preference when both formats are there.
    from safetensors.torch import save_file

    save_file(dict(state), folder / "model.safetensors")
    assert read_metadata(folder).path == str(folder / "model.safetensors")
    # Two unrelated weight files are still ambiguous.
    torch.save(state, folder / "other.pt")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").rename(folder / "weights.bin")
    with pytest.raises(CheckpointReadError, match="several checkpoints"):
        read_metadata(folder)


@pytest.mark.parametrize(
    "entry",
    [
        # a repeated name, compact and with spaces around the colon
        b'"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
        b'"w" :{"dtype":"F32","shape":[2],"data_offsets":[0,8]}',
        # a repeated field hidden behind a unicode escape, a space making up the count
        b'"w":{"dtype":"F32","dt\\u0079pe":"F16","shape" :[2],"data_offsets":[0,8]}',
        # a repeated field inside the metadata
        b'"__metadata__":{"a":"1","a":"2"},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}',
    ],
)
def test_safetensors_headers_repeating_a_key_are_refused(tmp_path: Path, entry: bytes) -> None:
    """The fast key count and the exact hook must agree: safetensors refuses these."""
    from ckptool.errors import CheckpointReadError

    header = b"{" + entry + b"}"
    path = tmp_path / "dup.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(CheckpointReadError, match="repeats the key"):
        read_metadata(path)


def test_a_header_with_json_text_in_its_metadata_reads(tmp_path: Path) -> None:
    """Escaped quotes (ckptool's own aliases metadata) take the exact path and pass."""
    from safetensors.torch import save_file

    tied = {"a": torch.ones(2), "b": torch.zeros(3)}
    save_file(tied, tmp_path / "t.safetensors", metadata={"note": json.dumps({"x": "y"})})
    meta = read_metadata(tmp_path / "t.safetensors")
    assert list(meta.tensors) == ["a", "b"] and json.loads(meta.metadata["note"]) == {"x": "y"}


@pytest.mark.parametrize(
    ("entries", "data_len", "message"),
    [
        # each passes every other check: the one named must catch it
        ({"w": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}}, 16, "shape"),
        ({"w": {"dtype": "F32", "shape": [2**64, 0], "data_offsets": [0, 0]}}, 0, "shape"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}}, 8, "data_offsets"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, 16, "before tensor"),
        ({}, 8, "after the last tensor"),
    ],
    ids=["negative-dims", "dim-past-int64", "three-offsets", "leading-gap", "no-tensors"],
)
def test_safetensors_entries_checked_in_bulk_are_refused(
    tmp_path: Path, entries: dict, data_len: int, message: str
) -> None:
    """The column-by-column check of a header refuses what the entry-by-entry one does."""
    path = _raw_safetensors(tmp_path / "bad.safetensors", entries, bytes(data_len))
    with pytest.raises(CheckpointReadError, match=message):
        read_metadata(path)


@pytest.mark.parametrize(
    ("spans", "valid"),
    [
        ([(8, 16), (0, 8), (16, 16)], True),  # out of data order, an empty tensor at the end
        ([(0, 8), (16, 24), (8, 16)], True),
        ([(0, 8), (8, 16), (4, 12)], False),  # overlaps once sorted
    ],
    ids=["reversed", "shuffled", "overlap"],
)
def test_safetensors_ranges_tile_in_any_header_order(
    tmp_path: Path, spans: list[tuple[int, int]], valid: bool
) -> None:
    """Writers list tensors in data order (the fast check); any other order is sorted."""
    header = {
        f"t{i}": {"dtype": "F32", "shape": [(end - begin) // 4], "data_offsets": [begin, end]}
        for i, (begin, end) in enumerate(spans)
    }
    data_len = max(end for _, end in spans)
    path = _raw_safetensors(tmp_path / "order.safetensors", header, bytes(data_len))
    if valid:
        meta = read_metadata(path)
        starts = {name: tensor.file_offset for name, tensor in meta.tensors.items()}
        data_start = min(starts.values())  # the tensor at byte 0 of the data section
        assert [starts[f"t{i}"] - data_start for i in range(3)] == [b for b, _ in spans]
        # ...by the bulk check: the entry-by-entry one (6x slower) is only for naming faults
        bulk = safetensors_header._entries_in_bulk(
            str(path), header, data_start=0, data_len=data_len
        )
        assert bulk is not None
    else:
        with pytest.raises(CheckpointReadError, match="overlaps"):
            read_metadata(path)


def test_safetensors_names_come_in_natural_order(tmp_path: Path) -> None:
    """Digit runs compare as numbers, component by component; text after a number."""
    names = ["layer10.0", "layer2.1", "layer2.weight", "a.b", "a1.b", "a.10", "a.9", "ab",
             "a7", "1a", "a", "x007", "x7b", "x10", "layer2.10", "layer2.9.w"]  # fmt: skip
    path = _one_float_each(tmp_path / "n.safetensors", names)
    assert list(read_metadata(path).tensors) == [
        "1a", "a", "a.9", "a.10", "a.b", "a1.b", "a7", "ab", "layer2.1", "layer2.9.w",
        "layer2.10", "layer2.weight", "layer10.0", "x007", "x7b", "x10",
    ]  # fmt: skip
    # A shard's tensors stay in header order: its index orders them.
    unsorted = safetensors_header.read_safetensors_meta(str(path), natural_order=False)
    assert list(unsorted.tensors) == names


def test_a_second_header_reuses_the_first_ones_natural_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Within natural_keys_kept (diff's two reads), a name keyed once is not keyed again,
    and the order is the one each file gets alone; the keys go when it ends."""
    from ckptool.compare import diff_checkpoint
    from ckptool.formats import natural_keys_kept

    first = _one_float_each(tmp_path / "a.safetensors", ["b.10", "b.9", "a.2", "c"])
    second = _one_float_each(tmp_path / "b.safetensors", ["b.9", "x.1", "b.10", "a.2", "b.100"])
    alone = [list(read_metadata(path).tensors) for path in (first, second)]
    keyed: list[str] = []
    natural_key = safetensors_header.natural_key
    monkeypatch.setattr(
        safetensors_header, "natural_key", lambda name: keyed.append(name) or natural_key(name)
    )
    with natural_keys_kept():
        both = [list(read_metadata(path).tensors) for path in (first, second)]
    assert both == alone == [["a.2", "b.9", "b.10", "c"], ["a.2", "b.9", "b.10", "b.100", "x.1"]]
    assert sorted(keyed) == ["a.2", "b.10", "b.100", "b.9", "c", "x.1"]  # each once
    keyed.clear()
    read_metadata(first)
    assert sorted(keyed) == ["a.2", "b.10", "b.9", "c"]  # not kept after it
    keyed.clear()
    diff_checkpoint(first, second)  # its two reads share the keys
    assert sorted(keyed) == ["a.2", "b.10", "b.100", "b.9", "c", "x.1"]


def test_kept_natural_keys_belong_to_one_thread(tmp_path: Path) -> None:
    """Another thread's reads neither use nor end the keys a diff keeps."""
    import threading

    from ckptool.formats import natural_keys_kept

    path = _one_float_each(tmp_path / "a.safetensors", ["b.10", "b.9"])
    seen: list[object] = []
    with natural_keys_kept():
        read_metadata(path)
        worker = threading.Thread(target=lambda: seen.append(safetensors_header._kept.keys))
        worker.start()
        worker.join()
        assert safetensors_header._kept.keys == {
            "b.10": safetensors_header.natural_key("b.10"),
            "b.9": safetensors_header.natural_key("b.9"),
        }
    assert seen == [None] and safetensors_header._kept.keys is None


def test_a_read_leaves_the_garbage_collector_as_it_found_it(
    tmp_path: Path, write_checkpoint: WriteCheckpoint
) -> None:
    """read_metadata pauses the collector (a header makes a million acyclic objects);
    it is back on after a read, a failed read too, and stays off if it was off."""
    import gc

    good = write_checkpoint({"w": torch.zeros(2)}, "good.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    assert gc.isenabled()
    read_metadata(good)
    assert gc.isenabled()
    with pytest.raises(CheckpointReadError):
        read_metadata(bad)
    assert gc.isenabled()
    gc.disable()
    try:
        read_metadata(good)
        assert not gc.isenabled()
    finally:
        gc.enable()


@pytest.mark.parametrize("shape", [(), (7,), (2, 3, 4), (3, 1, 2), (0, 3), (3, 0), (1, 1)])
def test_dense_strides_are_torchs(shape: tuple[int, ...]) -> None:
    """A tensor with these strides is counted as dense without looking at it further,
    and the .pt writer writes them."""
    assert meta_module.dense_strides(shape) == torch.empty(shape).stride()
