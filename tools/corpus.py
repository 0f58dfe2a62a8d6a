"""Permissively licensed source code found on a fresh machine, split by content hash.

The same deterministic split feeds three consumers: the embedded model's training set,
`calib_data/calib` (GPTQ/ONNX calibration) and `calib_data/eval` (held-out evaluation).
A file's split depends only on the sha256 of its text, so no file can land in two splits.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Percent buckets of the content hash: [0, 90) train, [90, 95) calib, [95, 100) eval.
TRAIN_BUCKETS = range(0, 90)
CALIB_BUCKETS = range(90, 95)
EVAL_BUCKETS = range(95, 100)
MAX_FILE_CHARS = 60_000  # skip generated monsters; they teach the model nothing


@dataclass(frozen=True)
class Source:
    language: str
    root: Path
    patterns: tuple[str, ...]
    licence: str
    origin: str
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class SourceFile:
    language: str
    path: str  # relative to the source root, for provenance
    origin: str
    licence: str
    text: str
    sha256: str

    @property
    def bucket(self) -> int:
        return int(self.sha256[:8], 16) % 100

    @property
    def split(self) -> str:
        if self.bucket in TRAIN_BUCKETS:
            return "train"
        return "calib" if self.bucket in CALIB_BUCKETS else "eval"


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _torch_include() -> Path:
    import torch

    return Path(torch.__file__).parent / "include"


def machine_sources() -> list[Source]:
    """The code this project trains and calibrates on, as found on a fresh machine."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    include = Path(sysconfig.get_paths()["include"])
    torch_inc = _torch_include()
    return [
        Source("python", stdlib, ("**/*.py",), "PSF-2.0", "CPython standard library",
               exclude=("site-packages/", "test/", "tests/", "idle_test/", "lib2to3/tests/")),
        Source("c", include, ("**/*.h",), "PSF-2.0", "CPython C headers"),
        Source("cpp", torch_inc / "c10", ("**/*.h", "**/*.cpp"), "BSD-3-Clause",
               "PyTorch c10 headers (torch wheel)"),
        Source("cpp", torch_inc / "ATen" / "core", ("**/*.h",), "BSD-3-Clause",
               "PyTorch ATen core headers (torch wheel)"),
        Source("javascript", Path("/usr/lib/node_modules/npm"), ("lib/**/*.js", "node_modules/**/*.js"),
               "Artistic-2.0 (npm) / ISC / MIT (dependencies)", "npm CLI shipped with Node.js",
               exclude=("/test/", "/dist/", ".min.js")),
        Source("tcl", Path("/usr/share/tcltk"), ("**/*.tcl",), "TCL (BSD-style)",
               "Tcl/Tk script libraries (Debian tcl8.6, tk8.6)"),
    ]


def iter_files(sources: list[Source] | None = None) -> Iterator[SourceFile]:
    """Every usable file once (deduplicated by content), in a stable order."""
    seen: set[str] = set()
    for src in sources or machine_sources():
        if not src.root.is_dir():
            continue
        paths = sorted({p for pat in src.patterns for p in src.root.glob(pat) if p.is_file()})
        for p in paths:
            rel = p.relative_to(src.root).as_posix()
            if any(x in "/" + rel for x in src.exclude):
                continue
            try:
                text = p.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if not text.strip() or len(text) > MAX_FILE_CHARS:
                continue
            digest = text_sha256(text)
            if digest in seen:
                continue
            seen.add(digest)
            yield SourceFile(src.language, rel, src.origin, src.licence, text, digest)
