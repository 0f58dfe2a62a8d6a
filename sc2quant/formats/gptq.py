"""GPTQ v1 checkpoints (GPTQModel, or round-to-nearest on the same grid).

On a CPU a GPTQ artifact runs fastest in ONNX Runtime's `MatMulNBits` after a lossless, cached
conversion (`sc2quant.runtime.convert`), which takes 4-bit weights whose groups follow the input
order; anything else (3 or 8 bits, act-order, one group per row, ...) runs in torch, through
transformers and GPTQModel's kernels, and `choose_engine` says so once.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sc2quant.core.errors import UserError
from sc2quant.formats.base import Format, Method

if TYPE_CHECKING:
    from sc2quant.footprint.predict import Row
    from sc2quant.footprint.shapes import Shape

GPTQ_BITS = (2, 3, 4, 8)  # what GPTQModel quantizes to
ONNX_GPTQ_BLOCKS = (16, 32, 64, 128, 256)  # the block sizes MatMulNBits accepts
FOOTPRINT_GROUPS = (32, 64, 128, -1)
# GPTQ kernels for CUDA, in order of preference. GPTQModel's own choice on Hopper is Machete,
# which refuses some shapes instead of falling back and builds itself at first use by
# downloading CUTLASS (an offline GPU machine cannot); Marlin compiles at first use too. These
# two need nothing at run time but triton (shipped with CUDA torch) or plain torch.
GPTQ_CUDA_KERNELS = ("gptq_triton", "gptq_torch")
# torch's int4 CPU kernel (`_weight_int4pack_mm_for_cpu`, GPTQModel's fused CPU choice) takes these
# group sizes; other 4-bit grids (one group per row, 16) run GPTQModel's plain torch kernel.
TORCH_INT4_GROUPS = (32, 64, 128, 256)
GPTQ_KERNEL_ENV = "SC2QUANT_GPTQ_KERNEL"


class GptqFormat(Format, kind="gptq"):
    description = "a GPTQ v1 checkpoint (GPTQModel, or round-to-nearest on the same grid)"
    families = ("gptq", "rtn")
    quant_method = "gptq"
    patterns = ((re.compile(r"^(?P<family>gptq|rtn)-int(?P<bits>[2348])-g(?P<group>-1|\d+)$"),
                 lambda m: Method(m["family"], int(m["bits"]), int(m["group"]))),)
    converted_for = ("onnx",)

    def method_name(self, m: Method) -> str:
        return f"{m.family}-int{m.bits}-g{m.group}"

    def engines(self, device: str) -> tuple[str, ...]:
        return ("onnx", "torch") if device == "cpu" else ("torch", "onnx")

    def check(self, config: dict[str, Any], where: str) -> None:
        super().check(config, where)
        quant = config.get("quantization_config") or {}
        bits, group = quant.get("bits"), quant.get("group_size")
        if bits not in GPTQ_BITS or not isinstance(group, int) or isinstance(group, bool) or not (group == -1 or group > 0):
            raise UserError(f"{where}: its quantization_config has bits {bits!r} and group_size {group!r}; GPTQ takes "
                            f"bits {', '.join(map(str, GPTQ_BITS))} and a positive group size or -1: the checkpoint "
                            "was edited; re-create it")

    def runs_in(self, engine: str, device: str, path: Path, config: dict[str, Any], verified: bool,
                dtype: str = "auto") -> str | None:
        if engine == "onnx":
            if not verified:
                return ("its conversion to ONNX Runtime is cached under checksums that this load did not verify (it "
                        "has no sc2quant.json, or verify=False / --no-verify was given)")
            if dtype not in ("auto", "fp32"):
                return f"its conversion to ONNX Runtime computes in fp32, and --dtype {dtype} was asked for"
            quant = config.get("quantization_config") or {}
            if _grid_refusal(quant) is None:
                check_conversion_installed(path)
            return onnx_refusal(path, quant)
        return super().runs_in(engine, device, path, config, verified, dtype)

    def load_context(self, quant: dict[str, Any] | None) -> Any:
        return gptqmodel_imported()

    def load_attempts(self, quant: dict[str, Any] | None, device: str) -> list[dict[str, Any]]:
        from transformers import GPTQConfig

        bits, group = int((quant or {}).get("bits", 4)), (quant or {}).get("group_size")
        if device == "cuda":
            return [{"quantization_config": GPTQConfig(bits=bits, backend=k)} for k in cuda_kernels()]
        if bits == 4 and group not in TORCH_INT4_GROUPS:  # GPTQModel's default CPU kernel would fail at the first forward
            return [{"quantization_config": GPTQConfig(bits=bits, backend="gptq_torch")}]
        return [{}]

    def footprint_methods(self) -> list[Method]:
        return [Method("gptq", bits, g) for bits in (4, 8) for g in FOOTPRINT_GROUPS]

    def footprint(self, shape: Shape, m: Method) -> Row:
        from sc2quant.footprint.predict import gptq_row

        return gptq_row(shape, m.bits or 4, m.group or 128)


CONVERSION_NEEDS = ("torch", "transformers", "safetensors", "onnx")  # what `sc2quant.runtime.convert` imports


def check_conversion_installed(path: Path) -> None:
    """The base install (no torch) cannot convert a GPTQ checkpoint for ONNX Runtime: say what it needs, in one
    line, before anything is tried (else: "this needs safetensors", the first import that failed)."""
    from sc2quant.core.extras import EXTRAS, absent

    if (module := absent(*CONVERSION_NEEDS)) is not None:
        what = "torch" if module == "torch" else f"torch and {module}"
        raise UserError(f"{path.name} is a GPTQ checkpoint, which runs in ONNX Runtime once converted, and converting "
                        f"it needs {what}, which the base install leaves out: pip install "
                        f"'sc2quant[{EXTRAS[module]}]' (it is converted once, then cached), or export it to ONNX "
                        f"with the full install (`sc2quant export onnx {path}`) and run the export")


def onnx_refusal(path: Path, quant: dict[str, Any]) -> str | None:
    """Why ONNX Runtime's MatMulNBits cannot run GPTQ checkpoint `path` (None: it can, losslessly).
    It needs GPTQ v1, 4 bits, a supported group size, groups in input order, a float lm_head."""
    if (reason := _grid_refusal(quant)) is not None:
        return reason
    reordered = reordered_g_idx(path, int(quant["group_size"]))
    if reordered:
        return f"its {reordered} reorders input channels (act-order), which MatMulNBits on the CPU cannot run"
    return None


def _grid_refusal(quant: dict[str, Any]) -> str | None:
    """`onnx_refusal`'s checks of the quantization config alone (the weights are not read)."""
    if quant.get("bits") != 4:
        return f"it has {quant.get('bits')}-bit weights and ONNX Runtime's MatMulNBits takes 4-bit GPTQ only"
    if quant.get("checkpoint_format", "gptq") != "gptq":
        return f"it is stored as '{quant.get('checkpoint_format')}', not GPTQ v1 (re-save it as v1, GPTQModel's default)"
    if quant.get("desc_act"):
        return ("it was quantized with act-order (desc_act): its groups are not contiguous, which MatMulNBits on the "
                "CPU cannot run")
    if quant.get("lm_head"):
        return "it has a quantized lm_head, which the conversion does not carry over"
    if quant.get("group_size") not in ONNX_GPTQ_BLOCKS:
        return (f"it has group size {quant.get('group_size')} and MatMulNBits needs a block of "
                f"{', '.join(map(str, ONNX_GPTQ_BLOCKS))}")
    return None


