"""The one place that reads a Hugging Face model directory and loads it into torch.

Everything is validated before weights are read: a wrong architecture, missing or corrupt
weights, a missing tokenizer and pickle checkpoints are `UserError`s. Loading goes through
transformers exactly as a plain user would (`AutoModelForCausalLM.from_pretrained`), plus
a guard: weights the checkpoint lacks or mis-shapes are refused (transformers only warns and
fills them with noise). What a quantized kind adds (GPTQModel imported without its side
effects, GPTQ kernels to try on CUDA, bitsandbytes' CPU kernel choice under the compute
policy below) comes from its format as `LoadHooks` (see `sc2quant.formats`).

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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sc2quant.core.errors import UserError
from sc2quant.core.files import check_regular, read_json, safetensors_header
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
    if device not in DEVICES:
        raise UserError(f"unknown device '{device}': choose one of {', '.join(DEVICES)}")
    if device == "cpu":
        return device
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if not cuda_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available: use --device cpu")
    return device


def cuda_available() -> bool:
    """torch's answer where torch is installed; else ONNX Runtime's (the base install's only runtime)."""
    try:
        import torch
    except ImportError:
        import onnxruntime

        return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    return bool(torch.cuda.is_available())


def read_config(path: Path) -> dict[str, Any]:
    """config.json of a StarCoder2 model directory (anything else is refused), checked against the
    shapes its weights' headers declare before anything is sized from it (`check_config_shapes`)."""
    file = Path(path) / "config.json"
    if not file.exists() and not file.is_symlink():
        _listable(Path(path))  # an unreadable directory says so, not "no config.json"
        raise UserError(f"no config.json in {path}: not a Hugging Face model directory")
    cfg = read_json(file, "restore the file")
    model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
    if model_type != "starcoder2":
        raise UserError(f"{path} holds a '{model_type}' model, not StarCoder2 (model_type 'starcoder2'): "
                        "sc2quant only handles Starcoder2ForCausalLM checkpoints")
    check_config_shapes(Path(path), cfg)
    return cfg


# What config.json sizes; each must be a positive integer (transformers allocates from them).
SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def check_config_shapes(path: Path, cfg: dict[str, Any]) -> None:
    """Refuse a config.json whose sizes the weights do not have (a claim of 100,000 layers, or of a
    hidden, vocabulary or MLP size the tensors do not hold), from the safetensors headers alone:
    transformers would allocate what the config says before noticing."""
    for key in SHAPE_KEYS:
        value = cfg.get(key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise UserError(f"{path}/config.json: {key} must be a positive integer, got {str(value)[:40]}: "
                            "restore the file")
    header: dict[str, Any] = {}
    for f in _listable(path):
        if f.suffix == ".safetensors" and f.is_file():
            try:
                header.update(safetensors_header(f)[1])
            except (UserError, OSError):
                return  # a broken weight file: weight_files says so, naming it
    if not header:  # an ONNX export: its genai_config.json sizes the buffers (the graph's inputs are checked at load)
        genai = path / "genai_config.json"
        data = read_json(genai, "re-export the model") if genai.is_file() else None
        if isinstance(data, dict) and isinstance(data.get("model"), dict) and isinstance(data["model"].get("decoder"), dict):
            check_genai_sizes(path, data, cfg)
        return

    def shape(name: str) -> list[int] | None:
        return header[name]["shape"] if name in header else None

    claims: list[str] = []

    def expect(key: str, declared: int | None, what: str) -> None:
        if declared is not None and cfg.get(key) is not None and cfg[key] != declared:
            claims.append(f"{key} {cfg[key]} but the weights have {what} {declared}")

    layers = {int(m.group(1)) for name in header if (m := _LAYER.match(name))}
    count = cfg.get("num_hidden_layers")
    if layers and count is not None and (count > max(layers) + 1 or any(i not in layers for i in range(count))):
        claims.append(f"num_hidden_layers {count} but the weights hold {len(layers)} layers")
    embed = shape("model.embed_tokens.weight")
    if embed and len(embed) == 2:
        expect("vocab_size", embed[0], "an embedding of rows")
        expect("hidden_size", embed[1], "an embedding width")
    norm = shape("model.norm.weight")
    if norm and len(norm) == 1:
        expect("hidden_size", norm[0], "a final norm of width")
    fc_bias = shape("model.layers.0.mlp.c_fc.bias")
    if fc_bias and len(fc_bias) == 1:
        expect("intermediate_size", fc_bias[0], "an MLP width")
    hidden, heads = cfg.get("hidden_size"), cfg.get("num_attention_heads")
    head_dim = cfg.get("head_dim") or (hidden // heads if hidden and heads else None)
    q_bias, k_bias = shape("model.layers.0.self_attn.q_proj.bias"), shape("model.layers.0.self_attn.k_proj.bias")
    if head_dim and isinstance(head_dim, int) and q_bias and len(q_bias) == 1 and q_bias[0] % head_dim == 0:
        expect("num_attention_heads", q_bias[0] // head_dim, "attention heads")
    if head_dim and isinstance(head_dim, int) and k_bias and len(k_bias) == 1 and k_bias[0] % head_dim == 0:
        expect("num_key_value_heads", k_bias[0] // head_dim, "KV heads")
    if claims:
        raise UserError(f"{path}/config.json does not match its weights ({'; '.join(dict.fromkeys(claims))}): "
                        "restore the model's own config.json")


def check_genai_sizes(path: Path, genai: dict[str, Any], config: Any) -> None:
    """genai_config.json sizes the KV cache and logits buffers: every size must be a positive integer
    and agree with config.json, and the context may not exceed the model's max_position_embeddings
    (a context_length of 2**28 would allocate tens of GB before any check)."""
    model, decoder = genai["model"], genai["model"]["decoder"]
    config = config if isinstance(config, dict) else {}
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    sizes = {
        "context_length": (model.get("context_length"), config.get("max_position_embeddings"), "max_position_embeddings"),
        "vocab_size": (model.get("vocab_size"), config.get("vocab_size"), "vocab_size"),
        "num_hidden_layers": (decoder.get("num_hidden_layers"), config.get("num_hidden_layers"), "num_hidden_layers"),
        "num_key_value_heads": (decoder.get("num_key_value_heads"), config.get("num_key_value_heads"),
                                "num_key_value_heads"),
        "head_size": (decoder.get("head_size"), config.get("head_dim") or (
            hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 else None),
            "hidden_size / num_attention_heads"),
    }
    for key, (value, limit, name) in sizes.items():
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise UserError(f"genai_config.json in {path}: {key} must be a positive integer, got {str(value)[:40]}: "
                            "re-export the model")
        if not (isinstance(limit, int) and not isinstance(limit, bool) and limit > 0):
            raise UserError(f"config.json in {path} has no valid {name}: re-export the model")
        if value > limit if key == "context_length" else value != limit:
            relation = "exceeds" if key == "context_length" else "does not match"
            raise UserError(f"genai_config.json in {path}: {key} {value} {relation} the model's {name} ({limit}): "
                            "re-export the model")


def _listable(path: Path) -> list[Path]:
    """The entries of a model directory, or a `UserError` when it cannot be read."""
    try:
        if not os.access(path, os.R_OK | os.X_OK):
            raise PermissionError(13, "permission denied")
        return sorted(Path(path).iterdir())
    except OSError as exc:
        raise UserError(f"cannot read the directory {path} ({exc.strerror}): make it readable") from exc


def weight_files(path: Path, allow_pickle: bool = False) -> list[Path]:
    """The safetensors files of a model directory, checked to be readable and complete."""
    from safetensors import safe_open

    entries = _listable(path)
    files = [p for p in entries if p.suffix == ".safetensors"]
    pickles = [p for p in entries if p.suffix in PICKLE_SUFFIXES]
    for f in files + pickles:
        try:
            check_regular(f, "weight file")  # a FIFO named *.safetensors would block every reader forever
        except FileNotFoundError as exc:
            raise UserError(f"weight file {f.name} in {path} is a broken link: restore the file it points to") from exc
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
    check_tokenizer_ids(path, len(tokenizer), max(tokenizer.get_vocab().values(), default=-1))
    return tokenizer


def check_tokenizer_ids(path: Path, length: int, top: int) -> None:
    """A tokenizer of `length` tokens, ids up to `top` (added tokens included), must fit the model's vocabulary."""
    if length == 0:
        raise UserError(f"the tokenizer in {path} is empty: copy the original model's tokenizer files")
    config = Path(path) / "config.json"
    cfg = read_json(config, "restore the file") if config.is_file() else None
    vocab = cfg.get("vocab_size") if isinstance(cfg, dict) else None
    if isinstance(vocab, int) and not isinstance(vocab, bool) and top >= vocab:
        raise UserError(f"the tokenizer in {path} has token ids up to {top} but the model's vocabulary has "
                        f"{vocab} rows: it is not this model's tokenizer; copy the original model's tokenizer files")


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy a model's tokenizer (and generation config) into an artifact being written."""
    import shutil

    for name in TOKENIZER_SIDE_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)


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


# ----------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    model: Any  # transformers.Starcoder2ForCausalLM (or a quantized variant of it)
    tokenizer: Any
    source: ModelSource
    config: dict[str, Any]
    policy: ComputePolicy
    kernel: str | None = None  # GPTQ: the GPTQModel kernel chosen


class LoadHooks(Protocol):
    """What an artifact kind adds to loading (its `sc2quant.formats.Format` implements this).
    `quant` is the checkpoint's quantization_config (None: none)."""

    def load_context(self, quant: dict[str, Any] | None) -> Any:
        """A context manager around `from_pretrained` (an import guard)."""
        ...

    def load_attempts(self, quant: dict[str, Any] | None, device: str) -> list[dict[str, Any]]:
        """Extra `from_pretrained` arguments to try in turn (a kernel that cannot run here: the next)."""
        ...

    def after_load(self, model: Any, policy: ComputePolicy) -> None:
        """Adjust the loaded model to the compute policy."""
        ...


def load_model(model: str | os.PathLike | None = None, dtype: str = "auto", device: str = "cpu",
               allow_pickle: bool = False, quantization_config: Any = None, hooks: LoadHooks | None = None) -> LoadedModel:
    """Load a StarCoder2 checkpoint and its tokenizer, validated, under the compute policy.

    dtype: "auto" (the policy), or fp32/bf16/fp16. quantization_config: quantize while loading
    (bitsandbytes), as `from_pretrained(quantization_config=...)` does. hooks: what the artifact's
    kind adds (its `sc2quant.formats.Format`: import guards, kernels to try, kernel choice).
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
    kwargs: dict[str, Any] = {"device_map": dev, "output_loading_info": True,
                              "use_safetensors": files[0].suffix == ".safetensors"}
    if policy.dtype is not None:
        kwargs["dtype"] = torch_dtype(policy.dtype)
    from transformers import AutoModelForCausalLM

    attempts = [{"quantization_config": quantization_config}] if quantization_config is not None else [{}]
    if hooks is not None and quantization_config is None:
        attempts = hooks.load_attempts(quant, dev)
    context = hooks.load_context(quant) if hooks is not None else contextlib.nullcontext()
    with status(f"loading {source.id} ({policy.label}, {dev})"), context:
        for i, attempt in enumerate(attempts):
            try:
                hf_model, info = AutoModelForCausalLM.from_pretrained(str(source.path), trust_remote_code=False,
                                                                      **kwargs, **attempt)
                break
            except Exception as exc:  # noqa: BLE001 - a kernel that cannot run here: try the next
                if i == len(attempts) - 1:
                    raise
                logging.getLogger("sc2quant").warning("loading with %s failed (%s); trying %s", _kernel(attempt), exc,
                                                      _kernel(attempts[i + 1]))
    kernel = _kernel(attempt) if quantization_config is None else None
    if kernel is not None:
        logging.getLogger("sc2quant").info("kernel %s", kernel)
    _check_loading_info(info, source)
    if hooks is not None:
        hooks.after_load(hf_model, policy)
    hf_model.eval()
    return LoadedModel(hf_model, tokenizer, source, config, policy, kernel)


def _kernel(attempt: dict[str, Any]) -> str | None:
    """The GPTQ kernel an attempt asks for (None: transformers' own choice)."""
    return getattr(attempt.get("quantization_config"), "backend", None) if attempt else None


def _check_loading_info(info: dict[str, Any], source: ModelSource) -> None:
    """transformers only warns about missing weights and fills them with noise; we refuse."""
    missing = [k for k in info.get("missing_keys", []) if k != "lm_head.weight"]
    mismatched = info.get("mismatched_keys", [])
    if missing or mismatched:
        bad = (missing or [m[0] if isinstance(m, tuple) else m for m in mismatched])[:3]
        raise UserError(f"weights of {source.id} do not match its config (missing or mis-shaped: "
                        f"{', '.join(map(str, bad))}): the checkpoint is incomplete")
