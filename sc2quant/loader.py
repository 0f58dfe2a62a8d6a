"""The one place that resolves a model source and loads a StarCoder2 model plus tokenizer.

A source is a local directory (HF layout), a hub id (downloaded when online), or nothing,
which means the embedded default model. Everything is validated before weights are read:
a wrong architecture, missing or corrupt weights and pickle checkpoints are `UserError`s.
"""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sc2quant.embedded import EMBEDDED_MODEL_DIR, EMBEDDED_MODEL_ID
from sc2quant.errors import UserError

DTYPES = ("bf16", "fp16", "fp32")
DEVICES = ("cpu", "cuda", "auto")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_HOST = ("huggingface.co", 443)


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: `kind` is "embedded", "local" or "hub"; `path` is on disk."""

    kind: Literal["embedded", "local", "hub"]
    id: str
    path: Path


@dataclass
class LoadedModel:
    model: Any  # transformers.Starcoder2ForCausalLM (or a quantized variant of it)
    tokenizer: Any
    source: ModelSource


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise UserError(f"unknown dtype '{name}': choose one of {', '.join(DTYPES)}")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def resolve_device(device: str) -> str:
    import torch

    if device not in DEVICES:
        raise UserError(f"unknown device '{device}': choose one of {', '.join(DEVICES)}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available: use --device cpu")
    return device


def resolve_source(model: str | os.PathLike | None) -> ModelSource:
    """Turn what the user typed into a directory on disk (downloading from the hub if needed)."""
    if model is None or str(model) in ("", "embedded", EMBEDDED_MODEL_ID):
        if not (EMBEDDED_MODEL_DIR / "config.json").is_file():
            raise UserError(
                f"the embedded model is missing from {EMBEDDED_MODEL_DIR}: reinstall sc2quant "
                "or rebuild it with `make embedded-model`"
            )
        return ModelSource("embedded", EMBEDDED_MODEL_ID, EMBEDDED_MODEL_DIR)
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{path} is a file, not a model directory: pass the directory that holds config.json")
        return ModelSource("local", str(path.resolve()), path.resolve())
    if HUB_ID.match(str(model)) and not str(model).startswith((".", "/", "~")):
        return ModelSource("hub", str(model), _download(str(model)))
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

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "merges.txt", "vocab.json"]
    try:  # a cached copy works offline
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001 - any cache miss means we must go online
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
        raise UserError(
            f"cannot download '{repo_id}': the Hugging Face hub is unreachable (offline) and no cached "
            "copy exists; pass a local model directory instead"
        )
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types
        raise UserError(f"cannot download '{repo_id}' from the hub ({type(exc).__name__}): "
                        "check the id and your access token") from exc


def read_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"no config.json in {path}: not a Hugging Face model directory")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{cfg_file} is not valid JSON ({exc}): restore the file") from exc
    model_type = cfg.get("model_type")
    if model_type != "starcoder2":
        raise UserError(
            f"{path} holds a '{model_type}' model, not StarCoder2 (model_type 'starcoder2'): "
            "sc2quant only handles Starcoder2ForCausalLM checkpoints"
        )
    return cfg


def weight_files(path: Path, allow_pickle: bool = False) -> list[Path]:
    """The safetensors files of a model directory, checked to be readable."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not files:
        if pickles and not allow_pickle:
            raise UserError(
                f"{path} has only pickle weights ({pickles[0].name}), which can run arbitrary code: "
                "convert them to safetensors, or pass --allow-pickle if you trust the source"
            )
        if not pickles:
            raise UserError(f"no weight files (*.safetensors) in {path}: the model directory is incomplete")
        return pickles
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                keys = list(st.keys())
                if keys:  # reading the last tensor catches truncation
                    st.get_slice(keys[-1])
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types
            raise UserError(f"corrupt weight file {f.name} ({exc}): re-download or re-export the model") from exc
        _check_complete(f)
    return files


def safetensors_header(file: Path) -> tuple[int, dict]:
    """(header length, tensor entries) of a safetensors file, read without loading tensors."""
    import struct

    with open(file, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(header_len))
    header.pop("__metadata__", None)
    return header_len, header


def _check_complete(file: Path) -> None:
    """safetensors maps lazily; a truncated file is only noticed here by comparing sizes."""
    header_len, header = safetensors_header(file)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if file.stat().st_size < 8 + header_len + end:
        raise UserError(f"weight file {file.name} is truncated ({file.stat().st_size} bytes): re-download or re-export the model")


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot load the tokenizer from {path} ({exc}): the directory needs tokenizer.json") from exc


def load_model(
    model: str | os.PathLike | None = None,
    dtype: str = "bf16",
    device: str = "cpu",
    allow_pickle: bool = False,
) -> LoadedModel:
    """Load a StarCoder2 checkpoint (bf16 by default) and its tokenizer, validated."""
    from sc2quant.console import console, quiet_libraries

    quiet_libraries()
    source = resolve_source(model)
    read_config(source.path)
    files = weight_files(source.path, allow_pickle)  # refuses pickle unless allow_pickle
    dev = resolve_device(device)
    tdtype = torch_dtype(dtype)
    tokenizer = load_tokenizer(source.path)
    from transformers import AutoModelForCausalLM

    with console.status(f"loading {source.id} ({dtype}, {dev})"):
        hf_model, info = AutoModelForCausalLM.from_pretrained(
            str(source.path),
            dtype=tdtype,
            device_map=dev,
            trust_remote_code=False,
            use_safetensors=files[0].suffix == ".safetensors",
            output_loading_info=True,
        )
    _check_loading_info(info, source)
    hf_model.eval()
    return LoadedModel(hf_model, tokenizer, source)


def _check_loading_info(info: dict, source: ModelSource) -> None:
    """transformers only warns about missing weights and fills them with noise; we refuse."""
    missing = [k for k in info.get("missing_keys", []) if k != "lm_head.weight"]
    mismatched = info.get("mismatched_keys", [])
    if missing or mismatched:
        bad = (missing or [m[0] if isinstance(m, tuple) else m for m in mismatched])[:3]
        raise UserError(f"weights of {source.id} do not match its config (missing or mis-shaped: "
                        f"{', '.join(map(str, bad))}): the checkpoint is incomplete")
