"""adapt, convert, merge through the API and the CLI: real files, strict loads, bit-exact."""

from __future__ import annotations

import hashlib
import json
import os
import pickletools
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import MLP, ConvBN, Tied, TiedLM, WriteCheckpoint, seeded_state, wrap
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import ckptool
from ckptool import IncompatibleError, UsageError
from ckptool.formats import pickle_scan
from ckptool.keys import Transforms
from ckptool.surgery import adapt, convert, merge

RESNET = ("--model", "torchvision:resnet18", "--num-classes", "5")


@pytest.fixture
def dataparallel_resnet18(write_checkpoint: WriteCheckpoint) -> Path:
    torch.manual_seed(0)
    state = wrap(torchvision.models.resnet18(weights=None).state_dict(), "module.")
    return write_checkpoint({"state_dict": state, "epoch": 90}, "resnet18_dp.pth")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_classic_adapt_loads_strictly_and_keeps_backbone_bits(
    run_cli, dataparallel_resnet18: Path, tmp_path: Path, suffix: str
) -> None:
    out = tmp_path / f"adapted{suffix}"
    result = run_cli(
        "adapt", dataparallel_resnet18, *RESNET, "--strip", "module.", "--drop", "fc.", "-o", out
    )
    assert result.exit_code == 0, result.stderr
    assert "filled         2  fc.{weight,bias}" in result.stdout
    # 2,565 of 11.2M values filled: 99.98% from the file, not "100.0%"
    assert "from ckpt   >99.9% of the model's 11.2M trainable values" in result.stdout
    model = torchvision.models.resnet18(weights=None, num_classes=5)
    state = ckptool.load_state_dict(out)
    model.load_state_dict(state, strict=True)
    source = torch.load(dataparallel_resnet18, weights_only=True)["state_dict"]
    backbone = {
        k.removeprefix("module."): v for k, v in source.items() if not k.startswith("module.fc.")
    }
    assert all(torch.equal(state[k], v) for k, v in backbone.items()) and len(backbone) == 120
    assert state["fc.weight"].shape == (5, 512) and state["fc.bias"].shape == (5,)
    assert (out.stat().st_mode & 0o777) == 0o666 & ~_umask()


def test_adapt_says_it_leaves_out_values_that_are_not_tensors(
    write_checkpoint: WriteCheckpoint, tmp_path: Path
) -> None:
    state = torchvision.models.resnet18(weights=None).state_dict() | {"step": 5}
    source = write_checkpoint(state, "r18_step.pt")
    log = adapt(source, model="torchvision:resnet18", out=str(tmp_path / "out.safetensors"))
    assert "left out 1 value(s) beside the tensors that are not tensors (step: 5)" in log.notes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_adapt_records_provenance_that_inspect_shows(
    run_cli, dataparallel_resnet18: Path, tmp_path: Path
) -> None:
    out = tmp_path / "a.safetensors"
    adapt(
        dataparallel_resnet18,
        model="torchvision:resnet18",
        num_classes=5,
        transforms=Transforms(strip=("module.",), drop=("fc.",)),
        out=str(out),
    )
    metadata = ckptool.read_metadata(out).metadata
    assert (
        metadata["ckptool.source_sha256"]
        == hashlib.sha256(dataparallel_resnet18.read_bytes()).hexdigest()
    )
    assert json.loads(metadata["ckptool.transforms"]) == ["--strip module.", "--drop fc."]
    assert (
        metadata["ckptool.model"] == "torchvision:resnet18"
        and metadata["ckptool.command"] == "adapt"
    )
    assert "metadata    ckptool.source = resnet18_dp.pth" in run_cli("inspect", out).stdout


def test_filled_tensors_use_the_models_own_init(
    write_checkpoint: WriteCheckpoint, tmp_path: Path
) -> None:
    """torchvision's ViT zero-initialises its head in __init__; reset_parameters() would not."""
    model = torchvision.models.vit_b_16(weights=None)
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith("heads.")}
    source = write_checkpoint(backbone, "vit.safetensors")
    out = tmp_path / "vit_adapted.safetensors"
    log = adapt(source, model="torchvision:vit_b_16", out=str(out))
    assert log.filled == ("heads.head.weight", "heads.head.bias")
    state = ckptool.load_state_dict(out)
    assert state["heads.head.weight"].shape == (1000, 768) and not state["heads.head.weight"].any()


def test_large_models_fill_only_the_owning_modules(
    write_checkpoint: WriteCheckpoint, tmp_path: Path, monkeypatch
) -> None:
    import ckptool.surgery as surgery

    monkeypatch.setattr(surgery, "FULL_BUILD_LIMIT", 0)  # treat resnet18 as "too big to build"
    source = write_checkpoint(
        wrap(torchvision.models.resnet18(weights=None).state_dict(), "module."), "r.pt"
    )
    log = adapt(
        source,
        model="torchvision:resnet18",
        num_classes=3,
        auto=True,
        on_mismatch="drop",
        out=str(tmp_path / "r3.pt"),
    )
    assert log.init_method == "reset_parameters() of fc (rest of the model on meta)"
    state = torch.load(tmp_path / "r3.pt", weights_only=True)
    torchvision.models.resnet18(weights=None, num_classes=3).load_state_dict(state)
    assert state["fc.weight"].abs().sum() > 0


