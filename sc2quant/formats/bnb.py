"""bitsandbytes checkpoints (int8, nf4/fp4, double quant) in transformers' layout, run in torch.

The load hooks apply the compute policy's kernel choice (`sc2quant.core.hf.compute_policy`):
bitsandbytes repacks 4-bit weights for its AVX512-BF16 kernel on the first CPU forward, and
its inverse of that repack is lossy, so a repacked model must never be saved (`assert_savable`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sc2quant.core.errors import UserError
from sc2quant.formats.base import Format, Method

if TYPE_CHECKING:
    from sc2quant.footprint.predict import Row
    from sc2quant.footprint.shapes import Shape

BNB_4BIT_TYPES = ("nf4", "fp4")


class BnbFormat(Format, kind="bnb"):
    description = "a bitsandbytes checkpoint (int8, nf4, fp4) in transformers' layout"
    families = ("bnb",)
    quant_method = "bitsandbytes"
    patterns = (
        (re.compile(r"^bnb-int8$"), lambda m: Method("bnb", 8)),
        (re.compile(r"^bnb-(?P<qt>nf4|fp4)(?P<dq>-dq)?$"),
         lambda m: Method("bnb", 4, quant_type=m["qt"], double_quant=bool(m["dq"]))),
    )
    vllm_refusal = ("vLLM has no bitsandbytes method: serve this artifact with sc2quant's own engine (drop --engine "
                    "vllm), or quantize with --method gptq for vLLM")

    def method_name(self, m: Method) -> str:
        return "bnb-int8" if m.bits == 8 else f"bnb-{m.quant_type}{'-dq' if m.double_quant else ''}"

    def method_label(self, m: Method) -> str:
        return "bnb-int8" if m.bits == 8 else f"bnb-{m.quant_type}"

    def runs_in(self, engine: str, device: str, path: Path, config: dict[str, Any], verified: bool,
                dtype: str = "auto") -> str | None:
        if engine == "onnx":
            return "ONNX Runtime has no kernels for bitsandbytes' int8/nf4/fp4 formats"
        return super().runs_in(engine, device, path, config, verified, dtype)

    def after_load(self, model: Any, policy: Any) -> None:
        set_bnb_repack(model, policy.bnb_repack)

    def footprint_methods(self) -> list[Method]:
        return [Method("bnb", 8), *(Method("bnb", 4, quant_type=qt, double_quant=dq)
                                    for qt in BNB_4BIT_TYPES for dq in (False, True))]

    def footprint(self, shape: Shape, m: Method) -> Row:
        from sc2quant.footprint.predict import bnb_4bit_row, bnb_int8_row

        return bnb_int8_row(shape) if m.bits == 8 else bnb_4bit_row(shape, m.quant_type or "nf4", m.double_quant)


def set_bnb_repack(model: Any, enabled: bool) -> None:
    """Let bitsandbytes repack 4-bit weights for its AVX512-BF16 kernel on the first CPU forward, or not."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = enabled


def assert_savable(model: Any) -> None:
    """Refuse to save a 4-bit model whose weights were repacked for the CPU kernel: bitsandbytes'
    inverse of the repack is lossy (absmax went through bf16), so the checkpoint would differ."""
    import bitsandbytes as bnb

    for name, module in model.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if isinstance(module, bnb.nn.Linear4bit) and getattr(state, "packing_format_for_cpu", False):
            raise UserError(f"{name} was repacked for bitsandbytes' AVX512-BF16 kernel by a forward pass; saving now "
                            "would write a different checkpoint: save before running the model, or load it with "
                            "dtype fp32 (no repack)")
