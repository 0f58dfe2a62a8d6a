"""The 3B's exact widths through `export onnx` and the graph check: 2 decoder layers of
StarCoder2-3B's shape (hidden 3072, 24 heads / 2 KV heads of 128, MLP 12288, vocab 49152,
window 4096 in a 16,384 context), random bf16 weights sharded as the hub ships them. What
depends on the widths (head size, grouped KV, the window attribute, rotary tables, the int8
lm_head shared with the 49152-row embedding, block quantization of 12288-wide inputs) is the
same as in the full 30-layer model; only the layer count differs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sc2quant.export.onnx import export_onnx

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_layer_3b(tmp_path_factory) -> Path:
    from bench.models import write_random_sharded
    from sc2quant.embedded import EMBEDDED_MODEL_DIR

    return write_random_sharded(tmp_path_factory.mktemp("3b") / "starcoder2-3b-2layers", EMBEDDED_MODEL_DIR,
                                num_hidden_layers=2, vocab_size=49152)


@pytest.mark.parametrize("options", [dict(weights="int4"), dict(dtype="fp16")], ids=["int4-default", "fp16"])
def test_the_3b_widths_export_with_fused_windowed_attention(two_layer_3b, tmp_path, options):
    from sc2quant.footprint import predict_method, shape_from_config

    out = export_onnx(two_layer_3b, tmp_path / "onnx", **options)
    manifest = json.loads((out / "sc2quant.json").read_text())
    facts, config = manifest["params"]["graph"], json.loads((two_layer_3b / "config.json").read_text())
    assert facts["attention_nodes"] == 2 and facts["local_window_size"] == 4096, facts
    genai = json.loads((out / "genai_config.json").read_text())["model"]
    assert genai["context_length"] == 16384 and genai["vocab_size"] == 49152
    decoder = genai["decoder"]
    assert (decoder["num_attention_heads"], decoder["num_key_value_heads"], decoder["head_size"]) == (24, 2, 128)
    name = manifest["params"]["method_name"]
    assert name == ("onnx-int4-b128-sym-lm8" if "weights" in options else "onnx-fp16")
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(out / "model.onnx"))
    stored = sum(numpy_helper.to_array(i).nbytes for i in proto.graph.initializer)
    assert stored == predict_method(shape_from_config(config), name).saved_bytes  # footprint, byte for byte
