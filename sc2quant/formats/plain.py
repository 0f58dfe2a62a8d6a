"""Plain Hugging Face checkpoints (bf16, fp16 or fp32 safetensors): transformers runs them in torch."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from sc2quant.core.names import FLOAT_DTYPES
from sc2quant.formats.base import Format, Method

if TYPE_CHECKING:
    from sc2quant.footprint.predict import Row
    from sc2quant.footprint.shapes import Shape


class PlainFormat(Format, kind="hf"):
    description = "a plain Hugging Face checkpoint (bf16, fp16 or fp32 safetensors)"
    families = FLOAT_DTYPES
    patterns = ((re.compile(r"^(?P<family>fp32|bf16|fp16)$"), lambda m: Method(m["family"])),)

    def footprint_methods(self) -> list[Method]:
        return [Method("fp32"), Method("bf16")]

    def footprint(self, shape: Shape, m: Method) -> Row:
        from sc2quant.footprint.predict import float_row

        return float_row(shape, m.family)
