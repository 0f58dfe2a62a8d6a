"""Engines, each implementing `sc2quant.runtime.engines.base.Engine`, and the choice between them.

`ENGINES` is the one table of engines (name -> class, imported on first use); which engines can
run an artifact is its format's answer (`sc2quant.formats.Format.engines` and `runs_in`).
Adding an engine is one module plus one line here.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from sc2quant.core.errors import UserError
from sc2quant.formats import get_format
from sc2quant.runtime.engines.base import Engine, EngineOptions

ENGINES: dict[str, str] = {
    "torch": "sc2quant.runtime.engines.torch_engine:TorchEngine",  # transformers' own kernels
    "onnx": "sc2quant.runtime.engines.onnx_engine:OnnxEngine",  # ONNX Runtime
}
ENGINE_CHOICES = ("auto", *ENGINES)


def choose_engine(kind: str, device: str, requested: str = "auto", path: Path | None = None,
                  config: dict[str, Any] | None = None, verified: bool = True,
                  notes: list[str] | None = None, dtype: str = "auto") -> str:
    """The engine that runs an artifact of `kind` at `path` on `device`.

    "auto": the format's fastest engine that can take this artifact; when a faster one cannot,
    why is appended to `notes` (the caller says it once). A requested engine that cannot take
    it is refused with the reason."""
    if requested not in ENGINE_CHOICES:
        raise UserError(f"unknown engine '{requested}': choose one of {', '.join(ENGINE_CHOICES)}")
    fmt = get_format(kind)
    where, config = Path(path or "."), config or {}
    if requested != "auto":
        reason = fmt.runs_in(requested, device, where, config, verified, dtype)
        if reason:
            fallback = choose_engine(kind, device, "auto", path, config, verified, None, dtype)
            raise UserError(f"this artifact cannot run in the {requested} engine: {reason}; drop --engine "
                            f"(it then runs in {fallback})")
        return requested
    skipped = []
    for engine in fmt.engines(device):
        reason = fmt.runs_in(engine, device, where, config, verified, dtype)
        if reason is None:
            if skipped and notes is not None:
                notes.append(f"running in {engine}, not {', '.join(e for e, _ in skipped)}: "
                             + "; ".join(r for _, r in skipped))
            return engine
        skipped.append((engine, reason))
    raise UserError(f"no engine runs this '{kind}' artifact on {device}: " + "; ".join(r for _, r in skipped))


def open_engine(engine: str, kind: str, path: Path, options: EngineOptions) -> Engine:
    """Engine `engine` opened on the artifact of `kind` at `path`."""
    module, cls = ENGINES[engine].split(":")
    return getattr(importlib.import_module(module), cls)(path, options, kind)


__all__ = ["ENGINES", "ENGINE_CHOICES", "Engine", "EngineOptions", "choose_engine", "open_engine"]
