"""DeepSpeed ZeRO folders consolidated without deepspeed, checked against DeepSpeed itself.

fixtures/zero/ holds real ZeRO stage 1, 2 and 3 checkpoints (2 or 3 ranks, one bf16),
written by DeepSpeed 0.19.8 on CPU, and what DeepSpeed's own ``zero_to_fp32`` made of
each (``<case>.expected.safetensors``); ``scripts/make_zero_fixtures.py`` regenerates
them. ckptool must give the same names, dtypes, shapes and bytes, tied names tied.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import ckptool
from ckptool.errors import CheckpointReadError

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures" / "zero"
CASES = ["stage1", "stage2", "stage2_bf16", "stage3", "stage3_3ranks"]

# The network scripts/make_zero_fixtures.py trains, as a --model file.
NET = """
import torch, torch.nn as nn


class Net(nn.Module):
    def __init__(self, bf16=False):
        super().__init__()
        self.embed = nn.Embedding(11, 7)
        self.conv = nn.Conv1d(7, 5, 3)
        self.bn = nn.GroupNorm(1, 5) if bf16 else nn.BatchNorm1d(5)
        self.register_buffer("pos", torch.linspace(0, 1, 9))
        self.frozen = nn.Linear(5, 5)
        self.head = nn.Linear(7, 11, bias=False)
        self.head.weight = self.embed.weight
        self.frozen.requires_grad_(False)
"""


def expected(case: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = load_file(FIXTURES / f"{case}.expected.safetensors")
    shared = json.loads((FIXTURES / f"{case}.expected.json").read_text())["shared"]
    return tensors, shared


def written(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        aliases = json.loads((f.metadata() or {}).get("ckptool.aliases", "{}"))
    tensors = load_file(path)
    return {**tensors, **{a: tensors[t] for a, t in aliases.items()}}, aliases


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(
        a.contiguous().view(-1).view(torch.uint8).equal(b.contiguous().view(-1).view(torch.uint8))
    )


@pytest.mark.parametrize("case", CASES)
def test_convert_is_bit_equal_to_zero_to_fp32(run_cli, tmp_path: Path, case: str) -> None:
    out = tmp_path / "consolidated.safetensors"
    result = run_cli("convert", str(FIXTURES / case), "-o", str(out))
    assert result.exit_code == 0, result.output
    got, aliases = written(out)
    want, shared = expected(case)
    for name, tensor in want.items():
        assert name in got, name
        assert same_bits(got[name], tensor), name
    assert aliases == shared  # the tied head is stored once and comes back tied
    extra = set(got) - set(want)
    # zero_to_fp32 drops stage-1 frozen parameters; ckptool keeps them (module docstring).
    assert extra == ({"frozen.weight", "frozen.bias"} if case == "stage1" else set())


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_convert_to_torch_file_keeps_the_tie(run_cli, tmp_path: Path, dtype: str | None) -> None:
    out = tmp_path / "consolidated.pt"
    cast = ["--dtype", dtype] if dtype else []
    result = run_cli("convert", str(FIXTURES / "stage3"), "-o", str(out), *cast)
    assert result.exit_code == 0, result.output
    state = torch.load(out, weights_only=True)
    assert state["head.weight"].data_ptr() == state["embed.weight"].data_ptr()
    want, _ = expected("stage3")
    assert torch.equal(state["embed.weight"], want["embed.weight"].to(state["embed.weight"].dtype))


def test_stage1_frozen_parameters_are_the_untrained_values(run_cli, tmp_path: Path) -> None:
    """Frozen weights never change, so they equal the seed-0 initialisation."""
    spec = importlib.util.spec_from_loader("zero_net", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    exec(NET, module.__dict__)  # our own model definition, not a checkpoint
    torch.manual_seed(0)
    initial = module.Net().state_dict()
    out = tmp_path / "stage1.safetensors"
    assert run_cli("convert", str(FIXTURES / "stage1"), "-o", str(out)).exit_code == 0
    got, _ = written(out)
    assert same_bits(got["frozen.weight"], initial["frozen.weight"])
    assert same_bits(got["frozen.bias"], initial["frozen.bias"])
    assert not same_bits(got["conv.weight"], initial["conv.weight"])  # trained


@pytest.mark.parametrize("case", ["stage2", "stage3_3ranks"])
def test_inspect_describes_the_consolidated_model(run_cli, case: str) -> None:
    result = run_cli("inspect", str(FIXTURES / case), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    want, shared = expected(case)
    assert report["format"] == "deepspeed-zero"
    tensors = {t["name"]: t for t in report["tensors"]}
    assert set(tensors) == set(want)
    assert all(tensors[n]["shape"] == list(t.shape) for n, t in want.items())
    assert all(tensors[n]["dtype"] == str(t.dtype)[6:] for n, t in want.items())
    assert [sorted(g) for g in report["shared"]] == [sorted([*shared, *shared.values()])]
    assert report["containers"][0]["summary"].startswith("stage ")


def test_load_state_dict_and_strict_load_into_the_model(tmp_path: Path) -> None:
    state = ckptool.load_state_dict(FIXTURES / "stage3")
    want, _ = expected("stage3")
    assert list(state) == json.loads((FIXTURES / "stage3.expected.json").read_text())["order"]
    assert all(same_bits(state[n], t) for n, t in want.items())
    assert state["head.weight"] is state["embed.weight"]  # tied, as torch.load gives it
    model_file = tmp_path / "net.py"
    model_file.write_text(NET)
    assert ckptool.diff(FIXTURES / "stage3", model=f"{model_file}:Net").compatible


def test_adapt_to_a_new_head_from_the_save_root(run_cli, tmp_path: Path) -> None:
    """The folder with DeepSpeed's ``latest`` file is read like the tag folder it names."""
    model_file = tmp_path / "net.py"
    model_file.write_text(NET)
    out = tmp_path / "adapted.safetensors"
    result = run_cli(
        "adapt", str(FIXTURES / "stage2"), "--model", f"{model_file}:Net", "-o", str(out)
    )
    assert result.exit_code == 0, result.output
    want, _ = expected("stage2")
    got = load_file(out)
    assert all(same_bits(got[n], want[n]) for n in got)