def test_filling_a_meta_built_model_does_not_import_the_reference_kernels(
    tmp_path: Path,
) -> None:
    """to_empty on meta tensors imports sympy and torch's meta registrations (0.3 s of
    every adapt of a large model); the filled head must come without them. (A model of
    plain torch: importing torchvision imports sympy by itself.)"""
    (tmp_path / "net.py").write_text(
        "from torch import nn\n"
        "class Net(nn.Sequential):\n"
        "    def __init__(self, classes=10):\n"
        "        super().__init__(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, classes))\n"
    )
    script = f"""
import sys, torch
sys.path.insert(0, {str(tmp_path)!r})
import net, ckptool.surgery as surgery
torch.save(net.Net().state_dict(), "net.pt")
surgery.FULL_BUILD_LIMIT = 0
log = surgery.adapt("net.pt", model="net.py:Net", model_args=["classes=3"],
                    on_mismatch="drop", out="net3.safetensors")
print(log.init_method)
print("sympy" in sys.modules)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == [
        "reset_parameters() of 2 (rest of the model on meta)",
        "False",
    ]
    filled = ckptool.load_state_dict(tmp_path / "net3.safetensors")["2.weight"]
    assert filled.shape == (3, 16) and filled.abs().sum() > 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ((), "no checkpoint key matches the model.*add --strip module. --drop fc. \\(or --auto\\)"),
        (  # the given --drop named the keys before the strip: adding would keep it
            ("--drop", "module.fc."),
            "no checkpoint key matches the model.*use --strip module. --drop fc. \\(or --auto\\)",
        ),
        (
            ("--strip", "module."),
            "shape mismatch: fc.weight \\[1000, 512\\] -> \\[5, 512\\].*add --drop fc.",
        ),
        (
            ("--strip", "module.", "--on-mismatch", "drop", "--strict"),
            "--strict: shape mismatch fc.\\{weight,bias\\}; add --drop fc.",
        ),
    ],
    ids=["nothing-matches", "drop-before-strip", "shape-mismatch", "strict"],
)
def test_adapt_refusals_exit_1_and_write_nothing(
    run_cli, dataparallel_resnet18: Path, tmp_path: Path, flags: tuple[str, ...], message: str
) -> None:
    import re

    out = tmp_path / "never.safetensors"
    result = run_cli("adapt", dataparallel_resnet18, *RESNET, *flags, "-o", out)
    assert result.exit_code == 1 and re.search(message, result.stderr), result.stderr
    assert list(tmp_path.iterdir()) == [dataparallel_resnet18]


def test_a_drop_named_before_the_strip_is_moved_by_the_printed_fix(
    run_cli, dataparallel_resnet18: Path, tmp_path: Path
) -> None:
    """A user drops the old head by the names inspect shows (module.fc.); --drop applies
    after --strip, so the printed fix and --auto move it to fc. (before, diff said the
    file was not for this model)."""
    shown = run_cli("diff", dataparallel_resnet18, *RESNET, "--drop", "module.fc.")
    assert "--drop module.fc. names keys before that change: --drop fc. after it" in shown.stdout
    fix = next(x for x in shown.stdout.splitlines() if x.startswith("  fix: "))
    assert fix.endswith(f"{' '.join(RESNET)} --strip module. --drop fc. -o OUT"), fix
    for extra in (("--strip", "module.", "--drop", "fc."), ("--drop", "module.fc.", "--auto")):
        out = tmp_path / f"out{len(extra)}.safetensors"
        done = run_cli("adapt", dataparallel_resnet18, *RESNET, *extra, "-o", out)
        assert done.exit_code == 0, done.stderr
        state = ckptool.load_state_dict(out)
        torchvision.models.resnet18(weights=None, num_classes=5).load_state_dict(state)
        source = torch.load(dataparallel_resnet18, weights_only=True)["state_dict"]
        assert torch.equal(state["conv1.weight"], source["module.conv1.weight"])


def test_values_the_given_flags_discard_are_not_called_another_model(
    run_cli, dataparallel_resnet18: Path, tmp_path: Path
) -> None:
    """--reinit layer4. discards three quarters of ResNet-18's values: diff said "this
    checkpoint is not for this model"; it is, the user's own flags did it. diff and
    adapt --auto say so and give the whole fix with --allow-mostly-init, which runs."""
    import re

    given = ("--reinit", "layer4.", "--drop", "module.fc.")
    shown = run_cli("diff", dataparallel_resnet18, *RESNET, *given)
    assert shown.exit_code == 1 and "not for this model" not in shown.stdout, shown.stdout
    assert "as the given --drop module.fc. --reinit layer4. discard the rest" in shown.stdout
    refused = run_cli(
        "adapt", dataparallel_resnet18, *RESNET, *given, "--auto", "-o", tmp_path / "x.pt"
    )
    assert refused.exit_code == 1, refused.output
    found = re.search(r"pass the whole fix instead: (.*)$", refused.stderr.strip())
    assert found and "--strip module. --drop fc. --reinit layer4." in found[1], refused.stderr
    out = tmp_path / "mostly_init.safetensors"
    done = run_cli("adapt", dataparallel_resnet18, *RESNET, *found[1].split(), "-o", out)
    assert done.exit_code == 0, done.output
    source = torch.load(dataparallel_resnet18, weights_only=True)["state_dict"]
    assert torch.equal(ckptool.load_state_dict(out)["conv1.weight"], source["module.conv1.weight"])
    # The same by --drop, named before the fix's --strip module. (moved with the keys).
    dropped = ("--drop", "module.layer4.", "--drop", "module.fc.")
    by_drop = run_cli("diff", dataparallel_resnet18, *RESNET, *dropped)
    assert "as the given --drop module.layer4. --drop module.fc. discard" in by_drop.stdout
    # A ResNet-18 file for a ResNet-50 keeps 25% whatever the flags: --reinit fc. (8%)
    # does not explain it, so that is still "not for this model".
    other = run_cli(
        "diff", dataparallel_resnet18, "--model", "torchvision:resnet50", "--reinit", "fc."
    )
    assert "this checkpoint is not for this model" in other.stdout, other.stdout


def test_adapt_auto_and_dry_run(run_cli, dataparallel_resnet18: Path, tmp_path: Path) -> None:
    result = run_cli(
        "adapt",
        dataparallel_resnet18,
        *RESNET,
        "--auto",
        "--on-mismatch",
        "drop",
        "--dry-run",
        "--json",
    )
    doc = json.loads(result.stdout)
    assert result.exit_code == 0 and doc["dry_run"] and doc["files"] == []
    # --auto applies the whole fix diff prints: the prefix and the head's --drop.
    assert doc["transforms"] == ["--strip module.", "--drop fc."] and len(doc["renamed"]) == 120
    assert set(doc["dropped"]) == {"module.fc.weight", "module.fc.bias"}
    assert list(tmp_path.iterdir()) == [dataparallel_resnet18]


def test_adapt_dtype_casts_floats_only(dataparallel_resnet18: Path, tmp_path: Path) -> None:
    out = tmp_path / "half.safetensors"
    adapt(
        dataparallel_resnet18,
        model="torchvision:resnet18",
        num_classes=5,
        auto=True,
        on_mismatch="drop",
        dtype="bfloat16",
        out=str(out),
    )
    tensors = ckptool.read_metadata(out).tensors
    assert tensors["conv1.weight"].dtype == "bfloat16" and tensors["fc.weight"].dtype == "bfloat16"
    assert tensors["bn1.num_batches_tracked"].dtype == "int64"


# --- output safety -------------------------------------------------------------------


def test_existing_output_needs_force_and_input_is_never_the_output(
    run_cli, write_checkpoint: WriteCheckpoint, tmp_path: Path
) -> None:
    source = write_checkpoint(seeded_state(MLP), "m.pt")
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"precious")
    result = run_cli("convert", source, "-o", out)
    assert result.exit_code == 5 and "exists; add --force" in result.stderr
    assert out.read_bytes() == b"precious"
    before = source.read_bytes()
    for flags in ((), ("--force",)):
        same = run_cli("convert", source, "-o", source, "--format", "pt", *flags)
        assert same.exit_code == 5 and "same file as the input" in same.stderr
    assert source.read_bytes() == before
    assert run_cli("convert", source, "-o", out, "--force").exit_code == 0
    assert set(ckptool.read_metadata(out).tensors) == set(seeded_state(MLP))


def test_missing_directory_and_unknown_suffix(
    run_cli, write_checkpoint: WriteCheckpoint, tmp_path: Path
) -> None:
    source = write_checkpoint(seeded_state(MLP), "m.pt")
    result = run_cli("convert", source, "-o", tmp_path / "nope" / "x.safetensors")
    assert result.exit_code == 5 and "does not exist" in result.stderr
    result = run_cli("convert", source, "-o", tmp_path / "x.weights")
    assert result.exit_code == 2 and "add --format safetensors or --format pt" in result.stderr


@pytest.mark.parametrize(
    ("failing", "errno_name", "message"),
    [("os.pwrite", "ENOSPC", "no space left"), ("tempfile.mkstemp", "EACCES", "no permission")],
    ids=["disk-full", "no-permission"],
)
def test_disk_full_and_permission_leave_nothing(
    run_cli,
    write_checkpoint: WriteCheckpoint,
    tmp_path: Path,
    monkeypatch,
    failing: str,
    errno_name: str,
    message: str,
) -> None:
    import errno

    source = write_checkpoint(seeded_state(ConvBN), "m.pt")
    module_name, attr = failing.rsplit(".", 1)
    module = sys.modules[module_name] if module_name in sys.modules else __import__(module_name)

    def fail(*args, **kwargs):
        raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)))

    monkeypatch.setattr(module, attr, fail)
    result = run_cli("convert", source, "-o", tmp_path / "out.safetensors")
    monkeypatch.undo()
    assert (
        result.exit_code == 5 and message in result.stderr and len(result.stderr.splitlines()) == 1
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


@pytest.mark.parametrize("sharded", [False, True], ids=["single-file", "sharded"])
def test_killed_convert_never_leaves_a_torn_file(
    tmp_path: Path, write_checkpoint: WriteCheckpoint, sharded: bool
) -> None:
    """kill -9 a large convert at several moments: OUT is the previous output or the new one."""
    import random
    import signal
    import time

    state = {f"w{i}": torch.randn(256, 1024) for i in range(64)}  # 64 MiB
    source = tmp_path / "big.pt"
    torch.save(state, source)
    out = tmp_path / "big.safetensors"
    shard_flags = ["--shard-size", "8MB"] if sharded else []
    entry = tmp_path / "big.safetensors.index.json" if sharded else out
    command = [
        sys.executable,
        "-m",
        "ckptool",
        "convert",
        str(source),
        "-o",
        str(out),
        "--force",
        *shard_flags,
    ]
    small = write_checkpoint({"w0": torch.zeros(2)}, "small.pt")  # the previous output
    shard_size = 8_000_000 if sharded else None
    ckptool.convert(small, str(out), shard_size=shard_size, force=True)
    rng = random.Random(0)
    for _ in range(4 if sharded else 6):
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 1.5))
        child.send_signal(signal.SIGKILL)
        child.wait()
        loaded = ckptool.load_state_dict(entry)  # a complete, valid checkpoint either way
        assert set(loaded) in ({"w0"}, set(state))
        if set(loaded) == set(state):
            assert all(torch.equal(loaded[k], v) for k, v in state.items())
            ckptool.convert(small, str(out), shard_size=shard_size, force=True)


def test_streaming_convert_does_not_import_torch(
    write_checkpoint: WriteCheckpoint, tmp_path: Path
) -> None:
    source = write_checkpoint({"state_dict": seeded_state(ConvBN)}, "m.pt")
    code = (
        "import sys; from ckptool.surgery import convert\n"
        f"convert({str(source)!r}, {str(tmp_path / 'm.safetensors')!r})\n"
        f"convert({str(tmp_path / 'm.safetensors')!r}, {str(tmp_path / 'back.pt')!r})\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    back = torch.load(tmp_path / "back.pt", weights_only=True, mmap=True)
    assert all(torch.equal(back[k], v) for k, v in seeded_state(ConvBN).items())


# --- convert round trips -------------------------------------------------------------

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
]


@st.composite
def state_dicts(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for i in range(draw(st.integers(1, 6))):
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        raw = torch.randint(
            0, 255, (max(1, int(torch.tensor(shape).prod())) * 8,), dtype=torch.uint8
        )
        count = int(torch.tensor(shape).prod()) if shape else 1
        tensor = (
            raw[: count * dtype.itemsize].view(dtype).reshape(shape)
            if count
            else torch.empty(shape, dtype=dtype)
        )
        state[f"layer{i}.weight"] = tensor
    names = list(state)
    kind = draw(st.sampled_from(["plain", "tied", "view", "transposed"]))
    if kind == "tied":
        state["tied.weight"] = state[names[0]]
    elif kind == "view" and state[names[0]].dim() >= 1 and state[names[0]].shape[0] > 1:
        state["view.row"] = state[names[0]][1]
    elif kind == "transposed" and state[names[0]].dim() == 2:
        state["view.t"] = state[names[0]].t()
    return state


def assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name, tensor in a.items():
        other = b[name]
        assert other.dtype == tensor.dtype and other.shape == tensor.shape, name
        assert torch.equal(_bits(tensor), _bits(other)), name


# dtypes with a typed storage class, which is what the legacy format can record.
LEGACY_DTYPES = frozenset(
    {torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
     torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128}
)  # fmt: skip


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(state=state_dicts(), legacy=st.booleans())
def test_pt_safetensors_pt_round_trip_is_bit_exact(
    tmp_path_factory, state: dict[str, torch.Tensor], legacy: bool
) -> None:
    # Legacy torch.save writes dtypes without a typed storage (float8, uint16...) that
    # torch.load itself cannot read back: there is no reference to compare with.
    assume(not legacy or all(t.dtype in LEGACY_DTYPES for t in state.values()))
    folder = tmp_path_factory.mktemp("rt")
    source = folder / "in.pt"
    torch.save(state, source, _use_new_zipfile_serialization=not legacy)
    convert(source, str(folder / "mid.safetensors"))
    convert(str(folder / "mid.safetensors"), str(folder / "out.pt"))
    back = torch.load(folder / "out.pt", weights_only=True)
    assert_bit_equal(state, back)
    if "tied.weight" in state:  # stored once, restored as tied
        assert back["tied.weight"].data_ptr() == back[next(iter(state))].data_ptr()


def test_written_pt_fetches_each_global_and_constant_once_stored(tmp_path: Path) -> None:
    """Each global and constant string stored once and fetched after, so that readers
    (ckptool's scan, torch's unpickler) meet every tensor after the first of its kind in
    the same opcodes."""
    state = {f"layer{i}.weight": torch.full((3, 2), float(i)) for i in range(1100)}
    # Two int64 tensors, written after the layers (names in natural order) and so past
    # memo index 255: the second fetches its storage type by a 4-byte index.
    state |= {"step.a": torch.tensor(5), "step.b": torch.tensor(7)}
    state |= {"conv.weight": torch.zeros(2, 1, 3, 3)}
    save_file(state, tmp_path / "in.safetensors")
    convert(tmp_path / "in.safetensors", str(tmp_path / "out.pt"))
    with zipfile.ZipFile(tmp_path / "out.pt") as archive:
        data = archive.read("archive/data.pkl")
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(data)]
    globals_ = [arg for name, arg in ops if name == "GLOBAL"]
    assert len(globals_) == len(set(globals_)) == 4  # OrderedDict, rebuild, two storages
    assert [arg for name, arg in ops if name == "BINUNICODE"].count("cpu") == 1
    assert [name for name, _ in ops].count("SETITEMS") == 2  # dict items 1000 at a time
    # Applied whole but the first tensor and the first int64 one (new globals).
    assert len(list(pickle_scan._BARE_TENSOR_RECORD.finditer(data))) == len(state) - 2
    back = torch.load(tmp_path / "out.pt", weights_only=True)
    assert all(torch.equal(back[name], tensor) for name, tensor in state.items())


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(state=state_dicts())
def test_sharded_to_single_round_trip(tmp_path_factory, state: dict[str, torch.Tensor]) -> None:
    folder = tmp_path_factory.mktemp("sh")
    torch.save(state, folder / "in.pt")
    log = convert(folder / "in.pt", str(folder / "model.safetensors"), shard_size=40)
    index = folder / "model.safetensors.index.json"
    assert log.files[-1] == str(index)  # the index is written last
    convert(str(index), str(folder / "single.pt"))
    assert_bit_equal(state, torch.load(folder / "single.pt", weights_only=True))


def test_tied_weights_convert(run_cli, write_checkpoint: WriteCheckpoint, tmp_path: Path) -> None:
    source = write_checkpoint(Tied().state_dict(), "tied.pt")
    result = run_cli("convert", source, "-o", tmp_path / "tied.safetensors", "--json")
    assert json.loads(result.stdout)["aliases"] == {"out.weight": "embed.weight"}
    assert result.exit_code == 0
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "tied.safetensors")) == {"embed.weight"}  # stored once
    state = ckptool.load_state_dict(tmp_path / "tied.safetensors")
    assert state["out.weight"] is state["embed.weight"]
    model = Tied()
    model.load_state_dict(state, strict=True)


def test_convert_dtype_and_zip64_archive_loads_in_torch(tmp_path: Path) -> None:
    from ckptool.formats.torch_zip_writer import write_torch_zip
    from ckptool.formats.write import OutTensor, Payload

    state = seeded_state(ConvBN)
    torch.save(state, tmp_path / "in.pt")
    log = convert(tmp_path / "in.pt", str(tmp_path / "half.pt"), dtype="float16")
    half = torch.load(tmp_path / "half.pt", weights_only=True)
    assert (
        half["conv.weight"].dtype == torch.float16
        and half["bn.num_batches_tracked"].dtype == torch.int64
    )
    assert "conv.weight" in log.cast and "bn.num_batches_tracked" not in log.cast
    plan = [OutTensor("w", "float32", (2, 2), torch.arange(4.0).numpy().tobytes())]
    with open(tmp_path / "z64.pt", "w+b") as f:
        write_torch_zip(f, plan, Payload(), force_zip64=True)
    for mmap in (False, True):
        assert torch.equal(
            torch.load(tmp_path / "z64.pt", weights_only=True, mmap=mmap)["w"],
            torch.arange(4.0).reshape(2, 2),
        )


# --- merge ---------------------------------------------------------------------------


def test_merge_take_puts_trained_head_on_backbone(
    run_cli, write_checkpoint: WriteCheckpoint, tmp_path: Path
) -> None:
    backbone = seeded_state(MLP)
    trained = {k: v + 1 for k, v in backbone.items()}
    a = write_checkpoint(backbone, "a.safetensors")
    b = write_checkpoint(trained, "b.pt")
    out = tmp_path / "merged.safetensors"
    result = run_cli("merge", a, b, "--take", "head.=1", "-o", out)
    assert result.exit_code == 0, result.stderr
    merged = ckptool.load_state_dict(out)
    assert torch.equal(merged["body.weight"], backbone["body.weight"])
    assert torch.equal(merged["head.weight"], trained["head.weight"])
    assert list(merged) == list(ckptool.read_metadata(a).tensors)  # the base's order


def test_merge_average(write_checkpoint: WriteCheckpoint, tmp_path: Path) -> None:
    states = [seeded_state(ConvBN)]
    states += [
        {k: v + i if v.is_floating_point() else v for k, v in states[0].items()} for i in (1, 2)
    ]
    paths = [write_checkpoint(s, f"s{i}.pt") for i, s in enumerate(states)]
    log = merge([str(p) for p in paths], str(tmp_path / "soup.safetensors"), average=True)
    soup = ckptool.load_state_dict(tmp_path / "soup.safetensors")
    assert torch.allclose(soup["conv.weight"], states[0]["conv.weight"] + 1)
    assert torch.equal(soup["bn.num_batches_tracked"], states[0]["bn.num_batches_tracked"])
    assert "conv.weight" in log.averaged


def test_merge_take_of_one_name_of_a_tied_tensor_takes_the_others(
    run_cli, write_checkpoint: WriteCheckpoint, tmp_path: Path
) -> None:
    """--take emb.=1 took emb.weight from input 1 and lm_head.weight, the same tensor,
    from the base: loaded into the tied model, the base's (the last name) won."""
    torch.manual_seed(0)
    base = write_checkpoint(TiedLM().state_dict(), "base.pt")
    other_state = TiedLM().state_dict()
    other = write_checkpoint(other_state, "other.pt")
    out = tmp_path / "merged.pt"
    result = run_cli("merge", base, other, "--take", "emb.=1", "-o", out)
    assert result.exit_code == 0, result.stderr
    assert "lm_head.weight taken from input 1 too: one tensor with emb.weight (tied)" in (
        result.stdout
    )
    model = TiedLM()
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    assert torch.equal(model.lm_head.weight, other_state["emb.weight"])
    untied = write_checkpoint(TiedLM(tied=False).state_dict(), "untied.pt")
    refused = run_cli("merge", base, untied, "--take", "emb.=1", "-o", tmp_path / "no.pt")
    assert refused.exit_code == 2 and "are one tensor in the base" in refused.stderr
    assert "which does not hold them as one tensor" in refused.stderr
    assert not (tmp_path / "no.pt").exists()
    split = run_cli(
        "merge",
        base,
        other,
        other,
        "--take",
        "emb.=1",
        "--take",
        "lm_head.=2",
        "-o",
        out,
        "--force",
    )
    assert split.exit_code == 2 and "would come from inputs 1, 2" in split.stderr
    # A take that replaces emb.weight by other names leaves lm_head.weight alone: no split
    # (this crashed: min() of no inputs).
    renamed = write_checkpoint({"emb.other": torch.ones(3)}, "renamed.pt")
    replaced = run_cli("merge", base, renamed, "--take", "emb.=1", "-o", out, "--force")
    assert replaced.exit_code == 0, replaced.stderr
    kept = {"emb.other", "body.weight", "body.bias", "lm_head.weight"}
    assert set(torch.load(out, weights_only=True)) == kept


