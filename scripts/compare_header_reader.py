"""The compact safetensors header reader against json: the same checkpoint or the same error.

``ckptool/formats/safetensors_compact.py`` reads the headers safetensors' writer emits
with one regex match per tensor instead of ``json.loads``; wherever it reads a header,
``read_safetensors_meta`` must give what it gives with that reader switched off (the
json path), and wherever the json path refuses a header, the result must be the same
refusal. This writes headers with safetensors' own writer (metadata, eight dtypes, a
scalar, an empty tensor, a four-dimensional one), a header with ckptool's alias
metadata (an escaped JSON string) and names in other scripts, one with a name that needs
an escape, and one without metadata, and mutates them: random byte edits
(``fuzz_readers.mutate``), JSON punctuation and digits put in place of a character,
and spans copied over others (whole entries repeated). It counts the mutants the compact
reader read and any whose outcome differs.

    python scripts/compare_header_reader.py [--mutants 200000] [--seed 0]
"""

from __future__ import annotations

import json
import os
import random
import re
import struct
import sys
import tempfile
import time
from typing import Any, NamedTuple
from unittest import mock

import torch
from safetensors.torch import save

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fuzz_readers import mutant_arguments, mutate, repeat_span

from ckptool.errors import CheckpointReadError
from ckptool.formats import safetensors_header
from ckptool.formats.meta import CheckpointMeta
from ckptool.formats.safetensors_compact import read_compact_header
from ckptool.formats.safetensors_header import read_safetensors_meta

# What a JSON header is made of, for edits that keep it almost JSON, and whitespace
# that JSON refuses.
JSON_CHARACTERS = [*'{}[],:"\\0123456789 -+.eEuFIU_\t', "\f", "\u00a0", "\u2028"]


def seed_files() -> list[tuple[bytes, bytes]]:
    """(header, data section) of each seed file."""
    torch.manual_seed(0)
    state = {
        "layers.0.weight": torch.randn(3, 2),
        "layers.0.bias": torch.zeros(3, dtype=torch.bfloat16),
        "layers.10.weight": torch.ones(2, 1, 2, 1, dtype=torch.float16),
        "steps": torch.tensor(7, dtype=torch.int64),
        "mask": torch.tensor([True, False]),
        "empty": torch.zeros(0, 4),
        "codes": torch.arange(4, dtype=torch.uint8),
        "scale": torch.zeros(2, dtype=torch.float8_e4m3fn),
    }
    written = save(state, metadata={"format": "pt"})
    plain = save({"t2": torch.zeros(2), "t10": torch.zeros(1), "t1": torch.zeros(3)})
    return [
        _split(written),
        _split(plain),
        _rewritten(
            _split(written),
            metadata={"ckptool.aliases": '{"tied": "layers.0.weight"}', "note": "\U0001f600"},
            ascii_only=True,  # the note as a pair of surrogate escapes
        ),
        _rewritten(_split(plain), names={"t2": "名前.0", "t10": "t\u00e9"}),
        _rewritten(_split(plain), names={"t1": 'quote"d'}),
    ]


def _split(file: bytes) -> tuple[bytes, bytes]:
    (length,) = struct.unpack("<Q", file[:8])
    return file[8 : 8 + length], file[8 + length :]


def _rewritten(
    seed: tuple[bytes, bytes],
    *,
    metadata: dict[str, str] | None = None,
    names: dict[str, str] | None = None,
    ascii_only: bool = False,
) -> tuple[bytes, bytes]:
    """The seed's header in safetensors' compact JSON, with metadata added and names
    changed."""
    header: dict[str, Any] = json.loads(seed[0])
    if metadata:
        header["__metadata__"] = {**header.get("__metadata__", {}), **metadata}
    renamed = {(names or {}).get(name, name): entry for name, entry in header.items()}
    ordered = {"__metadata__": renamed.pop("__metadata__", None), **renamed}
    if ordered["__metadata__"] is None:
        del ordered["__metadata__"]
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=ascii_only).encode()
    return text + b" " * (-len(text) % 8), seed[1]


