"""`sc2quant export onnx`: graph structure, parity with PyTorch, int4, GPTQ carry-over, errors."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sc2quant.core import artifact
from sc2quant.core.errors import UserError
from sc2quant.core.files import dir_bytes
from sc2quant.export.onnx import export_onnx
from tests.conftest import make_random_model

REPO = Path(__file__).resolve().parents[2]
FP32_TOL = 1e-4


# --- models and exports shared by the tests -------------------------------------------------


def perturb_vectors(path: Path, seed: int = 1) -> Path:
    """Non-zero biases and LayerNorm parameters: the random init leaves them 0 and 1, which
    would let an exporter that drops them pass."""
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(seed)
    file = path / "model.safetensors"
    weights = load_file(file)
    for name, value in weights.items():
        if value.dim() == 1:
            weights[name] = (value.float() + 0.1 * torch.randn(value.shape, generator=gen)).to(value.dtype)
    save_file(weights, file, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer) -> Path:
    """2 layers, hidden 64, 4 heads (head_dim 16) / 2 KV heads, window 16, context 256, with biases."""
    return perturb_vectors(make_random_model(tmp_path_factory.mktemp("onnx-src") / "model", tokenizer=tokenizer))


@pytest.fixture(scope="module", params=["tiny", "embedded"])
def source_dir(request, tiny_dir) -> Path:
    return tiny_dir if request.param == "tiny" else request.getfixturevalue("embedded_model_dir")


@pytest.fixture(scope="module")
def fp32_export(source_dir, tmp_path_factory) -> Path:
    return export_onnx(source_dir, tmp_path_factory.mktemp("fp32") / "onnx")


@pytest.fixture(scope="module")
def tiny_fp32_export(tiny_dir, tmp_path_factory) -> Path:
    return export_onnx(tiny_dir, tmp_path_factory.mktemp("tiny-fp32") / "onnx")


@pytest.fixture(scope="module")
def torch_model(source_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(source_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(fp32_export):
    from sc2quant.runtime.engines import EngineOptions
    from sc2quant.runtime.engines.onnx_engine import OnnxEngine

    return OnnxEngine(fp32_export, EngineOptions())


def code_tokens(tokenizer, n: int, offset: int = 0) -> list[int]:
    """Real code (this repository) as token ids, repeated if needed."""
    text = "\n".join(p.read_text() for p in sorted((REPO / "sc2quant").rglob("*.py")))
    ids = tokenizer(text, verbose=False).input_ids[offset:]
    return (ids * (n // max(len(ids), 1) + 1))[:n]


@torch.inference_mode()
def torch_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].float()


def window(model) -> int:
    return int(model.config.sliding_window)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def load_proto(path: Path):
    import onnx

    return onnx.load(str(path / "model.onnx"), load_external_data=False)


def attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def ops(proto) -> dict[str, int]:
    from collections import Counter

    return Counter(n.op_type for n in proto.graph.node)


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


# --- int4 -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def int4_exports(tiny_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("int4")
    return {
        "g32": export_onnx(tiny_dir, root / "g32", weights="int4", block_size=32, lm_head="int4"),
        "g128": export_onnx(tiny_dir, root / "g128", weights="int4", block_size=128, lm_head="int4"),
        "g32-asym": export_onnx(tiny_dir, root / "g32-asym", weights="int4", block_size=32, symmetric=False,
                                lm_head="int4"),
    }


def relative_error(path: Path, torch_model_dir: Path, ids: list[int]) -> float:
    from transformers import AutoModelForCausalLM

    from sc2quant.runtime.engines import EngineOptions
    from sc2quant.runtime.engines.onnx_engine import OnnxEngine

    ref = torch_logits(AutoModelForCausalLM.from_pretrained(str(torch_model_dir), dtype=torch.float32).eval(), ids)
    got = OnnxEngine(path, EngineOptions()).logits(torch.tensor([ids]))[0]
    return ((got - ref).norm() / ref.norm()).item()


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


# --- GPTQ -> ONNX -------------------------------------------------------------------------------


@contextlib.contextmanager
def gptqmodel_env(workdir: Path):
    """Importing gptqmodel points HF_HOME at /tmp (via tokenicer), it needs 2 CPU workers here,
    and it writes logs/ into the working directory: keep all three away from the user's."""
    saved, cwd = os.environ.get("HF_HOME"), Path.cwd()
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    os.chdir(workdir)
    try:
        import gptqmodel  # noqa: F401

        yield
    finally:
        os.chdir(cwd)
        if saved is None:
            os.environ.pop("HF_HOME", None)
        else:
            os.environ["HF_HOME"] = saved


