"""Export to other runtimes' formats: ONNX Runtime (`export_onnx`)."""

from __future__ import annotations


def export_onnx(*args, **kwargs):  # -> Path; see sc2quant.export.onnx.export_onnx
    from sc2quant.export.onnx import export_onnx as _export_onnx

    return _export_onnx(*args, **kwargs)


__all__ = ["export_onnx"]
