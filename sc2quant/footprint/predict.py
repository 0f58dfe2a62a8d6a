"""`sc2quant footprint`: the memory of every method for a StarCoder2 shape, predicted without a model.

Everything here is arithmetic on the shape (no torch import), checked against real tensors of
randomly initialised models in `tests/test_footprint.py`. Two byte counts per method:

- `weight_bytes`: the weight tensors only (quantized weights plus the weights kept in float),
  what `get_memory_footprint()` counts as parameters.
- `resident_bytes`: everything the loaded model holds in memory: weights, quantization
  metadata (bnb `SCB`, `absmax`, `quant_map`, nested absmax and offset; GPTQ `scales`,
  `qzeros`, `g_idx`; MatMulNBits scales and zero points) and buffers (rotary tables).

`saved_bytes` is the tensor data a checkpoint holds (the safetensors data section for
transformers and GPTQ; the initializers of an ONNX graph). Units: MB = 10**6 bytes, the unit
the StarCoder2 model card used; GB = 10**9.

Layouts assumed (and where they come from):

- transformers / bitsandbytes 0.50.2: decoder Linear weights are quantized; embeddings,
  lm_head, LayerNorms and all biases stay in bf16. int8: int8 weight + fp32 `SCB` per output
  row. 4-bit: two codes per byte, fp32 absmax per block of 64; double quant turns absmax into
  uint8 plus an fp32 absmax per 256 blocks, a scalar fp32 offset and a copy of the 256-entry
  fp32 dynamic code book (`quantize_blockwise` copies it per call). Each layer also holds its
  own 16-entry fp32 `quant_map`.
- gptqmodel 7.6.0 (GPTQ v1): qweight int32 [ceil(K*bits/32), N], qzeros int32
  [G, ceil(N*bits/32)], scales fp16 [G, N], g_idx int32 [K], bias fp16; G = ceil(K/group)
  (group -1: one group). This is the checkpoint layout; a runtime kernel may repack it.
- ONNX (onnxruntime-genai's builder, as `sc2quant.export.onnx_builder` uses it): a tied embedding is
  stored once, `cos_cache`/`sin_cache` [context, head_dim/2] are initializers in the graph's
  float type. int4 is `MatMulNBits` for every decoder MatMul and lm_head: packed uint8
  N*ceil(K/B)*B/2, scales N*ceil(K/B) in the graph's float type, uint8 zero points
  N*ceil(ceil(K/B)/2) unless symmetric; a tied embedding shares lm_head's int4 matrix
  (`GatherBlockQuantized`), an untied one stays in float.

What the tests measure: fp32/bf16 and all five bnb methods end to end (resident tensors,
`get_memory_footprint()`, `state_dict()` and the saved safetensors, byte for byte); GPTQ per
Linear against gptqmodel's own module buffers; one `MatMulNBits` against onnxruntime's
quantizer; transformers' KV cache; whole int4 ONNX exports (every lm_head precision) initializer for initializer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sc2quant.footprint.shapes import Shape, counts, resolve_shape, rotary_buffer_bytes
from sc2quant.formats import Method, method_names, parse_method

BNB_BLOCK = 64  # bitsandbytes' default 4-bit blocksize, which transformers uses
BNB_NESTED_BLOCK = 256  # double quant: absmax quantized blockwise in blocks of 256
BNB_DYNAMIC_MAP = 256 * 4  # fp32 code book of the nested (8-bit dynamic) absmax quantization
BNB_4BIT_MAP = 16 * 4  # fp32 nf4/fp4 code book, one per layer
# Double quant writes the nested offset as JSON text; its length depends on the data. We assume
# "0." plus 17 digits (a float32 mean in [0.1, 1) printed as a Python float); real files differ
# by a few bytes per layer.
BNB_OFFSET_TEXT = "0.12345678901234567"

@dataclass(frozen=True)
class Row:
    """Predicted bytes of one method; `parts` sums to `resident_bytes`."""

    method: str
    weight_bytes: int
    resident_bytes: int
    saved_bytes: int
    parts: dict[str, int]
    saved_exact: bool = True
    note: str = ""


@dataclass(frozen=True)
class KvRow:
    runtime: str
    dtype: str
    tokens: int  # cached positions per sequence and layer
    bytes: int
    note: str = ""


def predict(shape: Shape | str | Path, methods: Iterable[str] | None = None) -> list[Row]:
    """Predicted bytes of each method (all of `method_names()` by default)."""
    shape = resolve_shape(shape)
    return [predict_method(shape, m) for m in (methods or method_names())]


def predict_method(shape: Shape, method: str) -> Row:
    """One method's bytes, counted by the format that owns the method (`sc2quant.formats`)."""
    m = parse_method(method)
    return m.format.footprint(shape, m)