@pytest.fixture(scope="module")
def gptq_dir(tiny_dir, tmp_path_factory) -> Path:
    """A GPTQ v1 checkpoint (4 bit, group 32, symmetric) of the tiny model, made by GPTQModel."""
    out = tmp_path_factory.mktemp("gptq") / "model"
    with gptqmodel_env(out.parent):
        from gptqmodel import GPTQModel, QuantizeConfig

        gen = torch.Generator().manual_seed(0)
        calib = [torch.randint(0, 500, (64,), generator=gen).tolist() for _ in range(16)]
        model = GPTQModel.load(str(tiny_dir), QuantizeConfig(bits=4, group_size=32, desc_act=False, sym=True),
                               device="cpu")
        model.quantize([{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in calib], batch_size=8)
        model.save(str(out))
    return out


@pytest.fixture(scope="module")
def gptq_export(gptq_dir, tmp_path_factory) -> Path:
    """The GPTQ model exactly: its integers carried over, its float lm_head kept (as `run` converts it)."""
    return export_onnx(gptq_dir, tmp_path_factory.mktemp("gptq-onnx") / "onnx", lm_head="float")


def nibbles(packed: np.ndarray) -> np.ndarray:
    """uint8 bytes -> 4-bit values, low nibble first (MatMulNBits' order)."""
    packed = packed.astype(np.uint8)
    return np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


def test_gptq_integers_scales_and_zeros_are_carried_exactly(gptq_dir, gptq_export):
    import onnx
    from onnx import numpy_helper
    from safetensors.torch import load_file

    from sc2quant.quant.gptq_format import unpack_cols, unpack_rows

    gptq = load_file(str(gptq_dir / "model.safetensors"))
    proto = onnx.load(str(gptq_export / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    node = next(n for n in proto.graph.node if n.name == "/model/layers.1/mlp/fc1/MatMulNBits")
    qweight, scales, zeros = (inits[name] for name in node.input[1:4])
    prefix = "model.layers.1.mlp.c_fc."
    q = unpack_rows(gptq[prefix + "qweight"], 4).numpy()  # [K, N]
    k, n = q.shape
    assert np.array_equal(nibbles(qweight).reshape(n, -1)[:, :k], q.T)
    groups = gptq[prefix + "scales"].shape[0]
    assert np.array_equal(scales.reshape(n, groups), gptq[prefix + "scales"].float().numpy().T)
    z = unpack_cols(gptq[prefix + "qzeros"], 4).numpy() + 1  # v1 stores zero - 1
    assert np.array_equal(nibbles(zeros.reshape(n, -1))[:, :groups], z.T)
    assert attrs(node)["block_size"] == 32


def test_gptq_graph_keeps_lm_head_float_and_stored_once(gptq_export, gptq_dir):
    config = json.loads((gptq_dir / "config.json").read_text())
    proto = load_proto(gptq_export)
    count = ops(proto)
    assert count["MatMulNBits"] == 4 * config["num_hidden_layers"] and count["MatMul"] == 1  # lm_head
    assert count["GroupQueryAttention"] == config["num_hidden_layers"]
    big = [i.name for i in proto.graph.initializer if sorted(i.dims) == sorted([config["vocab_size"], 64])]
    assert big == ["lm_head.MatMul.weight"]  # the embedding Gathers from its transpose
    manifest = artifact.read_manifest(gptq_export)
    assert manifest.group_size == 32 and manifest.params["from_gptq"]["group_size"] == 32


def test_gptq_onnx_logits_match_the_gptq_model(gptq_dir, gptq_export, tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from sc2quant.runtime.engines import EngineOptions
    from sc2quant.runtime.engines.onnx_engine import OnnxEngine

    engine = OnnxEngine(gptq_export, EngineOptions())
    ids = code_tokens(engine.tokenizer, 70)
    with gptqmodel_env(tmp_path):
        gptq_model = AutoModelForCausalLM.from_pretrained(str(gptq_dir), device_map="cpu", dtype=torch.float32)
        ref = torch_logits(gptq_model.eval(), ids)
    fp = torch_logits(AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32).eval(), ids)
    got = engine.logits(torch.tensor([ids]))[0]
    err = ((got - ref).norm() / ref.norm()).item()
    quant_err = ((ref - fp).norm() / fp.norm()).item()
    print(f"GPTQ -> ONNX vs the GPTQ model: max |dlogit| = {max_err(got, ref):.2e}, relative {err:.4f} "
          f"(GPTQ vs fp32: relative {quant_err:.4f})")
    assert err < 0.02 and err < 0.5 * quant_err  # measured 0.0075 vs 0.04: int8 activations (accuracy_level 4)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_embedded_gptq_artifact_to_onnx(gptq_artifact, embedded_model_dir, tmp_path):
    """An sc2quant GPTQ artifact (embedded model, g128) exported and compared past the window."""
    from transformers import AutoModelForCausalLM

    from sc2quant.runtime.engines import EngineOptions
    from sc2quant.runtime.engines.onnx_engine import OnnxEngine

    out = export_onnx(gptq_artifact, tmp_path / "onnx")
    manifest = artifact.read_manifest(out)
    assert manifest.source["manifest"]["kind"] == "gptq" and manifest.group_size == 128
    engine = OnnxEngine(out, EngineOptions())
    config = json.loads((embedded_model_dir / "config.json").read_text())
    ids = code_tokens(engine.tokenizer, config["sliding_window"] + 100)
    with gptqmodel_env(tmp_path):
        gptq_model = AutoModelForCausalLM.from_pretrained(str(gptq_artifact), device_map="cpu", dtype=torch.float32)
        ref = torch_logits(gptq_model.eval(), ids)
    got = engine.logits(torch.tensor([ids]))[0]
    err = ((got - ref).norm() / ref.norm()).item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"embedded GPTQ -> ONNX vs the GPTQ model, {len(ids)} tokens: max |dlogit| = {max_err(got, ref):.2e}, "
          f"relative {err:.4f}, top-1 agreement {agree:.3f}")
    assert err < 0.02 and agree > 0.95


def _edit_config(src: Path, dst: Path, **quant) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"].update(quant)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("change,message", [
    ({"desc_act": True}, "act-order"),
    ({"checkpoint_format": "gptq_v2"}, "not GPTQ v1"),
    ({"bits": 8}, "8-bit"),
])
def test_unsupported_gptq_is_refused(gptq_dir, tmp_path, change, message):
    src = _edit_config(gptq_dir, tmp_path / "gptq", **change)
    with pytest.raises(UserError, match=message):
        export_onnx(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gptq_with_reordered_groups_is_refused(gptq_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    src = shutil.copytree(gptq_dir, tmp_path / "gptq")
    weights = load_file(src / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.g_idx"
    weights[name] = weights[name].flip(0).contiguous()
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="act-order"):
        export_onnx(src, tmp_path / "out")


# --- refusals: nothing is written ------------------------------------------------------------


def assert_nothing_written(parent: Path) -> None:
    assert [p.name for p in parent.iterdir()] == [] if parent.exists() else True


@pytest.mark.parametrize("kwargs,message", [
    ({"dtype": "fp8"}, "unknown dtype"),
    ({"dtype": "bf16"}, "bf16 ONNX graphs do not run on ONNX Runtime's CPU"),
    ({"weights": "int3"}, "unknown weights"),
    ({"weights": "int4", "block_size": 48}, "block size 48"),
    ({"device": "tpu"}, "unknown device"),
    ({"device": "cuda", "dtype": "fp32"}, "needs fp16"),
])
def test_bad_options_are_user_errors(tiny_dir, tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message):
        export_onnx(tiny_dir, tmp_path / "out" / "onnx", **kwargs)
    assert_nothing_written(tmp_path / "out")


def test_bnb_artifact_is_refused_with_a_pointer_to_gptq(tiny_dir, tmp_path):
    src = shutil.copytree(tiny_dir, tmp_path / "bnb")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="bitsandbytes.*GPTQ"):
        export_onnx(src, tmp_path / "out" / "onnx")
    assert_nothing_written(tmp_path / "out")


def test_unfused_attention_is_refused_and_nothing_written(tiny_dir, tmp_path, monkeypatch):
    from sc2quant.export import onnx_builder

    # What the builder does on its own for some dtypes/EPs: plain attention without the window.
    monkeypatch.setattr(onnx_builder.StarCoder2Model, "is_gqa_supported", lambda self: False)
    with pytest.raises(UserError, match="attention"):
        export_onnx(tiny_dir, tmp_path / "out" / "onnx")
    assert_nothing_written(tmp_path / "out")


def test_wrong_window_is_refused(tiny_dir, tmp_path, monkeypatch):
    from sc2quant.export import onnx_builder

    original = onnx_builder.StarCoder2Model.make_context_length_init

    def off_by_one(self, config):
        original(self, config)
        self.window_size += 1

    monkeypatch.setattr(onnx_builder.StarCoder2Model, "make_context_length_init", off_by_one)
    with pytest.raises(UserError, match="local_window_size=17, the model's sliding_window is 16"):
        export_onnx(tiny_dir, tmp_path / "out" / "onnx")
    assert_nothing_written(tmp_path / "out")


def test_check_graph_catches_a_missing_window(tiny_fp32_export, tiny_dir):
    from sc2quant.export.onnx_graph import check_graph

    config = json.loads((tiny_dir / "config.json").read_text())
    proto = load_proto(tiny_fp32_export)
    assert check_graph(proto, config)["local_window_size"] == 16
    for node in proto.graph.node:
        if node.op_type == "GroupQueryAttention":
            for a in node.attribute:
                if a.name == "local_window_size":
                    a.i = -1
    with pytest.raises(UserError, match="local_window_size=-1"):
        check_graph(proto, config)


def test_model_without_window_exports_minus_one(tmp_path, tokenizer):
    src = make_random_model(tmp_path / "nowin", sliding_window=None, tokenizer=tokenizer)
    out = export_onnx(src, tmp_path / "onnx")
    assert artifact.read_manifest(out).params["graph"]["local_window_size"] == -1


def test_config_without_architectures_exports(tiny_dir, tmp_path):
    src = shutil.copytree(tiny_dir, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    del config["architectures"]  # optional: model_type says what the model is
    (src / "config.json").write_text(json.dumps(config))
    assert export_onnx(src, tmp_path / "onnx", weights="int4").is_dir()


def test_existing_output_needs_force(tiny_fp32_export, tiny_dir):
    with pytest.raises(UserError, match="already exists"):
        export_onnx(tiny_dir, tiny_fp32_export)


def test_onnx_artifact_is_not_exported_again(tiny_fp32_export, tmp_path):
    with pytest.raises(UserError):
        export_onnx(tiny_fp32_export, tmp_path / "again")


def test_default_output_path(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = export_onnx(tiny_dir, weights="int4")
    assert out == Path("out") / "model-onnx-int4" and (tmp_path / out / "model.onnx").is_file()


def test_cli(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from sc2quant.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["export", "onnx", str(tiny_dir), "--weights", "int4", "--block-size", "64",
                                 "--asymmetric", "--out", str(tmp_path / "cli"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["method"] == "onnx-int4" and data["group_size"] == 64 and data["params"]["symmetric"] is False
    result = runner.invoke(app, ["export", "onnx", str(tiny_dir), "--dtype", "bf16", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "bf16" in result.output
    assert not (tmp_path / "x").exists()


def test_int8_lm_head_drifts_less_than_int4(onnx_int4_artifact, artifacts_dir, eval_sets_small, baseline_logits_fn):
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
    assert dir_bytes(out) < dir_bytes(onnx_int4_artifact) * 1.6  # not the fp32 embedding of before (2.9x)
    kl8 = compare(eval_sets_small, load(out).logits, baseline_logits_fn)["all"]["kl_mean"]
    kl4 = compare(eval_sets_small, load(onnx_int4_artifact).logits, baseline_logits_fn)["all"]["kl_mean"]
    assert kl8 < 0.5 * kl4, (kl8, kl4)  # measured 8.6e-4 vs 3.8e-3


@pytest.mark.parametrize("args,message", [
    (["--lm-head", "int8"], "--lm-head does not apply to a float export"),
    (["--weights", "int4", "--lm-head", "int2"], "unknown --lm-head"),
])
def test_lm_head_option_errors(tiny_dir, tmp_path, args, message):
    from typer.testing import CliRunner

    from sc2quant.cli import app

    result = CliRunner().invoke(app, ["export", "onnx", str(tiny_dir), "--out", str(tmp_path / "x"), *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "x").exists()


def test_recipes_are_valid_options():
    import inspect

    import yaml

    names = set(inspect.signature(export_onnx).parameters)
    for recipe in ("onnx-int4-cpu", "onnx-fp32-cpu"):
        data = yaml.safe_load((REPO / "recipes" / f"{recipe}.yaml").read_text())
        assert set(data) - {"description"} <= names




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