def test_merge_average_refuses_inputs_that_do_not_tie_what_the_base_ties(
    run_cli, write_checkpoint: WriteCheckpoint, tmp_path: Path
) -> None:
    """The base's emb and lm_head are one tensor; averaged with an input where they are
    two, their averages differed and a load kept whichever came last."""
    torch.manual_seed(0)
    base = write_checkpoint(TiedLM().state_dict(), "base.pt")
    tied = write_checkpoint(TiedLM().state_dict(), "tied.pt")
    untied = write_checkpoint(TiedLM(tied=False).state_dict(), "untied.pt")
    out = tmp_path / "soup.pt"
    assert run_cli("merge", base, tied, "--average", "-o", out).exit_code == 0
    soup = torch.load(out, weights_only=True)
    assert torch.equal(soup["emb.weight"], soup["lm_head.weight"])
    refused = run_cli("merge", base, untied, "--average", "-o", tmp_path / "no.pt")
    assert refused.exit_code == 1 and len(refused.stderr.splitlines()) == 1
    assert "emb.weight and lm_head.weight are one tensor in the base but not in input 1" in (
        refused.stderr
    )
    assert not (tmp_path / "no.pt").exists()


def test_merge_average_averages_complex_and_names_what_it_takes_from_the_base(
    run_cli, write_checkpoint: WriteCheckpoint, tmp_path: Path
) -> None:
    """Only float16..float64 were averaged: a complex tensor came from the base without
    a word, dropping the other inputs' values. float8 weights, the same in every input
    (a frozen FP8 base), are the base's, and listed so."""
    states = [
        {
            "w": torch.full((2,), v),
            "c": torch.full((2,), complex(v, -v), dtype=torch.complex64),
            "f8": torch.full((2,), 1.5).to(torch.float8_e4m3fn),
            "n": torch.tensor([int(v)]),
        }
        for v in (1.0, 3.0)
    ]
    paths = [write_checkpoint(s, f"s{i}.safetensors") for i, s in enumerate(states)]
    out = tmp_path / "soup.safetensors"
    result = run_cli("merge", *paths, "--average", "-o", out)
    assert result.exit_code == 0, result.stderr
    soup = ckptool.load_state_dict(out)
    assert torch.equal(soup["c"], torch.full((2,), 2 - 2j, dtype=torch.complex64))
    assert torch.equal(soup["f8"].view(torch.uint8), states[0]["f8"].view(torch.uint8))
    assert torch.equal(soup["w"], torch.full((2,), 2.0)) and torch.equal(soup["n"], states[0]["n"])
    assert "from input 0    2  f8, n" in result.stdout
    log = merge([str(p) for p in paths], str(tmp_path / "dry.pt"), average=True, dry_run=True)
    assert set(log.averaged) == {"w", "c"} and log.taken == {"f8": 0, "n": 0}


