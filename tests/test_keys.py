"""Key logic: transforms, diff categories, prefix suggestions, folding; with hypothesis."""

from __future__ import annotations

import dataclasses
import itertools
import re
import shlex
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ckptool import TransformError
from ckptool import keys as keys_module
from ckptool.errors import command_line_voice
from ckptool.formats.meta import TensorMeta
from ckptool.keys import (
    MAX_FOLDED_NUMBERS,
    MAX_STARTSWITH_PREFIXES,
    MAX_TENSOR_RENAMES,
    SCORING_BLOCK,
    HookPlacement,
    PrefixIndex,
    Reason,
    SortedNames,
    Transforms,
    _compare,
    _drop_covered,
    _Earlier,
    _literal_prefix,
    _parses_back,
    _rename,
    _templates_and_numbers,
    apply_transforms,
    covering_prefixes,
    diff,
    fold_counts,
    fold_names,
    fold_rows,
    renamed_names,
    suggest_prefixes,
    tie_groups,
    under_prefix,
)


def metas(shapes: dict[str, tuple[int, ...]], dtype: str = "float32") -> dict[str, TensorMeta]:
    return {name: TensorMeta(shape=shape, dtype=dtype) for name, shape in shapes.items()}


RESNET_LIKE = {
    "conv1.weight": (64, 3, 7, 7), "bn1.weight": (64,), "bn1.bias": (64,),
    "layer1.0.conv1.weight": (64, 64, 3, 3), "fc.weight": (1000, 512), "fc.bias": (1000,),
}  # fmt: skip


@pytest.mark.parametrize(
    ("prefix", "pattern"),
    [
        ("fc.", "fc.weight"),
        ("fc", "fc.weight"),
        ("fc", "fc"),
        ("layer1.0", "layer1.0.conv1.weight"),
    ],
    ids=["dotted", "bare", "exact-key", "nested"],
)
def test_under_prefix_covers(prefix: str, pattern: str) -> None:
    assert under_prefix(pattern, prefix)


@pytest.mark.parametrize(
    ("prefix", "name"), [("fc", "fc2.weight"), ("fc.", "fc"), ("layer1", "layer10.weight")]
)
def test_under_prefix_does_not_cover_siblings(prefix: str, name: str) -> None:
    assert not under_prefix(name, prefix)


@pytest.mark.parametrize(
    ("transforms", "expected"),
    [
        (Transforms(strip=("module.",)), {"a.w": "module.a.w", "b.w": "module.b.w"}),
        (
            Transforms(strip=("module.",), add_prefix="net."),
            {"net.a.w": "module.a.w", "net.b.w": "module.b.w"},
        ),
        (
            Transforms(rename=((r"^module\.a\.", "x."),)),
            {"x.w": "module.a.w", "module.b.w": "module.b.w"},
        ),
        (Transforms(strip=("module.",), drop=("a",)), {"b.w": "module.b.w"}),
    ],
    ids=["strip", "strip-then-add", "rename", "drop-after-strip"],
)
def test_apply_transforms(transforms: Transforms, expected: dict[str, str]) -> None:
    assert dict(apply_transforms(["module.a.w", "module.b.w"], transforms).mapping) == expected


def test_strip_is_all_or_nothing_with_hint() -> None:
    """The hint speaks Python to a Python caller and flags on the command line."""
    with pytest.raises(TransformError, match=r"1/2 keys .*'head.w'.*use rename='\^module"):
        apply_transforms(["module.a.w", "head.w"], Transforms(strip=("module.",)))
    with command_line_voice(), pytest.raises(TransformError) as refused:
        apply_transforms(["module.a.w", "head.w"], Transforms(strip=("module.",)))
    assert str(refused.value).startswith("--strip 'module.': 1/2 keys")
    assert str(refused.value).endswith("use --rename '^module\\.='")


def test_rename_collision_is_refused() -> None:
    with pytest.raises(TransformError, match=r"maps both 'a\.w' and 'b\.w' to 'x\.w'"):
        apply_transforms(["a.w", "b.w"], Transforms.from_flags(rename=[r"^[ab]\.=x."]))


@pytest.mark.parametrize(
    "item", ["no-equals", "=x", "(unclosed=x"], ids=["no-equals", "empty-regex", "bad-regex"]
)
def test_rename_flag_validation(item: str) -> None:
    with pytest.raises(TransformError, match=f"^rename={re.escape(repr(item))}"):
        Transforms.from_flags(rename=[item])
    with (
        command_line_voice(),
        pytest.raises(TransformError, match=f"^--rename '{re.escape(item)}'"),
    ):
        Transforms.from_flags(rename=[item])


def test_classic_dataparallel_case_suggests_both_fixes() -> None:
    target = dict(RESNET_LIKE, **{"fc.weight": (5, 512), "fc.bias": (5,)})
    source = {f"module.{k}": v for k, v in RESNET_LIKE.items()}
    result = diff(metas(source), metas(target))
    assert not result.compatible and len(result.unexpected) == 6 and len(result.missing) == 6
    assert result.suggestions[0].flags == ["--strip module."] and result.suggestions[0].matched == 6
    assert result.fix is not None
    assert result.fix.transforms.flags() == ["--strip module.", "--drop fc."]
    assert [s.reason for s in result.fix.steps] == [Reason.PREFIX, Reason.SHAPE_MISMATCH]
    fixed = diff(metas(source), metas(target), result.fix.transforms)
    assert fixed.compatible and fixed.unexplained_missing == ()
    assert set(fixed.missing) == {"fc.weight", "fc.bias"} and len(fixed.matched) == 4


def test_categories_and_dtype_differences() -> None:
    source = metas({"a": (2,), "b": (3,), "extra": (1,)})
    source["b"] = TensorMeta((3,), "float16")
    source["a"] = TensorMeta((2,), "bfloat16")  # a shape mismatch first: not a dtype one
    target = metas({"a": (4,), "b": (3,), "new": (1,)})
    result = diff(source, target, suggest=False)
    assert (
        result.matched == ("b",) and result.unexpected == ("extra",) and result.missing == ("new",)
    )
    assert [(m.key, m.source, m.target) for m in result.shape_mismatch] == [("a", (2,), (4,))]
    assert [(m.key, m.source, m.target) for m in result.dtype_mismatch] == [
        ("b", "float16", "float32")
    ]


