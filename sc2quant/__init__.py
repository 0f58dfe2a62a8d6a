"""sc2quant: quantization and export toolkit for StarCoder2 code models."""

from sc2quant.errors import IntegrityError, UserError

__version__ = "0.1.0"
__all__ = ["IntegrityError", "UserError", "__version__"]