def copy_case(case: str, tmp_path: Path) -> Path:
    folder = tmp_path / case
    shutil.copytree(FIXTURES / case, folder)
    return folder / "global_step2"


def test_a_missing_rank_is_named(run_cli, tmp_path: Path) -> None:
    step = copy_case("stage2_bf16", tmp_path)
    (step / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    result = run_cli("convert", str(step.parent), "-o", str(tmp_path / "out.safetensors"))
    assert result.exit_code == 3
    assert "of 3 ranks, but the optimizer states of rank 1 are missing" in result.output
    assert not (tmp_path / "out.safetensors").exists()


def test_stage3_missing_model_states_of_a_rank(run_cli, tmp_path: Path) -> None:
    step = copy_case("stage3", tmp_path)
    (step / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    result = run_cli("inspect", str(step))
    assert result.exit_code == 3
    assert "the model states of rank 1 are missing" in result.output


def test_files_of_another_save_mixed_in(run_cli, tmp_path: Path) -> None:
    step = copy_case("stage3", tmp_path)
    other = FIXTURES / "stage3_3ranks" / "global_step2"
    name = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shutil.copy(other / name, step / name)
    result = run_cli("inspect", str(step))
    assert result.exit_code == 3
    assert "of 3 ranks, but rank 0's is stage 3 of 2: files of another save" in result.output


def write_layout(
    folder: Path,
    stage: int,
    shapes: dict[str, tuple[int, ...]],
    held: list[int],
    *,
    paddings: list[int] | None = None,
    buffers: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """A minimal ZeRO folder in DeepSpeed's layout, one group, built from its format:
    rank r's flat fp32 tensor holds ``held[r]`` elements of ``arange`` (returned)."""
    folder.mkdir(parents=True)
    model_states = {
        "module": dict(buffers or {}),
        "buffer_names": list(buffers or {}),
        "param_shapes": [{n: torch.Size(s) for n, s in shapes.items()}],
        "shared_params": {},
    }
    values = torch.arange(sum(held), dtype=torch.float32)
    group_key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
    for rank, part in enumerate(values.split(held)):
        state: dict[str, object] = {
            "zero_stage": stage,
            "partition_count": len(held) if stage == 3 else [len(held)],
            group_key: [part.clone()],
        }
        if paddings is not None:
            state["param_alignment_paddings"] = [paddings]
        name = f"zero_pp_rank_{rank}_mp_rank_00"
        torch.save({"optimizer_state_dict": state}, folder / f"{name}_optim_states.pt")
        if stage == 3:
            torch.save(model_states, folder / f"{name}_model_states.pt")
    if stage != 3:
        torch.save(model_states, folder / "mp_rank_00_model_states.pt")
    return values


def test_stage2_layout_built_from_the_format(tmp_path: Path) -> None:
    """Parameters follow one another across the ranks' slices, after their alignment
    padding; floating buffers come out as float32 (as zero_to_fp32 makes them)."""
    shapes = {"a": (3, 5), "b": (7,)}
    half = torch.tensor([0.1, 2.5, -3.0], dtype=torch.float16)
    values = write_layout(
        tmp_path / "ok", 2, shapes, [12, 12], paddings=[2, 0], buffers={"scale": half}
    )
    state = ckptool.load_state_dict(tmp_path / "ok")
    assert list(state) == ["scale", "a", "b"]
    assert torch.equal(state["a"].flatten(), values[:15])
    assert torch.equal(state["b"], values[17:24])  # after a's 2 padding elements
    assert state["scale"].dtype == torch.float32 and torch.equal(state["scale"], half.float())


def test_stage2_slices_that_do_not_fit_the_parameters(tmp_path: Path) -> None:
    """Slices too short (or long) for the parameters the model states name are refused,
    never read past; one element short is within DeepSpeed's alignment slack."""
    shapes = {"a": (3, 5), "b": (7,)}
    write_layout(tmp_path / "short", 2, shapes, [11, 6])
    with pytest.raises(CheckpointReadError, match="do not match the model states"):
        ckptool.read_metadata(tmp_path / "short")
    write_layout(tmp_path / "one_short", 2, shapes, [11, 10])
    with pytest.raises(CheckpointReadError, match=r"'b' needs elements 15\.\.22 .* holds 21"):
        ckptool.read_metadata(tmp_path / "one_short")
    write_layout(tmp_path / "long", 2, shapes, [11, 11 + 8])
    with pytest.raises(CheckpointReadError, match="takes 22 elements but the ranks hold 30"):
        ckptool.read_metadata(tmp_path / "long")


def test_stage3_layout_built_from_the_format(tmp_path: Path) -> None:
    """Each parameter is every rank's ceil(numel / world) share, joined and cut; ranks
    whose shares differ in size are refused."""
    shapes = {"a": (2, 5), "b": (3,)}  # shares of 4 and 1 elements on each of 3 ranks
    values = write_layout(tmp_path / "ok", 3, shapes, [5, 5, 5])
    state = ckptool.load_state_dict(tmp_path / "ok")
    rank = values.split(5)
    assert torch.equal(state["a"].flatten(), torch.cat([rank[0][:4], rank[1][:4], rank[2][:2]]))
    assert torch.equal(state["b"], torch.stack([rank[0][4], rank[1][4], rank[2][4]]))
    write_layout(tmp_path / "uneven", 3, shapes, [5, 4, 5])
    with pytest.raises(CheckpointReadError, match="differ in size from rank 0's"):
        ckptool.read_metadata(tmp_path / "uneven")


def test_model_parallel_and_latest_errors(run_cli, tmp_path: Path) -> None:
    step = copy_case("stage2", tmp_path)
    (step / "zero_pp_rank_0_mp_rank_00_optim_states.pt").rename(
        step / "zero_pp_rank_0_mp_rank_01_optim_states.pt"
    )
    result = run_cli("inspect", str(step))
    assert result.exit_code == 3 and "model-parallel" in result.output
    root = tmp_path / "root"
    root.mkdir()
    (root / "latest").write_text("global_step9")
    result = run_cli("inspect", str(root))
    assert result.exit_code == 3 and "names tag 'global_step9'" in result.output
    (root / "latest").write_text("../../etc")
    result = run_cli("inspect", str(root))
    assert result.exit_code == 3 and "names no checkpoint tag" in result.output


def test_truncated_rank_file(run_cli, tmp_path: Path) -> None:
    step = copy_case("stage3", tmp_path)
    victim = step / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[:-600])
    result = run_cli("convert", str(step), "-o", str(tmp_path / "out.safetensors"))
    assert result.exit_code == 3, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_hostile_rank_file_is_refused(run_cli, tmp_path: Path) -> None:
    step = copy_case("stage2", tmp_path)
    target = step / "zero_pp_rank_1_mp_rank_00_optim_states.pt"

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (subprocess.call, (["true"],))

    torch.save({"optimizer_state_dict": {"zero_stage": 2, "x": Evil()}}, target)
    result = run_cli("inspect", str(step))
    assert result.exit_code == 4, result.output
    assert "subprocess" in result.output


@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"
)
def test_fresh_deepspeed_checkpoints_match_zero_to_fp32(tmp_path: Path) -> None:
    """With deepspeed at hand, train and consolidate anew (not the stored fixtures)."""
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_zero_fixtures.py"), str(tmp_path)],
        check=True,
        timeout=600,
    )
    for case in CASES:
        state = ckptool.load_state_dict(tmp_path / case)
        want = load_file(tmp_path / f"{case}.expected.safetensors")
        assert all(same_bits(state[n], t) for n, t in want.items()), case