def test_merge_average_refuses_float8_weights_that_differ(
    run_cli, write_checkpoint: WriteCheckpoint, tmp_path: Path
) -> None:
    """float8 weights are codes times scales held elsewhere: averaging the codes is not
    averaging the weights (it was done, silently)."""
    paths = [
        write_checkpoint(
            {"w": torch.full((2,), v).to(torch.float8_e4m3fn), "s": torch.full((1,), v)},
            f"fp8_{i}.safetensors",
        )
        for i, v in enumerate((1.0, 3.0))
    ]
    out = tmp_path / "soup.safetensors"
    result = run_cli("merge", *paths, "--average", "-o", out)
    assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1
    assert "'w' (float8_e4m3fn) differs in input 1" in result.stderr
    assert "average only after dequantizing them with their scales" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)


def test_merge_average_refuses_a_complex_tensor_against_a_real_one(
    write_checkpoint: WriteCheckpoint, tmp_path: Path
) -> None:
    base = write_checkpoint({"c": torch.ones(2, dtype=torch.complex64)}, "base.safetensors")
    real = write_checkpoint({"c": torch.ones(2)}, "real.safetensors")
    with pytest.raises(
        IncompatibleError, match=r"'c' is float32 in input 1 .* complex64 in the base"
    ):
        merge([str(base), str(real)], str(tmp_path / "soup.pt"), average=True)
    assert not (tmp_path / "soup.pt").exists()