def test_reinit_takes_keys_from_the_model_even_when_shapes_match() -> None:
    result = diff(metas(RESNET_LIKE), metas(RESNET_LIKE), Transforms(reinit=("fc",)))
    assert result.compatible and set(result.reinit) == {"fc.weight", "fc.bias"}
    assert "fc.weight" not in result.matched and "fc.weight" in result.missing


def test_missing_head_is_suggested_as_reinit_and_prefix_as_add() -> None:
    backbone = {"embeddings.word.weight": (100, 8), "encoder.0.w": (8, 8), "encoder.1.w": (8, 8)}
    target = {f"bert.{k}": v for k, v in backbone.items()} | {
        "classifier.weight": (2, 8),
        "classifier.bias": (2,),
    }
    result = diff(metas(backbone), metas(target))
    assert result.suggestions[0].flags == ["--add-prefix bert."]
    assert result.fix is not None and result.fix.transforms.flags() == [
        "--add-prefix bert.",
        "--reinit classifier.",
    ]
    assert diff(metas(backbone), metas(target), result.fix.transforms).compatible


def test_equally_good_different_prefixes_are_ambiguous() -> None:
    source = metas({"a.x": (1,), "b.x": (1,)})
    target = metas({"p.a.x": (1,), "q.b.x": (1,)})
    result = diff(source, target)
    assert result.fix is None and not result.compatible
    assert {tuple(s.flags) for s in result.ambiguous} == {
        ("--add-prefix p.",),
        ("--add-prefix q.",),
    }


def test_vgg_head_is_covered_by_its_own_index() -> None:
    universe = {
        "classifier.0.weight",
        "classifier.0.bias",
        "classifier.6.weight",
        "classifier.6.bias",
        "features.0.weight",
    }
    assert covering_prefixes({"classifier.6.weight", "classifier.6.bias"}, universe) == [
        "classifier.6."
    ]
    assert covering_prefixes({"classifier.6.weight"}, universe) == ["classifier.6.weight"]


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["fc.weight", "fc.bias"], ["fc.{weight,bias}"]),
        (
            [f"layer{i}.{j}.conv{k}.weight" for i in (1, 2, 3, 4) for j in (0, 1) for k in (1, 2)],
            ["layer{1..4}.{0,1}.conv{1,2}.weight"],
        ),
        (["b.0.w", "b.1.w", "b.3.w"], ["b.{0,1,3}.w"]),
        (["l1.0.w", "l1.1.w", "l2.0.w"], ["l1.{0,1}.w", "l2.0.w"]),
        (["blocks.07.w", "blocks.08.w", "blocks.09.w"], ["blocks.{07..09}.w"]),
        (["x #.w", "x#1.w", "x#2.w"], ["x #.w", "x#{1,2}.w"]),  # crashed: '#' was the template's
        (["weight", "bias", "w1"], ["{weight,bias}", "w1"]),
        (["b.1", "b.1", "b.2", "fc.w", "fc.w"], ["b.{1,2}", "fc.{w,w}"]),
        (["x0.y0", "x1.y0", "x0.y1"], ["x0.y{0,1}", "x1.y0"]),  # x0 in two runs
    ],
    ids=[
        "leaves",
        "resnet-grid",
        "gappy",
        "not-a-product",
        "zero-padded",
        "hash-sign",
        "no-module",
        "repeated",
        "split-run",
    ],
)
def test_fold_names(names: list[str], expected: list[str]) -> None:
    assert fold_names(names) == expected


def expand(label: str) -> list[str]:
    """Inverse of folding, for the property test: {a..b} and {x,y} alternatives."""
    match = re.search(r"\{([^{}]*)\}", label)
    if not match:
        return [label]
    body = match.group(1)
    if ".." in body and "," not in body:
        lo, hi = body.split("..")
        options = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [x for o in options for x in expand(label[: match.start()] + o + label[match.end() :])]


segment = st.sampled_from(["layer", "conv", "bn", "blocks", "fc", "attn", "mlp", "h#"])
numbered = st.builds(
    lambda s, n: f"{s}{n}" if n is not None else s, segment, st.none() | st.integers(0, 12)
)
index = st.integers(0, 5).map(str)
leaf = st.sampled_from(["weight", "bias", "running_mean"])
module_path = st.lists(numbered | index, min_size=0, max_size=3)
names_strategy = st.lists(
    st.builds(lambda parts, last: ".".join([*parts, last]), module_path, leaf),
    min_size=1,
    max_size=60,
    unique=True,
)


@given(names_strategy)
def test_folding_is_lossless(names: list[str]) -> None:
    expanded = [n for label in fold_names(names) for n in expand(label)]
    assert sorted(expanded) == sorted(names)


@given(st.lists(st.text(alphabet="ab.01\n\x00{,}", max_size=8), max_size=12))
def test_names_split_alike_by_the_joined_and_the_one_by_one_path(names: list[str]) -> None:
    """ASCII names are split in bulk, other names one by one: a Unicode digit forces
    the second path, and both give each name the same template and numbers."""
    one_by_one = _templates_and_numbers(["\u0663", *names])
    assert _templates_and_numbers(names) == (one_by_one[0][1:], one_by_one[1][1:])
    for name, template, numbers in zip(names, *_templates_and_numbers(names), strict=True):
        pieces = itertools.zip_longest(template, numbers, fillvalue="")
        assert "".join(itertools.chain(*pieces)) == name


def test_names_with_a_leading_dot_fold_to_themselves() -> None:
    """``.weight`` was folded as ``weight`` (its member name too, which inspect then
    looked up and failed on)."""
    assert fold_names([".weight", ".bias", "weight"]) == [".{weight,bias}", "weight"]
    assert fold_rows([(".weight", 1), (".bias", 1)]) == [(".{weight,bias}", [".weight", ".bias"])]


shape = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)
key_sets = st.dictionaries(names_strategy.flatmap(st.sampled_from), shape, min_size=1, max_size=40)


@given(key_sets, key_sets, st.sampled_from(["", "module.", "_orig_mod.", "model.", "x."]))
def test_diff_partitions_both_key_sets(source: dict, target: dict, prefix: str) -> None:
    wrapped = {prefix + k: v for k, v in source.items()}
    result = diff(metas(wrapped), metas(target), suggest=False)
    mismatched = {m.key for m in result.shape_mismatch}
    assert set(result.matched) | mismatched | set(result.unexpected) == set(wrapped)
    assert set(result.matched) | mismatched | set(result.missing) == set(target)
    assert not set(result.matched) & mismatched and not set(result.unexpected) & set(target)
    assert result.compatible == (not result.unexpected and not mismatched and not result.missing)


