"""Generate fixtures/bad/: corrupt, unsupported and hostile checkpoints, with a manifest.

Each file is paired in MANIFEST.json with the exit code ckptool must give and a
regex its one-line error must match. Hostile pickles would write MARKER if executed.

    python scripts/make_bad_fixtures.py [OUTDIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import pickle
import random
import shutil
import struct
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

MARKER = "/tmp/ckptool-pwned-marker"
OK, UNREADABLE, UNSAFE = 0, 3, 4


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


def _entry(name: str) -> zipfile.ZipInfo:
    """A zip entry with a fixed date, so regenerating the corpus gives the same bytes."""
    return zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))


def rezip(
    data: bytes, edit: Callable[[str, bytes], bytes | None], compress: int = zipfile.ZIP_STORED
) -> bytes:
    """Rewrite a torch zip, passing each entry through ``edit`` (None drops it)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w", compress) as dst:
        for info in src.infolist():
            content = edit(info.filename, src.read(info))
            if content is not None:
                entry = _entry(info.filename)
                entry.compress_type = compress
                dst.writestr(entry, content)
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


def patched(data: bytes, at: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, at, value)
    return bytes(out)


def central_entry(data: bytes, suffix: str) -> int:
    """Where the central directory entry whose name ends with ``suffix`` starts."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        at = archive.start_dir
    while True:
        name_length, extra, comment = struct.unpack_from("<3H", data, at + 28)
        if data[at + 46 : at + 46 + name_length].endswith(suffix.encode()):
            return at
        at += 46 + name_length + extra + comment


def torch_refuses_cases(good_zip: bytes) -> dict[str, tuple[bytes, int, str]]:
    """Zips torch's own reader refuses and zipfile reads (tests/test_torch_agreement.py)."""
    locator = len(good_zip) - 22 - 20
    data_0 = central_entry(good_zip, "data/0")
    return {
        "zip64_locator_past_end.pt": (patched(good_zip, locator + 8, "<Q", 1 << 40), UNREADABLE, "zip64 locator points past the end"),
        "zip_entry_other_disk.pt": (patched(good_zip, data_0 + 34, "<H", 2), UNREADABLE, "starts on disk 2"),
        "zip_entry_marked_directory.pt": (patched(good_zip, data_0 + 38, "<L", 0x10), UNREADABLE, "marked as a directory"),
        "zip_version_unsupported.pt": (rezip(good_zip, lambda n, b: b"11" if n.endswith("/version") else b), UNREADABLE, "file format version 11"),
        "zip_byteorder_padded.pt": (rezip(good_zip, lambda n, b: b"little\n" if n.endswith("/byteorder") else b), UNREADABLE, "byteorder record"),
    }  # fmt: skip


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
        **torch_refuses_cases(good_zip),
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
        # Harmless objects beside the weights are kept as data, never run (issue 10).
        "argparse_namespace.pt": (torch_bytes({"state_dict": state, "args": argparse.Namespace(lr=0.1)}), OK, ""),
        "numpy_array.pt": (torch_bytes({"w": state["weight"].numpy()}), UNREADABLE, "no dict of tensors"),
        "legacy_os_system.pt": (torch_bytes({"w": state["weight"], "x": system}, _use_new_zipfile_serialization=False), UNSAFE, "posix.system"),
        "raw_pickle_system.pt": (pickle.dumps(system, protocol=2), UNSAFE, "posix.system"),
        "raw_pickle_proto5_getattr.pt": (pickle.dumps(Payload(getattr, Payload(__import__, "os"), "system"), protocol=5), UNSAFE, "builtins.getattr.*builtins.__import__|builtins.__import__.*builtins.getattr"),
    }  # fmt: skip
    return cases


# --- hand-assembled pickles ------------------------------------------------------------
# Opcodes written out by hand, so a case can hold what no pickler writes: BUILD on a
# tensor, memo indices out of order, references that share one object a million times.

PROTO2, STOP, MARK, TUPLE, TUPLE1, TUPLE2 = b"\x80\x02", b".", b"(", b"t", b"\x85", b"\x86"
EMPTY_DICT, EMPTY_LIST, EMPTY_TUPLE, SETITEM, SETITEMS = b"}", b"]", b")", b"s", b"u"
APPENDS, REDUCE, BUILD, BINPERSID, NEWFALSE, FROZENSET = b"e", b"R", b"b", b"Q", b"\x89", b"\x91"
POP, DICT = b"0", b"d"


