"""Integrity guarantees that hold for the whole code base."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "sc2quant"


def test_no_code_path_trusts_remote_code_or_unpickles():
    """Remote code and pickle only ever behind an explicit user flag: none in the code at all."""
    offenders = []
    for file in PACKAGE.rglob("*.py"):
        text = file.read_text()
        for pattern in (r"trust_remote_code\s*=\s*True", r"torch\.load\(", r"pickle\.loads?\(", r"weights_only\s*=\s*False"):
            if re.search(pattern, text):
                offenders.append(f"{file.name}: {pattern}")
    assert not offenders, offenders


def test_every_hugging_face_load_says_trust_remote_code_false():
    """Every `*.from_pretrained(...)` call in the package passes trust_remote_code=False literally."""
    calls, offenders = 0, []
    for file in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "from_pretrained":
                calls += 1
                if not any(k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant) and k.value.value is False
                           for k in node.keywords):
                    offenders.append(f"{file.relative_to(PACKAGE)}:{node.lineno}")
    assert calls >= 2 and not offenders, offenders
