"""Round-to-nearest int2/int4/int8, written as a standard GPTQ v1 checkpoint (artifact kind "gptq").

Hand-written rather than a library call on purpose: it is the uncalibrated baseline that
GPTQ must beat, so it uses exactly GPTQ's grid and format and nothing cleverer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sc2quant.core.console import track
from sc2quant.core.errors import UserError
from sc2quant.core.hf import load_model
from sc2quant.core.names import Method
from sc2quant.core.source import ModelSource
from sc2quant.quant.base import QuantizeOptions, Quantizer
from sc2quant.quant.gptq import check_group_size
from sc2quant.quant.gptq_format import QUANTIZED_LINEARS, quantization_config, quantize_rtn

RTN_BITS = (2, 4, 8)  # GPTQ v1 packs these into int32 words evenly; 3 bits needs GPTQ's own packer


class RtnQuantizer(Quantizer):
    name = "rtn"
    kind = "gptq"
    options = ("bits", "group_size", "sym")

    def validate(self, opts: QuantizeOptions, config: dict[str, Any]) -> None:
        if opts.bits not in RTN_BITS:
            raise UserError(f"round-to-nearest writes {', '.join(map(str, RTN_BITS))} bits, not {opts.bits}: "
                            "use --bits 4 (or --method gptq for 3 bits)")
        check_group_size(opts.group_size, config)

    def method(self, opts: QuantizeOptions) -> Method:
        return Method("rtn", opts.bits, opts.group_size, sym=opts.sym)

    def run(self, opts: QuantizeOptions, source: ModelSource, tmp: Path, prepared: Any, device: str) -> dict[str, Any]:
        loaded = load_model(source.path, dtype="bf16", device=device, allow_pickle=opts.allow_pickle)
        return quantize_rtn_model(loaded.model, tmp, opts.bits, opts.group_size, opts.sym)


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