def reordered_g_idx(path: Path, group_size: int) -> str | None:
    """The first g_idx tensor that is not `k // group_size` for input k (act-order hidden in g_idx)."""
    import numpy as np
    from safetensors import safe_open

    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as st:
            for name in (k for k in st.keys() if k.endswith(".g_idx")):
                g_idx = st.get_tensor(name)
                if not np.array_equal(g_idx.astype(np.int64), np.arange(g_idx.size) // group_size):
                    return name
    return None


@contextlib.contextmanager
def gptqmodel_imported() -> Iterator[None]:
    """Import GPTQModel without its side effects on the user's environment.

    tokenicer (imported by GPTQModel) points HF_HOME at /tmp when unset, and GPTQModel's
    default CPU worker count (1 on a 2-core machine) stalls quantization.
    """
    saved = os.environ.get("HF_HOME")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, min(4, os.cpu_count() or 2))))
    try:
        import gptqmodel  # noqa: F401

        yield
    finally:
        if saved is None:
            os.environ.pop("HF_HOME", None)
        else:
            os.environ["HF_HOME"] = saved


def cuda_kernels() -> list[str]:
    """The kernels to try for a GPTQ checkpoint on CUDA: $SC2QUANT_GPTQ_KERNEL, else triton then torch."""
    if os.environ.get(GPTQ_KERNEL_ENV):
        return [os.environ[GPTQ_KERNEL_ENV]]
    return [k for k in GPTQ_CUDA_KERNELS if k != "gptq_triton" or importlib.util.find_spec("triton") is not None]