@settings(max_examples=60)
@given(
    key_sets, st.sampled_from(["module.", "_orig_mod.", "module._orig_mod.", "model.", "encoder."])
)
def test_wrapper_prefix_is_found_and_fix_is_compatible(target: dict, prefix: str) -> None:
    assume(len(target) >= 2)
    source = {prefix + k: v for k, v in target.items()}
    result = diff(metas(source), metas(target))
    best = result.suggestions[0]
    assert best.matched == len(target) and not result.ambiguous
    assert result.fix is not None
    assert diff(metas(source), metas(target), result.fix.transforms).compatible


@settings(max_examples=60)
@given(key_sets, key_sets)
def test_suggested_fix_always_makes_a_compatible_diff(source: dict, target: dict) -> None:
    """A fix is offered only when it works; without one, the names fit already, two
    prefixes tie, or no name matches under any transform (nothing worth keeping)."""
    result = diff(metas(source), metas(target))
    if result.fix is not None:
        fixed = diff(metas(source), metas(target), result.fix.transforms)
        assert fixed.compatible and fixed.matched
    else:
        best = result.suggestions[0].transforms if result.suggestions else Transforms()
        nothing_kept = not diff(metas(source), metas(target), best, suggest=False).matched
        assert result.compatible or bool(result.ambiguous) or nothing_kept


@given(key_sets)
def test_suggestions_never_beat_identity_when_names_already_match(target: dict) -> None:
    assert suggest_prefixes(list(target), list(target), baseline=len(target)) == []


def test_a_candidate_that_wins_by_one_name_in_the_last_block_is_kept() -> None:
    """Scoring stops early only when a candidate cannot beat the baseline: the bound
    counts every name not yet scored as a possible match, no fewer."""
    names = [f"x{i}.w" for i in range(3 * SCORING_BLOCK)]
    source = [*names, "m.a.w", "m.b.w"]  # only the last two change under --rename ^m.=
    target = {*names, "a.w", "b.w"}
    suggestions = suggest_prefixes(source, list(target), baseline=len(source) - 1)
    assert [s.flags for s in suggestions] == [["--rename '^m\\.='"]]
    assert suggestions[0].matched == len(source)
    assert suggest_prefixes(source, list(target), baseline=len(source)) == []


def test_a_candidate_that_cannot_win_is_scored_on_one_block(monkeypatch) -> None:
    """Against a checkpoint that already matches all but one name, a wrong prefix costs
    one block of names, not a pass over all of them."""
    import ckptool.keys as key_logic

    scored = []
    renamed = key_logic._renamed
    monkeypatch.setattr(
        key_logic, "_renamed", lambda names, *a: scored.append(len(names)) or renamed(names, *a)
    )
    names = [f"model.layers.{i}.w" for i in range(10 * SCORING_BLOCK)]
    assert suggest_prefixes(names, names[1:], baseline=len(names) - 1) == []
    # strip '', 'model.', 'model.layers.' and add '', 'model.', but not the names as given
    assert scored == [SCORING_BLOCK] * 4


def test_no_names_and_the_names_as_given_are_no_suggestion() -> None:
    assert suggest_prefixes([], ["a.w"]) == []
    # Re-initialised names are left out of the baseline; renaming every name to itself
    # would "match" them and is still no suggestion.
    names = metas({"model.a.w": (1,), "model.b.w": (1,), "model.fc.w": (1,)})
    result = diff(names, names, Transforms(reinit=("model.fc.",)))
    assert result.suggestions == ()


def test_covering_prefixes_property_on_grid() -> None:
    universe = {f"m{i}.{j}.w" for i, j in itertools.product(range(3), range(3))}
    affected = {f"m1.{j}.w" for j in range(3)} | {"m2.0.w"}
    prefixes = covering_prefixes(affected, universe)
    assert prefixes == ["m1.", "m2.0."]
    covered = {u for u in universe if any(under_prefix(u, p) for p in prefixes)}
    assert covered == affected


# Names around the edges of "under fc": a slash sorts right after the dot, a dash before.
EDGE_NAMES = ["fc", "fc.w", "fc.0.b", "fc/w", "fc-1.w", "fc0.w", "fcx", "f", "fc.", "a.fc.w"]
EDGE_PREFIXES = ["fc", "fc.", "fc.0", "fc.0.", "f", "fc/w", "a", "a.fc", "zz", ""]


@pytest.mark.parametrize("prefix", EDGE_PREFIXES)
def test_sorted_names_count_what_under_prefix_covers(prefix: str) -> None:
    expected = sum(under_prefix(name, prefix) for name in EDGE_NAMES)
    assert SortedNames(EDGE_NAMES).count_under(prefix) == expected


@pytest.mark.parametrize("count", [3, MAX_STARTSWITH_PREFIXES + 5])
def test_prefix_index_agrees_with_under_prefix(count: int) -> None:
    """Both ways of answering (a few prefixes at once, many by walking up the modules)
    agree with under_prefix, also for prefixes added after a question."""
    prefixes = [*EDGE_PREFIXES[:2], *(f"extra{i}." for i in range(count))]
    index = PrefixIndex(prefixes)
    expected = [any(under_prefix(n, p) for p in prefixes) for n in EDGE_NAMES]
    assert [index.covers(n) for n in EDGE_NAMES] == expected
    assert index.covered(EDGE_NAMES) == list(itertools.compress(EDGE_NAMES, expected))
    assert index.covered(iter(EDGE_NAMES)) == index.covered(EDGE_NAMES)  # read once
    index.add("a.fc")
    assert index.covers("a.fc.w") and not index.covers("a.fcw")
    assert index.covered(["a.fcw", "a.fc.w", "a.fc"]) == ["a.fc.w", "a.fc"]
    assert PrefixIndex().covered(EDGE_NAMES) == []


