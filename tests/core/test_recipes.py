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
