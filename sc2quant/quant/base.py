"""What every quantization method provides, and the options of `sc2quant quantize`.

A method is one module with one `Quantizer` subclass and one line in `QUANTIZERS`
(`sc2quant/quant/__init__.py`). The quantizer owns its option checks and the checkpoint it writes;
the method's format (`sc2quant.formats`) owns how that checkpoint is named, loaded and run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from sc2quant.core.errors import UserError
from sc2quant.core.source import ModelSource
from sc2quant.formats import Method


@dataclass
class QuantizeOptions:
    """Every option of `sc2quant quantize`; a recipe YAML may set any of them."""

    model: str | None = None
    out: str | None = None
    method: str = "gptq"
    bits: int = 4
    group_size: int = 128  # gptq, rtn
    act_order: bool = False  # gptq
    sym: bool = True  # gptq, rtn
    damp: float = 0.01  # gptq
    calib: str | list[str] = "calib_data"  # gptq
    calib_samples: int = 128  # gptq
    calib_seqlen: int = 512  # gptq
    seed: int = 0  # gptq
    quant_type: str = "nf4"  # bnb 4-bit
    double_quant: bool = False  # bnb 4-bit
    compute_dtype: str = "bf16"  # bnb 4-bit
    device: str = "cpu"
    allow_pickle: bool = False  # *.bin checkpoints can run code when unpickled: explicit opt-in
    force: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class Quantizer:
    """One quantization method. Subclasses set `name` and `options`, and implement `validate`,
    `method` and `run`; `prepare` and `params` have sensible defaults. The artifact kind written
    is the format that owns the method's family (`self.method(opts).kind`)."""

    name: ClassVar[str]  # what `--method` says
    options: ClassVar[tuple[str, ...]]  # the QuantizeOptions fields this method reads

    def applicable(self, opts: QuantizeOptions) -> tuple[str, ...]:
        """The options that change what these options write (given others are refused as not applying)."""
        return self.options

    def validate(self, opts: QuantizeOptions, config: dict[str, Any]) -> None:
        """Refuse impossible option values before anything is read or written."""
        raise NotImplementedError

    def method(self, opts: QuantizeOptions) -> Method:
        """The method's name (full and short) for these options."""
        raise NotImplementedError

    def prepare(self, opts: QuantizeOptions, source: ModelSource, config: dict[str, Any]) -> tuple[Any, dict | None]:
        """Inputs built before the output directory exists (calibration data), and their description."""
        return None, None

    def run(self, opts: QuantizeOptions, source: ModelSource, tmp: Path, prepared: Any, device: str) -> dict[str, Any]:
        """Write the quantized checkpoint into `tmp`; return facts for the manifest's params."""
        raise NotImplementedError

    def params(self, opts: QuantizeOptions) -> dict[str, Any]:
        """The method's settings as recorded in the manifest."""
        return {k: getattr(opts, k) for k in self.options if k not in ("bits", "calib", "calib_samples",
                                                                       "calib_seqlen", "seed")}


def tiles(group_size: int, config: dict[str, Any]) -> bool:
    """Groups of `group_size` input features tile every decoder Linear's input (hidden and intermediate)."""
    return group_size > 0 and config["hidden_size"] % group_size == 0 and config["intermediate_size"] % group_size == 0


def check_group_size(group_size: int, config: dict[str, Any]) -> None:
    """A GPTQ-grid group size must divide every Linear's input features (or be -1: one group per row)."""
    hidden, intermediate = config["hidden_size"], config["intermediate_size"]
    if group_size != -1 and not tiles(group_size, config):
        raise UserError(f"group size {group_size} does not divide the input features ({hidden} and {intermediate}): "
                        "use a divisor such as 32, 64 or 128, or -1 for one group per row")
