"""The layout keeps its promises: each layer imports only what it may, modules stay readable,
the server and the bench use public APIs only, maintainer tools stay out of the package."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "sc2quant"
MAX_LINES = 450


def _modules(root: Path) -> list[Path]:
    """Our Python files under root: not caches, nor the peers' sources and models the bench fetches there."""
    return sorted(p for p in root.rglob("*.py") if not {"__pycache__", ".cache", "work"} & set(p.relative_to(root).parts))


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import statement, relative imports resolved."""
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, [a.name for a in node.names]))
    return out


def test_no_module_is_too_long():
    modules = [*_modules(PACKAGE), *_modules(REPO / "tests")]
    long = {str(p.relative_to(REPO)): n for p in modules if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules: {long}"


def test_test_modules_share_helpers_through_support_modules_only():
    """A test module imports conftest and support modules (tests/serving.py, ...), never another test module."""
    found = [(str(p.relative_to(REPO)), mod) for p in _modules(REPO / "tests") for mod, _ in _imports(p)
             if mod.startswith("tests.") and mod.rsplit(".", 1)[-1].startswith("test_")]
    assert not found, found


@pytest.mark.parametrize("layer,forbidden", [
    ("core", ("sc2quant.formats", "sc2quant.footprint", "sc2quant.quant", "sc2quant.export", "sc2quant.runtime",
              "sc2quant.evaluate", "sc2quant.cli")),
    # formats sit on core; they count their bytes with footprint's arithmetic, imported when asked
    ("formats", ("sc2quant.quant", "sc2quant.export", "sc2quant.runtime", "sc2quant.evaluate", "sc2quant.cli")),
    # the runtime converts GPTQ artifacts to ONNX through the export package (runtime/convert.py)
    ("runtime", ("sc2quant.quant", "sc2quant.evaluate", "sc2quant.cli")),
    ("quant", ("sc2quant.runtime", "sc2quant.export", "sc2quant.evaluate", "sc2quant.cli")),
    # the export's int4 grid is GPTQ's (sc2quant.quant.gptq_lite, one layer at a time inside the build)
    ("export", ("sc2quant.runtime", "sc2quant.evaluate", "sc2quant.cli")),
    ("footprint", ("sc2quant.quant", "sc2quant.export", "sc2quant.runtime", "sc2quant.evaluate", "sc2quant.cli")),
])
def test_layers_import_only_what_they_may(layer, forbidden):
    bad = [(str(p.relative_to(REPO)), mod) for p in _modules(PACKAGE / layer) for mod, _ in _imports(p)
           if mod.startswith(forbidden)]
    assert not bad, bad


def _private_uses(path: Path) -> list[str]:
    """Imports of private sc2quant names and attribute accesses like `model._run` (self/cls aside)."""
    tree = ast.parse(path.read_text())
    found = [f"import {mod}.{n}" for mod, names in _imports(path) if mod.startswith("sc2quant")
             for n in names if n.startswith("_")]
    found += [f"{mod}" for mod, _ in _imports(path) if mod.startswith("sc2quant") and any(
        part.startswith("_") and not part.startswith("__") for part in mod.split("."))]
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
            found.append(f"line {node.lineno}: .{node.attr}")
    return found


@pytest.mark.parametrize("path", [*(PACKAGE / "runtime" / f"{m}.py" for m in ("server", "backends", "vllm", "infill")),
                                  *_modules(REPO / "bench")],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_server_and_bench_use_public_apis_only(path):
    found = _private_uses(path)
    assert not found, found


SERVER_SIDE = ("server", "backends", "vllm", "http_guard", "infill")


@pytest.mark.parametrize("module", SERVER_SIDE)
def test_the_server_reaches_the_model_through_the_public_runtime_api_only(module):
    """The server, its backends and guards import `sc2quant.runtime`'s public names, and each other."""
    own = {f"sc2quant.runtime.{m}" for m in SERVER_SIDE}
    runtime = [(m, names) for m, names in _imports(PACKAGE / "runtime" / f"{module}.py") if m.startswith("sc2quant.runtime")]
    public = [(m, names) for m, names in runtime if m not in own]
    assert all(m == "sc2quant.runtime" for m, _ in public), runtime
    import sc2quant.runtime

    assert all(n in sc2quant.runtime.__all__ for _, names in public for n in names)


def test_maintainer_tools_stay_out_of_the_wheel():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert config["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"] == ["sc2quant"]
    assert (REPO / "tools" / "train_embedded.py").is_file() and not list(PACKAGE.rglob("train*.py"))
    users = [str(p) for p in _modules(PACKAGE) for m, _ in _imports(p) if m == "tools" or m.startswith("tools.")]
    assert not users, users


def test_fixtures_do_not_import_the_training_tool():
    assert not [m for m, _ in _imports(REPO / "tests" / "conftest.py") if m.startswith("tools")]
