"""Small file helpers every layer uses: JSON that must be valid, checksums, sizes, safetensors headers."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from sc2quant.core.errors import UserError


def read_json(file: Path, fix: str, error: type[UserError] = UserError) -> Any:
    """Parse a JSON file or raise `error` naming the file and `fix` (what the user should do)."""
    try:
        return json.loads(Path(file).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise error(f"{file} is missing: {fix}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{file} is not valid JSON ({exc}): {fix}") from exc


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def dir_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a directory."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def safetensors_header(file: Path) -> tuple[int, dict[str, Any]]:
    """(header length, tensor entries) of a safetensors file, read without loading tensors."""
    with open(file, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(header_len))
    header.pop("__metadata__", None)
    return header_len, header
