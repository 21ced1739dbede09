"""Generate fixtures/bad/: corrupt, unsupported and hostile checkpoints, with a manifest.

Each file is paired in MANIFEST.json with the exit code ckptool must give and a
regex its one-line error must match. Hostile pickles would write MARKER if executed.

    python scripts/make_bad_fixtures.py [OUTDIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import random
import shutil
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

MARKER = "/tmp/ckptool-pwned-marker"
UNREADABLE, UNSAFE = 3, 4


class Payload:
    """Pickles as a call of ``func(*args)``: what a hostile checkpoint does."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return self.func, self.args


def small_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Linear(4, 3).state_dict()


def torch_bytes(obj: Any, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return buffer.getvalue()


def rezip(
    data: bytes, edit: Callable[[str, bytes], bytes | None], compress: int = zipfile.ZIP_STORED
) -> bytes:
    """Rewrite a torch zip, passing each entry through ``edit`` (None drops it)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w", compress) as dst:
        for info in src.infolist():
            content = edit(info.filename, src.read(info))
            if content is not None:
                dst.writestr(info.filename, content)
    return out.getvalue()


def safetensors_bytes(header: Any, data: bytes = b"", raw_header: bytes | None = None) -> bytes:
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def good_header() -> dict[str, Any]:
    return {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}


def header_with(**changes: Any) -> dict[str, Any]:
    header = good_header()
    header["w"].update(changes)
    return header


def torchscript_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), buffer)
    return buffer.getvalue()


def flip_pickle_byte(data: bytes) -> bytes:
    """Corrupt data.pkl in place so the zip CRC no longer matches."""
    position = data.index(b"data.pkl") + 40
    return data[:position] + bytes([data[position] ^ 0xFF]) + data[position + 1 :]


def build_cases() -> dict[str, tuple[bytes, int, str]]:
    """name -> (content, expected exit code, regex for the error line)."""
    state = small_state()
    good_zip = torch_bytes(state)
    legacy = torch_bytes(state, _use_new_zipfile_serialization=False)
    system = Payload(os.system, f"echo pwned > {MARKER}")
    rng = random.Random(0)
    cases: dict[str, tuple[bytes, int, str]] = {
        "empty.pt": (b"", UNREADABLE, "empty"),
        "random_bytes.pt": (bytes(rng.randrange(256) for _ in range(4096)), UNREADABLE, "not a recognised"),
        "text_file.safetensors": (b"hello, this is not a checkpoint\n", UNREADABLE, "safetensors|not a recognised"),
        "zip_truncated_half.pt": (good_zip[: len(good_zip) // 2], UNREADABLE, "zip"),
        "zip_truncated_tail.pt": (good_zip[:-30], UNREADABLE, "zip"),
        "zip_compressed.pt": (rezip(good_zip, lambda n, b: b, zipfile.ZIP_DEFLATED), UNREADABLE, "compressed"),
        "zip_storage_short.pt": (rezip(good_zip, lambda n, b: b[:4] if n.endswith("data/0") else b), UNREADABLE, "storage record .* has 4 bytes"),
        "zip_storage_missing.pt": (rezip(good_zip, lambda n, b: None if n.endswith("data/0") else b), UNREADABLE, "missing from the archive"),
        "zip_no_data_pkl.pt": (rezip(good_zip, lambda n, b: None if n.endswith("data.pkl") else b), UNREADABLE, "no torch data.pkl"),
        "zip_garbage_pickle.pt": (rezip(good_zip, lambda n, b: b"\x80\x02garbage" if n.endswith("data.pkl") else b), UNREADABLE, "corrupt pickle"),
        "zip_crc_mismatch.pt": (flip_pickle_byte(good_zip), UNREADABLE, "corrupt|CRC|pickle"),
        "torchscript.pt": (torchscript_bytes(), UNREADABLE, "TorchScript"),
        "no_tensor_dict.pt": (torch_bytes([1, 2, 3]), UNREADABLE, "no dict of tensors"),
        "legacy_truncated.pt": (legacy[:-10], UNREADABLE, "truncated"),
        "legacy_bad_magic.pt": (pickle.dumps(12345, protocol=2) + legacy[30:], UNREADABLE, "not a torch.save"),
        "st_too_short.safetensors": (b"\x05\x00\x00", UNREADABLE, "empty|not a recognised|too short"),
        "st_header_too_long.safetensors": (struct.pack("<Q", 1 << 40) + b"{}", UNREADABLE, "header length"),
        "st_bad_json.safetensors": (safetensors_bytes(None, raw_header=b"{not json"), UNREADABLE, "not valid JSON"),
        "st_bad_utf8.safetensors": (safetensors_bytes(None, raw_header=b'{"\xff\xfe": 1}'), UNREADABLE, "UTF-8"),
        "st_not_object.safetensors": (safetensors_bytes(["w"]), UNREADABLE, "not a JSON object|not a recognised"),
        "st_entry_not_object.safetensors": (safetensors_bytes({"w": 1}), UNREADABLE, "not an object"),
        "st_bad_dtype.safetensors": (safetensors_bytes(header_with(dtype="F33"), bytes(16)), UNREADABLE, "unknown dtype 'F33'"),
        "st_negative_shape.safetensors": (safetensors_bytes(header_with(shape=[-2, 2]), bytes(16)), UNREADABLE, "invalid shape"),
        "st_offsets_beyond.safetensors": (safetensors_bytes(header_with(data_offsets=[0, 16]), bytes(8)), UNREADABLE, "truncated"),
        "st_size_mismatch.safetensors": (safetensors_bytes(header_with(data_offsets=[0, 12]), bytes(16)), UNREADABLE, "spans 12 bytes"),
        "st_overlap.safetensors": (
            safetensors_bytes({**good_header(), "v": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(16)),
            UNREADABLE, "overlaps",
        ),
        "st_duplicate_keys.safetensors": (
            safetensors_bytes(None, bytes(16), raw_header=json.dumps(good_header())[:-1].encode()
                              + b', "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}'),
            UNREADABLE, "repeats the key 'w'",
        ),
        "st_bad_metadata.safetensors": (safetensors_bytes({**good_header(), "__metadata__": {"epoch": 3}}, bytes(16)), UNREADABLE, "__metadata__"),
        "st_bad_offsets.safetensors": (safetensors_bytes(header_with(data_offsets=[16, 0]), bytes(16)), UNREADABLE, "invalid data_offsets"),
        "zip_os_system.pt": (torch_bytes({"state_dict": state, "hook": system}), UNSAFE, "posix.system"),
        "zip_eval.pt": (torch_bytes({"w": state["weight"], "x": Payload(eval, "print('pwned')")}), UNSAFE, "builtins.eval"),
        "zip_exec.pt": (torch_bytes({"w": state["weight"], "x": Payload(exec, "import os")}), UNSAFE, "builtins.exec"),
        "zip_subprocess.pt": (torch_bytes({"x": Payload(subprocess.Popen, ["touch", MARKER])}), UNSAFE, "subprocess.Popen"),
        "pickled_module.pt": (torch_bytes(nn.Linear(4, 3)), UNSAFE, "torch.nn.modules.linear.Linear"),
        "argparse_namespace.pt": (torch_bytes({"state_dict": state, "args": argparse.Namespace(lr=0.1)}), UNSAFE, "argparse.Namespace"),
        "numpy_array.pt": (torch_bytes({"w": state["weight"].numpy()}), UNSAFE, "numpy"),
        "legacy_os_system.pt": (torch_bytes({"w": state["weight"], "x": system}, _use_new_zipfile_serialization=False), UNSAFE, "posix.system"),
        "raw_pickle_system.pt": (pickle.dumps(system, protocol=2), UNSAFE, "posix.system"),
        "raw_pickle_proto5_getattr.pt": (pickle.dumps(Payload(getattr, Payload(__import__, "os"), "system"), protocol=5), UNSAFE, "builtins.getattr.*builtins.__import__|builtins.__import__.*builtins.getattr"),
    }  # fmt: skip
    return cases


def write_sharded_cases(outdir: str, manifest: dict[str, dict[str, Any]]) -> None:
    """Index files: bad JSON, a missing shard, a tensor in the wrong shard."""
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, os.path.join(outdir, "shard-a.safetensors"))
    save_file({"b": torch.zeros(2)}, os.path.join(outdir, "shard-b.safetensors"))
    indexes = {
        "index_bad_json.index.json": ("{weight_map: ", "not valid JSON"),
        "index_missing_shard.index.json": (json.dumps({"weight_map": {"a": "shard-a.safetensors", "b": "gone.safetensors"}}), "'gone.safetensors' is missing"),
        "index_wrong_shard.index.json": (json.dumps({"weight_map": {"a": "shard-b.safetensors", "b": "shard-b.safetensors"}}), "tensor 'b' is in|'a' .*no shard|indexed tensors are in no shard"),
        "index_escaping_path.index.json": (json.dumps({"weight_map": {"a": "../shard-a.safetensors"}}), "not a plain file name"),
    }  # fmt: skip
    for name, (text, pattern) in indexes.items():
        with open(os.path.join(outdir, name), "w", encoding="utf-8") as f:
            f.write(text)
        manifest[name] = {"exit": UNREADABLE, "match": pattern}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "outdir",
        nargs="?",
        default=os.path.join(os.path.dirname(__file__), "..", "fixtures", "bad"),
    )
    outdir = parser.parse_args().outdir
    shutil.rmtree(outdir, ignore_errors=True)
    os.makedirs(outdir)
    manifest: dict[str, dict[str, Any]] = {}
    for name, (content, code, pattern) in build_cases().items():
        with open(os.path.join(outdir, name), "wb") as f:
            f.write(content)
        manifest[name] = {"exit": code, "match": pattern}
    write_sharded_cases(outdir, manifest)
    with open(os.path.join(outdir, "MANIFEST.json"), "w", encoding="utf-8") as f:
        json.dump({"marker": MARKER, "cases": manifest}, f, indent=1, sort_keys=True)
    print(f"wrote {len(manifest)} cases to {outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
