"""ONNX Runtime decoders written by `sc2quant export onnx` (GroupQueryAttention, MatMulNBits,
genai_config.json): they run in ONNX Runtime only."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sc2quant.formats.base import Format, Method

if TYPE_CHECKING:
    from sc2quant.footprint.predict import Row
    from sc2quant.footprint.shapes import Shape

LM_HEADS = ("int4", "int8", "float")
_HEAD_SUFFIX = {"int4": "", "int8": "-lm8", "float": "-lmf"}  # an int4 lm_head has no suffix (the oldest names)
FOOTPRINT_BLOCKS = (32, 128)


def _int4(m: re.Match[str]) -> Method:
    head = {"-lm8": "int8", "-lmf": "float"}.get(m["head"] or "", "int4")
    return Method("onnx", 4, int(m["block"]), sym=bool(m["sym"]), dtype="fp16" if m["fp16"] else "fp32", lm_head=head)


class OnnxFormat(Format, kind="onnx"):
    description = "an ONNX Runtime decoder (GroupQueryAttention, MatMulNBits) with genai_config.json"
    families = ("onnx",)
    patterns = (
        (re.compile(r"^onnx-(?P<dtype>fp32|fp16)$"), lambda m: Method("onnx", dtype=m["dtype"])),
        (re.compile(r"^onnx-int4-b(?P<block>\d+)(?P<sym>-sym)?(?P<fp16>-fp16)?(?P<head>-lm8|-lmf)?$"), _int4),
    )
    vllm_refusal = ("vLLM does not run ONNX exports: serve the model it was exported from with --engine vllm, or "
                    "this export with sc2quant's own engine (drop --engine vllm)")

    def method_name(self, m: Method) -> str:
        if m.bits != 4:
            return f"onnx-{m.dtype}"
        return (f"onnx-int4-b{m.group}{'-sym' if m.sym else ''}{'-fp16' if m.dtype == 'fp16' else ''}"
                f"{_HEAD_SUFFIX[m.lm_head or 'int4']}")

    def method_label(self, m: Method) -> str:
        return "onnx-int4" if m.bits == 4 else f"onnx-{m.dtype}"

    def engines(self, device: str) -> tuple[str, ...]:
        return ("onnx",)

    def check(self, config: dict[str, Any], where: str) -> None:
        """config.json is the source model's (a GPTQ one keeps its quantization_config): the graph and
        genai_config.json describe the export, and the engine checks those."""

    def runs_in(self, engine: str, device: str, path: Path, config: dict[str, Any], verified: bool,
                dtype: str = "auto") -> str | None:
        if engine == "torch":
            return "an ONNX export runs in ONNX Runtime only (run its source model in torch)"
        return super().runs_in(engine, device, path, config, verified, dtype)

    def footprint_methods(self) -> list[Method]:
        methods = [Method("onnx", dtype="fp32"), Method("onnx", dtype="fp16")]
        methods += [Method("onnx", 4, b, sym=sym, dtype="fp32", lm_head=head)
                    for b in FOOTPRINT_BLOCKS for sym in (False, True) for head in ("int8", "int4")]
        return [*methods, Method("onnx", 4, 32, sym=True, dtype="fp32", lm_head="float"),
                Method("onnx", 4, 32, sym=False, dtype="fp16", lm_head="int8")]

    def footprint(self, shape: Shape, m: Method) -> Row:
        from sc2quant.footprint.predict import onnx_float_row, onnx_int4_row

        float_bytes = 2 if m.dtype == "fp16" else 4
        if m.bits == 4:
            return onnx_int4_row(shape, m.group or 32, m.sym, float_bytes, m.lm_head or "int4")
        return onnx_float_row(shape, float_bytes, m.name)