def test_merge_average_dry_run_averages_nothing(
    write_checkpoint: WriteCheckpoint, tmp_path: Path, monkeypatch
) -> None:
    """A dry run reports; the averaging happens tensor by tensor only while writing."""
    from ckptool import surgery

    paths = [write_checkpoint(seeded_state(ConvBN), f"s{i}.pt") for i in range(2)]

    def no_work(*args: object) -> None:
        raise AssertionError("averaged during a dry run")

    monkeypatch.setattr(surgery, "_averaged", no_work)
    log = merge([str(p) for p in paths], str(tmp_path / "soup.pt"), average=True, dry_run=True)
    assert log.dry_run and "conv.weight" in log.averaged
    assert not (tmp_path / "soup.pt").exists()


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("--average",), 1, "average needs identical keys and shapes"),
        (("--take", "head.=5"), 2, "inputs are numbered 0 \\(BASE\\) to 1"),
        (("--take", "nothere.=1"), 2, "has no keys under 'nothere.'"),
        (("--take", "head"), 2, "must be PREFIX=N"),
        ((), 2, "either --take PREFIX=N or --average"),
    ],
    ids=["average-mismatch", "index-range", "empty-prefix", "malformed", "no-mode"],
)
def test_merge_errors(
    run_cli, write_checkpoint: WriteCheckpoint, tmp_path: Path, args, code: int, message: str
) -> None:
    import re

    a = write_checkpoint(seeded_state(MLP), "a.pt")
    b = write_checkpoint(seeded_state(MLP, num_classes=7), "b.pt")
    result = run_cli("merge", a, b, *args, "-o", tmp_path / "m.safetensors")
    assert result.exit_code == code and re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (
            ("--take", "module.head.=1"),
            2,
            "'module.head.weight' is its 'head.weight'.*replacing nothing",
        ),
        (("--take", "head.=1"), 2, "has no keys under 'head.'"),
        (("--average",), 1, "average needs identical keys and shapes"),
    ],
    ids=["renamed-copies", "prefix-of-the-base", "average"],
)
def test_merge_of_inputs_named_differently_says_how_they_match(
    run_cli, write_checkpoint: WriteCheckpoint, tmp_path: Path, args, code: int, message: str
) -> None:
    """A DataParallel OTHER: taking its module.head. would add a second head beside the
    base's (a file no model loads strictly); every refusal names the prefix change."""
    import re

    a = write_checkpoint(seeded_state(MLP), "a.pt")
    b = write_checkpoint(wrap(seeded_state(MLP), "module."), "b.pt")
    result = run_cli("merge", a, b, *args, "-o", tmp_path / "m.safetensors")
    assert result.exit_code == code and re.search(message, result.stderr), result.stderr
    hint = "b.pt names its keys differently (4 match the base's after --strip module.)"
    assert hint in result.stderr and "ckptool adapt" in result.stderr, result.stderr
    assert not (tmp_path / "m.safetensors").exists()


def test_merge_take_adds_a_head_the_base_lacks(
    write_checkpoint: WriteCheckpoint, tmp_path: Path
) -> None:
    """Keys the base has under no name (a headless backbone) are added, not refused."""
    full = seeded_state(MLP)
    backbone = {k: v for k, v in full.items() if not k.startswith("head.")}
    paths = [write_checkpoint(backbone, "backbone.pt"), write_checkpoint(full, "full.pt")]
    log = merge([str(p) for p in paths], str(tmp_path / "m.safetensors"), take=[("head.", 1)])
    merged = ckptool.load_state_dict(tmp_path / "m.safetensors")
    assert sorted(merged) == sorted(full) and log.output
    assert torch.equal(merged["head.weight"], full["head.weight"])


def test_merge_take_judges_names_against_how_they_already_match(
    write_checkpoint: WriteCheckpoint, tmp_path: Path
) -> None:
    """OTHER names its keys as the base does (p.a, p.c); --strip p. would match only the
    base's stray 'b' (1 name against 2): p.b is a new key, not a renamed copy of 'b'."""
    base = {"p.a": torch.zeros(2), "p.c": torch.zeros(2), "b": torch.zeros(2)}
    other = {"p.a": torch.ones(2), "p.c": torch.ones(2), "p.b": torch.ones(2)}
    paths = [write_checkpoint(base, "base.pt"), write_checkpoint(other, "other.pt")]
    merge([str(p) for p in paths], str(tmp_path / "m.safetensors"), take=[("p.b", 1)])
    assert sorted(ckptool.load_state_dict(tmp_path / "m.safetensors")) == ["b", "p.a", "p.b", "p.c"]


def test_api_errors_are_typed(dataparallel_resnet18: Path, tmp_path: Path) -> None:
    with pytest.raises(IncompatibleError):
        adapt(
            dataparallel_resnet18,
            model="torchvision:resnet18",
            num_classes=5,
            out=str(tmp_path / "x.pt"),
        )
    with pytest.raises(UsageError, match="shard_size= writes safetensors"):
        convert(dataparallel_resnet18, str(tmp_path / "x.pt"), shard_size=10)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_save_state_dict_keeps_ties_views_and_refuses_overwrite(
    tmp_path: Path, suffix: str
) -> None:
    model = Tied()
    state = dict(model.state_dict())
    state["row"] = state["embed.weight"][2]  # a view: saved as its own tensor
    state["half"] = torch.arange(4.0, dtype=torch.bfloat16)
    path = tmp_path / f"s{suffix}"
    ckptool.save_state_dict(state, path)
    loaded = ckptool.load_state_dict(path)
    assert_bit_equal(state, loaded)
    assert loaded["out.weight"].data_ptr() == loaded["embed.weight"].data_ptr()
    with pytest.raises(ckptool.OutputError, match="exists; add force=True"):
        ckptool.save_state_dict(state, path)
    ckptool.save_state_dict({"x": torch.ones(1)}, path, force=True)
    assert set(ckptool.load_state_dict(path)) == {"x"}


def test_strict_refuses_a_missing_key_that_no_flag_names(
    write_checkpoint: WriteCheckpoint, tmp_path: Path
) -> None:
    """Only missing keys (no unexpected, no mismatch): --strict alone must still refuse."""
    state = seeded_state(MLP)
    del state["head.bias"]
    source = write_checkpoint(state, "m.safetensors")
    spec = f"{Path(__file__).parent / 'conftest.py'}:MLP"
    with pytest.raises(IncompatibleError, match=r"strict=True: missing head\.bias"):
        adapt(source, model=spec, strict=True, out=str(tmp_path / "out.safetensors"))
    assert not (tmp_path / "out.safetensors").exists()
    # Named by --reinit, the same key is allowed and filled from the model's init.
    transforms = Transforms(reinit=("head.bias",))
    adapt(source, model=spec, strict=True, transforms=transforms, out=str(tmp_path / "ok.pt"))
    assert set(torch.load(tmp_path / "ok.pt", weights_only=True)) == set(seeded_state(MLP))


def test_adapt_refuses_to_write_a_mostly_initialised_model(
    run_cli, write_checkpoint: WriteCheckpoint, tmp_path: Path
) -> None:
    """The body (144 values) kept, a 300-class head (5,100) filled: 3% from the file."""
    source = write_checkpoint(seeded_state(MLP), "mlp.safetensors")
    spec = f"{Path(__file__).parent / 'conftest.py'}:MLP"
    out = tmp_path / "out.safetensors"
    flags = ("--model", spec, "--num-classes", "300", "--drop", "head.", "-o", out)
    refused = run_cli("adapt", source, *flags)
    assert (
        refused.exit_code == 1
        and "only 144 of the model's 5,244 trainable values (3%)" in refused.stderr
    )
    assert "--allow-mostly-init" in refused.stderr and not out.exists()
    allowed = run_cli("adapt", source, *flags, "--allow-mostly-init", "--json")
    assert allowed.exit_code == 0, allowed.stderr
    document = json.loads(allowed.stdout)
    assert (document["from_checkpoint"], document["model_numel"]) == (144, 5244)
    kept = run_cli("adapt", source, "--model", spec, "-o", tmp_path / "same.safetensors")
    assert kept.exit_code == 0 and "100.0% of the model's" in kept.stdout


