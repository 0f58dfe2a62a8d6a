"""`sc2quant export onnx`, float graphs: structure, parity with PyTorch (the window, decoding, batches), fp16."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sc2quant.core import artifact
from sc2quant.core.errors import UserError
from sc2quant.export.onnx import export_onnx
from tests.export.onnx_support import (
    FP32_TOL,
    attrs,
    code_tokens,
    load_proto,
    max_err,
    ops,
    torch_logits,
    window,
)

# --- graph structure --------------------------------------------------------------------------


def test_graph_is_fused_with_the_models_window(fp32_export, source_dir):
    config = json.loads((source_dir / "config.json").read_text())
    proto = load_proto(fp32_export)
    gqa = [n for n in proto.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == config["num_hidden_layers"]
    for node in gqa:
        a = attrs(node)
        assert node.domain == "com.microsoft"
        assert a["do_rotary"] == 1
        assert a["kv_num_heads"] == config["num_key_value_heads"]
        assert a["local_window_size"] == config["sliding_window"]
    count = ops(proto)
    assert count["LayerNormalization"] == 1 and count["SkipLayerNormalization"] == 2 * config["num_hidden_layers"]
    assert not any(count[op] for op in ("Attention", "MultiHeadAttention", "Softmax", "ReduceMean"))
    names = {i.name for i in proto.graph.input} | {o.name for o in proto.graph.output}
    assert {"past_key_values.0.key", "present.0.value", "logits"} <= names


def test_manifest_and_genai_config(fp32_export, source_dir):
    config = json.loads((source_dir / "config.json").read_text())
    manifest = artifact.verify(fp32_export)  # every file listed and checksummed
    assert (manifest.kind, manifest.method, manifest.bits, manifest.group_size) == ("onnx", "onnx-fp32", 32, None)
    assert manifest.params["graph"]["local_window_size"] == config["sliding_window"]
    assert manifest.params["dtype"] == "fp32" and manifest.params["weights"] == "fp"
    genai = json.loads((fp32_export / "genai_config.json").read_text())
    assert genai["model"]["type"] == "decoder"
    cos = next(i for i in load_proto(fp32_export).graph.initializer if i.name == "cos_cache")
    assert genai["model"]["context_length"] == cos.dims[0] == config["max_position_embeddings"]
    assert (fp32_export / "tokenizer.json").is_file()


# --- parity with PyTorch (fp32) --------------------------------------------------------------


def test_a_short_prompt(engine, torch_model):
    ids = code_tokens(engine.tokenizer, 12)
    err = max_err(engine.logits(torch.tensor([ids]))[0], torch_logits(torch_model, ids))
    print(f"(a) short prompt, 12 tokens: max |dlogit| = {err:.2e}")
    assert err < FP32_TOL


def test_b_prompt_longer_than_the_window(engine, torch_model, source_dir):
    n = 2 * window(torch_model) + 40
    ids = code_tokens(engine.tokenizer, n)
    got = engine.logits(torch.tensor([ids]))[0]
    err = max_err(got, torch_logits(torch_model, ids))
    print(f"(b) prompt of {n} tokens, window {window(torch_model)}: max |dlogit| = {err:.2e}")
    assert err < FP32_TOL
    # The test can tell a dropped window: the same model without one gives other logits.
    from transformers import AutoModelForCausalLM

    unwindowed = AutoModelForCausalLM.from_pretrained(str(source_dir), dtype=torch.float32, sliding_window=None)
    assert max_err(got, torch_logits(unwindowed.eval(), ids)) > 100 * FP32_TOL


def test_c_decode_50_steps_across_the_window(engine, torch_model):
    ids = code_tokens(engine.tokenizer, window(torch_model) - 8, offset=100)
    state, last = engine.start([ids])
    errors = [max_err(last[0], torch_logits(torch_model, ids)[-1])]
    for _ in range(50):
        ids.append(int(last[0].argmax()))
        last = engine.step(state, torch.tensor([ids[-1]]))
        errors.append(max_err(last[0], torch_logits(torch_model, ids)[-1]))
    print(f"(c) prompt {len(ids) - 50} + 50 steps (window {window(torch_model)}): max |dlogit| = {max(errors):.2e}")
    assert len(ids) > window(torch_model) + 30
    assert max(errors) < FP32_TOL


def test_d_batch_of_two_prompts_of_different_lengths(engine, torch_model):
    long = code_tokens(engine.tokenizer, window(torch_model) + 40)
    short = code_tokens(engine.tokenizer, 9, offset=500)
    # Full forward of a right-padded batch.
    ids = torch.zeros((2, len(long)), dtype=torch.long)
    ids[0], ids[1, : len(short)] = torch.tensor(long), torch.tensor(short)
    mask = (torch.arange(len(long)) < torch.tensor([[len(long)], [len(short)]])).long()
    full = engine.logits(ids, mask)
    errors = [max_err(full[0], torch_logits(torch_model, long)),
              max_err(full[1, : len(short)], torch_logits(torch_model, short))]
    # Prefill both, then decode 20 tokens per row through the shared cache.
    state, last = engine.start([list(long), list(short)])
    rows = [list(long), list(short)]
    for _ in range(20):
        for row, seq in enumerate(rows):
            errors.append(max_err(last[row], torch_logits(torch_model, seq)[-1]))
            seq.append(int(last[row].argmax()))
        last = engine.step(state, torch.tensor([rows[0][-1], rows[1][-1]]))
    print(f"(d) batch of {len(long)} and {len(short)} tokens + 20 steps: max |dlogit| = {max(errors):.2e}")
    assert max(errors) < FP32_TOL


def test_runs_in_onnxruntime_genai(fp32_export, torch_model, engine):
    import onnxruntime_genai as og

    prompt = code_tokens(engine.tokenizer, window(torch_model) + 5)
    model = og.Model(str(fp32_export))
    text = "def add(a, b):\n    return a + b  # 123\n"
    assert [int(t) for t in og.Tokenizer(model).encode(text)] == engine.tokenizer(text).input_ids
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 20, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    generated = []
    while not generator.is_done():
        generator.generate_next_token()
        generated.append(int(generator.get_next_tokens()[0]))
    ids, expected = list(prompt), []
    for _ in generated:  # PyTorch greedy, one full forward per token
        expected.append(int(torch_logits(torch_model, ids)[-1].argmax()))
        ids.append(expected[-1])
    assert generated == expected


def test_engine_tokenizer_matches_the_source(engine, source_dir):
    from transformers import AutoTokenizer

    text = "def add(a, b):\n    return a + b\n"
    assert engine.tokenizer(text).input_ids == AutoTokenizer.from_pretrained(str(source_dir))(text).input_ids


def test_engine_refuses_what_the_graph_would_get_wrong(tiny_fp32_export):
    from sc2quant.runtime.engines import EngineOptions
    from sc2quant.runtime.engines.onnx_engine import OnnxEngine

    engine = OnnxEngine(tiny_fp32_export, EngineOptions())
    with pytest.raises(UserError, match="context length"):
        engine.logits(torch.zeros((1, engine.context_length + 1), dtype=torch.long))
    with pytest.raises(UserError, match="right-padded"):
        engine.logits(torch.zeros((2, 4), dtype=torch.long), torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]))
    with pytest.raises(UserError, match="unknown device"):
        OnnxEngine(tiny_fp32_export, EngineOptions(device="tpu"))


# --- fp16 -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp16_export(source_dir, tmp_path_factory) -> Path:
    return export_onnx(source_dir, tmp_path_factory.mktemp("fp16") / "onnx", dtype="fp16")


def test_fp16_keeps_gqa_with_the_window_and_runs_on_cpu(fp16_export, torch_model, source_dir):
    """fp16 graphs keep GroupQueryAttention and the window (the builder would fall back to an
    attention op without it); ONNX Runtime 1.32 runs them on the CPU EP too."""
    from onnx import TensorProto

    from sc2quant.runtime.engines import EngineOptions
    from sc2quant.runtime.engines.onnx_engine import OnnxEngine

    proto = load_proto(fp16_export)
    config = json.loads((source_dir / "config.json").read_text())
    gqa = [attrs(n) for n in proto.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == config["num_hidden_layers"]
    assert all(a["local_window_size"] == config["sliding_window"] and a["do_rotary"] == 1 for a in gqa)
    assert proto.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    engine = OnnxEngine(fp16_export, EngineOptions())
    ids = code_tokens(engine.tokenizer, 2 * window(torch_model) + 40)
    ref = torch_logits(torch_model, ids)
    err = max_err(engine.logits(torch.tensor([ids]))[0], ref)
    tol = 2e-3 * max(1.0, ref.abs().max().item())  # stated fp16 tolerance: 0.2 % of the logit range
    print(f"fp16 on the CPU EP, {len(ids)} tokens: max |dlogit| = {err:.2e} (tolerance {tol:.2e})")
    assert err < tol


def test_cuda_export_keeps_gqa_and_names_the_cuda_provider(tiny_dir, tmp_path):
    """Built here without a GPU (the graph does not need one to be written); not run on CUDA."""
    out = export_onnx(tiny_dir, tmp_path / "cuda", dtype="fp16", device="cuda")
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["session_options"]["provider_options"][0].keys() == {"cuda"}
    facts = artifact.read_manifest(out).params["graph"]
    assert facts["attention"] == "GroupQueryAttention" and facts["local_window_size"] == 16
    assert facts["io_dtype"] == "float16"

