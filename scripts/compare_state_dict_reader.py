"""The one-pass state dict reader against the restricted unpickler: the same objects.

``ckptool/formats/state_dict_pickle.py`` reads torch.save state dicts without the
budget scan and the unpickler; wherever it returns objects, they must be the ones the
unpickler builds from the same bytes, and the unpickler must not refuse those bytes.
This reads torch.save pickles of state dicts (an ``OrderedDict`` with ``_metadata``
and views, tied storages, half, int64 and five-dimensional tensors; the same as a plain
dict; a file ckptool wrote; locations made afresh per storage, as CUDA tensors have),
and random mutants of them (``fuzz_readers.mutate``, plus copies of one span over
another, which repeat whole records), with both readers, and counts the mutants the
one-pass reader read and any that differ.

    python scripts/compare_state_dict_reader.py [--mutants 200000] [--seed 0]
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import random
import subprocess
import sys
import tempfile
import time
import zipfile
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fuzz_readers import mutant_arguments, mutate, repeat_span

from ckptool.formats.restricted_pickle import Unpickled, load_restricted
from ckptool.formats.state_dict_pickle import read_state_dict_pickle

SCOPE = "archive/data/"


def data_pkl(obj: Any) -> bytes:
    """The data.pkl torch.save writes for ``obj``."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return archived_data_pkl(io.BytesIO(buffer.getvalue()))


def archived_data_pkl(archive_file: str | io.BytesIO) -> bytes:
    with zipfile.ZipFile(archive_file) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        return archive.read(name)


def seed_pickles() -> list[bytes]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        *[torch.nn.Linear(2, 2) for _ in range(40)], torch.nn.BatchNorm1d(2)
    )
    state = model.state_dict()
    state["tied"] = state["0.weight"].view(-1)
    state["view"] = state["0.bias"][1:]
    state["half"] = torch.zeros(2, 2, dtype=torch.half)
    state["five"] = torch.zeros(1, 2, 1, 2, 1)
    state["scalar"] = torch.tensor(3.0)
    state.update(step=5, lr=0.25, best="val", done=True, parent=None)  # plain values
    pickles = [data_pkl(state), data_pkl(dict(state))]
    with tempfile.TemporaryDirectory() as tmp:
        source, written = os.path.join(tmp, "a.pt"), os.path.join(tmp, "b.pt")
        torch.save(state, source)
        convert = [sys.executable, "-m", "ckptool", "convert", source, "-o", written]
        subprocess.run(convert, check=True, capture_output=True)
        pickles.append(archived_data_pkl(written))
    # (a size tuple of its own each: a shared one would be pickled once, then fetched)
    fresh_locations = {f"w{i}": Tensor(Storage(str(i), 4), 0, tuple([4])) for i in range(300)}
    pickles.append(torch_like_pickle(fresh_locations))
    return pickles


class Storage:
    def __init__(self, key: str, numel: int) -> None:
        self.key, self.numel = key, numel


class Tensor:
    """Pickles as torch.save pickles a tensor: _rebuild_tensor_v2 of a persistent id."""

    def __init__(
        self,
        storage: Storage,
        offset: int,
        size: tuple[int, ...],
        stride: tuple[int, ...] | None = None,
    ) -> None:
        self.storage, self.offset, self.size = storage, offset, size
        self.stride = stride if stride is not None else tuple(1 for _ in size)

    def __reduce_ex__(self, protocol: Any) -> Any:
        rebuild = torch._utils._rebuild_tensor_v2
        hooks = collections.OrderedDict()
        return rebuild, (self.storage, self.offset, self.size, self.stride, False, hooks)


class TorchLikePickler(pickle.Pickler):
    """Locations made afresh for each storage, as a CUDA tensor's are: each is written
    out with a store of its own, at every memo index."""

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, Storage):
            return ("storage", torch.FloatStorage, obj.key, "cuda:" + str(0), obj.numel)
        return None


def torch_like_pickle(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    TorchLikePickler(buffer, protocol=2).dump(state)
    return buffer.getvalue()


def general(data: bytes) -> Unpickled | Exception:
    try:
        return load_restricted(data, path="x.pt", storage_scope=SCOPE)
    except Exception as e:  # every refusal
        return e


def same(fast: Unpickled, slow: Unpickled | Exception) -> bool:
    def attributes(obj: Any) -> str:
        return repr(vars(obj)) if hasattr(obj, "__dict__") else ""

    return (
        not isinstance(slow, Exception)
        and type(fast.obj) is type(slow.obj)
        and repr(list(fast.obj.items())) == repr(list(slow.obj.items()))  # (NaN is NaN)
        and [type(v) for v in fast.obj.values()] == [type(v) for v in slow.obj.values()]
        and list(fast.storages.items()) == list(slow.storages.items())
        and fast.opaque == slow.opaque
        and attributes(fast.obj) == attributes(slow.obj)
    )


def main() -> None:
    args = mutant_arguments(__doc__, 200_000)
    pickles = seed_pickles()
    for data in pickles:
        fast = read_state_dict_pickle(data, storage_scope=SCOPE)
        if fast is None or not same(fast, general(data)):
            sys.exit(f"a seed pickle of {len(data)} bytes is not read alike")
    rng = random.Random(args.seed)
    read = differ = 0
    started = time.perf_counter()
    for _ in range(args.mutants):
        data = rng.choice(pickles)
        mutant = repeat_span(data, rng) if rng.random() < 0.3 else mutate(data, rng)
        fast = read_state_dict_pickle(mutant, storage_scope=SCOPE)
        if fast is None:
            continue
        read += 1
        if not same(fast, general(mutant)):
            differ += 1
            print(f"DIFFERS: mutant {mutant!r}"[:300])
    seconds = time.perf_counter() - started
    print(
        f"{args.mutants} mutants of {len(pickles)} state dict pickles in {seconds:.0f} s: "
        f"the one-pass reader read {read}, {differ} differ from the restricted unpickler"
    )
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
