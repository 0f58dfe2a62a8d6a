"""`sc2quant export onnx`: a StarCoder2 model or GPTQ artifact as an ONNX Runtime decoder.

The graph comes from onnxruntime-genai's model builder (see `sc2quant.export.onnx_builder`): fused
GroupQueryAttention with rotary and the model's sliding window, fused LayerNorms, a KV cache,
int4 `MatMulNBits` on request, weights in external data. The output directory runs in plain
onnxruntime (`sc2quant.runtime.engines.onnx_engine.OnnxEngine`) and in onnxruntime-genai (`genai_config.json`).
Every graph is checked (`sc2quant.export.onnx_graph.check_graph`) before the artifact is committed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from sc2quant.core import artifact
from sc2quant.core.console import api_output, console, progress, quiet_libraries
from sc2quant.core.errors import UserError
from sc2quant.core.files import dir_bytes
from sc2quant.core.hf import check_tokenizer, read_config, weight_files
from sc2quant.core.source import ModelSource, resolve_source
from sc2quant.formats import Method, get_format
from sc2quant.formats.gptq import onnx_refusal
from sc2quant.formats.onnx import LM_HEADS

DTYPES = ("fp32", "fp16")
WEIGHTS = ("fp", "int4")
BLOCK_SIZES = (32, 64, 128)
DEVICES = ("cpu", "cuda")
# The int4 defaults, one choice for every CPU kind met (bench/results/2026-12-05-x86_64-2cpu-avx512-bf16.md;
# README "Against the peers"): block 128: 1.35x decode / 1.20x prefill of llama.cpp Q4_0 on the 315M
# model (AVX512 EPYC) against 0.96x / 0.96x at block 32, the same order on the AMX Xeon (GPTQ g128
# export 1.45x / 1.13x against RTN b32's 1.20x / 0.84x); its KL cost is what GPTQ wins back.
DEFAULT_BLOCK = 128
# lm_head int8: KL to bf16 on the embedded model int4 3.8e-3, int8 9.1e-4 for +22 % of disk; the
# 315M model's export stays within 1.1x llama.cpp Q4_K_M's size.
DEFAULT_LM_HEAD = "int8"
# How a float checkpoint's matrices get their int4 grid. "gptq": GPTQ on CALIB_TOKENS tokens of the
# shipped calibration text (sc2quant.quant.gptq_lite), KL to bf16 on the embedded model 0.25x
# round-to-nearest's at block 128 (0.28x at 32); "rtn": round-to-nearest, no data, seconds.
INT4_METHODS = ("gptq", "rtn")
DEFAULT_INT4_METHOD = "gptq"
CALIB_TOKENS = 4096  # 8 x 512 (16 x 256 within the embedded model's window): 16 -> 32 windows gained 0.3 % KL
VERB = "export onnx"


@api_output("export onnx")
def export_onnx(
    model: str | Path | None = None,
    out: str | Path | None = None,
    dtype: str = "fp32",
    weights: str = "fp",
    block_size: int = DEFAULT_BLOCK,
    symmetric: bool = True,
    device: str = "cpu",
    force: bool = False,
    lm_head: str | None = None,
    int4_method: str | None = None,
    given: set[str] | None = None,
) -> Path:
    """Export `model` (directory, hub id, artifact, or None for the embedded model) to `out`.

    dtype: activations, KV cache and logits (fp32, or fp16 which also runs on the CPU EP but is
    meant for CUDA); weights: "fp" (same dtype) or "int4" (MatMulNBits, `block_size`, symmetric
    or with zero points). A GPTQ checkpoint keeps its own int4 weights, group size and zeros.
    lm_head (int4 weights only): "int8" (the default: the output matrix, read whole at every step and
    the most sensitive to rounding, at 8 bits as llama.cpp keeps it above 4; a tied embedding reads
    the same int8 matrix), "int4" (smallest), or "float" (a GPTQ checkpoint's own, bit for bit).
    int4_method (int4 weights of a float checkpoint): "gptq" (the default: GPTQ on a few thousand
    tokens of the shipped calibration text, minutes at 3B) or "rtn" (round-to-nearest, no data).
    given: the options the user set (default: those that differ from their defaults); one that
    does not apply (an int4 setting for a float export, a grid setting for a GPTQ checkpoint,
    whose grid is carried over) is refused.
    """
    if given is None:
        given = {k for k, v, d in (("weights", weights, "fp"), ("block_size", block_size, DEFAULT_BLOCK),
                                   ("symmetric", symmetric, True), ("lm_head", lm_head, None),
                                   ("int4_method", int4_method, None)) if v != d}
    _check_options(dtype, weights, block_size, device)
    if lm_head not in (None, *LM_HEADS):
        raise UserError(f"unknown --lm-head '{lm_head}': choose one of {', '.join(LM_HEADS)}")
    if int4_method not in (None, *INT4_METHODS):
        raise UserError(f"unknown --int4-method '{int4_method}': choose one of {', '.join(INT4_METHODS)}")
    quiet_libraries()
    source = resolve_source(model)
    config = read_config(source.path)
    gptq = _check_source(source, config)
    if gptq is not None:
        wrong = given & {"block_size", "symmetric", "int4_method"}
        _refuse(wrong | ({"weights"} if weights == "fp" and "weights" in given else set()),
                f"{source.id}: a GPTQ checkpoint, whose int4 grid (group {gptq['group_size']}) is carried over as it is")
        weights, block_size, symmetric = "int4", int(gptq["group_size"]), bool(gptq.get("sym", True))
    elif weights != "int4":
        _refuse(given & {"block_size", "symmetric", "lm_head", "int4_method"}, "a float export (add --weights int4)")
    int4_method = (int4_method or DEFAULT_INT4_METHOD) if weights == "int4" and gptq is None else None
    if int4_method == "gptq":
        block_size = _gptq_block(block_size, config, "block_size" in given)
    check_tokenizer(source.path)
    out = artifact.output_path(out, default_out(source, dtype, weights, block_size, symmetric))
    opts = _build_options(dtype, weights, block_size, symmetric, device, lm_head or DEFAULT_LM_HEAD)
    method = _method(dtype, weights, block_size, symmetric, opts.lm_head)
    started = time.monotonic()
    calibration = _calibration(source, config) if int4_method == "gptq" else None
    if calibration is not None:
        opts = dataclasses.replace(opts, calibration=tuple(map(tuple, calibration.pop("windows"))))
    with artifact.staging(out, force, VERB, [source.path]) as tmp:
        facts = _build(source.path, config, tmp, opts)
        if calibration is not None:
            calibration.update(facts.pop("calibration"))
        shutil.copy2(source.path / "config.json", tmp / "config.json")  # the engine's `config`
        manifest = artifact.Manifest(
            kind=method.kind,
            method=method.label,
            bits=4 if weights == "int4" else int(dtype[2:]),
            group_size=block_size if weights == "int4" else None,
            params={"method_name": method.name,
                    **_params(dtype, weights, block_size, symmetric, device, opts, gptq, facts, time.monotonic() - started),
                    **({"int4_method": int4_method} if int4_method else {}),
                    **({"calibration": calibration} if calibration else {})},
            source=artifact.source_identity(source.id, source.kind, source.path),
            verb=VERB,
        )
        artifact.commit(tmp, out, manifest, force)
    console.print(f"[green]exported[/] {source.id} -> {out} ({manifest.method}, "
                  f"window {facts['local_window_size']}, {dir_bytes(out) / 2**20:.1f} MiB)")
    return out


def _method(dtype: str, weights: str, block_size: int, symmetric: bool, lm_head: str = "int8") -> Method:
    if weights == "int4":
        return Method("onnx", 4, block_size, sym=symmetric, dtype=dtype, lm_head=lm_head)
    return Method("onnx", dtype=dtype)


def default_out(source: ModelSource, dtype: str, weights: str, block_size: int = DEFAULT_BLOCK,
                symmetric: bool = True) -> Path:
    """out/<model>-<method>: <model> is "embedded", the directory name, or the hub name."""
    return Path("out") / f"{source.short_name}-{_method(dtype, weights, block_size, symmetric).label}"


def _check_options(dtype: str, weights: str, block_size: int, device: str) -> None:
    if dtype == "bf16":
        raise UserError("bf16 ONNX graphs do not run on ONNX Runtime's CPU execution provider: "
                        "use --dtype fp32 (CPU) or --dtype fp16 (CUDA)")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}': choose one of {', '.join(DTYPES)}")
    if weights not in WEIGHTS:
        raise UserError(f"unknown weights '{weights}': choose fp (same as --dtype) or int4")
    if block_size not in BLOCK_SIZES:
        raise UserError(f"block size {block_size} is not supported: choose one of {', '.join(map(str, BLOCK_SIZES))}")
    if device not in DEVICES:
        raise UserError(f"unknown device '{device}': choose cpu or cuda")
    if device == "cuda" and dtype == "fp32":
        # CUDA's GroupQueryAttention has no fp32 kernel; the builder would fall back to an
        # attention op without the sliding window.
        raise UserError("GroupQueryAttention on CUDA needs fp16: use --dtype fp16 with --device cuda")


def _check_source(source: ModelSource, config: dict[str, Any]) -> dict[str, Any] | None:
    """Refuse what cannot be exported faithfully; return the GPTQ config of a GPTQ source."""
    if artifact.is_artifact(source.path):
        manifest = artifact.verify(source.path)
        get_format(manifest.kind).check(config, source.id)  # an unknown kind, or one its config contradicts
        if manifest.kind == "onnx":
            raise UserError(f"{source.id} is already an ONNX export: export its source model instead")
    quant = config.get("quantization_config") or {}
    method = quant.get("quant_method")
    if method == "bitsandbytes":
        raise UserError(f"{source.id} is a bitsandbytes checkpoint, which ONNX Runtime cannot run (no kernels for "
                        "its int8/nf4/fp4 formats): quantize with GPTQ (`sc2quant quantize --method gptq`) and export "
                        "that, or export the original model with --weights int4")
    if method not in (None, "gptq"):
        raise UserError(f"{source.id} is a '{method}' checkpoint: only plain and GPTQ checkpoints can be "
                        "exported to ONNX")
    weight_files(source.path)
    head = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    if head % 16:
        raise UserError(f"{source.id}: head size {head} is not a multiple of 16, which ONNX Runtime's "
                        "GroupQueryAttention needs on the CPU: run this model in torch instead "
                        "(`sc2quant run MODEL`, or quantize it with --method bnb/rtn)")
    if method == "gptq":
        reason = onnx_refusal(source.path, quant)
        if reason:
            raise UserError(f"{source.id} (GPTQ) cannot be exported to ONNX: {reason}; re-quantize with "
                            "`sc2quant quantize --bits 4 --group-size 128` (no act-order), or run it in torch")
        return quant
    return None


def _refuse(options: set[str], what: str) -> None:
    if options:
        flags = ", ".join("--" + o.replace("_", "-") for o in sorted(options))
        raise UserError(f"{flags} {'does' if len(options) == 1 else 'do'} not apply to {what}: drop it")


def _build_options(dtype: str, weights: str, block_size: int, symmetric: bool, device: str, lm_head: str):
    from sc2quant.export.onnx_builder import BuildOptions

    return BuildOptions(
        precision="int4" if weights == "int4" else dtype,
        io_dtype=dtype,
        ep=device,
        block_size=block_size,
        symmetric=symmetric,
        lm_head=lm_head if weights == "int4" else "float",
    )


def _gptq_block(block_size: int, config: dict[str, Any], chosen: bool) -> int:
    """GPTQ's groups must tile every matrix's input: the default block steps down to the largest that
    does (a toy model's hidden size of 64); a block the user chose is refused with the ways out."""
    from sc2quant.quant.base import tiles

    if tiles(block_size, config):
        return block_size
    fits = [b for b in BLOCK_SIZES if tiles(b, config) and b < block_size]
    widths = f"the input features ({config['hidden_size']} and {config['intermediate_size']})"
    if chosen or not fits:
        raise UserError(f"{'' if chosen else 'the default '}block size {block_size} does not divide {widths} that "
                        "GPTQ's groups must tile: " + (f"choose --block-size {max(fits)} or " if fits else "use ")
                        + "--int4-method rtn")
    console.print(f"block size {max(fits)}: the default {block_size} does not divide {widths} that GPTQ's groups "
                  "must tile", highlight=False, markup=False)
    return max(fits)


def _calibration(source: ModelSource, config: dict[str, Any]) -> dict[str, Any]:
    """GPTQ's calibration windows from the shipped text ("windows"), and what the manifest records."""
    from sc2quant.core.data import MIN_SEQLEN, calibration_samples
    from sc2quant.core.hf import load_tokenizer

    context = int(config["max_position_embeddings"])
    window = int(config.get("sliding_window") or context)
    seqlen = min(512, window, context)
    if seqlen < MIN_SEQLEN:
        what = "sliding window" if window < context else "context"
        raise UserError(f"GPTQ's calibration windows must fit the model's {what} of {seqlen} tokens, too short to "
                        f"calibrate (at least {MIN_SEQLEN}): use --int4-method rtn")
    windows, described = calibration_samples(load_tokenizer(source.path), "calib_data", max(1, CALIB_TOKENS // seqlen),
                                             seqlen, seed=0)
    return {"method": "GPTQ (sc2quant.quant.gptq_lite): static groups in activation order, damp 0.01, each layer on "
                      "the float outputs of the layers before it", "data": described, "windows": windows}


def _build(source_path: Path, config: dict[str, Any], tmp: Path, opts: Any) -> dict[str, Any]:
    """Run the builder with progress, then check the graph and genai_config before anything is kept."""
    import onnx

    from sc2quant.export import onnx_builder
    from sc2quant.export.onnx_graph import check_genai_config, check_graph

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    layers = int(config["num_hidden_layers"])
    with progress() as bar:
        task = bar.add_task(f"loading {source_path.name}", total=None)

        def on_layer(layer_id: int) -> None:
            bar.update(task, description="GPTQ and building layers" if opts.calibration else "building layers",
                       total=layers, completed=layer_id + 1)

        def on_stage(stage: str) -> None:  # "save": int4 quantizes the lm_head, then writes everything
            bar.update(task, description="quantizing lm_head, saving" if "int4" in opts.precision else "saving",
                       total=None)

        built = onnx_builder.build(source_path, tmp, opts, on_stage=on_stage, on_layer=on_layer)
        bar.update(task, description="checking graph", total=1, completed=0)
        proto = onnx.load(str(tmp / onnx_builder.MODEL_FILE), load_external_data=False)
        facts = check_graph(proto, config)
        check_genai_config(artifact.read_genai_config(tmp), config, facts)
        bar.update(task, completed=1)
    return {**facts, **built}


def _params(dtype: str, weights: str, block_size: int, symmetric: bool, device: str, opts: Any,
            gptq: dict[str, Any] | None, facts: dict[str, Any], seconds: float) -> dict[str, Any]:
    params: dict[str, Any] = {
        "dtype": dtype,
        "weights": weights,
        "block_size": block_size if weights == "int4" else None,
        "symmetric": symmetric if weights == "int4" else None,
        "device": device,
        "execution_provider": "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider",
        "exporter": "onnxruntime-genai model builder + sc2quant.export.onnx_builder",
        "kv_cache": "full-length, past/present share one buffer",
        "lm_head": {"int4": "int4 by round-to-nearest, shared with the embedding (GatherBlockQuantized)",
                    "int8": "int8 (MatMulNBits) by round-to-nearest, shared with the embedding (8-bit GatherBlockQuantized)",
                    "float": "float, shared with the embedding"}[opts.lm_head],
        "graph": facts,
        "seconds": round(seconds, 1),
    }
    if gptq is not None:
        params["from_gptq"] = {k: gptq.get(k) for k in ("bits", "group_size", "sym", "desc_act", "checkpoint_format")}
    return json.loads(json.dumps(params))  # plain JSON types only
