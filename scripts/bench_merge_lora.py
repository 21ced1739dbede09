"""Benchmark: merging a LoRA adapter into a ~1 GB base, ckptool versus peft.

Makes a base of LAYERS Linear(4096, 4096) layers in float32 (64 MiB each; 16 layers =
1 GiB) saved with torch.save, and a LoRA adapter (r=16) on every layer written by peft
itself. Then, each in a fresh process, REPEATS times, interleaved, with ``sync`` first:

- ckptool merge-lora BASE ADAPTER -o OUT.safetensors (streamed, one tensor at a time);
- peft: torch.load the base into the model, PeftModel.from_pretrained,
  merge_and_unload(), safetensors save_file (what a user writes by hand).

Prints medians of wall time and peak RSS (wait4) and checks both outputs agree.

    python scripts/bench_merge_lora.py [--workdir DIR] [--repeats 3] [--layers 16]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_read import interleaved

HIDDEN = 4096

MODEL = textwrap.dedent(
    f"""
    import torch
    from torch import nn

    class Stack(nn.Module):
        def __init__(self, layers):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear({HIDDEN}, {HIDDEN}) for _ in range(layers))
    """
)

MAKE = MODEL + textwrap.dedent(
    """
    import sys, peft
    layers, base_path, adapter_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    torch.manual_seed(0)
    model = Stack(layers)
    torch.save(model.state_dict(), base_path)
    config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=["0", "1", "2", "3", "4",
        "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15"][:layers],
        init_lora_weights=False)
    peft.get_peft_model(model, config).save_pretrained(adapter_dir)
    """
)

PEFT_MERGE = MODEL + textwrap.dedent(
    """
    import sys, peft
    from safetensors.torch import save_file
    layers, base_path, adapter_dir, out = int(sys.argv[1]), *sys.argv[2:5]
    with torch.device("meta"):
        model = Stack(layers)
    model.load_state_dict(torch.load(base_path, weights_only=True, mmap=True), assign=True)
    merged = peft.PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, out)
    """
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=16)
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="ckptool-bench-lora-")
    base, adapter = os.path.join(workdir, "base.pt"), os.path.join(workdir, "adapter")
    ours, theirs = os.path.join(workdir, "ours.safetensors"), os.path.join(workdir, "peft.st")
    py = sys.executable
    subprocess.run([py, "-c", MAKE, str(args.layers), base, adapter], check=True)
    print(f"base {os.path.getsize(base) / 2**30:.2f} GiB, {args.layers} layers, r=16")
    contenders = {
        "ckptool merge-lora": [py, "-m", "ckptool", "merge-lora", base, adapter, "-o", ours,
                               "--force"],
        "peft merge_and_unload + save_file": [py, "-c", PEFT_MERGE, str(args.layers), base,
                                              adapter, theirs],
    }  # fmt: skip
    interleaved(contenders, args.repeats)
    check = (
        "import sys, torch; from safetensors.torch import load_file; a, b = map(load_file, "
        "sys.argv[1:]); print(max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() "
        "for k in b))"
    )
    out = subprocess.run([py, "-c", check, ours, theirs], capture_output=True, text=True)
    print(f"max relative difference ckptool vs peft: {out.stdout.strip()}")
    if not args.workdir:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