def test_given_prefix_fix_leaves_only_the_shape_step() -> None:
    """With --strip given, the verdict must not repeat an empty prefix suggestion."""
    target = dict(RESNET_LIKE, **{"fc.weight": (5, 512), "fc.bias": (5,)})
    source = {f"module.{k}": v for k, v in RESNET_LIKE.items()}
    result = diff(metas(source), metas(target), Transforms(strip=("module.",)))
    assert result.suggestions == ()
    assert result.fix is not None and [s.flag for s in result.fix.steps] == ["--drop fc."]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ("--strip", "module.", "--drop", "module.head."),
            r"--drop module\.head\.: matches no key; .*apply after them: use 'head\.'",
        ),
        (("--strip", "module.", "--drop", "haed."), r"--drop haed\.: .*did you mean 'head\.'\?"),
        (("--strip", "module.", "--reinit", "nothing."), r"--reinit nothing\.: matches no key"),
    ],
    ids=["drop-before-strip", "drop-typo", "reinit-nothing"],
)
def test_flags_that_match_nothing_are_usage_errors(
    run_cli, write_checkpoint, flags: tuple[str, ...], message: str
) -> None:
    import re

    from conftest import MLP, seeded_state, wrap

    source = write_checkpoint(wrap(seeded_state(MLP), "module."), "dp.pt")
    spec = f"{Path(__file__).parent / 'conftest.py'}:MLP"
    result = run_cli("diff", source, "--model", spec, *flags)
    assert result.exit_code == 2 and re.search(message, result.stderr), result.stderr
    # The same flags, spelled as they apply, are accepted.
    fine = run_cli("diff", source, "--model", spec, "--strip", "module.", "--drop", "head.")
    assert fine.exit_code == 0, fine.stdout


def test_a_sub_tree_is_renamed_out_and_the_rest_dropped() -> None:
    """A Lightning module's checkpoint (model.backbone.*, model.head.*) into the backbone:
    rename the sub-tree where present, drop the rest; not drop-everything advice."""
    source = {f"model.backbone.{k}": v for k, v in RESNET_LIKE.items()}
    source |= {"model.head.weight": (3, 1000), "model.head.bias": (3,)}
    result = diff(metas(source), metas(RESNET_LIKE))
    assert result.suggestions[0].flags == ["--rename '^model\\.backbone\\.='"]
    assert result.fix is not None
    assert result.fix.transforms.flags() == [
        "--rename '^model\\.backbone\\.='",
        "--drop model.",  # what is left under model. after the rename: the head
    ]
    fixed = diff(metas(source), metas(RESNET_LIKE), result.fix.transforms)
    assert fixed.compatible and len(fixed.matched) == len(RESNET_LIKE)


def test_a_prefix_most_keys_have_is_renamed_where_present() -> None:
    """--strip is all-or-nothing; when a few keys lack the prefix the fix renames."""
    source = {f"module.{k}": v for k, v in RESNET_LIKE.items() if k != "fc.bias"}
    source["fc.bias"] = RESNET_LIKE["fc.bias"]  # saved beside the wrapper, unprefixed
    result = diff(metas(source), metas(RESNET_LIKE))
    assert result.fix is not None
    assert result.fix.transforms.flags() == ["--rename '^module\\.='"]
    assert diff(metas(source), metas(RESNET_LIKE), result.fix.transforms).compatible


def test_a_fix_is_offered_only_if_it_replays() -> None:
    """Renaming '0.weight' to 'weight' would collide with the checkpoint's own 'weight':
    that suggestion cannot run, so it is neither suggested nor part of the fix."""
    source = metas({"weight": (2,), "0.weight": (2,), "0.bias": (2,)})
    target = metas({"weight": (2,), "bias": (2,)})
    result = diff(source, target)
    assert all("--rename" not in " ".join(s.flags) for s in result.suggestions)
    assert result.fix is not None
    assert diff(source, target, result.fix.transforms).compatible


def test_a_given_drop_moves_with_the_keys_the_prefix_fix_renames() -> None:
    """The user's --drop module.fc. names keys as the report showed them, before the
    --strip module. that the fix adds; --drop applies after it, so kept as given it would
    match nothing and the fix would fail when run (before, diff offered no fix at all)."""
    source = metas({f"module.{k}": v for k, v in RESNET_LIKE.items()})
    result = diff(source, metas(RESNET_LIKE), Transforms(drop=("module.fc.",)))
    assert result.fix is not None
    assert result.fix.transforms.flags() == ["--strip module.", "--drop fc."]
    assert _fix_kinds(result) == [Reason.PREFIX, Reason.MOVED]
    assert result.fix.moved(("module.fc.", "layer1.")) == ("fc.", "layer1.")
    fixed = diff(source, metas(RESNET_LIKE), result.fix.transforms)
    assert fixed.compatible and fixed.dropped == ("module.fc.weight", "module.fc.bias")


def test_a_given_drop_that_still_covers_keys_is_not_moved() -> None:
    """--drop fc. already names the model's keys (fill from init): it stays as given."""
    source = metas({f"module.{k}": v for k, v in RESNET_LIKE.items()})
    result = diff(source, metas(RESNET_LIKE), Transforms(drop=("fc.",)))
    assert result.fix is not None
    assert result.fix.transforms.flags() == ["--strip module.", "--drop fc."]
    assert _fix_kinds(result) == [Reason.PREFIX]


def test_nothing_kept_under_any_prefix_offers_no_fix() -> None:
    source = metas({"encoder.conv.kernel": (8, 3), "encoder.conv.offset": (8,)})
    result = diff(source, metas(RESNET_LIKE))
    assert result.fix is None and not result.ambiguous and not result.compatible


@pytest.mark.parametrize("deeper", [True, False], ids=["model-deeper", "model-shallower"])
def test_a_layer_nested_one_level_off_is_renamed_not_reinitialised(deeper: bool) -> None:
    """The model's code wraps each prefilter conv in a Sequential (or stopped doing so):
    prefilt_layers.N.weight <-> prefilt_layers.N.0.weight. One rename keeps them all."""
    flat = {f"prefilt_layers.{i}.{leaf}": (8, 4) for i in range(5) for leaf in ("weight", "bias")}
    nested = {k.replace(f".{i}.", f".{i}.0."): v for i in range(5) for k, v in flat.items()
              if k.startswith(f"prefilt_layers.{i}.")}  # fmt: skip
    common = {"out.weight": (2, 8), "out.bias": (2,)}
    source, target = (flat, nested) if deeper else (nested, flat)
    result = diff(metas(source | common), metas(target | common))
    assert result.fix is not None and not result.fix.transforms.reinit
    assert [s.reason for s in result.fix.steps] == [Reason.NESTING]
    assert len(result.fix.steps[0].keys) == 10
    fixed = diff(metas(source | common), metas(target | common), result.fix.transforms)
    assert fixed.compatible and len(fixed.matched) == 12


