"""sc2quant: quantization and export toolkit for StarCoder2 code models.

The Python API mirrors the CLI: `load` (run any artifact), `quantize`, `export_onnx`, `report`.
Where things are: README.md, section "Where things are".
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from sc2quant.core.errors import IntegrityError, UserError
from sc2quant.core.version import __version__

F = TypeVar("F", bound=Callable[..., Any])


def _extras(fn: F) -> F:
    """A part of sc2quant whose extra is not installed: a `UserError` naming the extra, not an ImportError."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ModuleNotFoundError as exc:
            from sc2quant.core.extras import missing_extra

            if (missing := missing_extra(exc, fn.__name__)) is None:
                raise
            raise missing from None

    return wrapper  # type: ignore[return-value]


@_extras
def load(path: Any = None, device: str = "cpu", verify: bool = True, threads: int | None = None, dtype: str = "auto",
         engine: str = "auto", **options: Any):
    """Load an artifact or model directory for generation; see `sc2quant.runtime.load` (options:
    prefix_cache_bytes, prefill_chunk, profile_dir, static_cache)."""
    from sc2quant.runtime import load as _load

    return _load(path, device=device, verify=verify, threads=threads, dtype=dtype, engine=engine, **options)


@_extras
def quantize(model: Any = None, **options: Any):
    """`sc2quant quantize` from Python: options as `sc2quant.quant.QuantizeOptions` names them."""
    from sc2quant.quant import QuantizeOptions
    from sc2quant.quant import quantize as _quantize

    return _quantize(QuantizeOptions(model=None if model is None else str(model), **options), given=set(options))


@_extras
def export_onnx(model: Any = None, out: Any = None, **options: Any):
    """`sc2quant export onnx` from Python; see `sc2quant.export.onnx.export_onnx`."""
    from sc2quant.export import export_onnx as _export

    return _export(model, out, **options)


@_extras
def report(artifacts: list[Any], **options: Any) -> dict[str, Any]:
    """`sc2quant report` from Python; see `sc2quant.evaluate.report.report`."""
    from sc2quant.evaluate.report import report as _report

    return _report(artifacts, **options)


__all__ = ["IntegrityError", "UserError", "__version__", "export_onnx", "load", "quantize", "report"]
