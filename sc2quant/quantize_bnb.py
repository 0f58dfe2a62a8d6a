"""bitsandbytes int8 (LLM.int8) and int4 (nf4/fp4, optional double quant), CPU or CUDA.

The checkpoint is saved right after quantization, before any forward pass: on AVX512-BF16
CPUs bitsandbytes repacks 4-bit weights in place on the first forward and a later save
writes a wrong checkpoint (see shared notes). `guard_cpu_repack` also disables the repack
on every model we load, and `assert_savable` refuses to save a repacked model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sc2quant.errors import UserError

BNB_BITS = (4, 8)
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def bnb_config(bits: int, quant_type: str, double_quant: bool, compute_dtype: str):
    from transformers import BitsAndBytesConfig

    if bits not in BNB_BITS:
        raise UserError(f"bitsandbytes quantizes to 8 or 4 bits, not {bits}: "
                        "use --bits 8 or --bits 4 (or --method gptq for other widths)")
    if quant_type not in QUANT_TYPES:
        raise UserError(f"unknown 4-bit quant type '{quant_type}': choose nf4 or fp4")
    if compute_dtype not in COMPUTE_DTYPES:
        raise UserError(f"unknown compute dtype '{compute_dtype}': choose one of {', '.join(COMPUTE_DTYPES)}")
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=COMPUTE_DTYPES[compute_dtype],
    )


def guard_cpu_repack(model: Any) -> None:
    """Stop bitsandbytes from repacking 4-bit weights in place on AVX512-BF16 CPUs."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def assert_savable(model: Any) -> None:
    """Refuse to save a 4-bit model whose weights were repacked for the CPU kernel."""
    import bitsandbytes as bnb

    for name, module in model.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if isinstance(module, bnb.nn.Linear4bit) and getattr(state, "packing_format_for_cpu", False):
            raise UserError(f"{name} was repacked for the CPU kernel after a forward pass; saving now would write a "
                            "wrong checkpoint: quantize again and save before running the model")


def quantize_bnb_model(source_path: Path, tmp: Path, bits: int, quant_type: str, double_quant: bool,
                       compute_dtype: str, device: str) -> dict[str, Any]:
    """Quantize while loading, save at once (no forward in between), and describe what was done."""
    from transformers import AutoModelForCausalLM

    from sc2quant.console import console

    with console.status(f"loading and quantizing to bitsandbytes int{bits} on {device}"):
        model = AutoModelForCausalLM.from_pretrained(
            str(source_path),
            quantization_config=bnb_config(bits, quant_type, double_quant, compute_dtype),
            dtype=torch.bfloat16,
            device_map=device,
            trust_remote_code=False,
        )
    guard_cpu_repack(model)
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