def _row(method: str, parts: dict[str, int], weight_keys: Sequence[str], saved: int, **kw: Any) -> Row:
    parts = {k: v for k, v in parts.items() if v}
    return Row(method, sum(parts.get(k, 0) for k in weight_keys), sum(parts.values()), saved, parts, **kw)


def float_row(shape: Shape, method: str) -> Row:
    c = counts(shape)
    size = 4 if method == "fp32" else 2
    parts = {"weights": size * c.p, "buffers": rotary_buffer_bytes(shape)}
    return _row(method, parts, ["weights"], saved=size * c.p)


def bnb_int8_row(shape: Shape) -> Row:
    c = counts(shape)
    parts = {
        "quantized weights": c.q,
        "kept weights": 2 * c.n,
        "SCB": 4 * c.linear_rows,  # one fp32 scale per output row
        "buffers": rotary_buffer_bytes(shape),
    }
    weight_format = len(c.linears)  # a uint8 scalar per layer, written but not held in memory
    saved = c.q + 2 * c.n + 4 * c.linear_rows + weight_format
    return _row("bnb-int8", parts, ["quantized weights", "kept weights"], saved)


def bnb_4bit_layer_bytes(out: int, inp: int, double_quant: bool) -> dict[str, int]:
    """Resident bytes of one bnb 4-bit Linear weight (without bias)."""
    numel = out * inp
    blocks = math.ceil(numel / BNB_BLOCK)
    parts = {"quantized weights": (numel + 1) // 2, "quant_map": BNB_4BIT_MAP}
    if double_quant:
        parts["absmax"] = blocks + 4 * math.ceil(blocks / BNB_NESTED_BLOCK) + 4  # uint8, nested fp32, offset
        parts["nested quant_map"] = BNB_DYNAMIC_MAP
    else:
        parts["absmax"] = 4 * blocks
    return parts


def bnb_quant_state_json(out: int, inp: int, quant_type: str, double_quant: bool, offset: float | None = None,
                         dtype: str = "bfloat16") -> bytes:
    """The JSON that bitsandbytes packs into `weight.quant_state.bitsandbytes__<type>` (a uint8 tensor)."""
    state: dict[str, Any] = {"quant_type": quant_type, "blocksize": BNB_BLOCK, "dtype": dtype, "shape": [out, inp]}
    if not double_quant:
        return json.dumps(state).encode()
    state.update({"nested_blocksize": BNB_NESTED_BLOCK, "nested_dtype": "float32"})
    offset_text = BNB_OFFSET_TEXT if offset is None else json.dumps(float(offset))
    return (json.dumps(state)[:-1] + f', "nested_offset": {offset_text}}}').encode()


def bnb_4bit_row(shape: Shape, quant_type: str, double_quant: bool) -> Row:
    c = counts(shape)
    parts = {"quantized weights": 0, "kept weights": 2 * c.n, "absmax": 0, "quant_map": 0, "nested quant_map": 0}
    saved = 2 * c.n
    for out, inp in c.linears:
        layer = bnb_4bit_layer_bytes(out, inp, double_quant)
        for key, value in layer.items():
            parts[key] += value
        # on disk the offset is JSON text, not a tensor
        saved += sum(layer.values()) - (4 if double_quant else 0)
        saved += len(bnb_quant_state_json(out, inp, quant_type, double_quant))
    parts["buffers"] = rotary_buffer_bytes(shape)
    method = Method("bnb", 4, quant_type=quant_type, double_quant=double_quant).name
    note = "saved bytes assume a 19-character nested offset in each layer's JSON" if double_quant else ""
    return _row(method, parts, ["quantized weights", "kept weights"], saved, saved_exact=not double_quant, note=note)


def gptq_layer_bytes(out: int, inp: int, bits: int, group: int) -> dict[str, int]:
    """Bytes of one gptqmodel (GPTQ v1) Linear without its bias: qweight, qzeros, scales, g_idx."""
    groups = 1 if group == -1 else math.ceil(inp / group)
    return {
        "quantized weights": 4 * math.ceil(inp * bits / 32) * out,
        "zeros": 4 * groups * math.ceil(out * bits / 32),
        "scales": 2 * groups * out,
        "g_idx": 4 * inp,
    }


def gptq_row(shape: Shape, bits: int, group: int) -> Row:
    c = counts(shape)
    parts = {"quantized weights": 0, "kept weights": 2 * c.n, "zeros": 0, "scales": 0, "g_idx": 0}
    for out, inp in c.linears:
        for key, value in gptq_layer_bytes(out, inp, bits, group).items():
            parts[key] += value
    saved = sum(parts.values())
    parts["buffers"] = rotary_buffer_bytes(shape)
    note = "bias fp16, embeddings/norms bf16; checkpoint layout (a runtime kernel may repack)"
    return _row(Method("gptq", bits, group).name, parts, ["quantized weights", "kept weights"], saved, note=note)


def onnx_rotary_bytes(shape: Shape, float_bytes: int) -> int:
    return 2 * shape.context * shape.rotary_half * float_bytes  # cos_cache and sin_cache


def onnx_float_row(shape: Shape, size: int, method: str) -> Row:
    c = counts(shape)
    parts = {"weights": size * c.p, "buffers": onnx_rotary_bytes(shape, size)}
    return _row(method, parts, ["weights"], saved=sum(parts.values()), note="initializers; tied embedding stored once")


def matmul_nbits_bytes(n: int, k: int, block: int, symmetric: bool, float_bytes: int, bits: int = 4) -> dict[str, int]:
    """Initializers of one `MatMulNBits` (4 or 8 bits) with N outputs and K inputs."""
    k_blocks = math.ceil(k / block)
    parts = {"quantized weights": n * k_blocks * block * bits // 8, "scales": n * k_blocks * float_bytes}
    if not symmetric:
        parts["zeros"] = n * math.ceil(k_blocks * bits / 8)
    return parts


def onnx_int4_row(shape: Shape, block: int, symmetric: bool, float_bytes: int, lm_head: str = "int8") -> Row:
    """Decoder MatMuls in int4; lm_head int4 or int8 (a tied embedding shares its matrix, an untied
    one is int8 too with an int8 head and stays float with an int4 head) or float (tied: stored once)."""
    c = counts(shape)
    h, v = shape.hidden, shape.vocab
    head_bits = {"int4": 4, "int8": 8, "float": 0}[lm_head]
    quantized = [(out, inp, 4) for out, inp in c.linears]
    if head_bits:
        quantized.append((v, h, head_bits))
        if head_bits == 8 and not shape.tied:
            quantized.append((v, h, 8))  # the untied embedding, read by an 8-bit GatherBlockQuantized
    float_params = c.n - v * h * (len(quantized) - len(c.linears))
    parts = {"quantized weights": 0, "kept weights": float_bytes * float_params, "scales": 0, "zeros": 0}
    for out, inp, bits in quantized:
        for key, value in matmul_nbits_bytes(out, inp, block, symmetric, float_bytes, bits).items():
            parts[key] += value
    parts["buffers"] = onnx_rotary_bytes(shape, float_bytes)
    method = Method("onnx", 4, block, sym=symmetric, dtype="fp16" if float_bytes == 2 else "fp32", lm_head=lm_head).name
    shared = "shared with the embedding" if shape.tied else ("embedding int8 too" if head_bits == 8 else "embedding in float")
    note = f"lm_head {lm_head}, " + ("tied: stored once" if not head_bits and shape.tied else shared)
    return _row(method, parts, ["quantized weights", "kept weights"], saved=sum(parts.values()), note=note)


# ---------------------------------------------------------------- KV cache


def kv_cache_bytes(shape: Shape, context: int, batch: int = 1, dtype_bytes: int = 2, windowed: bool = False) -> int:
    """Keys plus values of every layer: 2 * layers * batch * kv_heads * head_dim * tokens * dtype.

    GQA is in `kv_heads`. `windowed` caps the cached positions at `sliding_window`; use it only for
    a runtime that really keeps a window-sized cache (see `kv_rows`).
    """
    return 2 * shape.layers * batch * shape.kv_heads * shape.hd * kv_tokens(shape, context, windowed) * dtype_bytes


def kv_tokens(shape: Shape, context: int, windowed: bool) -> int:
    return min(context, shape.sliding_window) if windowed and shape.sliding_window else context


def kv_rows(shape: Shape, context: int, batch: int = 1) -> list[KvRow]:
    """The cache each runtime keeps at `context` tokens per sequence.

    - transformers 5.x builds `DynamicCache(config=...)` with a `DynamicSlidingWindowLayer` for
      StarCoder2 when `sliding_window` is set: during decoding it holds `sliding_window` positions
      per layer (window-1 kept plus the new one, in one buffer; measured in the tests). Right
      after a prefill of T > window tokens it still holds all T until the next step.
    - transformers 4.x (the model card's era) kept every position: full length.
    - onnxruntime-genai preallocates past/present as one buffer of max_length (here: `context`)
      positions; only a `decoder.sliding_window` entry in genai_config.json makes it window-sized.
    """
    def row(runtime: str, dtype: str, size: int, windowed: bool, note: str) -> KvRow:
        tokens = kv_tokens(shape, context, windowed)
        return KvRow(runtime, dtype, tokens, kv_cache_bytes(shape, context, batch, size, windowed), note)

    return [
        row("transformers 5.x DynamicCache", "bf16", 2, True, "sliding-window layers, during decode"),
        row("transformers 4.x DynamicCache", "bf16", 2, False, "full length (the card's era)"),
        row("onnxruntime-genai GQA, shared buffer", "fp32", 4, False, "max_length buffer (fp32 CPU graph)"),
        row("onnxruntime-genai GQA, decoder.sliding_window", "fp32", 4, True, "window-sized buffer"),
    ]