def test_api_takes_a_live_model(write_checkpoint: WriteCheckpoint, tmp_path: Path) -> None:
    """diff and adapt accept the user's nn.Module wherever they accept a spec."""
    state = wrap(seeded_state(MLP), "module.")
    source = write_checkpoint(state, "dp.pt")
    model = MLP(num_classes=5)
    report = ckptool.diff(source, model=model)
    assert not report.compatible and report.keys.fix is not None
    assert report.target_label == "MLP (a live nn.Module)"
    assert report.keys.fix.transforms.flags() == ["--strip module.", "--drop head."]
    fresh_head = model.head.weight.detach().clone()
    out = tmp_path / "out.safetensors"
    adapt(
        source,
        model=model,
        transforms=Transforms(strip=("module.",), drop=("head.",)),
        out=str(out),
    )
    written = ckptool.load_state_dict(out)
    assert torch.equal(written["body.weight"], state["module.body.weight"])
    assert torch.equal(written["head.weight"], fresh_head)  # the live model's own values
    with pytest.raises(UsageError, match="replace_head"):
        ckptool.diff(source, model=model, num_classes=3)


def test_load_into_loads_in_place_or_raises_with_the_diff(
    write_checkpoint: WriteCheckpoint,
) -> None:
    state = wrap(seeded_state(MLP), "module.")
    source = write_checkpoint(state, "dp.pt")
    model = MLP(num_classes=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ckptool.IncompatibleCheckpointError,
        match=r"fix: load_into\(\.\.\., strip=\['module\.'\], drop=\['head\.'\]\)",
    ) as caught:
        ckptool.load_into(model, source)
    assert caught.value.diff.shape_mismatch == () and len(caught.value.diff.unexpected) == 4
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched
    log = ckptool.load_into(model, source, strip=["module."], drop=["head."])
    assert torch.equal(model.body.weight, state["module.body.weight"])
    assert torch.equal(model.head.weight, before["head.weight"])
    assert set(log.renamed.values()) == {"body.weight", "body.bias"}
    # The verdict is torch's: what load_into accepts, load_state_dict(strict=True) accepts.
    same = MLP(num_classes=3)
    ckptool.load_into(same, source, strip=["module."])
    same.load_state_dict({k.removeprefix("module."): v for k, v in state.items()}, strict=True)


def _fp8_model() -> torch.nn.Module:
    """FP8 inference weights: a frozen float8_e4m3fn weight beside a float32 bias."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    weight = model[0].weight.detach().to(torch.float8_e4m3fn)
    model[0].weight = torch.nn.Parameter(weight, requires_grad=False)
    return model


def test_load_into_fp8_weights(write_checkpoint: WriteCheckpoint) -> None:
    """torch has no isfinite for float8_e4m3fn: the finiteness check crashed load_into."""
    torch.manual_seed(0)
    state = _fp8_model().state_dict()
    source = write_checkpoint(state, "fp8.safetensors")
    model = _fp8_model()
    log = ckptool.load_into(model, source)
    assert set(log.kept) == {"0.weight", "0.bias"}
    assert torch.equal(model[0].weight.view(torch.uint8), state["0.weight"].view(torch.uint8))
    # adapt says, as convert does, what a --dtype cast leaves in float8
    out = source.parent / "bf16.safetensors"
    cast = ckptool.adapt(source, model=_fp8_model(), out=str(out), dtype="bfloat16")
    assert any(
        n.startswith("1 float8/float4 tensors keep their dtype (0.weight)") for n in cast.notes
    )


FP8_MODEL = """
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 64, bias=False)
        self.norm = nn.LayerNorm(64)
