"""Training checkpoints that torch.load(weights_only=True) refuses, read without trusting them.

Files as Lightning and timm write them: hyper-parameters in an ``argparse.Namespace`` or
a dict subclass from the training code, numpy scalars for the best metric, ``pathlib``
paths in callback states, an EMA copy of the weights, an omegaconf config (Hydra).
ckptool keeps those objects as inert data (never imported, never called) and extracts
the tensors; the reference is
``torch.load(weights_only=False)`` run in a throwaway subprocess on these generated files.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ckptool
from ckptool.formats.restricted_pickle import load_restricted

# The training code's own classes: importable by the reference subprocess, never by
# ckptool (it does not import anything a file names).
TRAINING_CODE = '''
import argparse


class AttributeDict(dict):
    """Lightning's hyper-parameter container: a dict subclass."""

    def __getattr__(self, key):
        return self[key]


class RunConfig:
    def __init__(self, lr, layers):
        self.lr = lr
        self.layers = layers
'''


@pytest.fixture(scope="module")
def training_code(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("training_code")
    (folder / "trainlib.py").write_text(TRAINING_CODE)
    return folder


def _write(training_code: Path, name: str, folder: Path) -> Path:
    """Build the checkpoint in a subprocess that imports the training code, as a run would."""
    import numpy  # noqa: F401  (the generator uses it; skip cleanly if missing)

    path = folder / name
    code = textwrap.dedent(f"""
        import argparse, collections, pathlib, sys, torch, numpy as np
        sys.path.insert(0, {str(training_code)!r})
        from trainlib import AttributeDict, RunConfig
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                  torch.nn.Flatten(), torch.nn.Linear(4, 2))
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        net(torch.randn(2, 3, 3, 3)).square().mean().backward()
        optimizer.step()  # momentum buffers in the optimizer state, as after training
        state = net.state_dict()
        kind = {name!r}
        if kind == "lightning.ckpt":
            ckpt = {{
                "epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0",
                "state_dict": {{"model." + k: v for k, v in state.items()}},
                "hyper_parameters": AttributeDict(lr=0.1, config=RunConfig(0.1, [64, 64])),
                "callbacks": {{"ModelCheckpoint{{'monitor': 'val_loss'}}": {{
                    "best_model_score": torch.tensor(0.25),
                    "best_model_path": pathlib.PurePosixPath("/runs/7/epoch=3.ckpt"),
                }}, "EMA": {{"decay": 0.999, "ema_state_dict": {{"model." + k: v * 0.5
                    for k, v in state.items() if v.is_floating_point()}}}}}},
                "optimizer_states": [optimizer.state_dict()],
                "loops": {{"fit_loop": collections.defaultdict(list, {{"epochs": [1, 2]}})}},
                "hparams_name": "kwargs",
            }}
        elif kind == "hydra.ckpt":  # Lightning + Hydra: an omegaconf config as hparams
            from omegaconf import OmegaConf
            config = OmegaConf.create({{"model": {{"lr": 0.1, "layers": [64, 64]}},
                                       "run": "${{model.lr}}", "seed": 7}})
            ckpt = {{"state_dict": {{"model." + k: v for k, v in state.items()}},
                    "hyper_parameters": config, "datamodule_hyper_parameters":
                    OmegaConf.create([1, 2]), "epoch": 1}}
        else:  # timm's train.py: args namespace, numpy metric, an EMA copy
            ckpt = {{
                "epoch": 9, "arch": "tiny", "version": 2,
                "state_dict": state,
                "state_dict_ema": {{k: v * 0.5 if v.is_floating_point() else v
                                   for k, v in state.items()}},
                "optimizer": optimizer.state_dict(),
                "args": argparse.Namespace(model="tiny", lr=0.1, epochs=10),
                "metric": np.float64(0.875),
                "best_epoch": np.int64(7),
            }}
        torch.save(ckpt, {str(path)!r})
    """)
    subprocess.run([sys.executable, "-c", code], check=True)
    return path


def _reference(training_code: Path, path: Path, key: str, out: Path) -> dict[str, torch.Tensor]:
    """torch.load(weights_only=False) in a throwaway process: the values torch would give."""
    code = textwrap.dedent(f"""
        import sys, torch
        from safetensors.torch import save_file
        sys.path.insert(0, {str(training_code)!r})
        state = torch.load({str(path)!r}, weights_only=False)
        for part in {key.split(".")!r}:
            state = state[part]
        save_file({{k: v.contiguous() for k, v in state.items()}}, {str(out)!r})
    """)
    subprocess.run([sys.executable, "-c", code], check=True)
    return load_file(out)


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("lightning.ckpt", "state_dict"),
        ("lightning.ckpt", "callbacks.EMA.ema_state_dict"),
        ("timm.pth.tar", "state_dict"),
        ("timm.pth.tar", "state_dict_ema"),
        ("hydra.ckpt", "state_dict"),
    ],
)
def test_weights_come_out_bit_for_bit_without_running_anything(
    run_cli, training_code: Path, tmp_path: Path, name: str, key: str
) -> None:
    if name == "hydra.ckpt" and importlib.util.find_spec("omegaconf") is None:
        pytest.skip("omegaconf is not installed")  # found, not imported: see the end
    path = _write(training_code, name, tmp_path)
    with pytest.raises(pickle.UnpicklingError):  # what torch itself says by default
        torch.load(path, weights_only=True)
    reference = _reference(training_code, path, key, tmp_path / "reference.safetensors")

    out = tmp_path / "weights.safetensors"
    result = run_cli("convert", path, "--key", key, "-o", out)
    assert result.exit_code == 0, result.output
    written = load_file(out)
    assert written.keys() == reference.keys()
    assert all(
        torch.equal(written[k], v) and written[k].dtype == v.dtype for k, v in reference.items()
    )
    extracted = ckptool.load_state_dict(path, key=key)  # the API, values via the storages
    assert all(torch.equal(extracted[k], v) for k, v in reference.items())
    # ckptool imported none of the file's globals
    assert "trainlib" not in sys.modules and "omegaconf" not in sys.modules


def test_inspect_lists_the_objects_it_did_not_run(
    run_cli, training_code: Path, tmp_path: Path
) -> None:
    path = _write(training_code, "lightning.ckpt", tmp_path)
    both = run_cli("inspect", path)  # the weights and the EMA callback's copy
    assert both.exit_code == 2 and "callbacks.EMA.ema_state_dict" in both.stderr
    result = run_cli("inspect", path, "--key", "state_dict")
    assert result.exit_code == 0, result.output
    assert "hyper_parameters: trainlib.AttributeDict (not executed)" in result.stdout
    assert "objects" in result.stdout and "trainlib.RunConfig" in result.stdout
    doc = json.loads(run_cli("inspect", path, "--key", "state_dict", "--json").stdout)
    assert "pathlib.PurePosixPath" in doc["opaque"] and doc["key"] == "state_dict"
    assert "builtins.list" in doc["opaque"]  # defaultdict(list): a type named as data


def test_ema_copies_are_listed_and_picked_with_key(
    run_cli, training_code: Path, tmp_path: Path
) -> None:
    path = _write(training_code, "timm.pth.tar", tmp_path)
    result = run_cli("inspect", path)
    assert result.exit_code == 2 and "state_dict_ema" in result.stderr and "--key" in result.stderr
    ema = run_cli("inspect", path, "--key", "state_dict_ema", "--json")
    doc = json.loads(ema.stdout)
    assert ema.exit_code == 0 and doc["key"] == "state_dict_ema"
    assert "argparse.Namespace" in doc["opaque"]
    assert any(n.startswith("numpy") and n.endswith(".scalar") for n in doc["opaque"])


def _opcodes(*parts: bytes) -> bytes:
    return b"\x80\x02" + b"".join(parts) + b"."


def _tensor_pickle(
    size_ops: bytes,
    key_ops: bytes = b"X\x01\x00\x00\x000",
    offset_ops: bytes = b"K\x00",
    stride_ops: bytes = b"K\x01\x85",
    location_ops: bytes = b"X\x03\x00\x00\x00cpu",
) -> bytes:
    """{'w': _rebuild_tensor_v2(storage, OFFSET, SIZE, STRIDE, False, OrderedDict())}."""
    storage = (  # persistent id ('storage', FloatStorage, KEY, 'cpu', 4)
        b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\n" + key_ops + location_ops + b"K\x04tQ"
    )
    return _opcodes(
        b"}X\x01\x00\x00\x00w",
        b"ctorch._utils\n_rebuild_tensor_v2\n(",
        storage,
        offset_ops,
        size_ops,
        stride_ops,
        b"\x89ccollections\nOrderedDict\n)RtR",  # requires_grad, hooks
        b"s",
    )


def test_a_tensor_that_needs_an_opaque_result_is_refused() -> None:
    """A size made by calling a harmless-looking global: only running it would give the
    size, so the file is refused as unsafe (exit 4), not read with a made-up value."""
    ok = load_restricted(_tensor_pickle(b"K\x04\x85"), path="ok.pt")
    assert ok.obj["w"].shape == (4,) and not ok.opaque
    with pytest.raises(ckptool.UnsafeCheckpointError, match=r"size from mylib\.make_size"):
        load_restricted(_tensor_pickle(b"cmylib\nmake_size\n)R"), path="evil.pt")
    with pytest.raises(ckptool.UnsafeCheckpointError, match=r"size from mylib\.make_dim"):
        load_restricted(_tensor_pickle(b"cmylib\nmake_dim\n)R\x85"), path="evil.pt")  # (dim,)
    with pytest.raises(ckptool.UnsafeCheckpointError, match=r"storage reference from mylib\.key"):
        load_restricted(_tensor_pickle(b"K\x04\x85", b"cmylib\nkey\n)R"), path="evil.pt")
    kept = load_restricted(_opcodes(b"}X\x01\x00\x00\x00acmylib\nConfig\n)Rs"), path="x.pt")
    assert kept.opaque == frozenset({"mylib.Config"})  # the same global as plain data: kept


@pytest.mark.parametrize(
    ("part", "ops"),
    [
        ("size", b"J\xff\xff\xff\xff\x85"),  # (-1,)
        ("stride", b"X\x01\x00\x00\x001\x85"),  # ('1',)
        ("stride", b"\x88\x85"),  # (True,): a bool is no stride
        ("offset", b"J\xff\xff\xff\xff"),  # -1
    ],
    ids=["negative-size", "text-stride", "bool-stride", "negative-offset"],
)
def test_a_malformed_size_stride_or_offset_is_corrupt(part: str, ops: bytes) -> None:
    """Only ints make a tensor's geometry; anything else is a corrupt file (exit 3)."""
    ops_for = {"size_ops": b"K\x04\x85", part + "_ops": ops}
    with pytest.raises(ckptool.CheckpointReadError, match="malformed size"):
        load_restricted(_tensor_pickle(**ops_for), path="bad.pt")


@pytest.mark.parametrize(
    "storage_ops",
    [
        {"key_ops": b"X\x2c\x01\x00\x00" + b"k" * 300},  # a 300-character record key
        {"location_ops": b"K\x00"},  # location 0, not a device name
        {"key_ops": b"K\x00"},  # key 0, not a record name
    ],
    ids=["long-key", "int-location", "int-key"],
)
def test_a_malformed_storage_reference_is_corrupt(storage_ops: dict) -> None:
    with pytest.raises(ckptool.CheckpointReadError, match="malformed storage reference"):
        load_restricted(_tensor_pickle(b"K\x04\x85", **storage_ops), path="bad.pt")
