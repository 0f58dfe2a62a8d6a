"""The one place that reads a Hugging Face model directory and loads it into torch.

Everything is validated before weights are read: a wrong architecture, missing or corrupt
weights, a missing tokenizer and pickle checkpoints are `UserError`s. Loading goes through
transformers exactly as a plain user would (`AutoModelForCausalLM.from_pretrained`), plus
three guards: weights the checkpoint lacks or mis-shapes are refused (transformers only
warns and fills them with noise), GPTQModel is imported without its side effects, and
bitsandbytes' CPU kernel choice follows the compute policy below.

Compute policy (`compute_policy`), per CPU kind (`sc2quant.core.system.cpu_caps`):

| artifact | `auto` on a CPU with native bf16 (AVX512-BF16, AMX) | `auto` on AVX2 / other CPUs |
|---|---|---|
| plain checkpoint | bf16 | fp32 (bf16 weights widen exactly; emulated bf16 is slow) |
| bitsandbytes 4-bit | bf16, bitsandbytes' repacked AVX512-BF16 kernel | bf16, plain kernel |
| bitsandbytes int8, GPTQ | as transformers loads it (bf16) | as transformers loads it (bf16) |

`auto` for quantized checkpoints is exactly what plain transformers does on the same CPU, so
sc2quant's logits equal transformers' bit for bit. `fp32`/`bf16`/`fp16` override the dtype of
plain and GPTQ checkpoints (`--dtype`); bitsandbytes checkpoints compute in bf16 only. The CPU
kind can be forced with `SC2QUANT_CPU=avx2|bf16` (see `sc2quant.core.system`): `avx2` also turns
bitsandbytes' repack off on an AVX512-BF16 machine.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sc2quant.core.errors import UserError
from sc2quant.core.files import read_json, safetensors_header
from sc2quant.core.names import FLOAT_DTYPES, PICKLE_SUFFIXES
from sc2quant.core.source import ModelSource, resolve_source

DEVICES = ("cpu", "cuda", "auto")
COMPUTE_DTYPES = ("auto", *FLOAT_DTYPES)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")
TOKENIZER_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                        "tokenizer.model", "generation_config.json")


def torch_dtype(name: str) -> Any:
    import torch

    if name not in FLOAT_DTYPES:
        raise UserError(f"unknown dtype '{name}': choose one of {', '.join(FLOAT_DTYPES)}")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def resolve_device(device: str) -> str:
    import torch

    if device not in DEVICES:
        raise UserError(f"unknown device '{device}': choose one of {', '.join(DEVICES)}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available: use --device cpu")
    return device


def read_config(path: Path) -> dict[str, Any]:
    """config.json of a StarCoder2 model directory (anything else is refused)."""
    if not (Path(path) / "config.json").is_file():
        raise UserError(f"no config.json in {path}: not a Hugging Face model directory")
    cfg = read_json(Path(path) / "config.json", "restore the file")
    model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
    if model_type != "starcoder2":
        raise UserError(f"{path} holds a '{model_type}' model, not StarCoder2 (model_type 'starcoder2'): "
                        "sc2quant only handles Starcoder2ForCausalLM checkpoints")
    return cfg


def weight_files(path: Path, allow_pickle: bool = False) -> list[Path]:
    """The safetensors files of a model directory, checked to be readable and complete."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not files:
        if pickles and not allow_pickle:
            raise UserError(f"{path} has only pickle weights ({pickles[0].name}), which can run arbitrary code: "
                            "convert them to safetensors, or pass --allow-pickle if you trust the source")
        if not pickles:
            raise UserError(f"no weight files (*.safetensors) in {path}: the model directory is incomplete")
        return pickles
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                keys = list(st.keys())
                if keys:  # reading the last tensor's slice catches a broken header
                    st.get_slice(keys[-1])
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types
            raise UserError(f"corrupt weight file {f.name} ({exc}): re-download or re-export the model") from exc
        header_len, header = safetensors_header(f)  # safetensors maps lazily: truncation shows only in the sizes
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if f.stat().st_size < 8 + header_len + end:
            raise UserError(f"weight file {f.name} is truncated ({f.stat().st_size} bytes): "
                            "re-download or re-export the model")
    return files


