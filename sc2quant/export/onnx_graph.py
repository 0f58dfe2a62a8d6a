"""What an exported StarCoder2 ONNX graph must look like, checked before it is written.

An exporter can silently produce a graph that runs but is a different model: attention left
unfused (or fused into an op that ignores the window), a sliding window dropped or off by one
(63 or 65 instead of 64 changes logits by ~0.1). `check_graph` refuses such graphs and returns
the facts it verified, which go into the artifact manifest.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from sc2quant.core.errors import UserError

MS_DOMAIN = "com.microsoft"
# Attention ops that either are unfused building blocks or carry no sliding window.
FORBIDDEN_ATTENTION = ("Attention", "MultiHeadAttention", "Softmax", "RotaryEmbedding")


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def expected_window(config: dict[str, Any]) -> int:
    """GQA's local_window_size for a StarCoder2 config: the window exactly, -1 when there is none."""
    window = config.get("sliding_window")
    return int(window) if window else -1


def check_graph(model: Any, config: dict[str, Any]) -> dict[str, Any]:
    """Verify fused attention, window, LayerNorm fusion and KV cache; return the graph's facts.

    `model` is an onnx.ModelProto (external data need not be loaded); `config` the HF config.
    """
    graph = model.graph
    ops = Counter(n.op_type for n in graph.node)
    layers = int(config["num_hidden_layers"])
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    problems = _attention_problems(gqa, ops, config)
    problems += _layernorm_problems(ops, layers)
    problems += _cache_problems(graph, layers)
    if problems:
        raise UserError("the exported ONNX graph is not a faithful StarCoder2: " + "; ".join(problems)
                        + " (nothing was written)")
    attrs = _attrs(gqa[0])
    facts: dict[str, Any] = {
        "attention": "GroupQueryAttention",
        "attention_nodes": len(gqa),
        "num_heads": attrs["num_heads"],
        "kv_num_heads": attrs["kv_num_heads"],
        "local_window_size": attrs.get("local_window_size", -1),
        "rotary_fused": True,
        "windowed_kv_cache": bool(attrs.get("sliding_window_cache", 0)),
        "rotary_positions": rotary_positions(model),
        "layernorm": {"LayerNormalization": ops["LayerNormalization"],
                      "SkipLayerNormalization": ops["SkipLayerNormalization"]},
        "matmul": ops["MatMul"],
        "matmul_nbits": ops["MatMulNBits"],
        "embedding": "GatherBlockQuantized" if ops["GatherBlockQuantized"] else "Gather",
        "io_dtype": _elem_type_name(graph.output[0]),
    }
    nbits = [_attrs(n) for n in graph.node if n.op_type == "MatMulNBits"]
    if nbits:
        facts["nbits_block_sizes"] = sorted({a["block_size"] for a in nbits})
        facts["nbits_bits"] = sorted({a["bits"] for a in nbits})
        facts["nbits_zero_points"] = sum(1 for n in graph.node if n.op_type == "MatMulNBits" and _has_input(n, 3))
    return facts


def _attention_problems(gqa: list[Any], ops: Counter, config: dict[str, Any]) -> list[str]:
    layers = int(config["num_hidden_layers"])
    problems = []
    if len(gqa) != layers:
        problems.append(f"{len(gqa)} GroupQueryAttention nodes for {layers} layers (attention is not fused)")
    unfused = [op for op in FORBIDDEN_ATTENTION if ops[op]]
    if unfused:
        problems.append(f"graph contains {', '.join(unfused)} (attention unfused or without the window)")
    window = expected_window(config)
    for node in gqa:
        a = _attrs(node)
        if node.domain != MS_DOMAIN:
            problems.append(f"{node.name} is not com.microsoft.GroupQueryAttention")
        if a.get("do_rotary", 0) != 1:
            problems.append(f"{node.name} has do_rotary={a.get('do_rotary', 0)}: rotary is not fused")
        if a.get("kv_num_heads") != config["num_key_value_heads"]:
            problems.append(f"{node.name} has kv_num_heads={a.get('kv_num_heads')}, "
                            f"the model has {config['num_key_value_heads']} KV heads")
        if a.get("num_heads") != config["num_attention_heads"]:
            problems.append(f"{node.name} has num_heads={a.get('num_heads')}, "
                            f"the model has {config['num_attention_heads']}")
        if a.get("local_window_size", -1) != window:
            problems.append(f"{node.name} has local_window_size={a.get('local_window_size', -1)}, "
                            f"the model's sliding_window is {window}")
    return problems


def _layernorm_problems(ops: Counter, layers: int) -> list[str]:
    # One LayerNormalization on the embeddings, then SkipLayerNormalization before each MLP,
    # before each later attention and as the final norm: 2 * layers of them.
    if ops["LayerNormalization"] != 1 or ops["SkipLayerNormalization"] != 2 * layers:
        return [f"LayerNorm is not fused (LayerNormalization={ops['LayerNormalization']}, "
                f"SkipLayerNormalization={ops['SkipLayerNormalization']}, expected 1 and {2 * layers})"]
    return []


def _cache_problems(graph: Any, layers: int) -> list[str]:
    inputs = {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    names = [(i, kv) for i in range(layers) for kv in ("key", "value")]
    missing = [f"past_key_values.{i}.{kv}" for i, kv in names if f"past_key_values.{i}.{kv}" not in inputs]
    missing += [f"present.{i}.{kv}" for i, kv in names if f"present.{i}.{kv}" not in outputs]
    if "logits" not in outputs:
        missing.append("logits")
    return [f"KV cache inputs/outputs missing: {', '.join(missing[:4])}"] if missing else []


def check_genai_config(genai: dict[str, Any], config: dict[str, Any], facts: dict[str, Any]) -> None:
    """genai_config.json must describe this graph: a decoder whose context the rotary tables cover."""
    model, decoder = genai.get("model", {}), genai.get("model", {}).get("decoder", {})
    expected = {
        "type": ("decoder", model.get("type")),
        "context_length": (facts["rotary_positions"], model.get("context_length")),
        "num_hidden_layers": (config["num_hidden_layers"], decoder.get("num_hidden_layers")),
        "num_key_value_heads": (config["num_key_value_heads"], decoder.get("num_key_value_heads")),
        "head_size": (config["hidden_size"] // config["num_attention_heads"], decoder.get("head_size")),
    }
    wrong = [f"{key} is {got}, expected {want}" for key, (want, got) in expected.items() if want != got]
    if facts["rotary_positions"] != config.get("max_position_embeddings"):
        wrong.append(f"rotary tables cover {facts['rotary_positions']} positions, the model "
                     f"{config.get('max_position_embeddings')}")
    if wrong:
        raise UserError("genai_config.json does not match the exported graph: " + "; ".join(wrong)
                        + " (nothing was written)")


def rotary_positions(model: Any) -> int:
    """How many positions the rotary cos/sin tables cover (the longest usable context)."""
    for init in model.graph.initializer:
        if init.name == "cos_cache":
            return int(init.dims[0])
    raise UserError("the exported ONNX graph has no cos_cache initializer: rotary tables are missing")


def _has_input(node: Any, index: int) -> bool:
    return len(node.input) > index and bool(node.input[index])


def _elem_type_name(value_info: Any) -> str:
    from onnx import TensorProto

    return TensorProto.DataType.Name(value_info.type.tensor_type.elem_type).lower()