def edit_json(header: bytes, rng: random.Random) -> bytes:
    """A character of ``header`` replaced by, or a character inserted from, JSON's own."""
    out = bytearray(header)
    at = rng.randrange(len(out))
    character = rng.choice(JSON_CHARACTERS).encode("utf-8")
    out[at : at + rng.randint(0, 1)] = character
    return bytes(out)


def repeat_member(header: bytes, rng: random.Random) -> bytes:
    """An entry or a metadata string repeated, or its name made another's (or
    ``__metadata__``): keys that json keeps the last of."""
    text = header.decode("utf-8", "surrogatepass")
    members = list(_MEMBER.finditer(text))
    if not members:
        return header
    member = rng.choice(members)
    if rng.random() < 0.5:
        edited = text[: member.start()] + member[0] + "," + text[member.start() :]
    else:
        name = rng.choice([*(m[1] for m in members), '"__metadata__"'])
        edited = text[: member.start()] + name + text[member.end(1) :]
    return edited.encode("utf-8", "surrogatepass")


# An entry ("name":{...}) or a string member ("key":"value") of a compact header.
_STRING = r'"(?:[^"\\]|\\.)*"'
_MEMBER = re.compile(rf"(?<=[{{,])({_STRING}):(?:\{{[^{{}}]*\}}|{_STRING})(?=[,}}])")


def outcome(path: str) -> CheckpointMeta | str:
    try:
        return read_safetensors_meta(path)
    except CheckpointReadError as e:
        return str(e)


def json_outcome(path: str) -> CheckpointMeta | str:
    with mock.patch.object(safetensors_header, "read_compact_header", lambda text: None):
        return outcome(path)


def same(got: CheckpointMeta | str, expected: CheckpointMeta | str) -> bool:
    if isinstance(got, str) or isinstance(expected, str):
        return got == expected
    return got == expected and list(got.tensors.items()) == list(expected.tensors.items())


def read_compactly(header: bytes) -> bool:
    try:
        text = header.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return read_compact_header(text) is not None


class Tally(NamedTuple):
    read: int  # mutants the compact reader read
    valid: int  # of those, the checkpoints (the rest are refused after the checks)
    differ: list[bytes]  # headers whose outcome is not the json path's


def compare(mutants: int, seed: int) -> Tally:
    """Each seed, then ``mutants`` random mutants of them, through both paths."""
    seeds = seed_files()
    rng = random.Random(seed)
    read = valid = 0
    differ: list[bytes] = []
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "mutant.safetensors")
        for number in range(-len(seeds), mutants):
            header, data = seeds[number] if number < 0 else rng.choice(seeds)
            if number >= 0:
                header = rng.choice(EDITS)(header, rng)
            with open(path, "wb") as f:
                f.write(struct.pack("<Q", len(header)) + header + data)
            if not read_compactly(header):
                if number < 0 and b'quote\\"d' not in header:
                    raise AssertionError(f"a seed is not read by the compact reader: {header!r}")
                continue
            read += 1
            got, expected = outcome(path), json_outcome(path)
            valid += isinstance(got, CheckpointMeta)
            if not same(got, expected):
                differ.append(header)
                print(f"DIFFERS: header {header!r}: {got!r} against json's {expected!r}"[:400])
    return Tally(read, valid, differ)


EDITS = (mutate, edit_json, edit_json, repeat_member, repeat_span)


def main() -> None:
    args = mutant_arguments(__doc__, 200_000)
    started = time.perf_counter()
    tally = compare(args.mutants, args.seed)
    seconds = time.perf_counter() - started
    print(
        f"{args.mutants} mutants of {len(seed_files())} safetensors headers in {seconds:.0f} s: "
        f"the compact reader read {tally.read} ({tally.valid} of them checkpoints, the rest "
        f"refused), {len(tally.differ)} differ from the json path"
    )
    sys.exit(1 if tally.differ else 0)


if __name__ == "__main__":
    main()