def check_tokenizer(path: Path) -> None:
    """A model directory must carry its tokenizer: without it nothing can be encoded or run."""
    if not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{path} has no tokenizer ({' or '.join(TOKENIZER_FILES)}): copy the tokenizer files "
                        "of the original model into it")


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    check_tokenizer(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - tokenizers raise many types
        raise UserError(f"cannot load the tokenizer from {path} ({exc}): the directory needs tokenizer.json") from exc
    if len(tokenizer) == 0:
        raise UserError(f"the tokenizer in {path} is empty: copy the original model's tokenizer files")
    return tokenizer


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy a model's tokenizer (and generation config) into an artifact being written."""
    import shutil

    for name in TOKENIZER_SIDE_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)


@contextlib.contextmanager
def contained_gptqmodel_import() -> Iterator[None]:
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


# ----------------------------------------------------------------------------- compute policy


@dataclass(frozen=True)
class ComputePolicy:
    """How a checkpoint is computed here: the torch dtype to load it in (None: as transformers
    would) and whether bitsandbytes may repack 4-bit weights for its AVX512-BF16 kernel."""

    dtype: str | None
    bnb_repack: bool
    reason: str

    @property
    def label(self) -> str:
        return f"{self.dtype or 'as stored'}{', bnb repacked kernel' if self.bnb_repack else ''}"


def compute_policy(quant: dict[str, Any] | None, device: str, requested: str = "auto") -> ComputePolicy:
    """The documented policy (module docstring) for a checkpoint's `quantization_config` (None:
    a plain checkpoint), the device and the CPU kind."""
    from sc2quant.core.system import cpu_caps

    if requested not in COMPUTE_DTYPES:
        raise UserError(f"unknown dtype '{requested}': choose one of {', '.join(COMPUTE_DTYPES)}")
    method = (quant or {}).get("quant_method")
    if method == "bitsandbytes" and requested not in ("auto", "bf16"):
        raise UserError(f"bitsandbytes checkpoints compute in bf16, the dtype they were saved in, not {requested}: "
                        "drop --dtype (or use --dtype bf16)")
    if device == "cuda":
        import torch

        native = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        dtype = (native if method is None else None) if requested == "auto" else requested
        return ComputePolicy(dtype, False, f"CUDA: {dtype or 'as stored'}")
    caps = cpu_caps()
    if method is None:
        if requested != "auto":
            return ComputePolicy(requested, False, f"asked for {requested}")
        if caps.native_bf16:
            return ComputePolicy("bf16", False, "the CPU computes bf16 natively")
        return ComputePolicy("fp32", False, "the CPU has no native bf16: bf16 weights are widened to fp32 exactly")
    dtype = None if requested == "auto" else requested
    if method == "bitsandbytes" and (quant or {}).get("load_in_4bit"):
        if caps.bnb_repack:
            return ComputePolicy(dtype, True, "bitsandbytes' repacked AVX512-BF16 4-bit kernel, as transformers uses it")
        return ComputePolicy(dtype, False, "bitsandbytes' plain 4-bit kernel, as transformers uses it here")
    return ComputePolicy(dtype, False, "as transformers loads it")


