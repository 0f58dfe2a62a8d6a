"""`sc2quant export onnx --weights int4`: MatMulNBits graphs, their error, the lm_head precision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sc2quant.core import artifact
from sc2quant.core.files import dir_bytes
from sc2quant.export.onnx import export_onnx
from tests.export.onnx_support import (
    attrs,
    code_tokens,
    load_proto,
    ops,
    relative_error,
)

# --- int4 -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def int4_exports(tiny_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("int4")
    return {
        "g32": export_onnx(tiny_dir, root / "g32", weights="int4", block_size=32, lm_head="int4"),
        # round-to-nearest: GPTQ's groups cannot tile the tiny model's 64 inputs at 128 (ONNX Runtime pads them)
        "g128": export_onnx(tiny_dir, root / "g128", weights="int4", block_size=128, lm_head="int4", int4_method="rtn"),
        "g32-asym": export_onnx(tiny_dir, root / "g32-asym", weights="int4", block_size=32, symmetric=False,
                                lm_head="int4"),
    }


@pytest.mark.parametrize("name,block,zero_points", [("g32", 32, False), ("g128", 128, False), ("g32-asym", 32, True)])
def test_int4_graph(int4_exports, tiny_dir, name, block, zero_points):
    config = json.loads((tiny_dir / "config.json").read_text())
    proto = load_proto(int4_exports[name])
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 4 * config["num_hidden_layers"] + 1  # qkv, o, fc1, fc2 per layer + lm_head
    assert {attrs(n)["block_size"] for n in nbits} == {block} and {attrs(n)["bits"] for n in nbits} == {4}
    assert all((len(n.input) > 3 and bool(n.input[3])) == zero_points for n in nbits)
    assert ops(proto)["MatMul"] == 0
    # The tied embedding is the lm_head's int4 matrix, read by GatherBlockQuantized: stored once.
    gather = [n for n in proto.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(gather) == 1
    vocab, hidden = config["vocab_size"], config["hidden_size"]
    float_matrices = [i.name for i in proto.graph.initializer if sorted(i.dims) == sorted([vocab, hidden])]
    assert float_matrices == []
    manifest = artifact.read_manifest(int4_exports[name])
    assert (manifest.method, manifest.bits, manifest.group_size) == ("onnx-int4", 4, block)
    assert manifest.params["symmetric"] is (not zero_points)


def test_int4_error_is_quantization_error_and_smaller_with_smaller_blocks(int4_exports, tiny_dir, tokenizer):
    ids = code_tokens(tokenizer, 60)
    errors = {name: relative_error(path, tiny_dir, ids) for name, path in int4_exports.items()}
    print("int4 relative logit error vs fp32:", {k: round(v, 4) for k, v in errors.items()})
    assert all(0 < e < 0.35 for e in errors.values())  # a broken weight or embedding gives ~1
    assert errors["g32"] < errors["g128"]


def test_int4_runs_in_onnxruntime_genai(int4_exports):
    import onnxruntime_genai as og

    from sc2quant.runtime.engines import EngineOptions
    from sc2quant.runtime.engines.onnx_engine import OnnxEngine

    path = int4_exports["g32-asym"]
    model = og.Model(str(path))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=40, do_sample=False)
    generator = og.Generator(model, params)
    prompt = list(range(40, 60))
    generator.append_tokens(prompt)
    generated = []
    while not generator.is_done():
        generator.generate_next_token()
        generated.append(int(generator.get_next_tokens()[0]))
    engine = OnnxEngine(path, EngineOptions())
    state, last = engine.start([prompt])
    mine = []
    for _ in generated:
        mine.append(int(last[0].argmax()))
        last = engine.step(state, torch.tensor([mine[-1]]))
    assert generated == mine




def test_int8_lm_head_drifts_less_than_int4(onnx_int4_rtn_artifact, artifacts_dir, eval_sets_small, baseline_logits_fn):
    """An 8-bit lm_head (as llama.cpp keeps its output matrix above 4 bits) with the int4 body."""
    from sc2quant.evaluate.metrics import compare
    from sc2quant.runtime import load

    out = export_onnx(None, artifacts_dir / "onnx-int4-lm8", dtype="fp32", weights="int4", block_size=32, lm_head="int8")
    proto = load_proto(out)
    bits = {n.name: attrs(n)["bits"] for n in proto.graph.node if n.op_type == "MatMulNBits"}
    assert [b for name, b in bits.items() if "lm_head" in name] == [8]
    assert set(b for name, b in bits.items() if "lm_head" not in name) == {4}
    # the tied embedding reads the same int8 matrix (8-bit GatherBlockQuantized): stored once
    [gather] = [n for n in proto.graph.node if n.op_type == "GatherBlockQuantized"]
    assert attrs(gather)["bits"] == 8 and not any(sorted(i.dims) == sorted([8192, 256]) for i in proto.graph.initializer
                                                  if i.data_type == 1)
    assert artifact.read_manifest(out).params["lm_head"].startswith("int8")
    assert dir_bytes(out) < dir_bytes(onnx_int4_rtn_artifact) * 1.6  # not the fp32 embedding of before (2.9x)
    kl8 = compare(eval_sets_small, load(out).logits, baseline_logits_fn)["all"]["kl_mean"]
    kl4 = compare(eval_sets_small, load(onnx_int4_rtn_artifact).logits, baseline_logits_fn)["all"]["kl_mean"]
    assert kl8 < 0.5 * kl4, (kl8, kl4)  # measured 8.6e-4 vs 3.8e-3



def test_the_default_int4_export_is_gptq_on_the_shipped_text_and_drifts_a_quarter_of_rtn(
        artifacts_dir, eval_sets_small, baseline_logits_fn):
    """`export onnx --weights int4` of a float checkpoint calibrates (GPTQ, 4,096 tokens of calib_data, block
    128, int8 lm_head); `--int4-method rtn` is the data-free grid at the same block."""
    from sc2quant.evaluate.metrics import compare
    from sc2quant.runtime import load

    default = export_onnx(None, artifacts_dir / "onnx-int4-default", weights="int4")
    rtn = export_onnx(None, artifacts_dir / "onnx-int4-rtn-b128", weights="int4", int4_method="rtn")
    manifest = artifact.read_manifest(default)
    assert (manifest.group_size, manifest.params["int4_method"], manifest.params["lm_head"][:4]) == (128, "gptq", "int8")
    calibration = manifest.params["calibration"]
    assert calibration["data"]["source"] == "calib_data" and calibration["data"]["tokens"] == 4096
    assert calibration["act_order"] is True and calibration["seconds"] > 0
    assert not [p for p in default.iterdir() if p.name.startswith(".")]  # the calibrated checkpoint was not kept
    assert artifact.read_manifest(rtn).params["int4_method"] == "rtn"
    kl = {name: compare(eval_sets_small, load(path).logits, baseline_logits_fn)["all"]["kl_mean"]
          for name, path in (("gptq", default), ("rtn", rtn))}
    assert kl["gptq"] < 0.45 * kl["rtn"], kl  # measured 3.5e-4 vs 1.41e-3 on the bench's evaluation


def test_an_untied_embedding_is_stored_in_int8_rows_with_an_int8_lm_head(tmp_path):
    """StarCoder2-15B unties its embedding: with an int8 lm_head it is read from int8 rows too, not fp32."""
    from bench.models import write_random_sharded
    from sc2quant.runtime import load

    src = write_random_sharded(tmp_path / "untied", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=256, vocab_size=8192, sliding_window=64,
                               max_position_embeddings=256, tie_word_embeddings=False)
    out = export_onnx(src, tmp_path / "onnx", weights="int4", lm_head="int8")
    proto = load_proto(out)
    [gather] = [n for n in proto.graph.node if n.op_type == "GatherBlockQuantized"]
    assert attrs(gather)["bits"] == 8 and gather.input[0].startswith("/model/embed_tokens")
    assert not [i for i in proto.graph.initializer if i.data_type == 1 and sorted(i.dims) == [128, 8192]]  # no float [V, H]
    ids = torch.tensor([list(range(100, 160))])
    onnx_logits = load(out).logits(ids)
    ref = load(src, dtype="fp32").logits(ids)
    assert ((onnx_logits - ref).norm() / ref.norm()).item() < 0.2  # int4 quantization error, not a broken lookup


def test_the_default_int4_export_keeps_an_int8_lm_head_shared_with_the_embedding(tiny_dir, tmp_path):
    out = export_onnx(tiny_dir, tmp_path / "onnx", weights="int4")
    proto = load_proto(out)
    bits = sorted({attrs(n)["bits"] for n in proto.graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")})
    assert bits == [4, 8] and "shared with the embedding" in artifact.read_manifest(out).params["lm_head"]
