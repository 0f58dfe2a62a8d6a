"""Artifact formats: one `Format` subclass per artifact kind, registered by subclassing.

See `sc2quant.formats.base`. Importing this package registers the built-in kinds in the order
`sc2quant footprint` and `sc2quant formats` list them; a new kind's module registers itself
when it is imported.
"""

from __future__ import annotations

from sc2quant.formats import bnb, gptq, onnx, plain  # noqa: F401  (registration, in display order below)
from sc2quant.formats.base import (
    FORMATS,
    Format,
    Method,
    family_format,
    format_of_config,
    get_format,
    method_names,
    parse_method,
)

for _kind in ("hf", "bnb", "gptq", "onnx"):  # display order: plain first
    FORMATS[_kind] = FORMATS.pop(_kind)

__all__ = ["FORMATS", "Format", "Method", "family_format", "format_of_config", "get_format",
           "method_names", "parse_method"]
