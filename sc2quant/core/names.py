"""Names shared by every layer: float dtypes and weight-file suffixes.

Artifact kinds and method names (full and short) belong to the formats that own them: see
`sc2quant.formats` (one `Format` per kind, one table of formats).
"""

from __future__ import annotations

FLOAT_DTYPES = ("fp32", "bf16", "fp16")

WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".data", ".onnx_data", ".bin", ".pt", ".pth", ".ckpt", ".pkl")
ONNX_WEIGHT_SUFFIXES = (".onnx", ".data", ".onnx_data")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
