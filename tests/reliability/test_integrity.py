"""Integrity guarantees that hold for the whole code base."""

from __future__ import annotations

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


def test_every_model_load_says_trust_remote_code_false():
    calls = 0
    for file in PACKAGE.rglob("*.py"):
        text = file.read_text()
        for match in re.finditer(r"AutoModelForCausalLM\.from_pretrained\(", text):
            calls += 1
            assert "trust_remote_code=False" in text[match.end(): match.end() + 300], f"{file.name}: {match.start()}"
    assert calls >= 3