"""


def test_scaled_fp8_weights_are_never_loaded_as_weights(
    run_cli, write_checkpoint: WriteCheckpoint, tmp_path: Path
) -> None:
    """An FP8 checkpoint (codes plus weight_scale_inv) against a float32 model: the fix
    was '--drop proj.weight_scale_inv', and adapt (even without it) wrote the codes as
    the weights, wrong by the scale."""
    spec_file = tmp_path / "net.py"
    spec_file.write_text(FP8_MODEL)
    spec = f"{spec_file}:Net"
    weight = torch.randn(64, 64)
    scale = weight.abs().max() / 448
    source = write_checkpoint(
        {
            "proj.weight": (weight / scale).to(torch.float8_e4m3fn),
            "proj.weight_scale_inv": scale.reshape(1, 1),
            "norm.weight": torch.ones(64),
            "norm.bias": torch.zeros(64),
        },
        "fp8.safetensors",
    )
    words = "proj.weight holds float8_e4m3fn codes scaled by proj.weight_scale_inv"
    shown = run_cli("diff", source, "--model", spec, "--json")
    document = json.loads(shown.stdout)
    assert shown.exit_code == 1 and document["fix"] is None
    assert document["scaled_codes"] == {"proj.weight": "proj.weight_scale_inv"}
    assert not document["fix_keeps_little"]
    dropped = run_cli("diff", source, "--model", spec, "--drop", "proj.weight_scale_inv")
    assert dropped.exit_code == 1 and f"incompatible: {words}" in dropped.stdout
    out = tmp_path / "out.safetensors"
    for flags in ((), ("--auto",), ("--drop", "proj.weight_scale_inv")):
        refused = run_cli("adapt", source, "--model", spec, *flags, "-o", out)
        assert refused.exit_code == 1 and words in refused.stderr, flags
    assert not out.exists()
    with pytest.raises(IncompatibleError, match=re.escape(words)):
        ckptool.load_into(ckptool.build_model(spec), source, drop=["proj.weight_scale_inv"])
    # An FP8 model (float8 weights, its own scale parameter) takes the same file as it is.
    fp8_net = tmp_path / "fp8net.py"
    fp8_net.write_text(
        FP8_MODEL.replace("from torch import nn", "import torch\nfrom torch import nn")
        + "        self.proj.weight = nn.Parameter(\n"
        "            self.proj.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)\n"
        "        self.proj.register_buffer('weight_scale_inv', torch.ones(1, 1))\n"
    )
    fits = run_cli("diff", source, "--model", f"{fp8_net}:Net")
    assert fits.exit_code == 0, fits.stdout


def test_non_finite_values_are_found_in_every_floating_dtype(monkeypatch) -> None:
    from ckptool.formats import load

    nan_e4m3 = torch.tensor([0x38, 0x7F], dtype=torch.uint8).view(torch.float8_e4m3fn)  # 1, NaN
    assert load.holds_non_finite(nan_e4m3)
    assert not load.holds_non_finite(torch.ones(3).to(torch.float8_e4m3fn))
    assert load.holds_non_finite(torch.tensor([1.0, float("inf")]).to(torch.float8_e5m2))
    assert load.holds_non_finite(torch.tensor([float("inf")]))
    fp4 = torch.tensor([0xFF], dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    assert not load.holds_non_finite(fp4)  # e2m1 has no NaN or inf (this was a crash)
    monkeypatch.setattr(load, "_WIDEN_CHUNK", 2)  # the NaN sits in the last chunk
    late = torch.tensor([0x38] * 5 + [0x7F], dtype=torch.uint8).view(torch.float8_e4m3fn)
    assert load.holds_non_finite(late) and not load.holds_non_finite(late[:5])


def test_lightning_sub_tree_into_the_backbone_alone(
    run_cli, write_checkpoint: WriteCheckpoint, tmp_path: Path
) -> None:
    """A LightningModule (backbone + its own head + a loss buffer) into torchvision's
    resnet18 with 5 classes: diff prints a rename of the sub-tree plus drops, the same
    fix --auto applies, and plain torch loads OUT with every backbone tensor kept."""
    torch.manual_seed(0)
    backbone = torchvision.models.resnet18(weights=None).state_dict()
    state = wrap(backbone, "model.backbone.") | {
        "model.head.weight": torch.randn(3, 1000),
        "model.head.bias": torch.randn(3),
        "model.criterion.pos_weight": torch.ones(3),
    }
    source = write_checkpoint({"state_dict": state, "epoch": 3}, "lightning.ckpt")
    shown = run_cli("diff", source, *RESNET)
    fix_line = next(line for line in shown.stdout.splitlines() if "fix:" in line)
    assert "--rename '^model\\.backbone\\.='" in fix_line and "--drop model." in fix_line
    out = tmp_path / "backbone.safetensors"
    result = run_cli("adapt", source, *RESNET, "--auto", "-o", out)
    assert result.exit_code == 0, result.stderr
    from safetensors.torch import load_file

    written = load_file(out)
    torchvision.models.resnet18(weights=None, num_classes=5).load_state_dict(written, strict=True)
    kept = {k: v for k, v in backbone.items() if not k.startswith("fc.")}
    assert len(kept) == 120 and all(torch.equal(written[k], v) for k, v in kept.items())


def test_the_share_counts_learned_values_not_computed_ones(
    write_checkpoint: WriteCheckpoint, tmp_path: Path
) -> None:
    """A pitch model's fixed CQT kernels (a frozen parameter, as pesto builds them) and a
    window buffer dwarf its trained encoder; a checkpoint of the encoder alone is a
    checkpoint of this model, not "mostly init"."""
    from torch import nn

    class WithFrontEnd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kernels = nn.Parameter(torch.randn(64, 1, 512), requires_grad=False)
            self.register_buffer("window", torch.hann_window(4096))
            self.encoder = nn.Sequential(nn.Conv1d(64, 8, 3), nn.Conv1d(8, 8, 3))

    torch.manual_seed(0)
    trained = WithFrontEnd()
    source = write_checkpoint(
        {k: v for k, v in trained.state_dict().items() if k.startswith("encoder.")}, "enc.pt"
    )
    report = ckptool.diff(source, model=WithFrontEnd())
    assert report.keys.fix is not None and not report.keys.fix.keeps_little
    assert report.keys.fix.transforms.flags() == ["--reinit kernels", "--reinit window"]
    out = tmp_path / "out.safetensors"
    log = adapt(source, model=WithFrontEnd(), transforms=report.keys.fix.transforms, out=str(out))
    assert (
        log.from_checkpoint
        == log.model_numel
        == sum(p.numel() for p in trained.encoder.parameters())
    )


def test_a_model_built_all_frozen_counts_every_parameter(write_checkpoint: WriteCheckpoint) -> None:
    """With nothing trainable, requires_grad says nothing about what was learned."""
    from torch import nn

    def frozen() -> nn.Module:
        net = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 2))
        net.requires_grad_(False)
        return net

    source = write_checkpoint(
        {k: v for k, v in frozen().state_dict().items() if k[0] == "1"}, "h.pt"
    )
    report = ckptool.diff(source, model=frozen())
    assert report.keys.fix is not None and report.keys.fix.keeps_little


def test_keep_dtype_keeps_norms_in_float32(
    run_cli, write_checkpoint: WriteCheckpoint, tmp_path: Path
) -> None:
    """--dtype bfloat16 --keep-dtype '*bn*' --keep-dtype '*.bias': an export with the
    norms and biases left in float32, the rest cast; integers untouched."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    source = write_checkpoint(state, "r18.pt")
    out = tmp_path / "mixed.safetensors"
    flags = ("--dtype", "bfloat16", "--keep-dtype", "*bn*", "--keep-dtype", "*.bias")
    result = run_cli("convert", source, "-o", out, *flags, "--json")
    assert result.exit_code == 0, result.output
    written = load_file(out)
    for name, value in state.items():
        kept = "bn" in name or name.endswith(".bias") or not value.is_floating_point()
        if kept:
            assert written[name].dtype == value.dtype and torch.equal(written[name], value), name
        else:
            assert written[name].dtype == torch.bfloat16, name
            assert torch.equal(written[name], value.to(torch.bfloat16)), name
    doc = json.loads(result.stdout)
    assert "conv1.weight" in doc["cast"] and "bn1.weight" not in doc["cast"]
    assert "fc.bias" not in doc["cast"] and "layer1.0.bn1.num_batches_tracked" not in doc["cast"]

    adapted = tmp_path / "adapted.safetensors"
    result = run_cli("adapt", source, *RESNET, "--drop", "fc.", "-o", adapted, *flags)
    assert result.exit_code == 0, result.output
    written = load_file(adapted)
    assert (
        written["bn1.weight"].dtype == torch.float32 and written["fc.bias"].dtype == torch.float32
    )
    assert written["fc.weight"].dtype == written["conv1.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--keep-dtype", "*bn*"), "add --dtype"),
        (("--dtype", "float16", "--keep-dtype", "*norm*"), "'\\*norm\\*' matches no tensor"),
    ],
    ids=["without-dtype", "matches-nothing"],
)
def test_keep_dtype_usage_errors(
    run_cli, write_checkpoint: WriteCheckpoint, tmp_path: Path, flags: tuple, message: str
) -> None:
    import re

    source = write_checkpoint(torchvision.models.resnet18(weights=None).state_dict(), "r.pt")
    out = tmp_path / "out.safetensors"
    result = run_cli("convert", source, "-o", out, *flags)
    assert result.exit_code == 2 and re.search(message, result.stderr), result.output
    assert not out.exists()