def _fix_kinds(result) -> list[Reason]:
    assert result.fix is not None, result
    return [s.reason for s in result.fix.steps]


def test_a_tensor_renamed_inside_its_module_is_renamed_not_dropped() -> None:
    """One unexpected and one missing key in the same module, same shape and dtype, one
    leaf name inside the other: the fix renames it. Before, it dropped the module,
    throwing the trained tensor away and re-initialising its new name."""
    source = {f"experts.{e}.w{w}.weight": (4,) for e in range(3) for w in (1, 2)}
    target = dict(source)
    target["experts.1.w2.weight_orig"] = target.pop("experts.1.w2.weight")
    result = diff(metas(source), metas(target))
    assert _fix_kinds(result) == [Reason.RENAMED]
    assert result.fix is not None and not result.fix.transforms.drop
    assert result.fix.steps[0].keys == ("experts.1.w2.weight_orig",)
    fixed = diff(metas(source), metas(target), result.fix.transforms)
    assert fixed.compatible and len(fixed.matched) == 6
    assert fixed.renamed == {"experts.1.w2.weight": "experts.1.w2.weight_orig"}


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (("gamma", "beta"), ("weight", "bias")),
        (("weight", "bias"), ("gamma", "beta")),
        (
            ("weight_g", "weight_v"),
            ("parametrizations.weight.original0", "parametrizations.weight.original1"),
        ),
        (
            ("parametrizations.weight.original0", "parametrizations.weight.original1"),
            ("weight_g", "weight_v"),
        ),
    ],
    ids=["tf-layernorm", "to-tf-layernorm", "weight-norm-to-parametrized", "parametrized-to-old"],
)
def test_known_port_renames_get_one_rule_per_tail(old: tuple, new: tuple) -> None:
    """Two same-shaped tensors per module (gamma and beta are both (768,)): only a known
    port rename can pair them, and one rule covers every module."""
    layers = [f"encoder.layer.{i}.LayerNorm" for i in range(8)] + ["LayerNorm"]
    common = {"encoder.layer.0.dense.weight": (8, 8)}
    source = {f"{m}.{leaf}": (8,) for m in layers for leaf in old} | common
    target = {f"{m}.{leaf}": (8,) for m in layers for leaf in new} | common
    result = diff(metas(source), metas(target))
    assert _fix_kinds(result) == [Reason.RENAMED, Reason.RENAMED]
    assert result.fix is not None and len(result.fix.transforms.rename) == 2
    fixed = diff(metas(source), metas(target), result.fix.transforms)
    assert fixed.compatible and len(fixed.matched) == len(target)
    assert all(o.rpartition(old[0])[0] == n.rpartition(new[0])[0]
               for o, n in fixed.renamed.items() if o.endswith(old[0]))  # fmt: skip
    # Each step names the keys it moves in the checkpoint's order (a report lists them).
    for step in result.fix.steps:
        assert list(step.keys) == [n for n in fixed.matched if n in step.keys]


@pytest.mark.parametrize(
    ("source_leaf", "target_leaf", "target_meta"),
    [
        ("k_bias", "v_bias", ((4,), "float32")),  # two designs, not one tensor renamed
        ("weight", "weight_orig", ((5,), "float32")),  # another shape
        ("weight", "weight_orig", ((4,), "int64")),  # another dtype
    ],
    ids=["unrelated-names", "shape", "dtype"],
)
def test_tensors_that_may_differ_are_not_paired(
    source_leaf: str, target_leaf: str, target_meta: tuple
) -> None:
    shape, dtype = target_meta
    common = {"attn.proj.weight": TensorMeta(shape=(4, 4), dtype="float32")}
    source = common | {f"attn.{source_leaf}": TensorMeta(shape=(4,), dtype="float32")}
    target = common | {f"attn.{target_leaf}": TensorMeta(shape=shape, dtype=dtype)}
    result = diff(source, target)
    assert Reason.RENAMED not in _fix_kinds(result)
    assert result.fix is not None and not result.fix.transforms.rename
    assert result.fix.transforms.explains(f"attn.{target_leaf}")


def test_two_candidates_in_one_module_are_not_guessed() -> None:
    source = metas({"m.w": (4,), "m.keep": (2,)})
    target = metas({"m.w_a": (4,), "m.w_b": (4,), "m.keep": (2,)})
    assert Reason.RENAMED not in _fix_kinds(diff(source, target))


def test_names_that_tell_their_partners_apart_are_paired() -> None:
    """Two renamed tensors of one shape, and a new same-shaped tensor beside them: each
    old name fits exactly one new name, so both are renamed and only the new one is
    re-initialised (before, the module was dropped whole)."""
    source = metas({"m.left": (4,), "m.right": (4,), "m.bias": (2,)})
    target = metas({"m.left_new": (4,), "m.right_new": (4,), "m.scale": (4,), "m.bias": (2,)})
    result = diff(source, target)
    assert _fix_kinds(result) == [Reason.RENAMED, Reason.RENAMED, Reason.MISSING]
    assert result.fix is not None and result.fix.transforms.reinit == ("m.scale",)
    fixed = diff(source, target, result.fix.transforms)
    assert fixed.fits_after_adapt
    assert fixed.renamed == {"m.left": "m.left_new", "m.right": "m.right_new"}


def test_a_tail_rule_that_would_break_matched_names_falls_back_to_one_per_tensor() -> None:
    """'weight' -> 'weight_orig' in three modules of four: the rule for every '.weight'
    would match more names but unmatch l0's, so each tensor gets its own rule."""
    source = {f"l{i}.weight": (4,) for i in range(4)}
    target = dict(source)
    for i in (1, 2, 3):
        target[f"l{i}.weight_orig"] = target.pop(f"l{i}.weight")
    result = diff(metas(source), metas(target))
    assert _fix_kinds(result) == [Reason.RENAMED] * 3
    assert result.fix is not None and not result.fix.transforms.drop
    patterns = [p for p, _ in result.fix.transforms.rename]
    assert patterns == [f"^l{i}\\.weight$" for i in (1, 2, 3)]
    assert diff(metas(source), metas(target), result.fix.transforms).compatible


