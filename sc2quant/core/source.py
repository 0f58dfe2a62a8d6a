"""Model sources: what the user typed, turned into a directory on disk.

A source is a local directory (Hugging Face layout), a hub id (downloaded when online, or
taken from the local cache), or nothing, which means the embedded default model.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sc2quant.core.errors import UserError
from sc2quant.embedded import EMBEDDED_MODEL_DIR, EMBEDDED_MODEL_ID

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_HOST = ("huggingface.co", 443)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "merges.txt", "vocab.json"]


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: `kind` is "embedded", "local" or "hub"; `path` is on disk."""

    kind: Literal["embedded", "local", "hub"]
    id: str
    path: Path

    @property
    def short_name(self) -> str:
        """A name for default output directories: "embedded", the directory's or the hub repo's name."""
        return {"embedded": "embedded", "local": self.path.name}.get(self.kind, self.id.split("/")[-1])


def resolve_source(model: str | os.PathLike | None) -> ModelSource:
    """Turn what the user typed into a directory on disk (downloading from the hub if needed)."""
    if model is None or str(model) in ("", "embedded", EMBEDDED_MODEL_ID):
        if not (EMBEDDED_MODEL_DIR / "config.json").is_file():
            raise UserError(f"the embedded model is missing from {EMBEDDED_MODEL_DIR}: reinstall sc2quant "
                            "or rebuild it with `make embedded-model`")
        return ModelSource("embedded", EMBEDDED_MODEL_ID, EMBEDDED_MODEL_DIR)
    text = str(model)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{path} is a file, not a model directory: pass the directory that holds config.json")
        return ModelSource("local", str(path.resolve()), path.resolve())
    looks_local = text.startswith((".", "/", "~")) or Path(text.split("/")[0]).expanduser().is_dir()
    if HUB_ID.match(text) and not looks_local:
        return ModelSource("hub", text, _download(text))
    raise UserError(f"model '{model}' not found: pass an existing directory, a hub id (org/name), "
                    "or nothing for the embedded model")


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def _download(repo_id: str) -> Path:
    """Fetch safetensors, config and tokenizer of a hub model; fail fast when offline."""
    from huggingface_hub import snapshot_download

    try:  # a cached copy works offline
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except Exception:  # noqa: BLE001 - any cache miss means we must go online
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
        raise UserError(f"cannot download '{repo_id}': the Hugging Face hub is unreachable (offline) and no cached "
                        "copy exists; pass a local model directory instead")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types
        raise UserError(f"cannot download '{repo_id}' from the hub ({type(exc).__name__}): "
                        "check the id and your access token") from exc
