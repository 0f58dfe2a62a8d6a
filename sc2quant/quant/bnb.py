"""bitsandbytes int8 (LLM.int8) and int4 (nf4/fp4, optional double quant), CPU or CUDA.

Written exactly as transformers writes it (`save_pretrained` of a model quantized while
loading) and loaded back by transformers (the runtime's torch engine, artifact kind "bnb").
The checkpoint is saved right after quantization, before any forward pass: on AVX512-BF16
CPUs bitsandbytes repacks 4-bit weights in place on the first forward, and its inverse is
lossy (`sc2quant.core.hf.assert_savable` refuses to save such a model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sc2quant.core.console import console
from sc2quant.core.errors import UserError
from sc2quant.core.hf import assert_savable, load_model
from sc2quant.core.names import BNB_4BIT_TYPES, Method
from sc2quant.core.source import ModelSource
from sc2quant.quant.base import QuantizeOptions, Quantizer

BNB_BITS = (4, 8)
COMPUTE_DTYPES = ("bf16", "fp32", "fp16")


def bnb_config(bits: int, quant_type: str, double_quant: bool, compute_dtype: str) -> Any:
    """transformers' BitsAndBytesConfig for these options (each checked with a clear error)."""
    from transformers import BitsAndBytesConfig

    from sc2quant.core.hf import torch_dtype

    if bits not in BNB_BITS:
        raise UserError(f"bitsandbytes quantizes to 8 or 4 bits, not {bits}: "
                        "use --bits 8 or --bits 4 (or --method gptq for other widths)")
    if quant_type not in BNB_4BIT_TYPES:
        raise UserError(f"unknown 4-bit quant type '{quant_type}': choose nf4 or fp4")
    if compute_dtype not in COMPUTE_DTYPES:
        raise UserError(f"unknown compute dtype '{compute_dtype}': choose one of {', '.join(COMPUTE_DTYPES)}")
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch_dtype(compute_dtype))


class BnbQuantizer(Quantizer):
    name = "bnb"
    kind = "bnb"
    options = ("bits", "quant_type", "double_quant", "compute_dtype")

    def validate(self, opts: QuantizeOptions, config: dict[str, Any]) -> None:
        bnb_config(opts.bits, opts.quant_type, opts.double_quant, opts.compute_dtype)

    def method(self, opts: QuantizeOptions) -> Method:
        return Method("bnb", opts.bits, quant_type=opts.quant_type, double_quant=opts.double_quant)

    def params(self, opts: QuantizeOptions) -> dict[str, Any]:
        return {"llm_int8_threshold": 6.0} if opts.bits == 8 else super().params(opts)

    def run(self, opts: QuantizeOptions, source: ModelSource, tmp: Path, prepared: Any, device: str) -> dict[str, Any]:
        """Quantize while loading, save at once (no forward in between), and describe what was done."""
        config = bnb_config(opts.bits, opts.quant_type, opts.double_quant, opts.compute_dtype)
        model = load_model(source.path, device=device, allow_pickle=opts.allow_pickle, quantization_config=config).model
        assert_savable(model)
        info = describe(model)
        with console.status("saving"):
            model.save_pretrained(str(tmp))
        return info


def describe(model: Any) -> dict[str, Any]:
    """Which modules were quantized, which tensors were kept, and the true bytes of each part.

    transformers' get_memory_footprint() misses SCB / absmax / quant_state; the state dict has them.
    """
    import bitsandbytes as bnb

    quant_modules = [n for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))]
    state = model.state_dict()
    qbytes = kept_bytes = 0
    kept: list[str] = []
    for key, tensor in state.items():
        module = key.rsplit(".", 2)[0] if ".weight." in key else key.rsplit(".", 1)[0]
        size = tensor.numel() * tensor.element_size()
        if module in quant_modules and not key.endswith(".bias"):
            qbytes += size
        else:
            kept_bytes += size
            kept.append(key)
    if model.config.tie_word_embeddings and "lm_head.weight" in kept:
        kept.remove("lm_head.weight")  # shares the embedding's storage: counted once
        kept_bytes -= state["lm_head.weight"].numel() * state["lm_head.weight"].element_size()
    return {
        "quantized_modules": quant_modules,
        "kept_tensors": kept,
        "quantized_weight_bytes": qbytes,  # includes SCB / absmax / quant_map / nested stats
        "kept_bytes": kept_bytes,
        "total_weight_bytes": qbytes + kept_bytes,
        "transformers_memory_footprint": model.get_memory_footprint(),
    }


def save_bnb(model: Any, out: Path) -> None:
    """Re-save a loaded bitsandbytes model (transformers 5.24's save_pretrained raises
    NotImplementedError for a pre-quantized bnb model it loaded). The state dict already holds
    the packed weights and SCB/absmax/quant_state exactly as stored, so we write it as is."""
    from safetensors.torch import save_file

    assert_savable(model)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: the embedding is the one copy
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.to_json_file(str(out / "config.json"))
