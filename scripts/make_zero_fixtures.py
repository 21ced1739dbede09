"""Write small real DeepSpeed ZeRO checkpoint folders, and what DeepSpeed's own
``zero_to_fp32`` makes of each, for ckptool's tests (fixtures/zero/).

Needs deepspeed (not a ckptool dependency; its sdist builds against the installed torch):

    DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed hjson py-cpuinfo msgpack ninja
    python scripts/make_zero_fixtures.py fixtures/zero

Each case trains two Adam steps on CPU (gloo, ``DS_ACCELERATOR=cpu``) with 2 or 3 ranks,
saves with ``engine.save_checkpoint`` and then runs DeepSpeed's
``get_fp32_state_dict_from_zero_checkpoint`` on the folder, saving the result as
``<case>.expected.safetensors`` (shared tensors cloned; their names in
``<case>.expected.json``). The model has what consolidation must get right: an odd
number of elements per tensor (ZeRO pads partitions), float buffers and an int64 one,
a frozen parameter, a weight shared by two modules, and two parameter groups.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# (case, zero stage, ranks, bf16)
CASES = [
    ("stage1", 1, 2, False),
    ("stage2", 2, 2, False),
    ("stage2_bf16", 2, 3, True),
    ("stage3", 3, 2, False),
    ("stage3_3ranks", 3, 3, False),
]

TRAIN = r"""
import os, sys
import torch, torch.nn as nn
import deepspeed

stage, bf16, out = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 7)
        self.conv = nn.Conv1d(7, 5, 3)
        # CPU batch_norm takes no bf16 input with float statistics: GroupNorm there.
        self.bn = nn.GroupNorm(1, 5) if bf16 else nn.BatchNorm1d(5)
        self.register_buffer("pos", torch.linspace(0, 1, 9))  # a float buffer, always
        self.frozen = nn.Linear(5, 5)
        self.head = nn.Linear(7, 11, bias=False)
        self.head.weight = self.embed.weight  # tied, as language models tie them
        self.frozen.requires_grad_(False)

    def forward(self, x):
        h = self.embed(x)
        h = (h + self.pos[:, None].to(h.dtype)).transpose(1, 2)  # DeepSpeed leaves buffers
        h = self.frozen(self.bn(self.conv(h)).transpose(1, 2)).mean(1)
        return h.sum() + self.head(self.embed(x)).mean()


torch.manual_seed(0)
model = Net()
decay = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("weight")]
other = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("weight")]
groups = [{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}]
world = int(os.environ["WORLD_SIZE"])
config = {
    "train_batch_size": 2 * world,
    "zero_optimization": {"stage": stage},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
    "bf16": {"enabled": bf16},
}
engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
torch.manual_seed(1 + engine.global_rank)
for _ in range(2):
    loss = engine(torch.randint(0, 11, (2, 9), device=engine.device))
    engine.backward(loss)
    engine.step()
engine.save_checkpoint(out, tag="global_step2")
"""

CONSOLIDATE = r"""
import json, sys
import torch
from safetensors.torch import save_file
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

folder, out = sys.argv[1], sys.argv[2]
state = get_fp32_state_dict_from_zero_checkpoint(folder)
first = {}
for name, tensor in state.items():
    first.setdefault(id(tensor), name)
shared = {name: first[id(t)] for name, t in state.items() if first[id(t)] != name}
save_file({k: v.contiguous().clone() for k, v in state.items()}, out + ".expected.safetensors")
with open(out + ".expected.json", "w") as f:
    json.dump({"order": list(state), "shared": shared}, f, indent=1)
"""


def main() -> None:
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "fixtures/zero")
    target.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        train, consolidate = Path(tmp, "train.py"), Path(tmp, "consolidate.py")
        train.write_text(TRAIN)
        consolidate.write_text(CONSOLIDATE)
        for case, stage, ranks, bf16 in CASES:
            folder = target / case
            shutil.rmtree(folder, ignore_errors=True)
            run = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}"]
            run += ["--master_port", str(29600 + stage * 10 + ranks), str(train)]
            run += [str(stage), "1" if bf16 else "0", str(folder)]
            _run(run, env)
            for script in ("zero_to_fp32.py", "zero_to_torch.py"):
                (folder / script).unlink(missing_ok=True)  # DeepSpeed copies its tools in
            _run([sys.executable, str(consolidate), str(folder), str(target / case)], env)
            size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            print(f"{case}: stage {stage}, {ranks} ranks, bf16={bf16}, {size} bytes")


def _run(command: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")


if __name__ == "__main__":
    main()
