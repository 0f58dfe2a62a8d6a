"""`sc2quant inspect`: what the loader sees in a model directory or artifact, without loading it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sc2quant.core import artifact
from sc2quant.core.files import dir_bytes, safetensors_header
from sc2quant.core.hf import read_config, weight_files
from sc2quant.core.names import ONNX_WEIGHT_SUFFIXES
from sc2quant.core.source import resolve_source
from sc2quant.core.tables import Table


def stored_elements(files: list[Path]) -> dict[str, int]:
    """Tensor elements stored in safetensors files, per dtype (packed int4 counts as its int32 words)."""
    by_dtype: dict[str, int] = {}
    for f in files:
        for info in safetensors_header(f)[1].values():
            n = 1
            for d in info["shape"]:
                n *= d
            by_dtype[info["dtype"]] = by_dtype.get(info["dtype"], 0) + n
    return by_dtype


def inspect_model(model: str | os.PathLike | None = None) -> dict[str, Any]:
    source = resolve_source(model)
    cfg = read_config(source.path)
    kind = artifact.read_manifest(source.path).kind if artifact.is_artifact(source.path) else None
    if kind is not None:
        from sc2quant.formats import get_format

        get_format(kind).check(cfg, source.id)  # an unknown kind, or one its config.json contradicts
    if kind == "onnx":
        files = sorted(p for p in source.path.iterdir() if p.suffix in ONNX_WEIGHT_SUFFIXES)
    else:
        files = weight_files(source.path)
    from sc2quant.footprint import counts, shape_from_config

    # From the shape, not the files: a GPTQ, bnb or ONNX artifact stores packed words, not parameters.
    params = counts(shape_from_config(cfg, name=source.id)).p
    by_dtype = stored_elements([f for f in files if f.suffix == ".safetensors"])
    rope = cfg.get("rope_parameters") or {}
    info: dict[str, Any] = {
        "source": {"kind": source.kind, "id": source.id, "path": str(source.path)},
        "architecture": (cfg.get("architectures") or ["Starcoder2ForCausalLM"])[0],
        "model_type": cfg["model_type"],
        "shape": {
            "layers": cfg.get("num_hidden_layers"),
            "heads": cfg.get("num_attention_heads"),
            "kv_heads": cfg.get("num_key_value_heads"),
            "hidden": cfg.get("hidden_size"),
            "intermediate": cfg.get("intermediate_size"),
            "vocab": cfg.get("vocab_size"),
            "context": cfg.get("max_position_embeddings"),
            "sliding_window": cfg.get("sliding_window"),
            "tied_embeddings": bool(cfg.get("tie_word_embeddings", False)),
            "rope_theta": rope.get("rope_theta", cfg.get("rope_theta")),
        },
        "dtype": cfg.get("dtype") or cfg.get("torch_dtype"),
        "parameters": params,
        "stored_elements_by_dtype": by_dtype,
        "quantization": cfg.get("quantization_config"),
        "weight_files": [f.name for f in files],
        "bytes_on_disk": dir_bytes(source.path),
    }
    if artifact.is_artifact(source.path):
        m = artifact.read_manifest(source.path)
        info["artifact"] = {"kind": m.kind, "method": m.method, "bits": m.bits, "group_size": m.group_size,
                            "source": m.source.get("id"), "created": m.created, "metrics": m.metrics}
        if kind == "onnx":  # its config.json is the source's: the graph's own dtype is in the manifest
            info["dtype"] = {"fp32": "float32", "fp16": "float16"}.get(str(m.params.get("dtype")), m.params.get("dtype"))
    return info


def table(info: dict[str, Any]) -> Table:
    """`sc2quant inspect` as a two-column table."""
    t = Table(["field", "value"], title=f"{info['architecture']}  ·  {info['source']['id']}")
    for key, value in info["shape"].items():
        t.add(key, str(value))
    t.add("dtype", str(info["dtype"]))
    t.add("parameters", f"{info['parameters']:,}")
    t.add("bytes on disk", f"{info['bytes_on_disk']:,}")
    if info.get("quantization"):
        q = info["quantization"]
        t.add("quantization", f"{q.get('quant_method')} {q.get('bits', '')}".strip())
    if info.get("artifact"):
        a = info["artifact"]
        t.add("artifact", f"{a['kind']} / {a['method']} (from {a['source']})")
    return t
