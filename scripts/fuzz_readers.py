"""Mutation fuzzing of the readers: every mutant must load or raise a CkptError.

Seeds are three real files written by torch and safetensors (a zip ``.pt``, a legacy
``.pt`` and a ``.safetensors``). Each mutant flips, inserts, deletes or overwrites a few
bytes, or truncates the file, and goes through ``read_metadata`` and ``load_state_dict``.
The zip is mutated twice over: as a whole, and inside its data.pkl with the archive
repacked, so mutants get past the CRC check to the unpickler.
Outcomes are counted; anything other than success or a ``CkptError`` is a bug and is
printed with the seed and mutant number that reproduce it.

    python scripts/fuzz_readers.py [--mutants 10000] [--seed 0]
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

# Values that often sit on a boundary of a length or count field.
INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**63 - 1]


def seed_files() -> dict[str, bytes]:
    """Small real checkpoints in the three single-file formats."""
    import torch
    from safetensors.torch import save

    torch.manual_seed(0)
    state = {**torch.nn.Linear(4, 3).state_dict(), "bn.running_mean": torch.zeros(3)}
    zip_buffer, legacy_buffer = io.BytesIO(), io.BytesIO()
    torch.save({"state_dict": state, "epoch": 3}, zip_buffer)
    torch.save(state, legacy_buffer, _use_new_zipfile_serialization=False)
    return {
        "zip.pt": zip_buffer.getvalue(),
        "zip-data.pkl.pt": zip_buffer.getvalue(),  # mutated inside, see mutate_inner_pickle
        "legacy.pt": legacy_buffer.getvalue(),
        "model.safetensors": save(state),
    }


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to four random edits of ``data``."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        edit = rng.choice(EDITS)
        out = edit(out, rng)
    return bytes(out)


def _flip(out: bytearray, rng: random.Random) -> bytearray:
    if out:
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return out


def _overwrite(out: bytearray, rng: random.Random) -> bytearray:
    if len(out) > 8:
        value = rng.choice(INTERESTING)
        width = rng.choice((1, 2, 4, 8))
        position = rng.randrange(len(out) - width)
        out[position : position + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
    return out


def _insert(out: bytearray, rng: random.Random) -> bytearray:
    position = rng.randrange(len(out) + 1)
    out[position:position] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    return out


def _delete(out: bytearray, rng: random.Random) -> bytearray:
    if out:
        position = rng.randrange(len(out))
        del out[position : position + rng.randint(1, 8)]
    return out


def _truncate(out: bytearray, rng: random.Random) -> bytearray:
    return out[: rng.randrange(len(out) + 1)]


EDITS: list[Callable[[bytearray, random.Random], bytearray]] = [
    _flip, _flip, _overwrite, _overwrite, _insert, _delete, _truncate,
]  # fmt: skip


def repeat_span(data: bytes, rng: random.Random) -> bytes:
    """A copy of one span of ``data`` over or into another: whole records repeated."""
    out = bytearray(data)
    start, length = rng.randrange(len(out)), rng.randint(1, 120)
    at = rng.randrange(len(out))
    if rng.random() < 0.5:
        out[at:at] = out[start : start + length]
    else:
        out[at : at + length] = out[start : start + length]
    return bytes(out)


def mutate_inner_pickle(data: bytes, rng: random.Random) -> bytes:
    """Mutate only data.pkl inside a torch zip and repack it with valid CRCs, so the
    mutant reaches the unpickler instead of failing the zip's checksum."""
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            content = src.read(info)
            if info.filename.endswith("data.pkl"):
                content = mutate(content, rng)
            dst.writestr(info, content)
    return out.getvalue()


def mutants(data: bytes, count: int, seed: int, *, inner: bool) -> Iterator[tuple[int, bytes]]:
    rng = random.Random(seed)
    edit = mutate_inner_pickle if inner else mutate
    for number in range(count):
        yield number, edit(data, rng)


def outcome(path: str) -> str:
    """'ok', the CkptError class name, or 'BUG <exception>' for anything else."""
    import ckptool

    try:
        ckptool.read_metadata(path)
        ckptool.load_state_dict(path)
    except ckptool.CkptError as e:
        return type(e).__name__
    except Exception as e:  # what the fuzzer is looking for
        return f"BUG {type(e).__name__}: {str(e)[:120]}"
    return "ok"


def fuzz(name: str, data: bytes, count: int, seed: int, folder: str) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    path = os.path.join(folder, name.replace("-data.pkl", ""))
    for number, mutant in mutants(data, count, seed, inner=name == "zip-data.pkl.pt"):
        with open(path, "wb") as f:
            f.write(mutant)
        result = outcome(path)
        counts[result if not result.startswith("BUG") else "BUG"] += 1
        if result.startswith("BUG"):
            print(f"{name} seed={seed} mutant={number}: {result}", file=sys.stderr)
    return counts


def mutant_arguments(doc: str | None, mutants: int, what: str | None = None) -> argparse.Namespace:
    """--mutants (``mutants`` by default) and --seed, the options of every mutation script."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mutants", type=int, default=mutants, help=what)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> int:
    args = mutant_arguments(__doc__, 10000, "per seed file")
    bugs = 0
    with tempfile.TemporaryDirectory() as folder:
        for name, data in seed_files().items():
            start = time.perf_counter()
            counts = fuzz(name, data, args.mutants, args.seed, folder)
            bugs += counts["BUG"]
            elapsed = time.perf_counter() - start
            summary = ", ".join(f"{k} {v}" for k, v in counts.most_common())
            print(f"{name} ({len(data)} B): {args.mutants} mutants in {elapsed:.0f} s: {summary}")
    return 1 if bugs else 0


if __name__ == "__main__":
    sys.exit(main())