def s_(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def i_(value: int) -> bytes:
    return b"J" + struct.pack("<i", value) if -(2**31) <= value < 2**31 else b"\x8a" + _long(value)


def _long(value: int) -> bytes:
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return bytes([len(raw)]) + raw


def g_(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def put(index: int) -> bytes:
    return b"r" + struct.pack("<I", index)


def get(index: int) -> bytes:
    return b"j" + struct.pack("<I", index)


def tup(*items: bytes) -> bytes:
    return MARK + b"".join(items) + TUPLE


def storage_pid(key: bytes = b"", numel: bytes = b"", storage: str = "FloatStorage") -> bytes:
    key = key or s_("0")
    numel = numel or i_(4)
    return tup(s_("storage"), g_("torch", storage), key, s_("cpu"), numel) + BINPERSID


def tensor_ops(
    *,
    pid: bytes = b"",
    offset: int = 0,
    size: tuple[int, ...] = (2, 2),
    stride: tuple[int, ...] = (2, 1),
    after: bytes = b"",
) -> bytes:
    """_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict()) + ``after``."""
    args = (
        (pid or storage_pid())
        + i_(offset)
        + tup(*map(i_, size))
        + tup(*map(i_, stride))
        + NEWFALSE
        + g_("collections", "OrderedDict")
        + EMPTY_TUPLE
        + REDUCE
    )
    return g_("torch._utils", "_rebuild_tensor_v2") + MARK + args + TUPLE + REDUCE + after


def state_pickle(*entries: tuple[str, bytes], prefix: bytes = b"") -> bytes:
    """A dict pickle {name: value-ops}; ``prefix`` ops run first (memo set-up)."""
    body = b"".join(s_(name) + ops for name, ops in entries)
    return PROTO2 + prefix + EMPTY_DICT + MARK + body + SETITEMS + STOP


def torch_zip(
    pickle_bytes: bytes, records: dict[str, bytes] | None = None, *, storages_last: bool = False
) -> bytes:
    """A torch.save-shaped zip around ``pickle_bytes`` (one float32[4] record by default);
    ``storages_last`` puts the storage records after the version record."""
    records = {"0": struct.pack("<4f", 1, 2, 3, 4)} if records is None else records
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(_entry("archive/data.pkl"), pickle_bytes)
        archive.writestr(_entry("archive/byteorder"), b"little")
        if storages_last:
            archive.writestr(_entry("archive/version"), b"3\n")
        for key, data in records.items():
            archive.writestr(_entry(f"archive/data/{key}"), data)
        if not storages_last:
            archive.writestr(_entry("archive/version"), b"3\n")
    return out.getvalue()


def legacy_file(pickle_bytes: bytes, storages: dict[str, bytes]) -> bytes:
    """A pre-1.6 torch.save file: magic, protocol, sys info, object, keys, storages."""
    head = b"".join(
        pickle.dumps(obj, protocol=2)
        for obj in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001})
    )
    keys = pickle.dumps(list(storages), protocol=2)
    data = b"".join(struct.pack("<q", len(b) // 4) + b for b in storages.values())
    return head + pickle_bytes + keys + data


def doubling_tuple(levels: int) -> tuple[bytes, int]:
    """Ops leaving T_levels on the stack, T_i = (T_i-1, T_i-1): 2**levels nodes to hash."""
    ops = i_(1) + TUPLE1 + put(0) + POP
    for level in range(1, levels + 1):
        ops += get(level - 1) + get(level - 1) + TUPLE2 + put(level) + POP
    return ops + get(levels), levels


def repeated_build(target: bytes, levels: int, times: int, state: bytes = EMPTY_DICT) -> bytes:
    """Ops leaving ``target`` (made without the memo) BUILT ``times`` times from one
    ``state`` dict whose key is T_levels: merging a state hashes its keys again on every
    BUILD (for a plain dict state, Python reuses the stored hashes)."""
    state += doubling_tuple(levels)[0] + i_(1) + SETITEM
    ops = state + put(levels + 1) + POP + target + put(levels + 2) + POP
    return ops + (get(levels + 2) + get(levels + 1) + BUILD + POP) * times + get(levels + 2)


ORDERED_DICT = g_("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE


def fanout_dicts(levels: int, width: int) -> bytes:
    """Ops leaving D_levels: D_i = {k_j: D_i-1 for j < width}: width**levels entries to walk."""
    ops = EMPTY_DICT + put(0) + POP
    for level in range(1, levels + 1):
        items = b"".join(s_(f"k{j}") + get(level - 1) for j in range(width))
        ops += EMPTY_DICT + MARK + items + SETITEMS + put(level) + POP
    return ops + get(levels)


def crafted_cases() -> dict[str, tuple[bytes, int, str]]:
    """Hand-assembled pickles and zips, one per way a crafted file has hurt a reader."""
    good_tensor = tensor_ops()
    doubling, _ = doubling_tuple(64)
    hashed_key = doubling + i_(1)  # key, value: SETITEM follows
    secret = "/proc/self/environ"
    redirect = EMPTY_DICT + MARK + s_("file") + s_(secret) + s_("file_offset") + i_(0)
    redirect += s_("storage") + b"N" + SETITEMS
    cases: dict[str, tuple[bytes, int, str]] = {
        # The reader itself, on a well-formed hand-made file: must be accepted.
        "crafted_valid.pt": (torch_zip(state_pickle(("w", good_tensor))), OK, ""),
        "crafted_valid_legacy.pt": (
            legacy_file(state_pickle(("w", tensor_ops())), {"0": struct.pack("<4f", 1, 2, 3, 4)}),
            OK, "",
        ),
        # BUILD: overwrite the stand-ins' fields (the file-copy vulnerability) or their state.
        "build_redirects_tensor_file.pt": (torch_zip(state_pickle(("w", tensor_ops(after=redirect + BUILD)))), UNREADABLE, "BUILD"),
        "build_redirects_legacy_tensor.pt": (legacy_file(state_pickle(("w", tensor_ops(after=redirect + BUILD))), {"0": bytes(16)}), UNREADABLE, "BUILD"),
        "build_on_storage_ref.pt": (torch_zip(state_pickle(("w", tensor_ops(pid=storage_pid() + EMPTY_DICT + MARK + s_("key") + s_("../../etc/passwd") + SETITEMS + BUILD)))), UNREADABLE, "BUILD"),
        "build_on_dtype_token.pt": (torch_zip(state_pickle(("w", good_tensor), ("d", g_("torch", "Tensor") + EMPTY_DICT + BUILD))), UNREADABLE, "BUILD"),
        "build_wrong_state_shape.pt": (torch_zip(state_pickle(("w", good_tensor), ("o", g_("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE + i_(7) + BUILD))), UNREADABLE, "corrupt pickle"),
        # Hash bombs: a tuple of 2**64 nodes as a dict key, a set member, a Counter key.
        "hash_bomb_dict_key.pt": (torch_zip(state_pickle(("w", good_tensor), ("h", EMPTY_DICT + hashed_key + SETITEM))), UNREADABLE, "hash .*budget"),
        "hash_bomb_dict_opcode.pt": (torch_zip(state_pickle(("w", good_tensor), ("h", MARK + hashed_key + DICT))), UNREADABLE, "hash .*budget"),
        # 3 million nodes (inside the hash budget) hashed again by each of 400 BUILDs.
        "hash_bomb_build_state.pt": (torch_zip(state_pickle(("w", good_tensor), ("h", repeated_build(ORDERED_DICT, 20, 400)))), UNREADABLE, "corrupt pickle.*names"),
        "hash_bomb_build_record.pt": (torch_zip(state_pickle(("w", good_tensor), ("h", repeated_build(g_("argparse", "Namespace") + EMPTY_TUPLE + REDUCE, 20, 400, ORDERED_DICT)))), UNREADABLE, "no dict of tensors"),
        # One OrderedDict whose key is 3M nodes, shared by 1,000 entries: walked 1,000 times.
        "hash_bomb_shared_ordered_dict.pt": (torch_zip(state_pickle(("w", good_tensor), *((f"k{i}", get(21)) for i in range(1000)), prefix=ORDERED_DICT + doubling_tuple(20)[0] + i_(1) + SETITEM + put(21) + POP)), UNREADABLE, "no dict of tensors"),
        "hash_bomb_frozenset.pt": (torch_zip(state_pickle(("w", good_tensor), ("h", MARK + doubling + FROZENSET))), UNREADABLE, "hash .*budget"),
        "hash_bomb_counter.pt": (torch_zip(state_pickle(("w", good_tensor), ("h", g_("collections", "Counter") + MARK + EMPTY_LIST + MARK + doubling + APPENDS + TUPLE + REDUCE))), UNREADABLE, "budget"),
        "hash_bomb_set_call.pt": (torch_zip(state_pickle(("w", good_tensor), ("h", g_("builtins", "set") + MARK + EMPTY_LIST + MARK + doubling + APPENDS + TUPLE + REDUCE))), UNREADABLE, "budget"),
        # Billion laughs: shared references make one small dict appear 10**9 times.
        "laughs_nested_dicts.pt": (torch_zip(state_pickle(("w", good_tensor), ("x", fanout_dicts(3, 1000)))), UNREADABLE, "walked .*budget"),
        "laughs_dicts_as_candidates.pt": (torch_zip(state_pickle(("m", fanout_dicts(2, 2000)))), UNREADABLE, "walked .*budget|no dict of tensors"),
        "laughs_in_persistent_id.pt": (torch_zip(state_pickle(("w", tensor_ops(pid=storage_pid(key=doubling))))), UNREADABLE, "budget|malformed storage reference"),
        "laughs_in_device.pt": (torch_zip(state_pickle(("w", good_tensor), ("d", g_("torch", "device") + MARK + doubling + TUPLE + REDUCE))), UNREADABLE, "budget|torch.device"),
        "laughs_in_size.pt": (torch_zip(state_pickle(("w", good_tensor), ("d", g_("torch", "Size") + MARK + doubling + TUPLE + REDUCE))), UNREADABLE, "budget|torch.Size"),
        "laughs_list_as_extra.pt": (torch_zip(state_pickle(("state_dict", EMPTY_DICT + MARK + s_("w") + good_tensor + SETITEMS), ("extra", _list_laughs(30)))), OK, ""),
        "deep_nesting.pt": (torch_zip(state_pickle(("w", good_tensor), ("deep", (EMPTY_LIST + MARK) * 5000 + (APPENDS) * 5000))), UNREADABLE, "nests .*budget"),
        # Memory: a memo index of 2**31, a 10 GB bytearray, a stride-0 view of 10**10 floats.
        "memo_index_bomb.pt": (torch_zip(state_pickle(("w", good_tensor + b"r" + struct.pack("<I", 2**31 - 1)))), UNREADABLE, "memo"),
        "memo_get_unset.pt": (torch_zip(state_pickle(("w", get(5)))), UNREADABLE, "memo index 5"),
        "bytearray_bomb.pt": (torch_zip(state_pickle(("w", good_tensor), ("b", g_("builtins", "bytearray") + tup(i_(10**10)) + REDUCE))), UNREADABLE, "bytearray"),
        "stride0_expand.pt": (torch_zip(state_pickle(("w", tensor_ops(size=(100000, 100000), stride=(0, 0))))), UNREADABLE, "expanded-view budget"),
        "huge_size_int.pt": (torch_zip(state_pickle(("w", tensor_ops(size=(10**30,), stride=(1,))))), UNREADABLE, "malformed size"),
        "size_stride_rank_differ.pt": (torch_zip(state_pickle(("w", tensor_ops(size=(2, 2), stride=(1,))))), UNREADABLE, "sizes but"),
        "negative_storage_offset.pt": (torch_zip(state_pickle(("w", tensor_ops(offset=-40, size=(4,), stride=(1,))))), UNREADABLE, "storage offset"),
        "view_past_storage.pt": (torch_zip(state_pickle(("w", tensor_ops(offset=3, size=(4,), stride=(1,))))), UNREADABLE, "past the end of its storage"),
        # Its last element one past the storage's 4: the bound is strict.
        "view_one_past_storage.pt": (torch_zip(state_pickle(("w", tensor_ops(offset=1, size=(4,), stride=(1,))))), UNREADABLE, "past the end of its storage"),
        # Persistent ids of the wrong types.
        "pid_float_numel.pt": (torch_zip(state_pickle(("w", tensor_ops(pid=storage_pid(numel=b"G" + struct.pack(">d", 4.0)))))), UNREADABLE, "malformed storage reference"),
        "pid_dtype_key.pt": (torch_zip(state_pickle(("w", tensor_ops(pid=storage_pid(key=g_("torch", "float32")))))), UNREADABLE, "malformed storage reference"),
        "pid_int_key.pt": (torch_zip(state_pickle(("w", tensor_ops(pid=storage_pid(key=i_(0)))))), UNREADABLE, "malformed storage reference"),
        "pid_not_storage.pt": (torch_zip(state_pickle(("w", tensor_ops(pid=tup(s_("module"), s_("x")) + BINPERSID)))), UNREADABLE, "persistent id"),
        "pid_wrong_arity.pt": (torch_zip(state_pickle(("w", tensor_ops(pid=tup(s_("storage"), s_("x")) + BINPERSID)))), UNREADABLE, "persistent id"),
        "rebuild_from_non_storage.pt": (torch_zip(state_pickle(("w", tensor_ops(pid=i_(3))))), UNREADABLE, "not a storage"),
        "unknown_dtype_v3.pt": (torch_zip(state_pickle(("w", g_("torch._utils", "_rebuild_tensor_v3") + tup(storage_pid(), i_(0), tup(i_(4)), tup(i_(1)), NEWFALSE, g_("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE, s_("float32")) + REDUCE))), UNREADABLE, "unknown dtype"),
        "meta_tensor.pt": (torch_bytes({"w": torch.empty(2, 2, device="meta")}), OK, ""),
        "sparse_tensor.pt": (torch_bytes({"w": torch.eye(3).to_sparse()}), OK, ""),
        # Zip structure: what zipfile and torch's reader disagree on.
        "zip_duplicate_entry.pt": (_zip_with_duplicate(), UNREADABLE, "appears twice"),
        "zip_extra_past_eof.pt": (_patch_local_extra(torch_zip(state_pickle(("w", good_tensor))), "archive/data/0", 60000), UNREADABLE, "central directory|beyond the end|corrupt"),
        # The last record's data (a storage's, read by no check before) pushed one byte
        # into the central directory.
        "zip_last_record_into_directory.pt": (_patch_local_extra(torch_zip(state_pickle(("w", good_tensor)), storages_last=True), "archive/data/0", 1), UNREADABLE, "overlaps another record or the central directory"),
        "zip_extra_shifts_data.pt": (_patch_local_extra(torch_zip(state_pickle(("w", good_tensor))), "archive/data/0", 8), UNREADABLE, "central directory|corrupt|local header"),
        "zip_local_name_differs.pt": (_rename_local(torch_zip(state_pickle(("w", good_tensor))), b"archive/data/0", b"archive/data/9"), UNREADABLE, "local header"),
        "zip_bad_utf8_name.pt": (_utf8_flag_name(torch_zip(state_pickle(("w", good_tensor)))), UNREADABLE, "corrupt zip|local header|missing"),
        "zip_encrypted_flag.pt": (_set_flag_bit(torch_zip(state_pickle(("w", good_tensor))), 0x1), UNREADABLE, "corrupt zip|encrypt"),
        "zip_pickle_not_a_pickle.pt": (torch_zip(b"hello world"), UNREADABLE, "corrupt pickle"),
        "zip_two_data_pkl.pt": (_zip_two_prefixes(), UNREADABLE, "no torch data.pkl"),
        "pickle_truncated_mid_op.pt": (torch_zip(state_pickle(("w", good_tensor))[:-20]), UNREADABLE, "corrupt pickle"),
        "pickle_no_stop.pt": (torch_zip(state_pickle(("w", good_tensor))[:-1]), UNREADABLE, "corrupt pickle"),
        "pickle_stack_underflow.pt": (torch_zip(PROTO2 + SETITEMS + STOP), UNREADABLE, "corrupt pickle"),
    }  # fmt: skip
    return cases


def _list_laughs(levels: int) -> bytes:
    """L_i = [L_i-1] * 10, 30 levels: harmless unless something expands it."""
    ops = EMPTY_LIST + put(0) + POP
    for level in range(1, levels + 1):
        ops += EMPTY_LIST + MARK + get(level - 1) * 10 + APPENDS + put(level) + POP
    return ops + get(levels)


def _zip_with_duplicate() -> bytes:
    """Two records named archive/data/0 with different values."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(_entry("archive/data.pkl"), state_pickle(("w", tensor_ops())))
        archive.writestr(_entry("archive/byteorder"), b"little")
        archive.writestr(_entry("archive/data/0"), struct.pack("<4f", 1, 2, 3, 4))
        with warnings.catch_warnings():  # zipfile warns about the duplicate name
            warnings.simplefilter("ignore")
            archive.writestr(_entry("archive/data/0"), struct.pack("<4f", 9, 9, 9, 9))
    return out.getvalue()


def _patch_local_extra(data: bytes, name: str, extra_len: int) -> bytes:
    """Set the local header's extra-field length of ``name``: torch's reader skips it."""
    position = data.index(name.encode()) - 30
    return data[: position + 28] + struct.pack("<H", extra_len) + data[position + 30 :]


def _rename_local(data: bytes, old: bytes, new: bytes) -> bytes:
    position = data.index(old)  # the first occurrence is the local header's name
    return data[:position] + new + data[position + len(old) :]


def _set_flag_bit(data: bytes, bit: int) -> bytes:
    """Set a general-purpose flag bit in every central directory record."""
    out = bytearray(data)
    start = 0
    while (position := out.find(b"PK\x01\x02", start)) >= 0:
        out[position + 8] |= bit
        start = position + 4
    return bytes(out)


def _utf8_flag_name(data: bytes) -> bytes:
    """A record name that is not UTF-8 although its UTF-8 flag (bit 11) says it is."""
    bad = b"archive/versi\xff\xfe"
    renamed = data.replace(b"archive/version", bad)
    out = bytearray(renamed)
    central = out.rindex(bad) - 46
    out[central + 9] |= 0x08
    return bytes(out)


def _zip_two_prefixes() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for prefix in ("a/", "b/"):
            archive.writestr(_entry(f"{prefix}data.pkl"), state_pickle(("w", tensor_ops())))
            archive.writestr(_entry(f"{prefix}data/0"), bytes(16))
    return out.getvalue()


def st_entry(dtype: str = "F32", shape: Any = (2, 2), offsets: Any = (0, 16)) -> dict[str, Any]:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def flat_names(count: int) -> bytes:
    """``count`` empty tensors named w0, w1, ...: a flat layout (no dots) as some exports have."""
    header = {f"w{i}": st_entry(shape=(0,), offsets=(0, 0)) for i in range(count)}
    return safetensors_bytes(header)


def deep_json(levels: int) -> bytes:
    return b'{"a":' * levels + b"1" + b"}" * levels


def safetensors_cases() -> dict[str, tuple[bytes, int, str]]:
    data16 = struct.pack("<4f", 1, 2, 3, 4)
    aliased = {"w": st_entry()}

    def with_aliases(text: str) -> bytes:
        return safetensors_bytes({**aliased, "__metadata__": {"ckptool.aliases": text}}, data16)

    return {
        "st_gap_between_tensors.safetensors": (safetensors_bytes({"w": st_entry(), "v": st_entry(shape=(2,), offsets=(20, 28))}, bytes(28)), UNREADABLE, "belong to no tensor"),
        "st_trailing_bytes.safetensors": (safetensors_bytes(good_header(), bytes(24)), UNREADABLE, "after the last tensor"),
        "st_deep_json.safetensors": (safetensors_bytes(None, raw_header=deep_json(20000)), UNREADABLE, "nests too deeply"),
        "st_huge_shape.safetensors": (safetensors_bytes(header_with(shape=[10**30]), data16), UNREADABLE, "invalid shape"),
        "st_shape_product_overflow.safetensors": (safetensors_bytes(header_with(shape=[2**40, 2**40]), data16), UNREADABLE, "spans 16 bytes"),
        "st_shape_bool.safetensors": (safetensors_bytes(header_with(shape=[True, 4]), data16), UNREADABLE, "invalid shape"),
        "st_offsets_float.safetensors": (safetensors_bytes(header_with(data_offsets=[0.0, 16.0]), data16), UNREADABLE, "invalid data_offsets"),
        "st_offsets_three.safetensors": (safetensors_bytes(header_with(data_offsets=[0, 8, 16]), data16), UNREADABLE, "invalid data_offsets"),
        "st_dtype_lowercase.safetensors": (safetensors_bytes(header_with(dtype="f32"), data16), UNREADABLE, "unknown dtype"),
        "st_dtype_not_string.safetensors": (safetensors_bytes(header_with(dtype=["F32"]), data16), UNREADABLE, "unknown dtype"),
        "st_aliases_unhashable.safetensors": (with_aliases('{"a": ["w"]}'), UNREADABLE, "must map names to names"),
        "st_aliases_shadow_stored.safetensors": (with_aliases('{"w": "w"}'), UNREADABLE, "not a stored tensor"),
        "st_aliases_to_missing.safetensors": (with_aliases('{"a": "nope"}'), UNREADABLE, "not a stored tensor"),
        "st_aliases_not_json.safetensors": (with_aliases("{oops"), UNREADABLE, "not valid JSON"),
        "st_aliases_deep.safetensors": (with_aliases(deep_json(5000).decode()), UNREADABLE, "nests too deeply"),
        "st_metadata_not_dict.safetensors": (safetensors_bytes({**good_header(), "__metadata__": ["x"]}, data16), UNREADABLE, "__metadata__"),
        "st_escape_sequences_in_name.safetensors": (safetensors_bytes({"\x1b[31mred\x1b]0;pwned\x07": st_entry()}, data16), OK, ""),
        "st_markup_in_name.safetensors": (safetensors_bytes({"[/b]": st_entry(), "[bold red]x": st_entry(offsets=(16, 32))}, bytes(32)), OK, ""),
        "st_shell_and_hash_in_names.safetensors": (safetensors_bytes({"x; touch pwned #.weight": st_entry(), "y'$(id)'.bias": st_entry(offsets=(16, 32))}, bytes(32)), OK, ""),
        "st_flat_names_1000.safetensors": (flat_names(1000), OK, ""),
        "st_flat_names_25000.safetensors": (flat_names(25000), OK, ""),
        "st_empty_header.safetensors": (safetensors_bytes({}), OK, ""),
        "st_zero_sized.safetensors": (safetensors_bytes({"e": st_entry(shape=(0, 4), offsets=(0, 0)), "w": st_entry()}, data16), OK, ""),
    }  # fmt: skip


def unsafe_cases() -> dict[str, tuple[bytes, int, str]]:
    """Pickles that want code: each names the global it wanted."""

    def calling(module: str, name: str, *args: bytes) -> bytes:
        return torch_zip(
            state_pickle(("w", tensor_ops()), ("x", g_(module, name) + tup(*args) + REDUCE))
        )

    return {
        "unsafe_load_from_bytes.pt": (calling("torch.storage", "_load_from_bytes", b"C\x03abc"), UNSAFE, "torch.storage._load_from_bytes"),
        "unsafe_torch_load.pt": (calling("torch", "load", s_("/tmp/x")), UNSAFE, "torch.load"),
        "unsafe_pickle_loads.pt": (calling("pickle", "loads", b"C\x03abc"), UNSAFE, "pickle.loads"),
        "unsafe_functools_partial.pt": (calling("functools", "partial", s_("x")), UNSAFE, "functools.partial"),
        "unsafe_importlib.pt": (calling("importlib", "import_module", s_("os")), UNSAFE, "importlib.import_module"),
        "unsafe_shutil_rmtree.pt": (calling("shutil", "rmtree", s_("/tmp/nothing-here")), UNSAFE, "shutil.rmtree"),
        "unsafe_runpy.pt": (calling("runpy", "_run_code", s_("1")), UNSAFE, "runpy._run_code"),
        "unsafe_operator_attrgetter.pt": (calling("operator", "attrgetter", s_("system")), UNSAFE, "operator.attrgetter"),
        "unsafe_py2_builtin_eval.pt": (calling("__builtin__", "eval", s_("1")), UNSAFE, "builtins.eval"),
        "unsafe_nt_system.pt": (calling("nt", "system", s_("echo")), UNSAFE, "nt.system"),
        "unsafe_stack_global.pt": (torch_zip(PROTO2 + b"\x8c\x02os\x8c\x06system\x93" + tup(s_("echo")) + REDUCE + STOP), UNSAFE, "os.system"),
        "unsafe_inst_opcode.pt": (torch_zip(PROTO2 + MARK + s_(f"touch {MARKER}") + b"ios\nsystem\n" + STOP), UNSAFE, "os.system"),
        "unsafe_obj_opcode.pt": (torch_zip(PROTO2 + MARK + g_("subprocess", "Popen") + s_("true") + b"o" + STOP), UNSAFE, "subprocess.Popen"),
        "unsafe_newobj.pt": (torch_zip(PROTO2 + g_("subprocess", "Popen") + tup(s_("true")) + b"\x81" + STOP), UNSAFE, "subprocess.Popen"),
        "unsafe_storage_type.pt": (torch_zip(state_pickle(("w", tensor_ops(pid=tup(s_("storage"), g_("os", "system"), s_("0"), s_("cpu"), i_(4)) + BINPERSID)))), UNSAFE, "os.system"),
        "unsafe_module_prefix_lookalike.pt": (calling("torch._utils_evil", "_rebuild_tensor_v2"), UNSAFE, "torch._utils_evil"),
        "unsafe_storage_module_lookalike.pt": (torch_zip(state_pickle(("w", tensor_ops(pid=storage_pid(storage="FloatStorage").replace(b"ctorch\nFloatStorage", b"ctorch_evil\nFloatStorage"))))), UNSAFE, "torch_evil.FloatStorage"),
        "unsafe_dtype_module_lookalike.pt": (torch_zip(state_pickle(("w", g_("torch._utils", "_rebuild_tensor_v3") + tup(storage_pid(), i_(0), tup(i_(4)), tup(i_(1)), NEWFALSE, g_("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE, g_("torchvision", "float32")) + REDUCE))), UNSAFE, "torchvision.float32"),
        "unsafe_torch_submodule_function.pt": (calling("torch.hub", "load", s_("x")), UNSAFE, "torch.hub.load"),
    }  # fmt: skip


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


def write_directory_cases(outdir: str, manifest: dict[str, dict[str, Any]]) -> None:
    """Shard indexes beyond the basic ones, and torch.distributed.checkpoint folders."""
    os.makedirs(os.path.join(outdir, "a_directory.safetensors"))
    # git keeps no empty folders: a file inside keeps this one in the repository.
    with open(os.path.join(outdir, "a_directory.safetensors", "KEEP"), "w") as f:
        f.write("a folder named like a shard\n")
    torch.save(
        {"c": torch.ones(3)},
        os.path.join(outdir, "shard-c.bin"),
        _use_new_zipfile_serialization=False,
    )
    torch.save({"d": torch.ones(2)}, os.path.join(outdir, "shard-d.bin"))
    indexes = {
        "index_deep_json.index.json": (deep_json(20000).decode(), UNREADABLE, "nests too deeply"),
        "index_not_object.index.json": ("[1, 2]", UNREADABLE, "no 'weight_map'"),
        "index_shard_not_a_string.index.json": (json.dumps({"weight_map": {"a": 7}}), UNREADABLE, "no 'weight_map'"),
        "index_absolute_path.index.json": (json.dumps({"weight_map": {"a": "/etc/passwd"}}), UNREADABLE, "not a plain file name"),
        "index_shard_is_directory.index.json": (json.dumps({"weight_map": {"a": "a_directory.safetensors"}}), UNREADABLE, "is a directory"),
        "index_legacy_bin_shards.index.json": (json.dumps({"weight_map": {"c": "shard-c.bin", "d": "shard-d.bin"}}), OK, ""),
        "index_mixed_formats.index.json": (json.dumps({"weight_map": {"a": "shard-a.safetensors", "c": "shard-c.bin"}}), OK, ""),
    }  # fmt: skip
    for name, (text, code, pattern) in indexes.items():
        with open(os.path.join(outdir, name), "w", encoding="utf-8") as f:
            f.write(text)
        manifest[name] = {"exit": code, "match": pattern}
    for name, (edit, code, pattern) in dcp_edits().items():
        folder = os.path.join(outdir, name)
        write_dcp(folder, edit)
        manifest[name] = {"exit": code, "match": pattern}


def write_dcp(folder: str, edit: Callable[[Any, str], None]) -> None:
    """Save a real DCP checkpoint, then let ``edit`` change its metadata (our own pickle)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save({"model": small_state(), "step": 3}, checkpoint_id=folder)
    path = os.path.join(folder, ".metadata")
    with open(path, "rb") as f:
        metadata = pickle.load(f)
    edit(metadata, folder)
    with open(path, "wb") as f:
        pickle.dump(metadata, f)


def _first_storage(metadata: Any) -> Any:
    return next(iter(metadata.storage_data.values()))


def _chunk_not_a_tensor(metadata: Any, folder: str) -> None:
    blob = torch_bytes({"not": "a tensor"})
    with open(os.path.join(folder, "extra.distcp"), "wb") as f:
        f.write(blob)
    for info in metadata.storage_data.values():
        info.relative_path, info.offset, info.length = "extra.distcp", 0, len(blob)


def _bad_dtype(metadata: Any, folder: str) -> None:
    entry = metadata.state_dict_metadata["model.weight"]
    entry.properties = dataclasses.replace(entry.properties, dtype="float99")


def _huge_size(metadata: Any, folder: str) -> None:
    metadata.state_dict_metadata["model.weight"].size = torch.Size([10**12])


def _escaping_path(metadata: Any, folder: str) -> None:
    _first_storage(metadata).relative_path = "../../../../etc/passwd"


def dcp_edits() -> dict[str, tuple[Callable[[Any, str], None], int, str]]:
    return {
        "dcp_valid": (lambda metadata, folder: None, OK, ""),
        "dcp_chunk_not_a_tensor": (_chunk_not_a_tensor, OK, ""),
        "dcp_unknown_dtype": (_bad_dtype, UNREADABLE, "no known dtype"),
        "dcp_size_beyond_files": (_huge_size, UNREADABLE, "declares .* bytes"),
        "dcp_chunk_path_escapes": (_escaping_path, OK, ""),
    }


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
    cases = {**build_cases(), **crafted_cases(), **safetensors_cases(), **unsafe_cases()}
    for name, (content, code, pattern) in cases.items():
        with open(os.path.join(outdir, name), "wb") as f:
            f.write(content)
        manifest[name] = {"exit": code, "match": pattern}
    write_sharded_cases(outdir, manifest)
    write_directory_cases(outdir, manifest)
    with open(os.path.join(outdir, "MANIFEST.json"), "w", encoding="utf-8") as f:
        json.dump({"marker": MARKER, "cases": manifest}, f, indent=1, sort_keys=True)
    print(f"wrote {len(manifest)} cases to {outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
