"""The compact header reader reads what json reads, and leaves everything else to json.

``read_compact_header`` is a second reader of safetensors headers, so every test here
holds ``read_safetensors_meta`` to what it gives with that reader switched off: on files
safetensors wrote, on compact headers with a fault in one entry (found by the same
checks, named by the json path), on headers it must decline, and on random mutants.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from safetensors.torch import save_file

from ckptool.errors import CheckpointReadError
from ckptool.formats import safetensors_header
from ckptool.formats.meta import CheckpointMeta
from ckptool.formats.safetensors_compact import read_compact_header
from ckptool.formats.safetensors_header import read_safetensors_meta

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from compare_header_reader import compare, json_outcome, outcome, same


def write_header(path: Path, header: dict[str, Any], data: bytes, *, compact: bool = True) -> str:
    """A safetensors file of ``header`` as safetensors writes it (compact, space-padded),
    or as ``json.dumps`` writes it by default."""
    separators = (",", ":") if compact else None
    text = json.dumps(header, separators=separators, ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return str(path)


def header_text(path: str) -> str:
    data = Path(path).read_bytes()
    return data[8 : 8 + int.from_bytes(data[:8], "little")].decode()


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def without_json(path: str) -> CheckpointMeta:
    """The file read with json.loads made to fail: only the compact reader can read it."""
    with mock.patch.object(safetensors_header, "_parse_header", side_effect=AssertionError):
        return read_safetensors_meta(path)


def test_a_file_safetensors_wrote_is_read_without_json(tmp_path: Path) -> None:
    """Metadata, eight dtypes, a scalar, an empty tensor: json is never called, and the
    checkpoint is the one the json path reads."""
    state = {
        "layers.10.weight": torch.randn(3, 2),
        "layers.2.bias": torch.zeros(3, dtype=torch.bfloat16),
        "x": torch.ones(2, 1, 2, 1, dtype=torch.float16),
        "steps": torch.tensor(7),
        "mask": torch.tensor([True, False]),
        "empty": torch.zeros(0, 4),
        "codes": torch.arange(4, dtype=torch.uint8),
        "scale": torch.zeros(2, dtype=torch.float8_e5m2),
    }
    path = str(tmp_path / "w.safetensors")
    save_file(state, path, metadata={"format": "pt", "note": "caf\u00e9 \U0001f600"})
    meta = without_json(path)
    assert same(meta, json_outcome(path))
    assert list(meta.tensors)[:3] == ["codes", "empty", "layers.2.bias"]
    assert meta.tensors["layers.10.weight"].shape == (3, 2)
    assert meta.tensors["steps"].shape == ()
    assert meta.metadata == {"format": "pt", "note": "caf\u00e9 \U0001f600"}


def test_ckptools_alias_metadata_is_read_without_json(tmp_path: Path) -> None:
    """The alias map is a JSON string inside the metadata: escaped quotes."""
    header = {
        "__metadata__": {"ckptool.aliases": json.dumps({"head.weight": "embed.weight"})},
        "embed.weight": entry("F32", [2, 2], 0, 16),
    }
    path = write_header(tmp_path / "a.safetensors", header, bytes(16))
    meta = without_json(path)
    assert meta.tensors["head.weight"] == meta.tensors["embed.weight"]
    assert same(meta, json_outcome(path))


# A compact header of two tensors, and the data section it describes.
TWO = {"a": entry("F32", [2], 0, 8), "b.0": entry("I64", [1], 8, 16)}


@pytest.mark.parametrize(
    ("header", "data_len", "message"),
    [
        ({**TWO, "b.0": entry("Q8", [1], 8, 16)}, 16, "Q8"),
        ({**TWO, "b.0": entry("I64", [2], 8, 16)}, 16, "b.0"),  # 8 bytes for 16
        ({**TWO, "b.0": entry("I64", [1], 4, 12)}, 16, "overlap"),
        (TWO, 24, "belong to no tensor"),
        ({**TWO, "b.0": entry("I64", [1], 8, 10**20)}, 16, "b.0"),  # 21 digits
        ({**TWO, "b.0": entry("I64", [2**63], 8, 16)}, 16, "b.0"),
    ],
    ids=["dtype", "span", "overlap", "gap", "long-number", "count-over-int64"],
)
def test_a_compact_header_with_a_fault_is_refused_as_json_refuses_it(
    tmp_path: Path, header: dict[str, Any], data_len: int, message: str
) -> None:
    """The columns go through the general reader's entry checks; a fault sends the file
    to the json path, which names it."""
    path = write_header(tmp_path / "bad.safetensors", header, bytes(data_len))
    expected = json_outcome(path)
    assert isinstance(expected, str) and message in expected
    assert outcome(path) == expected


@pytest.mark.parametrize(
    ("text", "refusal"),
    [
        ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
         '"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', "repeats the key 'a'"),
        ('{"__metadata__":{"format":"pt","format":"np"},'
         '"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', "repeats the key 'format'"),
        ('{"__metadata__":{"dtype":"F32","shape":[0],"data_offsets":[8,8]},'
         '"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', "__metadata__ must map"),
        ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"__metadata__":'
         '{"dtype":"F32","shape":[0],"data_offsets":[8,8]}}', "__metadata__ must map"),
        ('{"a":{"dtype":"F32","shape":[02],"data_offsets":[0,8]}}', "not valid JSON"),
        ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,' + "8" * 5000 + "]}}",
         "not readable JSON"),
        ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}}', "not valid JSON"),
        ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}\u00a0', "not valid JSON"),
        ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}]', "not valid JSON"),
        ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
         '"b":{"dtype":"F32","shape":[0],"data_offsets":[8,8]}}', "not valid JSON"),
        ('{"__metadata__":{"n":"\\ud800"},'
         '"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', "lone surrogate"),
        ('{"a\\u0000":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', None),
        ('{"a\tb":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', "not valid JSON"),
    ],
    ids=["repeated-name", "repeated-metadata-key", "metadata-of-entry-shape",
         "tensor-named-metadata", "leading-zero", "5000-digits", "extra-brace", "no-break-space",
         "bracket", "no-comma", "lone-surrogate", "escaped-name", "raw-tab"],
)  # fmt: skip
def test_the_compact_reader_declines_what_it_cannot_read_as_json_does(
    tmp_path: Path, text: str, refusal: str | None
) -> None:
    """Each of these is either refused by json's path, or read by it alone."""
    raw = text.encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(8))
    assert read_compact_header(text) is None
    if refusal is None:
        assert isinstance(read_safetensors_meta(str(path)), CheckpointMeta)
    else:
        with pytest.raises(CheckpointReadError, match=refusal):
            read_safetensors_meta(str(path))


