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

Memory: the builder would load the whole model with transformers and, for int4, serialise the
whole fp32 graph into one protobuf before quantizing it (12.5 GB for the 3B shape). Here the
model is a skeleton on the meta device whose parts are read from the checkpoint just before
the builder turns them into graph nodes (`TensorReader`: one tensor at a time, no mapping),
every MatMul is quantized on the spot with the same MLAS kernel the builder's end pass uses,
and a quantized layer's float weights are dropped once it is built. Peak memory is then the
output being built plus one layer, whatever the model's size.
"""

from __future__ import annotations

import contextlib
import copy
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
INT_TYPES = (genai_builder.ir.DataType.INT4, genai_builder.ir.DataType.UINT4)


@contextlib.contextmanager
def _unmapped_safetensors() -> Iterator[None]:
    """The builder's GPTQ loader reads each shard with safetensors' `load_file`, which maps the
    file: its pages would count in memory on top of the tensors. Read them with plain reads."""
    from sc2quant.core.tensorfile import TensorReader

    loader_base = importlib.import_module("loaders.base")
    mapped = loader_base.load_file

    def load_file(path: str) -> dict[str, Any]:
        reader = TensorReader([Path(path)])
        return {name: reader.get(name) for name in reader.names()}

    loader_base.load_file = load_file
    try:
        yield
    finally:
        loader_base.load_file = mapped


class StarCoder2GPTQ(GPTQModel):
    """The builder's GPTQ (v1) loader, with StarCoder2's MLP names mapped onto its up/down slots.

    The loader unpacks `qweight`/`qzeros` (adding back GPTQ v1's stored zero-1) and repacks the
    same integers, scales and zero points into MatMulNBits' layout. Its dequantize-requantize
    round trip uses the checkpoint's own scales and zeros, so the integers come back unchanged.
    """

    weight_name_replacements = ((".mlp.c_fc.", ".mlp.up_proj."), (".mlp.c_proj.", ".mlp.down_proj."))


def _neutral_zeros_dropped(matmul: Any) -> Any:
    """A symmetric GPTQ grid (every zero point 2^(bits-1), which MatMulNBits implies when it has no
    zero points) without its zero points: ONNX Runtime then runs its symmetric kernels, faster, and
    clear of the asymmetric int8-activation path that AVX2-only CPUs get wrong at M=1 (ORT #29853)."""
    import numpy as np

    zeros = getattr(matmul, "qzeros", None)
    if zeros is None or matmul.bits not in (4, 8):
        return matmul
    neutral = 0x88 if matmul.bits == 4 else 0x80  # two 4-bit 8s per byte, or one 8-bit 128
    values = zeros.numpy() if hasattr(zeros, "numpy") else np.asarray(zeros)
    if values.dtype != np.uint8 or not (values == neutral).all():
        return matmul
    dropped = copy.copy(matmul)
    dropped.qzeros = None
    return dropped


class StarCoder2Model(genai_builder.Model):
    """The builder's generic decoder with StarCoder2's LayerNorm, MLP and sliding window."""

    on_layer: Callable[[int], None] | None = None  # progress callback, set by `build`
    calibration: tuple[tuple[int, ...], ...] | None = None  # BuildOptions.calibration, set by `build`
    calibrator: Any = None  # gptq_lite.Calibrator, made once the checkpoint is open (load_weights)
    _calibrated: dict[str, Any] = {}  # the layer being built: its matrices' GPTQ integers, by builder name
    lm_head_bits: int = 4  # int4 exports: 4, or 8 (`BuildOptions.lm_head == "int8"`), set by `build`

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
        # Quantize each weight here, with the same MLAS kernel as the builder's `to_nbits`, instead
        # of serialising the whole fp32 graph for it at the end. Excluded nodes stay float.
        if hasattr(matmul, "qweight"):
            return super().make_matmul_nbits(_neutral_zeros_dropped(matmul), basename, root_input, **kwargs)
        if basename in self.quant_attrs["nodes_to_exclude"]:
            return super().make_matmul_nbits(matmul, basename, root_input, **kwargs)
        if self.calibrator is not None and basename != "/lm_head/MatMul":
            return super().make_matmul_nbits(self._calibrated_matmul(matmul, basename), basename, root_input, **kwargs)
        bits = self.lm_head_bits if basename == "/lm_head/MatMul" else 4
        return super().make_matmul_nbits(self._quantize_now(matmul.weight, bits), basename, root_input, **kwargs)

    # the builder's name for each decoder matrix -> the Hugging Face module (or q/k/v stacked)
    BUILDER_NAMES = {"qkv_proj": "qkv", "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
                     "v_proj": "self_attn.v_proj", "o_proj": "self_attn.o_proj", "fc1": "mlp.c_fc", "fc2": "mlp.c_proj"}

    def _calibrated_matmul(self, matmul: Any, basename: str) -> SimpleNamespace:
        """The layer's GPTQ integers for this MatMul, in MatMulNBits' layout."""
        import numpy as np

        part = self.BUILDER_NAMES.get(basename.rsplit("/", 2)[-2])
        if part not in self._calibrated:
            raise RuntimeError(f"no GPTQ result for {basename}: the builder named a matrix sc2quant does not know")
        found = self._calibrated[part]
        n, k = found.q.shape
        if tuple(matmul.weight.shape) != (n, k):
            raise RuntimeError(f"GPTQ result for {basename} is {n}x{k}, the builder's matrix {tuple(matmul.weight.shape)}")
        symmetric = self.quant_attrs["is_symmetric"]
        dtype = np.float16 if self.io_dtype == genai_builder.ir.DataType.FLOAT16 else np.float32
        return SimpleNamespace(**found.matmul_nbits(symmetric, dtype), g_idx=None, bits=4, group_size=found.group,
                               in_features=k, out_features=n)

    def to_nbits(self):
        return self.model  # every MatMul that is to be quantized already is (make_matmul_nbits)

    def _quantize_now(self, weight: Any, bits: int = 4) -> SimpleNamespace:
        import torch
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            DefaultWeightOnlyQuantizer,
        )

        block = self.quant_attrs["matmul_block_size"]
        symmetric = self.quant_attrs["is_symmetric"]
        quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
            block_size=block, is_symmetric=symmetric, accuracy_level=self.quant_attrs["accuracy_level"], bits=bits))
        io = torch.float16 if self.io_dtype == genai_builder.ir.DataType.FLOAT16 else torch.float32
        w = weight.detach().to(io).T.contiguous().numpy()  # [K, N] in the graph's float type, as `to_nbits` sees it
        packed, scales, zero_points = quantizer.qbits_block_quant(w)
        return SimpleNamespace(
            qweight=packed, scales=scales, qzeros=None if symmetric else zero_points,  # shaped as `to_nbits` stores them
            g_idx=None, bits=bits, group_size=block, in_features=w.shape[0], out_features=w.shape[1])

    def make_tied_quantized_embedding_input_names(self):
        rows = getattr(self, "_embedding_rows", None)
        if rows is not None:  # an untied embedding quantized on its own (make_embedding)
            names = ("model.embed_tokens.qweight", "model.embed_tokens.scales", "model.embed_tokens.qzeros")
            self.make_initializer(rows.qweight, names[0])
            self.make_initializer(rows.scales, names[1])
            if rows.qzeros is not None:
                self.make_initializer(rows.qzeros, names[2])
            self._embedding_rows = None
            return rows.bits, names[0], names[1], names[2] if rows.qzeros is not None else ""
        # The tied embedding's GatherBlockQuantized reads the lm_head's quantized matrix (int4 or
        # int8): quantize it now (the embedding comes first) under a pre-quantized lm_head's names.
        lm_head = self.weights.lm_head
        if getattr(lm_head, "qweight", None) is None and getattr(lm_head, "weight", None) is not None:
            self._materialize(lm_head)
            quantized = self._quantize_now(lm_head.weight, self.lm_head_bits)
            for key, value in vars(quantized).items():
                setattr(lm_head, key, value)
            self._release(lm_head)
        return super().make_tied_quantized_embedding_input_names()

    def get_mlp_module(self, layer_id, layer):
        mlp = layer.mlp
        if hasattr(mlp, "c_fc"):  # Hugging Face module
            return SimpleNamespace(fc1=mlp.c_fc, fc2=mlp.c_proj)
        return SimpleNamespace(fc1=mlp.up_proj, fc2=mlp.down_proj)  # GPTQ loader (renamed)

    # --- reading the checkpoint part by part ----------------------------------------------

    def load_weights(self, input_path):
        if self.quant_type == "gptq":
            with _unmapped_safetensors():
                return StarCoder2GPTQ(
                    self.quant_type,
                    input_path=input_path,
                    quant_attrs=self.quant_attrs,
                    q_size=self.num_attn_heads * self.head_size,
                    kv_size=self.num_kv_heads * self.head_size,
                    intermediate_size=self.intermediate_size,
                    num_layers=self.num_layers,
                )
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from sc2quant.core.tensorfile import TensorReader

        config = AutoConfig.from_pretrained(input_path, trust_remote_code=False)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        self._reader = TensorReader.of(Path(input_path))
        self._names = {module: name for name, module in skeleton.named_modules()}
        if self.calibration is not None:
            from sc2quant.quant.gptq_lite import Calibrator

            self.calibrator = Calibrator(config, self._reader.get("model.embed_tokens.weight"),
                                         [list(s) for s in self.calibration], 4, self.quant_attrs["matmul_block_size"],
                                         self.quant_attrs["is_symmetric"])
        return skeleton

    def _materialize(self, module: Any) -> None:
        """Read `module`'s parameters that are still on the meta device from the checkpoint."""
        import torch

        reader = getattr(self, "_reader", None)
        if reader is None:
            return  # GPTQ: the builder's loader has read everything already
        prefix = self._names[module]
        for name, param in list(module.named_parameters()):
            if param.device.type != "meta":
                continue
            key = f"{prefix}.{name}" if prefix else name
            if key not in reader and key == "lm_head.weight":
                key = "model.embed_tokens.weight"  # tied: the embedding is the lm_head
            owner = module.get_submodule(name.rpartition(".")[0])
            setattr(owner, name.rpartition(".")[2], torch.nn.Parameter(reader.get(key), requires_grad=False))

    def _release(self, module: Any) -> None:
        """Drop the float weights of a quantized part: the graph holds its int4 data now."""
        import torch

        if getattr(self, "_reader", None) is None or self.onnx_dtype not in INT_TYPES:
            return  # float exports keep them: their initializers read them when the graph is saved
        for sub in module.modules():
            if isinstance(sub, torch.nn.Linear) and sub.weight.device.type != "meta":
                sub.weight = torch.nn.Parameter(torch.empty(sub.weight.shape, device="meta"), requires_grad=False)

    def make_embedding(self, embedding):
        if embedding.device.type == "meta" and not (self.tied_quantized_embeddings or self.tied_unquantized_embeddings):
            self._materialize(self.weights.model.embed_tokens)  # a tied embedding is read as the lm_head
            embedding = self.weights.model.embed_tokens.weight
        if self.onnx_dtype in INT_TYPES and not self.tied_quantized_embeddings and not self.tied_unquantized_embeddings \
                and self.lm_head_bits == 8 and "/model/embed_tokens/Gather" not in self.quant_attrs["nodes_to_exclude"]:
            # An untied embedding (15B) in int8 rows too, read by the same GatherBlockQuantized
            # path as a tied one: 8 bits and a scale per block instead of 32-bit floats.
            self._embedding_rows = self._quantize_now(embedding, 8)
            self.tied_quantized_embeddings = True
            try:
                return super().make_embedding(embedding)
            finally:
                self.tied_quantized_embeddings = False
                self._release(self.weights.model.embed_tokens)
        return super().make_embedding(embedding)

    def make_layer(self, layer_id, layer):
        self._materialize(layer)
        if self.calibrator is not None:
            self._calibrated = self.calibrator.layer(layer, layer_id)
        super().make_layer(layer_id, layer)
        self._calibrated = {}
        self._release(layer)
        if self.on_layer is not None:
            self.on_layer(layer_id)

    def make_layernorm(self, layer_id, layernorm, skip, simple, location):
        self._materialize(layernorm)  # the final norm (a layer's norms are read with the layer)
        return super().make_layernorm(layer_id, layernorm, skip, simple, location)

    def make_lm_head(self, lm_head):
        self._materialize(lm_head)
        super().make_lm_head(lm_head)
        self._release(lm_head)

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
    # int4 of a float checkpoint by GPTQ on these token windows (sc2quant.quant.gptq_lite), layer by
    # layer as the graph is built; None: round-to-nearest (MLAS, as the builder's own pass)
    calibration: tuple[tuple[int, ...], ...] | None = None


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
    # lm_head int8: the embedding reads the same int8 matrix through an 8-bit GatherBlockQuantized
    # (ORT 1.32 runs it; the builder assumes 4 bits only), so the tied matrix is stored once.
    return extra


def build(
    src: Path,
    out: Path,
    opts: BuildOptions,
    on_stage: Callable[[str], None] = lambda stage: None,
    on_layer: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Write model.onnx (+ external data), genai_config.json and the tokenizer into `out`; return
    what the manifest records of the build (GPTQ's calibration, when there was one).

    Mirrors the builder's `create_model`, whose architecture switch has no StarCoder2 entry.
    The builder's refusals (an unsupported RoPE scaling, activation, ...) become UserErrors.
    """
    from sc2quant.core.system import return_freed_memory

    ir = genai_builder.ir  # onnx_ir, as the builder imports it
    return_freed_memory()

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
            model.calibration = opts.calibration
            model.lm_head_bits = 8 if opts.lm_head == "int8" else 4
            model.make_model(str(src))
            on_stage("save")
            model.save_model(str(out))
            model.make_genai_config(config, hf_details["extra_kwargs"], str(out))
            model.save_processing(hf_details["hf_name"], hf_details["extra_kwargs"], str(out))
            return {"calibration": model.calibrator.describe()} if model.calibrator is not None else {}
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
