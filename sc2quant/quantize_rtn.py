"""Round-to-nearest int4/int8, written as a standard GPTQ v1 checkpoint.

Hand-written rather than a library call on purpose: it is the uncalibrated baseline that
GPTQ must beat, so it uses exactly GPTQ's grid and format and nothing cleverer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sc2quant.console import track
from sc2quant.gptq_format import QUANTIZED_LINEARS, quantization_config, quantize_rtn


def quantize_rtn_model(model: Any, tmp: Path, bits: int, group_size: int, sym: bool) -> dict[str, Any]:
    """Quantize every decoder Linear of a loaded HF model and save a GPTQ-format directory."""
    state: dict[str, torch.Tensor] = {}
    quantized, kept = [], []
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for name, module in track(linears.items(), f"RTN int{bits} g{group_size}", total=len(linears)):
        if name.split(".")[-1] not in QUANTIZED_LINEARS:
            continue
        for key, tensor in quantize_rtn(module.weight.data, bits, group_size, sym).items():
            state[f"{name}.{key}"] = tensor
        if module.bias is not None:
            state[f"{name}.bias"] = module.bias.data.half()
        quantized.append(name)
    for key, tensor in model.state_dict().items():
        module_name = key.rsplit(".", 1)[0]
        if module_name in quantized or key == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        state[key] = tensor.contiguous()
        kept.append(key)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(bits, group_size, sym, False, "rtn")
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"quantized_modules": quantized, "kept_tensors": kept}
