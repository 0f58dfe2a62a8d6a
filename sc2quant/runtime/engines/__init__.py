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


def open_engine(kind: str, path: Path, options: EngineOptions) -> Engine:
    """The registered engine for an artifact kind, opened on `path`."""
    if kind not in ENGINES:
        raise UserError(f"no engine runs artifacts of kind '{kind}': known kinds are {', '.join(ENGINES)}")
    module, cls = ENGINES[kind].split(":")
    return getattr(importlib.import_module(module), cls)(path, options, kind)


__all__ = ["ENGINES", "Engine", "EngineOptions", "open_engine"]
