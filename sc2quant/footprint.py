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
- ONNX (onnxruntime-genai's builder, as `sc2quant.onnx_builder` uses it): a tied embedding is
  stored once, `cos_cache`/`sin_cache` [context, head_dim/2] are initializers in the graph's
  float type. int4 is `MatMulNBits` for every decoder MatMul and lm_head: packed uint8
  N*ceil(K/B)*B/2, scales N*ceil(K/B) in the graph's float type, uint8 zero points
  N*ceil(ceil(K/B)/2) unless symmetric; a tied embedding shares lm_head's int4 matrix
  (`GatherBlockQuantized`), an untied one stays in float.

What the tests measure: fp32/bf16 and all five bnb methods end to end (resident tensors,
`get_memory_footprint()`, `state_dict()` and the saved safetensors, byte for byte); GPTQ per
Linear against gptqmodel's own module buffers; one `MatMulNBits` against onnxruntime's
quantizer; transformers' KV cache. Whole ONNX graphs (sharing, rotary tables) are not measured.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from sc2quant.errors import UserError

MB = 10**6  # the model card's "MB"; 2**20 would give 27878.36 for fp32, not 29232.57
GB = 10**9
BNB_BLOCK = 64  # bitsandbytes' default 4-bit blocksize, which transformers uses
BNB_NESTED_BLOCK = 256  # double quant: absmax quantized blockwise in blocks of 256
BNB_DYNAMIC_MAP = 256 * 4  # fp32 code book of the nested (8-bit dynamic) absmax quantization
BNB_4BIT_MAP = 16 * 4  # fp32 nf4/fp4 code book, one per layer
# Double quant writes the nested offset as JSON text; its length depends on the data. We assume
# "0." plus 17 digits (a float32 mean in [0.1, 1) printed as a Python float); real files differ
# by a few bytes per layer.
BNB_OFFSET_TEXT = "0.12345678901234567"
GPTQ_GROUPS = (32, 64, 128, -1)
ONNX_BLOCKS = (32, 128)

# Starcoder2Config defaults (transformers 5.24), used for keys a config.json leaves out.
CONFIG_DEFAULTS: dict[str, Any] = {
    "hidden_size": 3072,
    "num_hidden_layers": 30,
    "num_attention_heads": 24,
    "num_key_value_heads": 2,
    "intermediate_size": 12288,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "max_position_embeddings": 4096,
    "sliding_window": None,
    "use_bias": True,
}

# The StarCoder2-7B model card, in MB: what transformers 4.39 counted (see `legacy_card`).
CARD_7B_MB = {"fp32": 29232.57, "bf16": 14616.29, "int8": 7670.52, "int4": 4197.64}


@dataclass(frozen=True)
class Shape:
    """The numbers of a StarCoder2 config that decide its memory."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    context: int
    sliding_window: int | None
    head_dim: int = 0  # 0: hidden // heads, as transformers does without `head_dim`
    use_bias: bool = True

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def rotary_half(self) -> int:
        """Length of `inv_freq`: one frequency per pair of rotary dimensions."""
        return len(range(0, self.hd, 2))


def _preset(name: str, hidden: int, layers: int, heads: int, kv: int, inter: int, tied: bool) -> Shape:
    return Shape(name, hidden, layers, heads, kv, inter, vocab=49152, tied=tied, context=16384, sliding_window=4096)


PRESETS = {
    "3b": _preset("starcoder2-3b", 3072, 30, 24, 2, 12288, tied=True),
    "7b": _preset("starcoder2-7b", 4608, 32, 36, 4, 18432, tied=True),
    "15b": _preset("starcoder2-15b", 6144, 40, 48, 4, 24576, tied=False),
}


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


@dataclass(frozen=True)
class CardRow:
    """One model-card figure: transformers 4.39's count, today's count and the true resident bytes."""

    method: str
    card_era_bytes: int
    today_bytes: int
    resident_bytes: int
    card_mb: float | None = None


@dataclass(frozen=True)
class Counts:
    """Q = weights of the decoder Linear layers, N = every other parameter, P = Q + N."""

    q: int
    n: int
    linears: tuple[tuple[int, int], ...] = field(repr=False)  # (out, in) of every decoder Linear

    @property
    def p(self) -> int:
        return self.q + self.n

    @property
    def linear_rows(self) -> int:
        return sum(out for out, _ in self.linears)


# ---------------------------------------------------------------- shapes


def resolve_shape(spec: str | Path | Shape) -> Shape:
    """A preset name ("3b", "7b", "15b") or a path to a config.json or a model directory."""
    if isinstance(spec, Shape):
        return spec
    key = str(spec).strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"unknown shape '{spec}': use one of {', '.join(PRESETS)}, or an existing config.json or "
                        "model directory")
    if path.is_file():
        if path.name != "config.json":
            raise UserError(f"{path} is not a config.json: pass a model's config.json or its directory")
        path = path.parent
    from sc2quant.loader import read_config

    return shape_from_config(read_config(path), name=str(spec))


def shape_from_config(cfg: dict[str, Any], name: str = "config") -> Shape:
    def get(key: str) -> Any:  # a missing key means transformers' default, as when it loads the config
        return CONFIG_DEFAULTS[key] if cfg.get(key) is None else cfg[key]

    try:
        shape = Shape(
            name=name,
            hidden=int(get("hidden_size")),
            layers=int(get("num_hidden_layers")),
            heads=int(get("num_attention_heads")),
            kv_heads=int(get("num_key_value_heads") or get("num_attention_heads")),
            intermediate=int(get("intermediate_size")),
            vocab=int(get("vocab_size")),
            tied=bool(get("tie_word_embeddings")),
            context=int(get("max_position_embeddings")),
            sliding_window=int(cfg["sliding_window"]) if cfg.get("sliding_window") else None,
            head_dim=int(cfg.get("head_dim") or 0),
            use_bias=bool(get("use_bias")),
        )
    except (TypeError, ValueError) as exc:
        raise UserError(f"config {name} has a non-numeric shape field ({exc}): fix config.json") from exc
    if min(shape.hidden, shape.layers, shape.heads, shape.kv_heads, shape.intermediate, shape.vocab) <= 0:
        raise UserError(f"config {name} has a zero or negative size: fix config.json")
    return shape


def counts(shape: Shape) -> Counts:
    """Parameter counts, laid out as Starcoder2ForCausalLM builds its modules."""
    h, hd = shape.hidden, shape.hd
    q_out, kv_out = shape.heads * hd, shape.kv_heads * hd
    layer = ((q_out, h), (kv_out, h), (kv_out, h), (h, q_out), (shape.intermediate, h), (h, shape.intermediate))
    linears = layer * shape.layers
    biases = sum(out for out, _ in layer) if shape.use_bias else 0
    norms = 2 * 2 * h  # input and post-attention LayerNorm, weight and bias
    embeddings = shape.vocab * h * (1 if shape.tied else 2)
    n = embeddings + shape.layers * (biases + norms) + 2 * h  # + final LayerNorm
    return Counts(q=sum(o * i for o, i in linears), n=n, linears=linears)


def rotary_buffer_bytes(shape: Shape) -> int:
    """transformers 5.x: one fp32 `inv_freq` and one `original_inv_freq` for the whole model."""
    return 2 * 4 * shape.rotary_half


# ---------------------------------------------------------------- methods


def method_names() -> list[str]:
    """Every method `predict` knows, in display order."""
    names = ["fp32", "bf16", "bnb-int8", "bnb-nf4", "bnb-nf4-dq", "bnb-fp4", "bnb-fp4-dq"]
    names += [f"gptq-int{bits}-g{g}" for bits in (4, 8) for g in GPTQ_GROUPS]
    names += ["onnx-fp32", "onnx-fp16"]
    names += [f"onnx-int4-b{b}{sym}" for b in ONNX_BLOCKS for sym in ("", "-sym")]
    names += ["onnx-int4-b32-fp16"]
    return names


_GPTQ = re.compile(r"^gptq-int(?P<bits>[248])-g(?P<group>-1|\d+)$")
_ONNX4 = re.compile(r"^onnx-int4-b(?P<block>\d+)(?P<sym>-sym)?(?P<fp16>-fp16)?$")
_BNB4 = re.compile(r"^bnb-(?P<qt>nf4|fp4)(?P<dq>-dq)?$")


def predict(shape: Shape | str | Path, methods: Iterable[str] | None = None) -> list[Row]:
    """Predicted bytes of each method (all of `method_names()` by default)."""
    shape = resolve_shape(shape)
    return [predict_method(shape, m) for m in (methods or method_names())]


def predict_method(shape: Shape, method: str) -> Row:
    c = counts(shape)
    if method in ("fp32", "bf16", "fp16"):
        return _float_row(shape, c, method)
    if method == "bnb-int8":
        return _bnb_int8_row(shape, c)
    if m := _BNB4.match(method):
        return _bnb_4bit_row(shape, c, m["qt"], bool(m["dq"]))
    if m := _GPTQ.match(method):
        return _gptq_row(shape, c, int(m["bits"]), int(m["group"]))
    if method in ("onnx-fp32", "onnx-fp16"):
        return _onnx_float_row(shape, c, 4 if method == "onnx-fp32" else 2, method)
    if m := _ONNX4.match(method):
        return _onnx_int4_row(shape, c, int(m["block"]), symmetric=bool(m["sym"]), float_bytes=2 if m["fp16"] else 4)
    raise UserError(
        f"unknown method '{method}': use fp32, bf16, bnb-int8, bnb-nf4[-dq], bnb-fp4[-dq], gptq-int4-g128 "
        "(bits 2/4/8, group N or -1), onnx-fp32, onnx-fp16 or onnx-int4-b32[-sym][-fp16]"
    )


def _row(method: str, parts: dict[str, int], weight_keys: Sequence[str], saved: int, **kw: Any) -> Row:
    parts = {k: v for k, v in parts.items() if v}
    return Row(method, sum(parts.get(k, 0) for k in weight_keys), sum(parts.values()), saved, parts, **kw)


def _float_row(shape: Shape, c: Counts, method: str) -> Row:
    size = 4 if method == "fp32" else 2
    parts = {"weights": size * c.p, "buffers": rotary_buffer_bytes(shape)}
    return _row(method, parts, ["weights"], saved=size * c.p)


def _bnb_int8_row(shape: Shape, c: Counts) -> Row:
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


def _bnb_4bit_row(shape: Shape, c: Counts, quant_type: str, double_quant: bool) -> Row:
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
    method = f"bnb-{quant_type}{'-dq' if double_quant else ''}"
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


def _gptq_row(shape: Shape, c: Counts, bits: int, group: int) -> Row:
    parts = {"quantized weights": 0, "kept weights": 2 * c.n, "zeros": 0, "scales": 0, "g_idx": 0}
    for out, inp in c.linears:
        for key, value in gptq_layer_bytes(out, inp, bits, group).items():
            parts[key] += value
    saved = sum(parts.values())
    parts["buffers"] = rotary_buffer_bytes(shape)
    note = "bias fp16, embeddings/norms bf16; checkpoint layout (a runtime kernel may repack)"
    return _row(f"gptq-int{bits}-g{group}", parts, ["quantized weights", "kept weights"], saved, note=note)


def onnx_rotary_bytes(shape: Shape, float_bytes: int) -> int:
    return 2 * shape.context * shape.rotary_half * float_bytes  # cos_cache and sin_cache


def _onnx_float_row(shape: Shape, c: Counts, size: int, method: str) -> Row:
    parts = {"weights": size * c.p, "buffers": onnx_rotary_bytes(shape, size)}
    return _row(method, parts, ["weights"], saved=sum(parts.values()), note="initializers; tied embedding stored once")


def matmul_nbits_bytes(n: int, k: int, block: int, symmetric: bool, float_bytes: int) -> dict[str, int]:
    """Initializers of one 4-bit `MatMulNBits` with N outputs and K inputs."""
    k_blocks = math.ceil(k / block)
    parts = {"quantized weights": n * k_blocks * block // 2, "scales": n * k_blocks * float_bytes}
    if not symmetric:
        parts["zeros"] = n * math.ceil(k_blocks / 2)
    return parts


def _onnx_int4_row(shape: Shape, c: Counts, block: int, symmetric: bool, float_bytes: int) -> Row:
    h, v = shape.hidden, shape.vocab
    float_params = c.n - v * h  # lm_head is int4 (and a tied embedding shares it)
    parts = {"quantized weights": 0, "kept weights": float_bytes * float_params, "scales": 0, "zeros": 0}
    for out, inp in (*c.linears, (v, h)):
        for key, value in matmul_nbits_bytes(out, inp, block, symmetric, float_bytes).items():
            parts[key] += value
    parts["buffers"] = onnx_rotary_bytes(shape, float_bytes)
    method = f"onnx-int4-b{block}{'-sym' if symmetric else ''}{'-fp16' if float_bytes == 2 else ''}"
    note = "lm_head int4 too" + (", shared with the embedding" if shape.tied else "; embedding in float")
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


# ---------------------------------------------------------------- the model card


def legacy_card(shape: Shape | str | Path) -> list[CardRow]:
    """The StarCoder2 model card's four figures, as transformers 4.39 counted them, next to today's.

    The card used `get_memory_footprint()` = parameters + buffers, in MB of 10**6 bytes. In
    transformers 4.39 every attention layer owned a rotary module with `cos_cached` and
    `sin_cached` buffers of [max_position_embeddings, head_dim] in the model dtype (fp16 for the
    bnb loads) plus an fp32 `inv_freq` [head_dim/2]: 2*32*16384*128 elements for 7B, 268.44 MB
    in 16 bits and 536.87 MB in fp32. Current transformers computes cos/sin on the fly and keeps
    only two fp32 `inv_freq` vectors for the whole model, so it reports 7402.08 / 3929.20 MB for
    int8 / int4. Neither count includes bnb's `SCB` or `absmax`, which `resident_bytes` adds.
    """
    shape = resolve_shape(shape)
    card = CARD_7B_MB if shape == PRESETS["7b"] else {}
    rows = []
    for label, method, cache_bytes in (("fp32", "fp32", 4), ("bf16", "bf16", 2), ("int8", "bnb-int8", 2),
                                       ("int4", "bnb-nf4", 2)):
        now = predict_method(shape, method)
        old_buffers = shape.layers * (2 * shape.context * shape.hd * cache_bytes + 4 * shape.rotary_half)
        old = now.weight_bytes + old_buffers
        rows.append(CardRow(label, old, now.weight_bytes + rotary_buffer_bytes(shape), now.resident_bytes,
                            card.get(label)))
    return rows


def legacy_explanation(shape: Shape | str | Path) -> list[str]:
    """Why the card's figures differ from what transformers reports today, in numbers."""
    shape = resolve_shape(shape)
    elements = shape.layers * 2 * shape.context * shape.hd
    rows = {r.method: r for r in legacy_card(shape)}
    return [
        f"transformers 4.39 (the card's era) counted per-layer rotary caches: {shape.layers} layers x cos+sin x "
        f"[{shape.context}, {shape.hd}] = {elements:,} elements = {2 * elements / MB:.2f} MB in 16 bits, "
        f"{4 * elements / MB:.2f} MB in fp32 (plus a {4 * shape.rotary_half}-byte fp32 inv_freq per layer).",
        f"Today's transformers computes cos/sin on the fly and keeps two fp32 inv_freq vectors "
        f"({rotary_buffer_bytes(shape)} bytes for the whole model).",
        f"Neither count includes bnb's quantization state: SCB adds "
        f"{(rows['int8'].resident_bytes - rows['int8'].today_bytes) / MB:.2f} MB to int8, absmax and quant_map "
        f"{(rows['int4'].resident_bytes - rows['int4'].today_bytes) / MB:.2f} MB to nf4 (see 'resident').",
    ]


# ---------------------------------------------------------------- one report for the CLI and JSON


def report(spec: str | Path | Shape = "7b", context: int | None = None, batch: int = 1,
           legacy: bool = False, methods: Iterable[str] | None = None) -> dict[str, Any]:
    """Everything `sc2quant footprint` shows, as plain data."""
    shape = resolve_shape(spec)
    context = shape.context if context is None else context
    for flag, value in (("--context", context), ("--batch", batch)):
        if value < 1:
            raise UserError(f"{flag} {value} is not a count of tokens or sequences: pass 1 or more")
    c = counts(shape)
    out: dict[str, Any] = {
        "shape": asdict(replace(shape, head_dim=shape.hd)),
        "parameters": {"P": c.p, "Q": c.q, "N": c.n},
        "unit": {"MB": MB, "GB": GB},
        "methods": [asdict(r) for r in predict(shape, methods)],
        "kv_cache": {"context": context, "batch": batch, "rows": [asdict(r) for r in kv_rows(shape, context, batch)]},
    }
    if legacy:
        out["legacy_card"] = {"rows": [asdict(r) for r in legacy_card(shape)], "explanation": legacy_explanation(shape)}
    return out


# ---------------------------------------------------------------- terminal rendering


def render(data: dict[str, Any]) -> list[Any]:
    """Rich tables and lines for a `report`, in print order."""
    from rich.table import Table

    shape, params = data["shape"], data["parameters"]
    out: list[Any] = []
    table = Table(title=f"{shape['name']}: P = {params['P']:,} parameters (Q = {params['Q']:,} in decoder Linears)",
                  caption="MB = 10^6 bytes, GB = 10^9. resident = weights + scales/zeros/absmax/SCB/quant_map + "
                          "buffers; ~ = within a few bytes per layer")
    for col in ("method", "weights MB", "resident MB", "resident GB", "metadata+buffers MB", "saved MB"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in data["methods"]:
        saved = f"{r['saved_bytes'] / MB:.2f}" if r["saved_exact"] else f"~{r['saved_bytes'] / MB:.2f}"
        table.add_row(r["method"], f"{r['weight_bytes'] / MB:.2f}", f"{r['resident_bytes'] / MB:.2f}",
                      f"{r['resident_bytes'] / GB:.3f}", f"{(r['resident_bytes'] - r['weight_bytes']) / MB:.2f}",
                      saved)
    out.append(table)
    out += _notes(data["methods"])
    out.append(_kv_table(data))
    if "legacy_card" in data:
        out.append(_legacy_table(data["legacy_card"]["rows"]))
        out += data["legacy_card"]["explanation"]
    return out


def _notes(rows: list[dict[str, Any]]) -> list[str]:
    by_note: dict[str, list[str]] = {}
    for r in rows:
        if r["note"]:
            by_note.setdefault(r["note"], []).append(r["method"])
    return [f"{_family(methods)}: {note}" for note, methods in by_note.items()]


def _family(methods: list[str]) -> str:
    """'gptq-int*' rather than eight method names when a whole family shares a note."""
    return ", ".join(methods) if len(methods) <= 2 else os.path.commonprefix(methods) + "*"


def _kv_table(data: dict[str, Any]) -> Any:
    from rich.table import Table

    s, kv = data["shape"], data["kv_cache"]
    table = Table(title=f"KV cache at context {kv['context']}, batch {kv['batch']} ({s['kv_heads']} KV heads x "
                        f"{s['head_dim']} dims x {s['layers']} layers, sliding window {s['sliding_window']})")
    for col in ("runtime", "dtype", "tokens kept", "MB", "GB", "note"):
        table.add_column(col, justify="right" if col in ("tokens kept", "MB", "GB") else "left")
    for r in kv["rows"]:
        table.add_row(r["runtime"], r["dtype"], str(r["tokens"]), f"{r['bytes'] / MB:.2f}", f"{r['bytes'] / GB:.3f}",
                      r["note"])
    return table


def _legacy_table(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title="get_memory_footprint() in MB: transformers 4.39 (the model card) vs today")
    for col in ("method", "transformers 4.39", "model card", "today", "true resident"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        card = f"{r['card_mb']:.2f}" if r["card_mb"] is not None else "-"
        table.add_row(r["method"], f"{r['card_era_bytes'] / MB:.2f}", card, f"{r['today_bytes'] / MB:.2f}",
                      f"{r['resident_bytes'] / MB:.2f}")
    return table
