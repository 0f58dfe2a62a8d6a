"""`sc2quant quantize`: one entry point for GPTQ (default), bitsandbytes and round-to-nearest."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sc2quant import artifact
from sc2quant.errors import UserError
from sc2quant.loader import read_config, resolve_device, resolve_source, weight_files

METHODS = ("gptq", "bnb", "rtn")


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
    calib_samples: int = 128
    calib_seqlen: int = 512
    seed: int = 0
    quant_type: str = "nf4"  # bnb 4-bit
    double_quant: bool = False  # bnb 4-bit
    compute_dtype: str = "bf16"  # bnb 4-bit
    device: str = "cpu"
    allow_pickle: bool = False  # *.bin checkpoints can run code when unpickled: explicit opt-in
    force: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def default_out(opts: QuantizeOptions, model_name: str) -> Path:
    if opts.method == "bnb":
        tag = "int8" if opts.bits == 8 else f"{opts.quant_type}{'-dq' if opts.double_quant else ''}"
    else:
        tag = f"int{opts.bits}-g{opts.group_size}"
    return Path("out") / f"{model_name}-{opts.method}-{tag}"


def quantize(opts: QuantizeOptions) -> Path:
    """Validate everything, quantize into a temporary directory, then move it into place."""
    if opts.method not in METHODS:
        raise UserError(f"unknown method '{opts.method}': choose one of {', '.join(METHODS)}")
    source = resolve_source(opts.model)
    config = read_config(source.path)
    weight_files(source.path, opts.allow_pickle)
    if config.get("quantization_config"):
        raise UserError(f"{source.id} is already quantized ({config['quantization_config'].get('quant_method')}): "
                        "quantize the bf16 model")
    device = resolve_device(opts.device)
    out = Path(opts.out) if opts.out else default_out(opts, source.path.name if source.kind != "embedded" else "embedded")
    samples, calib_desc = _prepare(opts, source.path, config)
    started = time.time()
    with artifact.staging(out, opts.force) as tmp:
        details = _run(opts, source.path, tmp, samples, device)
        _copy_tokenizer(source.path, tmp)
        manifest = artifact.Manifest(
            kind={"bnb": "bnb", "gptq": "gptq", "rtn": "gptq"}[opts.method],
            method=_method_name(opts),
            bits=opts.bits,
            group_size=opts.group_size if opts.method != "bnb" else None,
            params=_params(opts, calib_desc, details, device, time.time() - started),
            source=artifact.source_identity(source.id, source.kind, source.path),
        )
        artifact.commit(tmp, out, manifest, opts.force)
    return out


def _method_name(opts: QuantizeOptions) -> str:
    if opts.method == "bnb":
        return "bnb-int8" if opts.bits == 8 else f"bnb-{opts.quant_type}"
    return opts.method


def _prepare(opts: QuantizeOptions, path: Path, config: dict) -> tuple[list[list[int]], dict | None]:
    """Check option combinations and build calibration samples before anything is written."""
    if opts.method == "bnb":
        from sc2quant.quantize_bnb import bnb_config

        bnb_config(opts.bits, opts.quant_type, opts.double_quant, opts.compute_dtype)
        return [], None
    from sc2quant.quantize_gptq import validate

    validate(opts.bits, opts.group_size, config["hidden_size"], config["intermediate_size"],
             opts.calib_seqlen, config["max_position_embeddings"])
    if opts.method == "rtn":
        return [], None
    from sc2quant.data import calibration_samples
    from sc2quant.loader import load_tokenizer

    return calibration_samples(load_tokenizer(path), opts.calib, opts.calib_samples, opts.calib_seqlen, opts.seed)


def _run(opts: QuantizeOptions, path: Path, tmp: Path, samples: list[list[int]], device: str) -> dict[str, Any]:
    if opts.method == "bnb":
        from sc2quant.quantize_bnb import quantize_bnb_model

        return quantize_bnb_model(path, tmp, opts.bits, opts.quant_type, opts.double_quant, opts.compute_dtype, device)
    if opts.method == "gptq":
        from sc2quant.quantize_gptq import quantize_gptq_model

        return quantize_gptq_model(path, tmp, samples, opts.bits, opts.group_size, opts.act_order, opts.sym,
                                   opts.damp, device)
    from sc2quant.loader import load_model
    from sc2quant.quantize_rtn import quantize_rtn_model

    loaded = load_model(path, dtype="bf16", device=device, allow_pickle=opts.allow_pickle)
    return quantize_rtn_model(loaded.model, tmp, opts.bits, opts.group_size, opts.sym)


def _copy_tokenizer(src: Path, tmp: Path) -> None:
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                 "generation_config.json"):
        if (src / name).is_file() and not (tmp / name).exists():
            shutil.copy2(src / name, tmp / name)


def _params(opts: QuantizeOptions, calib: dict | None, details: dict, device: str, seconds: float) -> dict[str, Any]:
    keep = {"bnb": ("quant_type", "double_quant", "compute_dtype"),
            "gptq": ("group_size", "act_order", "sym", "damp"),
            "rtn": ("group_size", "sym")}[opts.method]
    params = {k: v for k, v in asdict(opts).items() if k in keep}
    if opts.method == "bnb" and opts.bits == 8:
        params = {"llm_int8_threshold": 6.0}
    params.update({"device": device, "seconds": round(seconds, 2), **details})
    if calib is not None:
        params["calibration"] = calib
    return params
