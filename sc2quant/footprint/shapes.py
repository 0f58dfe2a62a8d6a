"""StarCoder2 shapes for `sc2quant footprint`: presets of the real 3B/7B/15B models, shapes read
from a config.json, and parameter counts laid out as Starcoder2ForCausalLM builds its modules.
Plain arithmetic, no torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sc2quant.core.errors import UserError

MB = 10**6  # the model card's "MB"; 2**20 would give 27878.36 for fp32, not 29232.57
GB = 10**9

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
    from sc2quant.core.hf import read_config

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