def test_a_fix_counts_what_it_keeps_through_ties_and_leaves_out_what_it_does_not() -> None:
    """The kept share of the model: matched names and names the checkpoint provides
    under a tied name count; mismatched and missing ones (re-initialised) do not."""
    tied = TensorMeta(shape=(10, 6), dtype="float32", storage="embedding")
    target = {"embed.weight": tied, "head.weight": tied} | metas(
        {"proj.weight": (6, 6), "proj.bias": (6,), "norm.weight": (6,)}
    )
    source = metas({"embed.weight": (10, 6), "proj.weight": (6, 5), "proj.bias": (6,)})
    result = diff(source, target)
    assert result.through_tie == {"head.weight": "embed.weight"}
    assert result.fix is not None
    kept = 60 + 60 + 6  # embed, head through the tie, proj.bias
    assert (result.fix.kept_numel, result.fix.model_numel) == (kept, kept + 36 + 6)


def test_tensor_renames_are_capped() -> None:
    """Each rename tried renames every name once more: past MAX_TENSOR_RENAMES the
    rest is dropped and re-initialised as before."""
    count = MAX_TENSOR_RENAMES + 3
    source = {f"l{i}.w{i}": (4,) for i in range(count)} | {"keep.weight": (9,)}
    target = {f"l{i}.w{i}_orig": (4,) for i in range(count)} | {"keep.weight": (9,)}
    result = diff(metas(source), metas(target))
    assert _fix_kinds(result).count(Reason.RENAMED) == MAX_TENSOR_RENAMES
    assert result.fix is not None and len(result.fix.transforms.drop) == 3
    assert diff(metas(source), metas(target), result.fix.transforms).fits_after_adapt


