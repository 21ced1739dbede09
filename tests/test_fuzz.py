"""A bounded, seeded run of scripts/fuzz_readers.py: mutants load or raise a CkptError.

The long run (thousands of mutants per seed file) is the script itself; its counts are
in docs/security.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import fuzz_readers

SEEDS = fuzz_readers.seed_files()


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_mutants_load_or_raise_ckpt_errors(tmp_path: Path, name: str) -> None:
    counts = fuzz_readers.fuzz(name, SEEDS[name], count=150, seed=1, folder=str(tmp_path))
    assert counts["BUG"] == 0, counts
    # The mutants must reach past the first check: some load, some are refused.
    assert counts["ok"] > 0 and counts["CheckpointReadError"] > 0, counts


def test_outcome_reports_foreign_exceptions_as_bugs(tmp_path: Path, monkeypatch) -> None:
    """The oracle itself: an exception that is not a CkptError must count as a bug."""
    import ckptool

    def broken(path: object) -> None:
        raise KeyError("internal")

    monkeypatch.setattr(ckptool, "read_metadata", broken)
    assert fuzz_readers.outcome(str(tmp_path / "x.pt")).startswith("BUG KeyError")
