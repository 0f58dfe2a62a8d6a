"""Round-to-nearest int2/int4/int8, written as a standard GPTQ v1 checkpoint (artifact kind "gptq").

Hand-written rather than a library call on purpose: it is the uncalibrated baseline that
GPTQ must beat, so it uses exactly GPTQ's grid and format and nothing cleverer. It streams:
one tensor in memory at a time (`sc2quant.quant.stream`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sc2quant.core.errors import UserError
from sc2quant.core.hf import read_config
from sc2quant.core.source import ModelSource
from sc2quant.formats import Method
from sc2quant.quant.base import QuantizeOptions, Quantizer, check_group_size
from sc2quant.quant.gptq_format import quantization_config, quantize_rtn_rows
from sc2quant.quant.stream import rewrite

RTN_BITS = (2, 4, 8)  # GPTQ v1 packs these into int32 words evenly; 3 bits needs GPTQ's own packer


class RtnQuantizer(Quantizer):
    name = "rtn"
    options = ("bits", "group_size", "sym")

    def validate(self, opts: QuantizeOptions, config: dict[str, Any]) -> None:
        if opts.bits not in RTN_BITS:
            raise UserError(f"round-to-nearest writes {', '.join(map(str, RTN_BITS))} bits, not {opts.bits}: "
                            "use --bits 4 (or --method gptq for 3 bits)")
        check_group_size(opts.group_size, config)

    def method(self, opts: QuantizeOptions) -> Method:
        return Method("rtn", opts.bits, opts.group_size, sym=opts.sym)

    def run(self, opts: QuantizeOptions, source: ModelSource, tmp: Path, prepared: Any, device: str) -> dict[str, Any]:
        def linear(module: str, weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
            stored = quantize_rtn_rows(weight, opts.bits, opts.group_size, opts.sym)
            return stored if bias is None else {**stored, "bias": bias.half()}  # GPTQ v1 keeps biases in fp16

        done = rewrite(source.path, tmp, linear, f"RTN int{opts.bits} g{opts.group_size}")
        config = read_config(source.path)
        config["quantization_config"] = quantization_config(opts.bits, opts.group_size, opts.sym, False, "rtn")
        config["dtype"] = "bfloat16"
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        return {k: v for k, v in done.describe().items() if k in ("quantized_modules", "kept_tensors", "weight_files")}
