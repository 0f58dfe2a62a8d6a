"""sc2quant: quantization and export toolkit for StarCoder2 code models."""

from sc2quant.errors import IntegrityError, UserError

__version__ = "0.1.0"
__all__ = ["IntegrityError", "UserError", "__version__"]


def load(path=None, device: str = "cpu", verify: bool = True):
    """Load an artifact or model directory for generation; see `sc2quant.runtime.load`."""
    from sc2quant.runtime import load as _load

    return _load(path, device=device, verify=verify)


__all__ += ["load"]