def test_a_cast_of_an_fp8_checkpoint_says_what_it_leaves_and_what_it_casts(
    run_cli, write_checkpoint: WriteCheckpoint, tmp_path: Path
) -> None:
    """--dtype bfloat16 on an FP8 checkpoint left the float8 weights as they were and
    rounded their float32 scales to bfloat16, without a word."""
    state = {
        "layer.weight": torch.randn(16, 16).to(torch.float8_e4m3fn),
        "layer.weight_scale_inv": torch.full((2, 2), 1 / 3),
        "norm.weight": torch.ones(16),
    }
    source = write_checkpoint(state, "fp8.safetensors")
    out = tmp_path / "out.safetensors"
    result = run_cli("convert", source, "-o", out, "--dtype", "bfloat16", "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    (note,) = document["notes"]
    assert note.startswith("1 float8/float4 tensors keep their dtype (layer.weight)")
    assert "tensors named like scales were cast (layer.weight_scale_inv)" in note
    assert set(document["cast"]) == {"layer.weight_scale_inv", "norm.weight"}
    kept = run_cli(
        "convert", source, "-o", out, "--dtype", "bfloat16", "--keep-dtype", "*scale*", "--force"
    )
    assert kept.exit_code == 0 and "keep their dtype" in kept.stdout
    assert "named like scales" not in kept.stdout
    written = ckptool.load_state_dict(out)
    assert written["layer.weight_scale_inv"].dtype == torch.float32
    assert written["layer.weight"].dtype == torch.float8_e4m3fn
    plain = write_checkpoint({"w": torch.ones(2)}, "plain.safetensors")
    quiet = run_cli("convert", plain, "-o", tmp_path / "p.safetensors", "--dtype", "bfloat16")
    assert quiet.exit_code == 0 and "note" not in quiet.stdout


def test_a_cast_that_would_make_values_infinite_is_refused(
    run_cli, write_checkpoint: WriteCheckpoint, tmp_path: Path
) -> None:
    """1e6 in float16 is inf: the file would hold it as if it had been trained so."""
    from safetensors.torch import load_file

    state = {
        "bn.running_var": torch.tensor([1.0, 1e6, -7e4]),
        "w": torch.ones(2),
        "mask": torch.tensor([0.0, -float("inf")]),  # infinite already: stays so, allowed
        "empty": torch.zeros(0),  # no extremes to check
    }
    source = write_checkpoint(state, "big.pt")
    out = tmp_path / "half.safetensors"
    refused = run_cli("convert", source, "-o", out, "--dtype", "float16")
    assert refused.exit_code == 2 and len(refused.stderr.splitlines()) == 1, refused.output
    assert (
        "--dtype float16: 2 values of 'bn.running_var' (up to 1e+06) are beyond its range "
        "(65504) and would become inf; keep the tensor with --keep-dtype bn.running_var"
    ) in refused.stderr
    assert not out.exists()
    # merge --average casts through the same path
    other = write_checkpoint(state, "big2.pt")
    averaged = run_cli("merge", source, other, "--average", "--dtype", "float16", "-o", out)
    assert averaged.exit_code == 2 and "2 values of 'bn.running_var'" in averaged.stderr
    kept = run_cli("convert", source, "-o", out, "--dtype", "float16", "--keep-dtype", "bn.*")
    assert kept.exit_code == 0, kept.output
    written = load_file(out)
    assert torch.equal(written["bn.running_var"], state["bn.running_var"])
    assert written["w"].dtype == torch.float16
    assert torch.equal(written["mask"], state["mask"].half())
    # bfloat16 has float32's range: 1e6 stays finite
    assert run_cli("convert", source, "-o", out, "--dtype", "bfloat16", "--force").exit_code == 0


def test_adapt_that_works_searches_no_prefix_and_a_refusal_still_hints(
    write_checkpoint: WriteCheckpoint, tmp_path: Path, monkeypatch
) -> None:
    from ckptool import keys as key_logic
    from ckptool.errors import IncompatibleError
    from ckptool.keys import Transforms

    state = wrap(seeded_state(MLP), "module.")
    ckpt = write_checkpoint(state, "dp.pt")
    real = key_logic.suggest_prefixes
    searches: list[int] = []

    def counted(*args: object, **kwargs: object) -> object:
        searches.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(key_logic, "suggest_prefixes", counted)
    out = str(tmp_path / "ok.safetensors")
    adapt(ckpt, model=MLP(), transforms=Transforms(strip=("module.",)), out=out)
    assert searches == [], "a plan that works searched for a better prefix"
    with pytest.raises(IncompatibleError, match=r"add strip=\('module\.',\)"):
        adapt(ckpt, model=MLP(), out=str(tmp_path / "no.safetensors"))
    assert searches, "the refusal's hint comes from the search"


TINY_BERT = """
import torch
from transformers import BertConfig, BertModel


def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=32)
    return BertModel(config).eval()
"""


def test_tf_era_layernorm_names_keep_their_weights(run_cli, tmp_path: Path) -> None:
    """BERT checkpoints converted from TensorFlow (and pytorch-pretrained-bert's) name
    LayerNorm's tensors gamma/beta. diff offers two renames where it offered a --drop of
    every LayerNorm (re-initialising them); adapt --auto writes a file transformers'
    BertModel loads strictly, with the same outputs as the original model."""
    pytest.importorskip("transformers")
    (tmp_path / "tiny_bert.py").write_text(TINY_BERT)
    spec = ("--model", f"{tmp_path / 'tiny_bert.py'}:tiny_bert")
    sys.path.insert(0, str(tmp_path))
    try:
        import tiny_bert
    finally:
        sys.path.remove(str(tmp_path))
    model = tiny_bert.tiny_bert()
    tf_names = {
        k.replace("Norm.weight", "Norm.gamma").replace("Norm.bias", "Norm.beta"): v
        for k, v in model.state_dict().items()
    }
    source = tmp_path / "bert-tf-names.pt"
    torch.save(tf_names, source)
    shown = run_cli("diff", source, *spec)
    fix = next(line for line in shown.stdout.splitlines() if "fix:" in line)
    assert shown.exit_code == 1 and fix.count("--rename") == 2, shown.output
    assert "--drop" not in fix and "--reinit" not in fix
    out = tmp_path / "bert.safetensors"
    result = run_cli("adapt", source, *spec, "--auto", "--strict", "-o", out)
    assert result.exit_code == 0, result.output
    fresh = tiny_bert.tiny_bert()
    torch.nn.init.zeros_(fresh.embeddings.LayerNorm.weight)
    from safetensors.torch import load_file

    fresh.load_state_dict(load_file(out), strict=True)
    ids = torch.tensor([[1, 5, 9, 2]])
    assert torch.equal(fresh(ids).last_hidden_state, model(ids).last_hidden_state)


def test_old_densenet_keys_are_renamed_not_called_another_model(run_cli, tmp_path: Path) -> None:
    """DenseNet checkpoints from before torchvision renamed norm.1 -> norm1 (the keys its
    own loader rewrites by regex): diff said "not for this model"; now the fix is two
    renames and adapt --auto writes every tensor bit for bit under the new names."""
    import re

    torch.manual_seed(0)
    state = torchvision.models.densenet121(weights=None).state_dict()
    old = {
        re.sub(r"(denselayer\d+\.(?:norm|conv))(\d)\.", r"\1.\2.", k): v for k, v in state.items()
    }
    source = tmp_path / "densenet121-old.pth"
    torch.save(old, source)
    spec = ("--model", "torchvision:densenet121")
    shown = run_cli("diff", source, *spec)
    fix = next(line for line in shown.stdout.splitlines() if "fix:" in line)
    assert fix.count("--rename") == 2 and "--drop" not in fix and "--reinit" not in fix, fix
    out = tmp_path / "densenet121.safetensors"
    words = shlex.split(fix.removeprefix("  fix: "))  # the printed fix, as pasted
    assert words[:2] == ["ckptool", "adapt"] and words[-2:] == ["-o", "OUT"]
    result = run_cli(*words[1:-1], str(out), "--strict")
    assert result.exit_code == 0, result.output
    from safetensors.torch import load_file

    written = load_file(out)
    assert written.keys() == state.keys()
    assert all(torch.equal(written[k], v) for k, v in state.items())


def test_load_into_suggests_keywords_that_load_when_passed_back(tmp_path: Path) -> None:
    """The fix in load_into's error is its own keyword arguments: read back as Python
    literals and passed back, the old DenseNet-style names load strictly."""
    import ast
    import re

    class Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1, self.conv1 = torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 4, 1)

    model = torch.nn.Sequential(Layer(), Layer())
    old = {re.sub(r"\.(norm|conv)1\.", r".\1.1.", k): v for k, v in model.state_dict().items()}
    source = tmp_path / "old-names.pt"
    torch.save(old, source)
    with pytest.raises(ckptool.IncompatibleCheckpointError) as caught:
        ckptool.load_into(torch.nn.Sequential(Layer(), Layer()), source)
    keywords = str(caught.value).rsplit("fix: load_into(..., ", 1)[1].removesuffix(")")
    call = ast.parse(f"load_into({keywords})", mode="eval").body
    assert isinstance(call, ast.Call)
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg}
    fresh = torch.nn.Sequential(Layer(), Layer())
    ckptool.load_into(fresh, source, **kwargs)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())


def test_auto_refuses_a_checkpoint_of_another_model(run_cli, tmp_path: Path) -> None:
    """--auto applies the fix diff prints; for another architecture no fix keeps a
    meaningful part, and applying one would mostly initialise the model afresh."""
    source = tmp_path / "squeezenet.pt"
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), source)
    out = tmp_path / "o.safetensors"
    refused = run_cli("adapt", source, "--model", "torchvision:resnet18", "--auto", "-o", out)
    assert refused.exit_code == 1, refused.output
    assert "--auto: no transform keeps a meaningful part of this checkpoint" in refused.stderr
    assert not out.exists()


def test_merge_of_one_checkpoint_is_a_usage_error(
    write_checkpoint: WriteCheckpoint, tmp_path: Path
) -> None:
    """The command line asks click for two paths; the API checks it itself."""
    base = write_checkpoint(seeded_state(MLP), "a.pt")
    with pytest.raises(UsageError, match="merge needs a BASE and at least one OTHER"):
        ckptool.merge([base], str(tmp_path / "m.safetensors"), average=True)
    assert not (tmp_path / "m.safetensors").exists()