def test_mutated_rank_files_load_or_raise_ckpt_errors(tmp_path: Path) -> None:
    """scripts/fuzz_readers.py's mutations, applied to each file of a stage-3 folder
    (inside data.pkl with valid CRCs, and to the raw bytes): success or a CkptError."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import fuzz_readers

    step = copy_case("stage3", tmp_path)
    outcomes = []
    for path in sorted(step.iterdir()):
        original = path.read_bytes()
        rng = random.Random(path.name)
        for number in range(24):
            inner = number % 2 == 0
            mutate = fuzz_readers.mutate_inner_pickle if inner else fuzz_readers.mutate
            path.write_bytes(mutate(original, rng))
            outcomes.append(fuzz_readers.outcome(str(step)))
        path.write_bytes(original)
    assert not [o for o in outcomes if o.startswith("BUG")]
    assert "ok" in outcomes and "CheckpointReadError" in outcomes


def test_key_is_refused_for_a_zero_folder(run_cli) -> None:
    """A ZeRO save is one state dict: --key would be ignored, so it is refused."""
    result = run_cli("inspect", str(FIXTURES / "stage2"), "--key", "module")
    assert result.exit_code == 3, result.output
    assert "a ZeRO folder is one state dict; --key does not apply" in result.stderr


def _rewrite(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


def _model(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    return lambda folder: _rewrite(folder / "mp_rank_00_model_states.pt", change)


def _optim(change: Callable[[dict[str, Any]], None], rank: int = 0) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        _rewrite(path, lambda s: change(s["optimizer_state_dict"]))

    return edit


def _set(key: str, value: object) -> Callable[[dict[str, Any]], None]:
    return lambda state: state.__setitem__(key, value)


GROUPS = "single_partition_of_fp32_groups"
STAGE2_EDITS: dict[str, tuple[Callable[[Path], None], str]] = {
    "experts": (
        lambda folder: (folder / "expp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b""),
        "a mixture-of-experts ZeRO checkpoint",
    ),
    "module": (_model(_set("module", [1])), "'module' is not a dict of tensors"),
    "buffer": (_model(lambda s: s["module"].__setitem__("scale", 5)), "no tensor for 'scale'"),
    "buffer-names": (_model(_set("buffer_names", "scale")), "'buffer_names' is not a list"),
    "frozen": (
        _model(
            lambda s: s.update(
                frozen_param_shapes={"f": torch.Size([2])}, frozen_param_fragments=[1]
            )
        ),
        "malformed frozen parameters",
    ),
    "param-shapes": (
        _model(_set("param_shapes", {"a": torch.Size([3, 5])})),
        "'param_shapes' is not a list of dicts",
    ),
    "shape": (
        _model(_set("param_shapes", [{"a": [3, 5], "b": torch.Size([7])}])),
        "parameter 'a' has a malformed shape",
    ),
    "strided-buffer": (
        _model(lambda s: s["module"].__setitem__("scale", torch.ones(3, 2).t())),
        "tensor 'scale' is not stored contiguously",
    ),
    "no-stage": (_optim(lambda s: s.pop("zero_stage")), "not a DeepSpeed ZeRO optimizer-states"),
    "stage": (_optim(_set("zero_stage", 4)), "unknown ZeRO stage 4"),
    "world": (_optim(_set("partition_count", [0])), "malformed partition_count [0]"),
    "groups": (_optim(_set(GROUPS, [5])), f"'{GROUPS}' is not a list of tensors"),
    "not-flat": (
        _optim(lambda s: s.__setitem__(GROUPS, [s[GROUPS][0].reshape(3, 4)])),
        f"{GROUPS}[0] is not a flat, dense tensor",
    ),
    "mixed-dtypes": (
        _optim(lambda s: s.__setitem__(GROUPS, [s[GROUPS][0].double()]), rank=1),
        "flat groups of mixed dtypes ['float32', 'float64']",
    ),
    "more-groups": (  # a second group the ranks' files do not hold
        _model(
            lambda s: s["param_shapes"].append({"c": torch.Size([1])}),
        ),
        "holds 1 parameter groups; the model states of",
    ),
    "paddings": (
        _optim(_set("param_alignment_paddings", [[2]])),
        "group 0 has 2 parameters but 1 paddings",
    ),
}


@pytest.mark.parametrize("case", list(STAGE2_EDITS))
def test_stage2_files_that_disagree_with_deepspeed_s_format_are_refused(
    tmp_path: Path, case: str
) -> None:
    """One field of a valid stage 2 save (built from the format) changed the way a
    crafted or damaged file has it: refused, naming what is wrong, never read past."""
    edit, message = STAGE2_EDITS[case]
    half = torch.tensor([0.1, 2.5, -3.0], dtype=torch.float16)
    shapes = {"a": (3, 5), "b": (7,)}
    folder = tmp_path / "save"
    write_layout(folder, 2, shapes, [12, 12], paddings=[2, 0], buffers={"scale": half})
    assert set(ckptool.read_metadata(folder).tensors) == {"scale", "a", "b"}
    edit(folder)
    with pytest.raises(CheckpointReadError, match=re.escape(message)):
        ckptool.read_metadata(folder)


def _stage3_model(rank: int, change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    return lambda folder: _rewrite(
        folder / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt", change
    )


def _frozen(fragments: object) -> Callable[[dict[str, Any]], None]:
    return lambda s: s.update(
        frozen_param_shapes={"f": torch.Size([2])}, frozen_param_fragments=fragments
    )


@pytest.mark.parametrize(
    ("held", "edits", "message"),
    [
        ([6, 6, 6], [], "parameters take 5 elements of each rank's share but the ranks hold 6"),
        ([5, 5, 5], [(0, _frozen([1]))], "malformed frozen parameters"),
        (
            [5, 5, 5],
            [(r, _frozen({"f": torch.ones(1)})) for r in (0, 2)],  # none on rank 1
            "a rank has no fragment of frozen 'f'",
        ),
    ],
    ids=["shares", "frozen-malformed", "frozen-missing"],
)
def test_stage3_files_that_disagree_with_deepspeed_s_format_are_refused(
    tmp_path: Path, held: list[int], edits: list[Any], message: str
) -> None:
    folder = tmp_path / "save"
    write_layout(folder, 3, {"a": (2, 5), "b": (3,)}, held)
    for rank, change in edits:
        _stage3_model(rank, change)(folder)
    with pytest.raises(CheckpointReadError, match=re.escape(message)):
        ckptool.read_metadata(folder)
