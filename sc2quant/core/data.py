"""Calibration and evaluation text: the shipped `calib_data/` and the user's own files.

`calib_data/` is built once from the machine's permissively licensed sources by the maintainer
tool `tools/build_calib_data.py` (`make calib-data`; see tools/corpus.py for the hash split that
keeps it disjoint from the embedded model's training data) and committed with its provenance.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sc2quant.core.errors import UserError

PACKAGE_DIR = Path(__file__).resolve().parents[1]
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


MIN_SEQLEN = 8  # the shortest calibration window taken


def calibration_samples(tokenizer: Any, source: str | list[str] = "calib_data", n_samples: int = 128,
                        seqlen: int = 512, seed: int = 0) -> tuple[list[list[int]], dict[str, Any]]:
    """`n_samples` windows of `seqlen` tokens, deterministic by seed, plus a description for the manifest.

    Documents are shuffled by seed, joined with <|endoftext|> into one stream and cut into
    non-overlapping windows, so no calibration token is used twice.
    """
    if n_samples < 1 or seqlen < MIN_SEQLEN:
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