def test_headers_json_dumps_writes_are_left_to_json(tmp_path: Path) -> None:
    """Spaces after the separators: not the compact shape, the same checkpoint."""
    spaced = write_header(tmp_path / "s.safetensors", TWO, bytes(16), compact=False)
    compact = write_header(tmp_path / "c.safetensors", TWO, bytes(16))
    assert read_compact_header(header_text(spaced)) is None
    assert read_compact_header(header_text(compact)) is not None

    def described(path: str) -> list[tuple[str, tuple[int, ...], str, int]]:
        tensors = read_safetensors_meta(path).tensors.items()
        return [(name, t.shape, t.dtype, t.storage_nbytes) for name, t in tensors]

    assert described(spaced) == described(compact) != []


def test_as_many_tensors_as_the_budget_are_left_to_json(tmp_path: Path) -> None:
    """The json path counts entries against MAX_TENSORS and names the budget."""
    header = {f"t{i}": entry("F32", [0], 0, 0) for i in range(3)}
    path = write_header(tmp_path / "many.safetensors", header, b"")
    budget = mock.patch.object(safetensors_header, "MAX_TENSORS", 2)
    with budget, pytest.raises(CheckpointReadError, match="over the budget of 2 tensors"):
        read_safetensors_meta(path)


def test_mutants_read_alike() -> None:
    """Random mutants of five headers (scripts/compare_header_reader.py runs 200,000)."""
    tally = compare(3000, seed=0)
    assert tally.differ == []
    assert tally.read > 150 and tally.valid > 100  # the comparison reached the reader