def set_bnb_repack(model: Any, enabled: bool) -> None:
    """Let bitsandbytes repack 4-bit weights for its AVX512-BF16 kernel on the first CPU forward, or not."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = enabled


def assert_savable(model: Any) -> None:
    """Refuse to save a 4-bit model whose weights were repacked for the CPU kernel: bitsandbytes'
    inverse of the repack is lossy (absmax went through bf16), so the checkpoint would differ."""
    import bitsandbytes as bnb

    for name, module in model.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if isinstance(module, bnb.nn.Linear4bit) and getattr(state, "packing_format_for_cpu", False):
            raise UserError(f"{name} was repacked for bitsandbytes' AVX512-BF16 kernel by a forward pass; saving now "
                            "would write a different checkpoint: save before running the model, or load it with "
                            "dtype fp32 (no repack)")


# ----------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    model: Any  # transformers.Starcoder2ForCausalLM (or a quantized variant of it)
    tokenizer: Any
    source: ModelSource
    config: dict[str, Any]
    policy: ComputePolicy
    kernel: str | None = None  # GPTQ: the GPTQModel kernel chosen


# GPTQ kernels for CUDA, in order of preference. GPTQModel's own choice on Hopper is Machete,
# which refuses some shapes instead of falling back and builds itself at first use by
# downloading CUTLASS (an offline GPU machine cannot); Marlin compiles at first use too. These
# two need nothing at run time but triton (shipped with CUDA torch) or plain torch.
GPTQ_CUDA_KERNELS = ("gptq_triton", "gptq_torch")
GPTQ_KERNEL_ENV = "SC2QUANT_GPTQ_KERNEL"


def gptq_cuda_kernels() -> list[str]:
    """The kernels to try for a GPTQ checkpoint on CUDA: $SC2QUANT_GPTQ_KERNEL, else triton then torch."""
    import importlib.util

    if os.environ.get(GPTQ_KERNEL_ENV):
        return [os.environ[GPTQ_KERNEL_ENV]]
    return [k for k in GPTQ_CUDA_KERNELS if k != "gptq_triton" or importlib.util.find_spec("triton") is not None]


def load_model(model: str | os.PathLike | None = None, dtype: str = "auto", device: str = "cpu",
               allow_pickle: bool = False, quantization_config: Any = None) -> LoadedModel:
    """Load a StarCoder2 checkpoint and its tokenizer, validated, under the compute policy.

    dtype: "auto" (the policy), or fp32/bf16/fp16. quantization_config: quantize while loading
    (bitsandbytes), as `from_pretrained(quantization_config=...)` does.
    """
    from sc2quant.core.console import quiet_libraries, status

    quiet_libraries()
    source = resolve_source(model)
    config = read_config(source.path)
    files = weight_files(source.path, allow_pickle)
    dev = resolve_device(device)
    tokenizer = load_tokenizer(source.path)
    quant = config.get("quantization_config") or None
    if quantization_config is not None:
        quant = quantization_config.to_dict()
        policy = ComputePolicy(dtype if dtype != "auto" else "bf16", False, "quantized while loading")
    else:
        policy = compute_policy(quant, dev, dtype)
    method = (quant or {}).get("quant_method")
    kwargs: dict[str, Any] = {"device_map": dev, "output_loading_info": True,
                              "use_safetensors": files[0].suffix == ".safetensors"}
    if policy.dtype is not None:
        kwargs["dtype"] = torch_dtype(policy.dtype)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    from transformers import AutoModelForCausalLM

    gptq = contained_gptqmodel_import() if method == "gptq" else contextlib.nullcontext()
    kernels: list[str | None] = [None]
    if method == "gptq" and dev == "cuda" and quantization_config is None:
        kernels = list(gptq_cuda_kernels())
    with status(f"loading {source.id} ({policy.label}, {dev})"), gptq:
        for i, kernel in enumerate(kernels):
            if kernel is not None:
                from transformers import GPTQConfig

                kwargs["quantization_config"] = GPTQConfig(bits=int((quant or {}).get("bits", 4)), backend=kernel)
            try:
                hf_model, info = AutoModelForCausalLM.from_pretrained(str(source.path), trust_remote_code=False,
                                                                      **kwargs)
                break
            except Exception as exc:  # noqa: BLE001 - a kernel that cannot run here: try the next
                if i == len(kernels) - 1:
                    raise
                logging.getLogger("sc2quant").warning("GPTQ kernel %s failed (%s); trying %s", kernel, exc,
                                                      kernels[i + 1])
    if kernels[0] is not None:
        logging.getLogger("sc2quant").info("GPTQ on CUDA: kernel %s", kernel)
    _check_loading_info(info, source)
    if method == "bitsandbytes":
        set_bnb_repack(hf_model, policy.bnb_repack)
    hf_model.eval()
    return LoadedModel(hf_model, tokenizer, source, config, policy, kernel)


def _check_loading_info(info: dict[str, Any], source: ModelSource) -> None:
    """transformers only warns about missing weights and fills them with noise; we refuse."""
    missing = [k for k in info.get("missing_keys", []) if k != "lm_head.weight"]
    mismatched = info.get("mismatched_keys", [])
    if missing or mismatched:
        bad = (missing or [m[0] if isinstance(m, tuple) else m for m in mismatched])[:3]
        raise UserError(f"weights of {source.id} do not match its config (missing or mis-shaped: "
                        f"{', '.join(map(str, bad))}): the checkpoint is incomplete")
