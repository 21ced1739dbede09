"""Every file in fixtures/bad/ gets its documented exit code and one clear line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

BAD = REPO / "fixtures" / "bad"
MANIFEST = json.loads((BAD / "MANIFEST.json").read_text())
CASES = sorted(MANIFEST["cases"].items())


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 25
    assert {case["exit"] for _, case in CASES} == {3, 4}


@pytest.mark.parametrize(("name", "case"), CASES, ids=[name for name, _ in CASES])
def test_inspect_refuses_with_one_line(run_cli, name: str, case: dict) -> None:
    result = run_cli("inspect", BAD / name)
    assert result.exit_code == case["exit"], result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptool: error: "), result.stderr
    assert re.search(case["match"], lines[0]), lines[0]
    assert "Traceback" not in result.stderr and "weights_only=False" not in result.stderr


@pytest.mark.parametrize(
    ("name", "case"), [c for c in CASES if c[1]["exit"] == 4], ids=lambda c: str(c)[:30]
)
def test_diff_and_load_refuse_unsafe_files_too(run_cli, name: str, case: dict) -> None:
    result = run_cli("diff", BAD / name, "--model", "torchvision:resnet18", "--json")
    assert result.exit_code == 4 and result.stdout == ""


def test_hostile_pickles_never_run(tmp_path: Path) -> None:
    """Run the real console script over the whole corpus; no payload may leave its marker."""
    marker = Path(MANIFEST["marker"])
    marker.unlink(missing_ok=True)
    names = [str(BAD / name) for name, _ in CASES]
    code = (
        "import sys, ckptool\n"
        "for p in sys.argv[1:]:\n"
        "    try: ckptool.load_state_dict(p)\n"
        "    except ckptool.CkptError: pass\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, *names], check=True, cwd=tmp_path, capture_output=True
    )
    for name in names[:5]:
        subprocess.run(
            ["ckptool", "inspect", name], cwd=tmp_path, capture_output=True, env={**os.environ}
        )
    assert not marker.exists()
    assert list(tmp_path.iterdir()) == []  # nothing written next to the user either
