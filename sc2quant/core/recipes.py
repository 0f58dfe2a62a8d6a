"""YAML recipes: named sets of options for any verb (`--recipe`). Flags given on the command
line override recipe values, which override the defaults.

A recipe is a flat mapping of option names (as in the CLI, `-` or `_`) to values, plus an
optional `description`. Unknown keys, keys set twice, wrong value types and empty recipes are
errors, not silently ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from sc2quant.core.errors import UserError

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_RECIPES = PACKAGE_ROOT / "recipes"  # inside an installed wheel
REPO_RECIPES = PACKAGE_ROOT.parent / "recipes"  # in a checkout


def find_recipe(name: str | Path) -> Path:
    """A path, or the name of a shipped recipe (`bnb-nf4` finds recipes/bnb-nf4.yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    for folder in (REPO_RECIPES, PACKAGE_RECIPES):
        for candidate in (folder / str(name), folder / f"{name}.yaml"):
            if candidate.is_file():
                return candidate
    shipped = sorted(p.stem for p in REPO_RECIPES.glob("*.yaml")) if REPO_RECIPES.is_dir() else []
    raise UserError(f"recipe '{name}' not found: pass a YAML file path or one of: {', '.join(shipped)}")


def _accepts(tp: Any, value: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(t, value) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_accepts(typing.get_args(tp)[0], v) for v in value)
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


MAX_RECIPE_BYTES = 1 << 20  # recipes are a few lines
MAX_RECIPE_DEPTH = 16  # a flat mapping whose values may be lists


class _Twice(Exception):
    """A mapping sets one key twice (as written, or as `group-size` and `group_size`)."""


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key set twice in a mapping (YAML forbids it; PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[str, tuple[str, int]] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue  # a list or mapping as a key: refused later as an unknown key
            written, line = key_node.value, key_node.start_mark.line + 1
            name = str(self.construct_object(key_node)).replace("-", "_")
            if name in seen:
                first, at = seen[name]
                what = f"'{written}' is set twice" if first == written else \
                    f"'{first}' and '{written}' set the same option"
                raise _Twice(f"{what} (lines {at} and {line}): keep one")
            seen[name] = (written, line)
        return super().construct_mapping(node, deep)


def _parse(path: Path) -> Any:
    """A recipe's YAML, refusing what no recipe needs and a parser would choke on: anchors and aliases
    (a 500-byte "billion laughs" expands to gigabytes), deep nesting, huge or non-regular files."""
    from sc2quant.core.files import check_regular

    try:
        check_regular(path, "recipe file")
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise UserError(f"recipe {path} is {path.stat().st_size:,} bytes, not a recipe: pass a YAML file of options")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"recipe {path} is not UTF-8 text: fix the file") from exc
    except OSError as exc:
        raise UserError(f"cannot read recipe {path} ({exc.strerror}): make it readable") from exc
    try:
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):  # events only: nothing is built or expanded yet
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise UserError(f"recipe {path} uses YAML anchors or aliases (&, *), which recipes do not allow: "
                                "write each value out")
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_RECIPE_DEPTH:
                    raise UserError(f"recipe {path} is nested more than {MAX_RECIPE_DEPTH} levels deep: "
                                    "write a flat mapping of option: value")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader
    except _Twice as exc:
        raise UserError(f"recipe {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"recipe {path} is not valid YAML ({str(exc).splitlines()[0]}): fix the file") from exc
    except RecursionError:
        raise UserError(f"recipe {path} is nested too deeply: write a flat mapping of option: value") from None


def load_recipe(name: str | Path, options: type | dict[str, Any]) -> dict[str, Any]:
    """Read and validate a recipe against the fields of a dataclass of options, or against a
    mapping of option name to type (a command's parameters)."""
    path = find_recipe(name)
    data = _parse(path)
    if data is None or data == {} or (isinstance(data, dict) and set(data) == {"description"}):
        raise UserError(f"recipe {path} sets no option: write 'option: value' lines, or drop --recipe")
    if not isinstance(data, dict):
        raise UserError(f"recipe {path} must be a mapping of option: value")
    hints = typing.get_type_hints(options) if isinstance(options, type) else options
    if isinstance(options, type):
        hints = {f.name: hints[f.name] for f in dataclasses.fields(options)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name_ = str(key).replace("-", "_")
        if name_ == "description":
            continue
        if name_ not in hints:
            raise UserError(f"recipe {path.name}: unknown key '{key}'; allowed keys: "
                            f"{', '.join(sorted(k.replace('_', '-') for k in hints))}")
        if not _accepts(hints[name_], value):
            shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
            raise UserError(f"recipe {path.name}: '{key}' has a {type(value).__name__} value {shown}, "
                            f"expected {_type_name(hints[name_])}")
        out[name_] = value
    return out


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def merge(options_type: type, recipe: str | Path | None, overrides: dict[str, Any]):
    """Defaults < recipe < explicit flags (flags left at None are 'not given')."""
    values = load_recipe(recipe, options_type) if recipe else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return options_type(**values)
