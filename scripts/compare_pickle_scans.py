"""The pickle budget scan of another checkout against this one: identical verdicts.

A change to ``ckptool/formats/pickle_scan.py`` (made for speed, say) must not change
what it accepts or refuses. This runs both scans on the pickles of ``fixtures/bad/``,
a ResNet-18 training checkpoint, two plain pickles and random mutants of them (the
edits of ``fuzz_readers.py``), and compares each outcome: accepted, or the exception's
type and message.

    git worktree add --detach /tmp/before HEAD~1
    python scripts/compare_pickle_scans.py /tmp/before [--pickles 30000] [--seed 0]
"""

from __future__ import annotations

import argparse
import collections
import glob
import importlib.util
import io
import os
import pickle
import random
import sys
import zipfile
from types import ModuleType

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fuzz_readers import mutate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scan_module(tree: str) -> ModuleType:
    """``pickle_scan`` as it is in ``tree`` (it imports only ckptool.errors)."""
    path = os.path.join(tree, "ckptool", "formats", "pickle_scan.py")
    spec = importlib.util.spec_from_file_location("pickle_scan_of_tree", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seed_pickles() -> list[bytes]:
    found = []
    for path in sorted(glob.glob(os.path.join(REPO, "fixtures", "bad", "*"))):
        if os.path.isdir(path):
            continue
        if zipfile.is_zipfile(path):
            try:
                with zipfile.ZipFile(path) as archive:
                    found += [archive.read(n) for n in archive.namelist() if n.endswith(".pkl")]
            except Exception:  # crafted archives break zipfile in many ways: not a seed
                continue
        else:
            with open(path, "rb") as f:
                data = f.read(1 << 20)
            if data[:1] == b"\x80":  # a legacy file's (first) pickle
                found.append(data)
    found.append(_training_checkpoint_pickle())
    found.append(pickle.dumps({"a": [1, 2, (3, 4)], "b": {"c": None}}, protocol=2))
    found.append(pickle.dumps([[1] * 5] * 3, protocol=0))
    return found


def _training_checkpoint_pickle() -> bytes:
    import torch
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": optimizer.state_dict()}, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as archive:
        return archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))


def verdict(scan: ModuleType, data: bytes) -> tuple[str, ...]:
    try:
        scan.check_pickle_budgets(data)
    except Exception as e:  # the verdict is the exception, whatever it is
        return (type(e).__name__, str(e))
    return ("accepted",)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("tree", help="the other checkout (a git worktree)")
    parser.add_argument("--pickles", type=int, default=30000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    before, now = scan_module(args.tree), scan_module(REPO)
    seeds = seed_pickles()
    rng = random.Random(args.seed)
    outcomes: collections.Counter[str] = collections.Counter()
    differ = 0
    for i in range(args.pickles):
        seed = seeds[i % len(seeds)]
        data = seed if i < len(seeds) else mutate(seed, rng)
        old, new = verdict(before, data), verdict(now, data)
        outcomes[new[0]] += 1
        if old != new:
            differ += 1
            print(f"pickle {i} (seed {i % len(seeds)}): {old} -> {new}")
    print(f"{len(seeds)} seeds, {args.pickles} pickles: {dict(outcomes)}; {differ} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
