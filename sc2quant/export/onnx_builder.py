"""StarCoder2 for onnxruntime-genai's model builder: the only hand-written export code.

The builder (`onnxruntime_genai.models.builder`) already emits what we want for a decoder:
`GroupQueryAttention` with rotary fused and `local_window_size`, packed QKV, fused
LayerNorm/SkipLayerNormalization, a KV cache with past/present, int4 `MatMulNBits`,
`GatherBlockQuantized` for a tied embedding, external data and `genai_config.json`. It does
not know StarCoder2, so this subclass tells it the differences from its Llama-like default:
LayerNorm with bias (not RMSNorm), a non-gated MLP `c_fc -> gelu -> c_proj` with biases,
`norm_epsilon`, every layer a sliding-window layer, and `"type": "decoder"` for the runtime.
GPTQ checkpoints go through the builder's own GPTQ loader (`QuantModel`), told that
StarCoder2's MLP is named `c_fc`/`c_proj`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from onnxruntime_genai.models import builder as genai_builder  # adds the builder's folder to sys.path

from sc2quant.core.errors import UserError

# The builder imports its own modules as top-level packages, importable only after the line above.
GPTQModel = importlib.import_module("loaders.gptq").GPTQModel

MODEL_FILE = "model.onnx"


class StarCoder2GPTQ(GPTQModel):
    """The builder's GPTQ (v1) loader, with StarCoder2's MLP names mapped onto its up/down slots.

    The loader unpacks `qweight`/`qzeros` (adding back GPTQ v1's stored zero-1) and repacks the
    same integers, scales and zero points into MatMulNBits' layout. Its dequantize-requantize
    round trip uses the checkpoint's own scales and zeros, so the integers come back unchanged.
    """

    weight_name_replacements = ((".mlp.c_fc.", ".mlp.up_proj."), (".mlp.c_proj.", ".mlp.down_proj."))


class StarCoder2Model(genai_builder.Model):
    """The builder's generic decoder with StarCoder2's LayerNorm, MLP and sliding window."""

    on_layer: Callable[[int], None] | None = None  # progress callback, set by `build`

    def __init__(self, config, io_dtype, onnx_dtype, ep, cache_dir, extra_options):
        super().__init__(config, io_dtype, onnx_dtype, ep, cache_dir, extra_options)
        self.layernorm_attrs["simple"] = False  # LayerNorm/SkipLayerNormalization with bias
        self.layernorm_attrs["epsilon"] = config.norm_epsilon  # the builder reads rms_norm_eps only
        self.mlp_attrs["use_proj"], self.mlp_attrs["use_fc"] = False, True  # fc1 -> act -> fc2

    def make_context_length_init(self, config):
        super().make_context_length_init(config)
        if self.window_size is None:  # no window: the kernels' "unused" value
            self.window_size = -1

    def is_gqa_supported(self) -> bool:
        # The builder only picks GQA for fp32 on CPU; for fp16 it falls back to an attention op
        # without a window, which would silently change the model. Always emit GQA instead.
        return True

    def make_matmul_nbits(self, matmul, basename, root_input, **kwargs):
        # The builder emits float MatMuls and quantizes them all at the end (`to_nbits`), which
        # first serialises the whole fp32 model into one protobuf: ~12 GB for a 3B model on top
        # of the loaded weights. Quantizing each weight here, with the same MLAS kernel, keeps
        # only int4 data in memory. The lm_head is left to `to_nbits` so that the builder's
        # tied GatherBlockQuantized embedding finds the names it expects.
        later = basename == "/lm_head/MatMul" or basename in self.quant_attrs["nodes_to_exclude"]
        if hasattr(matmul, "qweight") or later:
            return super().make_matmul_nbits(matmul, basename, root_input, **kwargs)
        return super().make_matmul_nbits(self._quantize_now(matmul.weight), basename, root_input, **kwargs)

    def _quantize_now(self, weight: Any) -> SimpleNamespace:
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            DefaultWeightOnlyQuantizer,
        )

        block = self.quant_attrs["matmul_block_size"]
        symmetric = self.quant_attrs["is_symmetric"]
        quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
            block_size=block, is_symmetric=symmetric, accuracy_level=self.quant_attrs["accuracy_level"], bits=4))
        w = weight.detach().float().T.contiguous().numpy()  # [K, N], as MatMul consumes it
        packed, scales, zero_points = quantizer.qbits_block_quant(w)
        return SimpleNamespace(
            qweight=packed, scales=scales.reshape(-1), qzeros=None if symmetric else zero_points.reshape(-1),
            g_idx=None, bits=4, group_size=block, in_features=w.shape[0], out_features=w.shape[1])

    def make_tied_quantized_embedding_input_names(self):
        # The builder names the asymmetric lm_head's initializers wrongly for its "default"
        # quantizer (no scales, no zero points), so the embedding Gather would read raw bytes.
        # These are the names MatMulNBitsQuantizer actually writes.
        bits, weight, scales, zeros = super().make_tied_quantized_embedding_input_names()
        if not self.quant_attrs["is_symmetric"] and self.quantization_algo == "default":
            return bits, "lm_head.MatMul.weight_Q4", "lm_head.MatMul.weight_scales", "lm_head.MatMul.weight_zero_points"
        return bits, weight, scales, zeros

    def get_mlp_module(self, layer_id, layer):
        mlp = layer.mlp
        if hasattr(mlp, "c_fc"):  # Hugging Face module
            return SimpleNamespace(fc1=mlp.c_fc, fc2=mlp.c_proj)
        return SimpleNamespace(fc1=mlp.up_proj, fc2=mlp.down_proj)  # GPTQ loader (renamed)

    def make_layer(self, layer_id, layer):
        super().make_layer(layer_id, layer)
        if self.on_layer is not None:
            self.on_layer(layer_id)

    def load_weights(self, input_path):
        if self.quant_type == "gptq":
            return StarCoder2GPTQ(
                self.quant_type,
                input_path=input_path,
                quant_attrs=self.quant_attrs,
                q_size=self.num_attn_heads * self.head_size,
                kv_size=self.num_kv_heads * self.head_size,
                intermediate_size=self.intermediate_size,
                num_layers=self.num_layers,
            )
        return super().load_weights(input_path)

    def update_genai_config(self, genai_config):
        # onnxruntime-genai knows no "starcoder2" type; a plain decoder is what this graph is.
        genai_config["model"]["type"] = "decoder"


@dataclass(frozen=True)
class BuildOptions:
    precision: str  # the builder's: "fp32", "fp16" or "int4"
    io_dtype: str  # "fp32" or "fp16": activations, KV cache and logits
    ep: str  # "cpu" or "cuda"
    block_size: int = 32
    symmetric: bool = True
    # int4: tied with the embedding (GatherBlockQuantized); float: tied, stored once; int8: its own
    # MatMulNBits at 8 bits (as llama.cpp keeps its output matrix at 6+ bits), embedding in float.
    lm_head: str = "int4"


@contextlib.contextmanager
def _quiet_builder() -> Iterator[io.StringIO]:
    """The builder prints every step to stdout and draws tqdm bars; sc2quant shows its own progress.

    Its output is kept (and shown if the build fails) but off the terminal.
    """
    from transformers.utils import logging as hf_logging

    base = sys.modules[genai_builder.Model.__module__]
    tqdm = base.tqdm
    base.tqdm = functools.partial(tqdm, disable=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            yield log
    finally:
        base.tqdm = tqdm
        if bars:
            hf_logging.enable_progress_bar()


def _extra_options(opts: BuildOptions) -> dict[str, Any]:
    extra: dict[str, Any] = {
        "hf_token": "false",  # never ask the hub: the source is a local directory
        "block_size": str(opts.block_size),
        "is_symmetric": str(opts.symmetric).lower(),
        "filename": MODEL_FILE,
        # A full-length cache, not the builder's window-sized one: with the window-sized cache
        # ORT 1.32 rejects a right-padded batch of prompts of different lengths ("seqlens_k[1] = 7
        # is too small for sequence_length 40"). The window itself is unchanged: GQA's
        # local_window_size still limits attention, the cache is just longer than it needs to be.
        "windowed_kv_cache": "false",
    }
    if opts.lm_head == "float":
        # Keep the tied matrix in float: the lm_head MatMul and the embedding Gather share it.
        extra["nodes_to_exclude"] = "/lm_head/MatMul,/model/embed_tokens/Gather"
    elif opts.lm_head == "int8":
        # GatherBlockQuantized reads 4-bit data only, so the embedding stays float (one row is
        # read per token; the lm_head, read whole at every step, is what costs time).
        extra["nodes_to_exclude"] = "/model/embed_tokens/Gather"
        extra["matmul_mixed_precision"] = "last_matmul:int8"
    return extra


def build(
    src: Path,
    out: Path,
    opts: BuildOptions,
    on_stage: Callable[[str], None] = lambda stage: None,
    on_layer: Callable[[int], None] | None = None,
) -> None:
    """Write model.onnx (+ external data), genai_config.json and the tokenizer into `out`.

    Mirrors the builder's `create_model`, whose architecture switch has no StarCoder2 entry.
    The builder's refusals (an unsupported RoPE scaling, activation, ...) become UserErrors.
    """
    ir = genai_builder.ir  # onnx_ir, as the builder imports it

    cache_dir = out / ".builder-cache"
    with _quiet_builder() as log:
        try:
            extra = genai_builder.parse_extra_options(
                None, str(src), str(out), opts.precision, opts.ep, str(cache_dir),
                [f"{k}={v}" for k, v in _extra_options(opts).items()],
            )
            hf_details = extra.pop("hf_details")
            extra.pop("_effective_builder_config", None)
            config = hf_details["hf_config"]
            _prepare_config(config)
            io_dtype = {"fp32": ir.DataType.FLOAT, "fp16": ir.DataType.FLOAT16}[opts.io_dtype]
            onnx_dtype = genai_builder.set_onnx_dtype(opts.precision, extra)
            model = StarCoder2Model(config, io_dtype, onnx_dtype, opts.ep, str(cache_dir), extra)
            model.on_layer = on_layer
            model.make_model(str(src))
            on_stage("save")
            model.save_model(str(out))
            model.make_genai_config(config, hf_details["extra_kwargs"], str(out))
            model.save_processing(hf_details["hf_name"], hf_details["extra_kwargs"], str(out))
        except (NotImplementedError, ValueError) as exc:
            raise UserError(f"the ONNX model builder cannot export {src.name}: {exc}") from exc
        except Exception:
            sys.stderr.write(log.getvalue()[-4000:])  # the builder's own account of where it stopped
            raise
        finally:
            shutil.rmtree(cache_dir, ignore_errors=True)


def _prepare_config(config: Any) -> None:
    """Tell the builder which layers are windowed: StarCoder2 windows every layer (or none)."""
    config.architectures = config.architectures or ["Starcoder2ForCausalLM"]  # optional in config.json
    window = getattr(config, "sliding_window", None)
    kind = "sliding_attention" if window else "full_attention"
    config.layer_types = [kind] * config.num_hidden_layers
