"""Recipes: every shipped recipe validates; unknown keys and wrong types are clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from sc2quant.core.errors import UserError
from sc2quant.core.recipes import REPO_RECIPES, load_recipe, merge
from sc2quant.quant import QuantizeOptions

QUANTIZE_RECIPES = sorted(p for p in REPO_RECIPES.glob("*.yaml") if not p.name.startswith("onnx"))


@pytest.mark.parametrize("path", QUANTIZE_RECIPES, ids=lambda p: p.stem)
def test_shipped_recipes_validate(path: Path):
    opts = merge(QuantizeOptions, path, {})
    assert opts.method in ("gptq", "bnb", "rtn")


def test_default_gptq_recipe_matches_defaults():
    assert merge(QuantizeOptions, "gptq-int4", {}) == QuantizeOptions()


def test_flags_override_recipe():
    opts = merge(QuantizeOptions, "bnb-nf4", {"quant_type": "fp4", "bits": None})
    assert (opts.method, opts.bits, opts.quant_type) == ("bnb", 4, "fp4")


def test_unknown_key(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("method: bnb\nbitz: 4\n")
    with pytest.raises(UserError, match="unknown key 'bitz'"):
        load_recipe(f, QuantizeOptions)


@pytest.mark.parametrize("body,key", [("bits: four\n", "bits"), ("double_quant: 1\n", "double_quant"),
                                      ("damp: [1]\n", "damp"), ("group-size: 1.5\n", "group-size")])
def test_wrong_types(tmp_path, body, key):
    f = tmp_path / "r.yaml"
    f.write_text(body)
    with pytest.raises(UserError, match=f"'{key}' has a"):
        load_recipe(f, QuantizeOptions)


def test_not_yaml_and_missing(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("method: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(f, QuantizeOptions)
    with pytest.raises(UserError, match="not found"):
        load_recipe("no-such-recipe", QuantizeOptions)


BILLION_LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi")) + "bits: *i\n"


def test_alias_bomb_is_refused_in_one_line_without_expanding_it(tmp_path):
    """A 468-byte "billion laughs" took 3.4 GB to format its error message."""
    import resource

    f = tmp_path / "bomb.yaml"
    f.write_text(BILLION_LAUGHS)
    assert len(BILLION_LAUGHS) < 600  # 9**9 strings once expanded
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(UserError, match="anchors or aliases") as caught:
        load_recipe(f, QuantizeOptions)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 300
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: no expansion
    f.write_text("method: &m gptq\nbits: 4\n")  # any anchor: recipes are flat
    with pytest.raises(UserError, match="anchors or aliases"):
        load_recipe(f, QuantizeOptions)


@pytest.mark.parametrize("body", ["method: " + "[" * 20_000 + "]" * 20_000 + "\n",
                                  "method:\n" + "".join("  " * i + "- \n" for i in range(1, 500))])
def test_deep_nesting_is_refused(tmp_path, body):
    f = tmp_path / "deep.yaml"
    f.write_text(body)
    with pytest.raises(UserError, match="nested") as caught:
        load_recipe(f, QuantizeOptions)
    assert "\n" not in str(caught.value)


def test_a_long_wrong_value_is_shown_shortened(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("bits: [" + ", ".join(["1"] * 10_000) + "]\n")
    with pytest.raises(UserError, match=r"'bits' has a list value \[1, 1, .*\.\.\., expected") as caught:
        load_recipe(f, QuantizeOptions)
    assert len(str(caught.value)) < 300


@pytest.mark.parametrize("body,message", [
    ("method: bnb\nbits: 4\nbits: 8\n", "'bits' is set twice (lines 2 and 3)"),
    ("group-size: 64\ngroup_size: 32\n", "'group-size' and 'group_size' set the same option (lines 1 and 2)"),
    ("description: a\nmethod: rtn\ndescription: b\n", "'description' is set twice (lines 1 and 3)"),
])
def test_a_key_set_twice_is_refused_naming_it_and_the_file(tmp_path, body, message):
    """Found by the red team: a duplicate key was accepted silently, the last one winning."""
    f = tmp_path / "twice.yaml"
    f.write_text(body)
    with pytest.raises(UserError) as caught:
        load_recipe(f, QuantizeOptions)
    assert message in str(caught.value) and str(f) in str(caught.value) and "\n" not in str(caught.value)


def test_a_key_set_twice_exits_2_in_one_line(tmp_path):
    import subprocess
    import sys

    f = tmp_path / "twice.yaml"
    f.write_text("max-new-tokens: 3\nmax-new-tokens: 4\n")
    done = subprocess.run([sys.executable, "-m", "sc2quant", "run", "--recipe", str(f)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "'max-new-tokens' is set twice" in done.stderr
