"""Engines: one per artifact kind, each implementing `sc2quant.runtime.engines.base.Engine`.

Adding an engine is one module plus one line here. Entries are imported on first use.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from sc2quant.core.errors import UserError
from sc2quant.runtime.engines.base import Engine, EngineOptions

# artifact kind -> engine. A plain checkpoint, bitsandbytes and GPTQ run in torch (transformers'
# own kernels); ONNX exports in ONNX Runtime.
ENGINES: dict[str, str] = {
    "hf": "sc2quant.runtime.engines.torch_engine:TorchEngine",
    "bnb": "sc2quant.runtime.engines.torch_engine:TorchEngine",
    "gptq": "sc2quant.runtime.engines.torch_engine:TorchEngine",
    "onnx": "sc2quant.runtime.engines.onnx_engine:OnnxEngine",
}


ENGINE_CHOICES = ("auto", "torch", "onnx")


def choose_engine(kind: str, device: str, requested: str = "auto", verified: bool = True) -> str:
    """Which engine runs an artifact of `kind`: the registered one, except that a GPTQ artifact
    on the CPU runs through ONNX Runtime's int4 kernels (converted once, see runtime.convert)
    unless `torch` is asked for. The conversion is cached under the artifact's checksums, so
    only files whose checksums were `verified` are converted."""
    if requested not in ENGINE_CHOICES:
        raise UserError(f"unknown engine '{requested}': choose one of {', '.join(ENGINE_CHOICES)}")
    if requested == "onnx" and kind not in ("onnx", "gptq"):
        raise UserError(f"a '{kind}' artifact cannot run in ONNX Runtime: export it first (`sc2quant export onnx`) "
                        "or drop --engine")
    if requested == "torch" and kind == "onnx":
        raise UserError("an ONNX export runs in ONNX Runtime only: drop --engine torch, or run its source model")
    if kind == "gptq" and requested == "onnx" and not verified:
        raise UserError("a GPTQ artifact runs in ONNX Runtime after a conversion that needs its checksums "
                        "verified: drop verify=False (--no-verify), or use engine torch")
    if kind == "gptq" and (requested == "onnx" or (requested == "auto" and device == "cpu" and verified)):
        return "onnx"
    return "onnx" if kind == "onnx" else "torch"


def open_engine(kind: str, path: Path, options: EngineOptions) -> Engine:
    """The registered engine for an artifact kind, opened on `path`."""
    if kind not in ENGINES:
        raise UserError(f"no engine runs artifacts of kind '{kind}': known kinds are {', '.join(ENGINES)}")
    module, cls = ENGINES[kind].split(":")
    return getattr(importlib.import_module(module), cls)(path, options, kind)


__all__ = ["ENGINES", "ENGINE_CHOICES", "Engine", "EngineOptions", "choose_engine", "open_engine"]
