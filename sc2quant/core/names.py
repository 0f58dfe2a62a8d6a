"""The one table of names: artifact kinds, quantization methods, method labels, file suffixes.

A method has a full name that says everything that changes its bytes (`gptq-int4-g128`,
`bnb-nf4-dq`, `onnx-int4-b32-sym`, as `sc2quant footprint` lists them and as default output
directories are named) and a short label (`gptq`, `bnb-nf4`, `onnx-int4`) that manifests and
report tables use. Both are built and parsed only here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sc2quant.core.errors import UserError

# Artifact kinds: what `sc2quant.json`'s "kind" may say, and what loads each (runtime engines
# register themselves under these names).
KINDS: dict[str, str] = {
    "hf": "a plain Hugging Face checkpoint (bf16, fp16 or fp32 safetensors)",
    "bnb": "a bitsandbytes checkpoint (int8, nf4, fp4) in transformers' layout",
    "gptq": "a GPTQ v1 checkpoint (GPTQModel, or round-to-nearest on the same grid)",
    "onnx": "an ONNX Runtime decoder (GroupQueryAttention, MatMulNBits) with genai_config.json",
}

# `sc2quant quantize --method`: quantizers register themselves under these names.
QUANTIZE_METHODS = ("gptq", "bnb", "rtn")
FLOAT_DTYPES = ("fp32", "bf16", "fp16")
BNB_4BIT_TYPES = ("nf4", "fp4")

WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".data", ".onnx_data", ".bin", ".pt", ".pth", ".ckpt", ".pkl")
ONNX_WEIGHT_SUFFIXES = (".onnx", ".data", ".onnx_data")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class Method:
    """Everything that decides a method's bytes. `family`: fp32/bf16/fp16, bnb, gptq, rtn or onnx."""

    family: str
    bits: int | None = None
    group: int | None = None  # GPTQ/RTN group size, MatMulNBits block size
    quant_type: str | None = None  # bnb 4-bit: nf4 or fp4
    double_quant: bool = False
    sym: bool = True
    dtype: str | None = None  # ONNX activations: fp32 or fp16

    @property
    def name(self) -> str:
        """The full name (`bnb-nf4-dq`, `gptq-int4-g128`, `onnx-int4-b32-sym`, `onnx-fp32`)."""
        if self.family in FLOAT_DTYPES:
            return self.family
        if self.family == "bnb":
            return "bnb-int8" if self.bits == 8 else f"bnb-{self.quant_type}{'-dq' if self.double_quant else ''}"
        if self.family in ("gptq", "rtn"):
            return f"{self.family}-int{self.bits}-g{self.group}"
        if self.bits == 4:
            return f"onnx-int4-b{self.group}{'-sym' if self.sym else ''}{'-fp16' if self.dtype == 'fp16' else ''}"
        return f"onnx-{self.dtype}"

    @property
    def label(self) -> str:
        """The short label manifests and reports use (`bnb-nf4`, `gptq`, `rtn`, `onnx-int4`)."""
        if self.family == "bnb":
            return "bnb-int8" if self.bits == 8 else f"bnb-{self.quant_type}"
        if self.family == "onnx":
            return "onnx-int4" if self.bits == 4 else f"onnx-{self.dtype}"
        return self.family

    @property
    def kind(self) -> str:
        """The artifact kind this method writes."""
        return {"bnb": "bnb", "gptq": "gptq", "rtn": "gptq", "onnx": "onnx"}.get(self.family, "hf")


_PATTERNS = (
    (re.compile(r"^(?P<family>fp32|bf16|fp16)$"), lambda m: Method(m["family"])),
    (re.compile(r"^bnb-int8$"), lambda m: Method("bnb", 8)),
    (re.compile(r"^bnb-(?P<qt>nf4|fp4)(?P<dq>-dq)?$"), lambda m: Method("bnb", 4, quant_type=m["qt"],
                                                                          double_quant=bool(m["dq"]))),
    (re.compile(r"^(?P<family>gptq|rtn)-int(?P<bits>[2348])-g(?P<group>-1|\d+)$"),
     lambda m: Method(m["family"], int(m["bits"]), int(m["group"]))),
    (re.compile(r"^onnx-(?P<dtype>fp32|fp16)$"), lambda m: Method("onnx", dtype=m["dtype"])),
    (re.compile(r"^onnx-int4-b(?P<block>\d+)(?P<sym>-sym)?(?P<fp16>-fp16)?$"),
     lambda m: Method("onnx", 4, int(m["block"]), sym=bool(m["sym"]), dtype="fp16" if m["fp16"] else "fp32")),
)


def parse_method(name: str) -> Method:
    """A full method name back into its fields; a clear error for anything else."""
    for pattern, make in _PATTERNS:
        if m := pattern.match(name):
            return make(m)
    raise UserError(f"unknown method '{name}': use fp32, bf16, bnb-int8, bnb-nf4[-dq], bnb-fp4[-dq], gptq-int4-g128 "
                    "(bits 2/3/4/8, group N or -1), onnx-fp32, onnx-fp16 or onnx-int4-b32[-sym][-fp16]")