def _one_rename_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every batch of renames declined: each rule is tried on its own."""
    batch = keys_module._with_renames

    def single_rules_only(*args: object) -> object:
        rules = args[4]
        assert isinstance(rules, list)
        return batch(*args) if len(rules) == 1 else None

    monkeypatch.setattr(keys_module, "_with_renames", single_rules_only)


@pytest.mark.parametrize("count", [2, MAX_TENSOR_RENAMES, MAX_TENSOR_RENAMES + 3])
def test_renames_tried_at_once_give_what_one_at_a_time_gives(
    monkeypatch: pytest.MonkeyPatch, count: int
) -> None:
    """Single-tensor renames are tried in one trial over the names where that is what
    trying them one at a time gives: the same fix, steps and comparison."""
    source = {f"l{i}.w{i}": (4,) for i in range(count)} | {"keep.weight": (9,)}
    target = {f"l{i}.w{i}_v{i % 3}": (4,) for i in range(count)} | {"keep.weight": (9,)}
    together = diff(metas(source), metas(target))
    _one_rename_at_a_time(monkeypatch)
    apart = diff(metas(source), metas(target))
    assert together == apart
    assert _fix_kinds(together).count(Reason.RENAMED) == min(count, MAX_TENSOR_RENAMES)


def _rename_trial(source: dict[str, TensorMeta], target: dict[str, TensorMeta]) -> tuple:
    as_given = diff(source, target, suggest=False)
    base = keys_module._RenameBase(Transforms(), {name: name for name in source}, {})
    return base, as_given


@pytest.mark.parametrize(
    ("rules", "why"),
    [
        ([("^a$", "a_new"), ("^a_new$", "b_new")], "two rules change one name"),
        ([("^a$", "a_new"), ("^b$", "c")], "a rule that matches nothing more"),
        ([("^a$", "a_new"), ("^kept$", "other")], "a rule that loses a matched name"),
        ([("^a$", "a_new"), ("^b$", "unfit")], "two names become one"),
        ([("^a$", "a_new"), ("^(a_new|b)$", "b_new")], "a rule changes what one before made"),
        ([("^a$", "a_new"), ("^b$", "\\9")], "a bad replacement"),
    ],
)
def test_renames_are_not_tried_at_once_where_that_could_differ(
    rules: list[tuple[str, str]], why: str
) -> None:
    """Each of these, tried at once, would keep a rule that one at a time is not kept."""
    source = metas({"a": (4,), "unfit": (3,), "b": (4,), "kept": (2,)})
    target = metas({"a_new": (4,), "b_new": (4,), "kept": (2,), "other": (2,), "unfit": (4,)})
    base, as_given = _rename_trial(source, target)
    assert keys_module._with_renames(source, target, base, as_given, rules, None) is None, why


def test_renames_tried_at_once_keep_each_ones_names() -> None:
    source = metas({"a": (4,), "b": (4,), "kept": (2,)})
    target = metas({"a_new": (4,), "b_new": (4,), "kept": (2,)})
    base, as_given = _rename_trial(source, target)
    rules = [("^b$", "b_new"), ("^a$", "a_new")]
    trial, after, moved = keys_module._with_renames(source, target, base, as_given, rules, None)
    assert moved == [("b_new",), ("a_new",)]
    assert trial.transforms.rename == tuple(rules)
    assert after.fits_after_adapt and set(after.matched) == {"a_new", "b_new", "kept"}
    assert list(trial.names) == ["a_new", "b_new", "kept"]  # each keeps its place


@pytest.mark.parametrize("checkpoint_has_dots", [True, False], ids=["old-to-new", "new-to-old"])
def test_densenet_index_style_names_get_one_rename_per_word(checkpoint_has_dots: bool) -> None:
    """Old DenseNet checkpoints name a layer's parts norm.1, conv.1, norm.2 where the
    model says norm1, conv1, norm2: every layer's tensors were 'unexpected' and the
    verdict was "not for this model". One rename per word keeps them all."""
    joined = {}
    for block in (1, 2):
        for layer in (1, 2, 3):
            stem = f"features.denseblock{block}.denselayer{layer}"
            for i in (1, 2):
                joined |= {f"{stem}.norm{i}.{leaf}": (8,) for leaf in ("weight", "bias")}
                joined[f"{stem}.conv{i}.weight"] = (8, 8, 1, 1)
    joined |= {"features.conv0.weight": (8, 3, 7, 7), "classifier.weight": (10, 8)}
    dotted = {re.sub(r"\.(norm|conv)(\d)\.", r".\1.\2.", k): v for k, v in joined.items()}
    source, target = (dotted, joined) if checkpoint_has_dots else (joined, dotted)
    result = diff(metas(source), metas(target))
    assert _fix_kinds(result) == [Reason.RENAMED, Reason.RENAMED]
    assert result.fix is not None and not result.fix.transforms.drop
    fixed = diff(metas(source), metas(target), result.fix.transforms)
    assert fixed.compatible and len(fixed.matched) == len(target)
    same_layer = re.compile(r"\.(norm|conv)\.?(\d)\.")
    assert all(
        same_layer.sub(r".\1\2.", old) == same_layer.sub(r".\1\2.", new)
        for old, new in fixed.renamed.items()
    )


def test_a_list_index_is_not_joined_onto_a_numbered_module() -> None:
    """layer1.0 (block 0 of layer1) and layer10 are different modules: never paired."""
    source = metas({"layer1.0.conv.weight": (4,), "stem.weight": (2,)})
    target = metas({"layer10.conv.weight": (4,), "stem.weight": (2,)})
    assert Reason.RENAMED not in _fix_kinds(diff(source, target))


def test_names_with_an_equals_sign_get_a_rename_flag_that_parses_back() -> None:
    """--rename is split at its first '=': a pattern must not hold one."""
    source = metas({"attn.w=1": (4,), "keep.weight": (2,)})
    target = metas({"attn.w=1_orig": (4,), "keep.weight": (2,)})
    result = diff(source, target)
    assert result.fix is not None and _fix_kinds(result) == [Reason.RENAMED]
    (flag,) = result.fix.transforms.flags()
    item = shlex.split(flag)[1]
    parsed = Transforms.from_flags(rename=[item])
    assert diff(source, target, parsed).compatible


@pytest.mark.parametrize(
    ("source", "target"),
    [
        ({"m.n.1.k.2.w": (4,)}, {"m.n1.k.2.w": (4,), "m.n.1.k2.w": (4,)}),  # which one?
        ({"m.norm.1.w": (4,)}, {"m.norm1.w": (5,)}),  # another shape
    ],
    ids=["two-candidates", "shape"],
)
def test_index_style_pairs_need_one_candidate_of_the_same_shape(source: dict, target: dict) -> None:
    common = {"keep.weight": (2,)}
    result = diff(metas(source | common), metas(target | common))
    assert Reason.RENAMED not in _fix_kinds(result)


pattern_pieces = st.lists(
    st.sampled_from(
        [
            "a",
            "b",
            ".",
            "\\.",
            "\\d",
            "1",
            "*",
            "?",
            "+",
            "{0,2}",
            "(",
            ")",
            "|",
            "$",
            "[ab]",
            "\\x3d",
            "=",
        ]
    ),
    max_size=8,
).map(lambda parts: "^" + "".join(parts))


@pytest.mark.parametrize(
    ("pattern", "prefix"),
    [
        ("^model\\.layers\\.7\\.w$", "model.layers.7.w"),
        ("^ab?c", "a"),  # b may be absent
        ("^ab*", "a"),
        ("^a{0,2}b", ""),
        ("^ab+c", "ab"),  # at least one b
        ("^a\\db", "a"),
        ("^a\\x3db", "a"),
        ("^a|b", ""),  # (^a)|(b)
        ("(^|\\.)gamma$", ""),
        ("a^", ""),
    ],
)
def test_literal_prefix(pattern: str, prefix: str) -> None:
    assert _literal_prefix(pattern) == prefix


@given(pattern_pieces, st.lists(st.text("ab.1=", max_size=6), max_size=12, unique=True))
def test_a_rename_only_skips_names_its_pattern_cannot_match(pattern: str, names: list) -> None:
    """The literal-prefix shortcut is sound: every name the regex matches starts with it."""
    try:
        regex = re.compile(pattern)
    except re.error:
        assume(False)
    prefix = _literal_prefix(pattern)
    for name in names:
        if regex.match(name):
            assert name.startswith(prefix), (pattern, prefix, name)


def test_renaming_one_of_many_names_runs_the_regex_once(monkeypatch) -> None:
    names = [f"model.layers.{i}.w" for i in range(1000)]
    compiled = re.compile(r"^model\.layers\.7\.w$")
    calls = []

    class Counting:
        def sub(self, repl: str, name: str) -> str:
            calls.append(name)
            return compiled.sub(repl, name)

    monkeypatch.setattr("ckptool.keys.re.compile", lambda pattern: Counting())
    renaming = apply_transforms(names, Transforms(rename=((compiled.pattern, "model.seven.w"),)))
    assert renaming.mapping["model.seven.w"] == "model.layers.7.w" and len(renaming.mapping) == 1000
    assert calls == ["model.layers.7.w"]


def test_pairing_inside_a_module_is_not_quadratic(monkeypatch) -> None:
    """Every unexpected name against every missing one of its module: 2,000 x 2,000
    flat names would be 4 million tries (a crafted pair of files could ask 10^10), so a
    module with more than MAX_MODULE_PAIRINGS candidate pairs is not paired at all."""
    import ckptool.keys as keys

    tries = []
    monkeypatch.setattr(keys, "_one_name_holds_the_other", lambda *pair: tries.append(pair))
    source = metas({f"u{i}": (4,) for i in range(2000)})
    target = metas({f"m{i}": (4,) for i in range(2000)})
    diff(source, target)
    assert len(tries) <= keys.MAX_MODULE_PAIRINGS


@pytest.mark.parametrize(
    ("transforms", "parses"),
    [
        (Transforms(rename=(("(^|\\.)(norm)\\.(\\d+)(\\.|$)", "\\g<1>\\g<2>\\g<3>\\g<4>"),)), True),
        (Transforms(drop=("x; touch y #.",), rename=(("^a'b$", "c"),)), True),
        (Transforms(rename=(("a(?=b)", "c"),)), False),  # split at the lookahead's '='
        (Transforms(rename=(("^a=b$", "c"),)), False),  # parses, as '^a' -> 'b$=c'
    ],
    ids=["index-style", "shell-syntax", "lookahead", "equals-in-pattern"],
)
def test_a_fix_is_printed_only_if_its_flags_parse_back(
    transforms: Transforms, parses: bool
) -> None:
    assert _parses_back(transforms) is parses


def test_a_fix_whose_flags_would_not_parse_back_is_not_printed(monkeypatch) -> None:
    """The safety net under every rule generator: one that forgot to hide '=' makes a
    fix whose printed --rename means something else; diff offers no fix instead."""
    import ckptool.keys as keys

    monkeypatch.setattr(keys, "name_pattern", re.escape)  # '=' left in the pattern
    source = metas({"attn.w=1": (4,), "keep.weight": (2,)})
    target = metas({"attn.w=1_orig": (4,), "keep.weight": (2,)})
    result = diff(source, target)
    assert result.fix is None or _parses_back(result.fix.transforms)


def test_a_prefix_with_an_equals_sign_is_renamed_away_by_a_flag_that_parses_back() -> None:
    """Every rename generator escapes names one way (name_pattern): the prefix rename
    printed '^m=1\\.=' (split as '^m' -> '1\\.='), then no fix once printed fixes had to
    parse back; now '^m\\x3d1\\.='."""
    source = metas({"m=1.w": (4,), "m=1.v": (4,), "m=1.u": (4,), "x": (2,)})
    target = metas({"w": (4,), "v": (4,), "u": (4,), "x": (2,)})
    result = diff(source, target)
    assert result.fix is not None and _parses_back(result.fix.transforms)
    (flag,) = result.fix.transforms.flags()
    parsed = Transforms.from_flags(rename=[shlex.split(flag)[1]])
    assert diff(source, target, parsed).compatible


# Names, shapes and dtypes that rename trials move around: layers that trade places,
# leaves that rename onto each other, a head to drop or re-initialise.
TRIAL_MODULES = ("enc.0", "enc.1", "enc.1.1", "dec", "head")
TRIAL_NAMES = [f"{module}.{leaf}" for module in TRIAL_MODULES for leaf in "wbg"]
TRIAL_RULES = [
    (r"^enc\.0\.", "enc.1."),  # onto names that may be there: a collision or a chain
    (r"^enc\.1\.", "enc."),  # enc.1.1.w -> enc.1.w while enc.1.w moves to enc.w
    (r"\.g$", ".w"),
    (r"^dec\.", "head."),
    (r"^head\.(\w)$", "dec.\\1"),
    (r"^nothing$", "x"),
]


@st.composite
def trial_cases(draw):
    """A checkpoint, a model (some names tied), transforms so far, names the model's
    hooks place, and a rule to try."""

    def tensors(names):
        return {
            name: TensorMeta(
                shape=(draw(st.sampled_from([2, 3])),),
                dtype=draw(st.sampled_from(["float32", "float16"])),
            )
            for name in names
        }

    source = tensors(draw(st.lists(st.sampled_from(TRIAL_NAMES), unique=True, max_size=12)))
    target = tensors(draw(st.lists(st.sampled_from(TRIAL_NAMES), unique=True, max_size=12)))
    tied = draw(st.lists(st.sampled_from(sorted(target) or ["-"]), unique=True, max_size=3))
    for name in set(tied) & set(target):
        target[name] = target[name]._replace(storage="tied", shape=(2,))
    base = Transforms(
        rename=tuple(draw(st.lists(st.sampled_from(TRIAL_RULES), max_size=1))),
        drop=tuple(draw(st.lists(st.sampled_from(["head.", "enc.1.1."]), unique=True, max_size=1))),
        reinit=tuple(draw(st.lists(st.sampled_from(["dec.", "enc.0.w"]), unique=True, max_size=1))),
    )
    # Names the model's load hooks would place (neither unexpected nor missing).
    consumed, filled = (
        frozenset(draw(st.lists(st.sampled_from(TRIAL_NAMES), max_size=2))) for _ in range(2)
    )
    hooks = HookPlacement(consumed, filled)
    return source, target, base, hooks, draw(st.sampled_from(TRIAL_RULES))


def _outcome(compare):
    try:
        return compare()
    except TransformError as e:
        return str(e)


@settings(max_examples=400, deadline=None)
@given(trial_cases())
def test_a_rename_trial_compares_as_a_full_comparison(case) -> None:
    """A trial compares again only the names its rule changed and those that did not fit
    before: its diff is the one a comparison of every name gives, field by field and in
    the same order (or the same refusal)."""
    source, target, base, hooks, rule = case
    try:
        after = _compare(source, target, apply_transforms(source, base), base, hooks)
        renamed, changes = _rename(renamed_names(source, base), *rule)
    except TransformError:
        return  # the transforms so far, or the rule, do not apply: nothing is tried
    candidate = dataclasses.replace(base, rename=(*base.rename, rule))
    earlier = _Earlier(after, frozenset([*changes, *changes.values()]), tie_groups(target))
    trial = _outcome(
        lambda: _compare(
            source, target, _drop_covered(renamed, candidate.drop), candidate, hooks, earlier
        )
    )
    full = _outcome(
        lambda: _compare(source, target, apply_transforms(source, candidate), candidate, hooks)
    )
    assert trial == full
    if not isinstance(full, str):  # dicts compare without order: their items too
        assert list(trial.renamed.items()) == list(full.renamed.items())


def test_a_rename_trial_looks_up_only_the_names_it_changes() -> None:
    """Eight tensors renamed one by one in a checkpoint of 2,000: each trial compares
    the names its rule moves, not all 2,000 again (100,000 names took 0.3 s a trial)."""
    looked_up = []

    class Counting(dict):
        def __getitem__(self, name):
            looked_up.append(name)
            return super().__getitem__(name)

    names = [f"layers.{i}.{w}.weight" for i in range(500) for w in ("q", "k", "v", "o")]
    source = Counting(metas({name: (4,) for name in names}))
    renamed = {names[i]: f"{names[i]}_v{i}" for i in range(0, 400, 50)}
    target = metas({renamed.get(name, name): (4,) for name in names})
    result = diff(source, target)
    assert result.fix is not None and len(result.fix.transforms.rename) == len(renamed)
    assert diff(metas({n: (4,) for n in names}), target, result.fix.transforms).compatible
    # One comparison of every name (as given; the fix's replay reuses the last trial's
    # diff) and a few lookups per trial.
    assert len(looked_up) < len(names) + 10 * len(renamed)


def test_names_with_too_many_numbers_are_shown_as_they_are() -> None:
    """Folding recurses once per number position: past MAX_FOLDED_NUMBERS a name is its
    own row, with itself as its member (a crafted name must not cost a deep recursion)."""
    many = [".".join(str(i + k) for i in range(MAX_FOLDED_NUMBERS + 1)) for k in range(3)]
    rows = [(name, "sig") for name in many]
    assert fold_names(many) == many
    assert fold_rows(rows) == [(name, [name]) for name in many]
    assert fold_counts(rows) == [(name, 1, "sig") for name in many]
