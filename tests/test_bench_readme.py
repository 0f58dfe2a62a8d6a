"""The README's figures are rendered from the committed results (bench/readme.py), not typed: every
marked block equals its rendering, the verdicts are computed from the data, misses first."""

from __future__ import annotations

import copy
import re

import pytest

from bench import readme
from bench.contenders import DEFAULT_EXPORT


def test_every_block_of_the_readme_is_its_rendering():
    text = readme.README.read_text()
    fresh = readme.render(text)
    differ = [n for n, body in readme.blocks(fresh).items() if readme.blocks(text)[n] != body]
    assert not differ, f"README blocks {differ} differ from their rendering: run python -m bench.readme"
    assert fresh == text


def test_every_renderer_has_one_block_and_every_block_a_renderer():
    names = [m.group(2) for m in readme.BLOCK.finditer(readme.README.read_text())]
    assert sorted(names) == sorted(readme.BLOCKS), names
    with pytest.raises(KeyError, match="no renderer"):
        readme.render("<!-- bench.readme: nonsense -->\n<!-- /bench.readme -->")


def test_prose_outside_the_blocks_carries_no_measured_ratio():
    """A ratio like 1.35x typed in prose is how the README drifted from its results: they live in blocks."""
    prose = readme.BLOCK.sub("", readme.README.read_text())
    assert not re.findall(r"\b\d+\.\d+x\b", prose)


def test_the_gap_is_relative_to_the_target_and_a_near_miss_is_a_miss():
    v = readme.Verdict("prefill", 1.197, 1.2, True, readme.PEERS)
    assert not v.met and v.words() == "**misses** by 0.2 %"
    assert readme.Verdict("rss", 1.78, 1.2, False, readme.PEERS).words() == "**misses** by 48 %"
    assert readme.Verdict("kl", 0.47, 0.5, False, readme.PEERS).words() == "meets"
    rounds = readme.Verdict("decode", 1.35, 1.3, True, readme.PEERS, rounds_missed=(2, 5))
    assert rounds.met and rounds.words() == "meets (2 of 5 rounds miss)"


def test_verdicts_follow_the_data_and_misses_come_first(monkeypatch):
    """Slow the default export's decode in a copy of the results: the verdict turns, and the row moves up."""
    original = readme.load

    def slower(name: str) -> dict:
        result = copy.deepcopy(original(name))
        if name == readme.PEERS:
            c = result["models"]["300m"]["contenders"][DEFAULT_EXPORT]
            c["ratio_vs_reference"]["decode_tokens_per_s"] = 1.0
            for r in c["rounds"]:
                r["decode_tokens_per_s"] = 1.0
        return result

    before = readme.targets()
    assert "| default export: decode ÷ Q4_0 | >= 1.30x | 1.35x" in before
    monkeypatch.setattr(readme, "load", slower)
    after = readme.targets().splitlines()
    row = next(i for i, line in enumerate(after) if line.startswith("| default export: decode"))
    assert "**misses** by 23 % (5 of 5 rounds miss)" in after[row]
    verdicts = [line for line in after if line.startswith("| ") and "---" not in line][1:]
    first_meet = next(i for i, line in enumerate(verdicts) if "| meets" in line)
    assert all("**misses**" in line for line in verdicts[:first_meet])
    assert not any("**misses**" in line for line in verdicts[first_meet:])
