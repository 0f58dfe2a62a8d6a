"""The footprint predictor against real tensors: every predicted byte is measured on a model."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import replace
from pathlib import Path

import pytest

from sc2quant import footprint as fp
from sc2quant.core.errors import UserError
from tests.conftest import make_random_model

# hidden 192 / 6 heads: q_proj has 576 absmax blocks, so nested double-quant blocks do not divide evenly
SMALL = {"hidden": 192, "layers": 2, "heads": 6, "kv_heads": 2, "intermediate": 768, "sliding_window": 16}


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory, tokenizer) -> Path:
    return make_random_model(tmp_path_factory.mktemp("footprint") / "model", tokenizer=tokenizer, **SMALL)


@pytest.fixture(scope="module")
def small_shape(small_dir) -> fp.Shape:
    return fp.resolve_shape(small_dir)


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (tied or shared tensors counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def resident_tensors(model):
    """Every tensor the loaded model holds: parameters, buffers and bnb's quantization state."""
    yield from model.parameters()
    yield from model.buffers()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        qs = getattr(weight, "quant_state", None)
        if qs is not None:
            yield from (qs.absmax, qs.code)
            if qs.nested:
                yield from (qs.offset, qs.state2.absmax, qs.state2.code)
        for name in ("SCB", "CB"):
            if getattr(weight, name, None) is not None:
                yield getattr(weight, name)


def safetensors_data_bytes(directory: Path) -> int:
    total = 0
    for f in directory.glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        total += max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    return total


# ---------------------------------------------------------------- shapes and counts


@pytest.mark.parametrize(
    ("name", "p", "q"),
    [
        ("3b", 3_030_371_328, 2_878_341_120),
        ("7b", 7_173_923_840, 6_945_767_424),
        ("15b", 15_957_889_024, 15_351_152_640),
    ],
)
def test_presets_give_the_notes_parameter_counts(name: str, p: int, q: int) -> None:
    c = fp.counts(fp.PRESETS[name])
    assert (c.p, c.q) == (p, q)


def test_15b_tied_count() -> None:
    assert fp.counts(replace(fp.PRESETS["15b"], tied=True)).p == 15_655_899_136


@pytest.mark.parametrize("name", ["3b", "7b", "15b"])
def test_counts_match_real_modules_on_meta(name: str) -> None:
    import torch
    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    s = fp.PRESETS[name]
    config = Starcoder2Config(hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
                              num_key_value_heads=s.kv_heads, intermediate_size=s.intermediate, vocab_size=s.vocab,
                              tie_word_embeddings=s.tied, max_position_embeddings=s.context,
                              sliding_window=s.sliding_window)
    with torch.device("meta"):
        model = Starcoder2ForCausalLM(config)
    p = sum(t.numel() for t in model.parameters())  # parameters() yields a tied weight once
    q = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    c = fp.counts(s)
    assert (c.p, c.q) == (p, q)
    assert fp.rotary_buffer_bytes(s) == buffers


def test_config_defaults_are_transformers_defaults() -> None:
    from transformers import Starcoder2Config

    default = Starcoder2Config()
    assert {k: getattr(default, k) for k in fp.CONFIG_DEFAULTS} == fp.CONFIG_DEFAULTS


def test_shape_from_directory_and_config_file(tiny_model_dir: Path) -> None:
    from_dir = fp.resolve_shape(tiny_model_dir)
    from_file = fp.resolve_shape(tiny_model_dir / "config.json")
    assert (from_dir.hidden, from_dir.layers, from_dir.heads, from_dir.kv_heads) == (64, 2, 4, 2)
    assert (from_dir.intermediate, from_dir.context, from_dir.sliding_window, from_dir.tied) == (256, 256, 16, True)
    assert replace(from_file, name="") == replace(from_dir, name="")


def test_bad_shapes_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown shape 'nope'"):
        fp.resolve_shape("nope")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="not StarCoder2"):
        fp.resolve_shape(tmp_path)
    with pytest.raises(UserError, match="unknown method"):
        fp.predict("7b", ["int3"])


# ---------------------------------------------------------------- the model card


def test_legacy_card_reproduces_the_7b_model_card_to_the_cent() -> None:
    rows = {r.method: r for r in fp.legacy_card("7b")}
    assert {k: round(r.card_era_bytes / fp.MB, 2) for k, r in rows.items()} == fp.CARD_7B_MB
    assert rows["int4"].card_era_bytes == 4_197_640_192
    # today's transformers: no per-layer cos/sin caches
    assert round(rows["int8"].today_bytes / fp.MB, 2) == 7402.08
    assert round(rows["int4"].today_bytes / fp.MB, 2) == 3929.20
    assert rows["bf16"].card_era_bytes - rows["bf16"].today_bytes == 32 * 2 * 16384 * 128 * 2 + 32 * 64 * 4 - 512


def test_absmax_overhead_of_7b_matches_the_notes() -> None:
    rows = {r.method: r for r in fp.predict("7b", ["bnb-nf4", "bnb-nf4-dq"])}
    assert round(rows["bnb-nf4"].parts["absmax"] / fp.MB) == 434
    assert round(rows["bnb-nf4-dq"].parts["absmax"] / fp.MB) == 110


# ---------------------------------------------------------------- measured: transformers


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_float_model_bytes_are_measured_exactly(small_dir: Path, small_shape: fp.Shape, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(small_dir, dtype=torch_dtype, device_map="cpu")
    row = fp.predict_method(small_shape, dtype)
    assert row.weight_bytes == sum(p.numel() * p.element_size() for p in model.parameters())
    assert row.resident_bytes == storage_bytes(resident_tensors(model)) == model.get_memory_footprint()
    if dtype == "bf16":  # the fixture was saved in bf16
        assert row.saved_bytes == safetensors_data_bytes(small_dir)


BNB = ["bnb-int8", "bnb-nf4", "bnb-nf4-dq", "bnb-fp4", "bnb-fp4-dq"]


def bnb_config(method: str):
    from transformers import BitsAndBytesConfig

    if method == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method.split("-")[1],
                              bnb_4bit_use_double_quant=method.endswith("-dq"))


def offset_text_correction(model, quant_type: str) -> int:
    """Bytes by which the real nested-offset JSON differs from the predictor's assumed text."""
    diff = 0
    for module in model.modules():
        qs = getattr(getattr(module, "weight", None), "quant_state", None)
        if qs is not None:
            out, inp = qs.shape
            real = fp.bnb_quant_state_json(out, inp, quant_type, True, offset=qs.offset.item())
            diff += len(real) - len(fp.bnb_quant_state_json(out, inp, quant_type, True))
    return diff


@pytest.mark.slow
@pytest.mark.parametrize("method", BNB)
def test_bnb_bytes_are_measured_exactly(small_dir: Path, small_shape: fp.Shape, method: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from sc2quant.core.console import quiet_libraries

    quiet_libraries()
    model = AutoModelForCausalLM.from_pretrained(small_dir, quantization_config=bnb_config(method), device_map="cpu")
    row = fp.predict_method(small_shape, method)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())

    assert row.weight_bytes + buffers == model.get_memory_footprint()  # what transformers reports
    assert row.resident_bytes == storage_bytes(resident_tensors(model))  # what is really held
    state = model.state_dict()
    packed = {k: v for k, v in state.items() if ".quant_state.bitsandbytes__" in k}
    for key, blob in packed.items():  # the JSON inside the uint8 tensor, byte for byte
        qs = model.get_submodule(key.split(".weight.quant_state")[0]).weight.quant_state
        offset = qs.offset.item() if qs.nested else None
        assert bytes(blob.tolist()) == fp.bnb_quant_state_json(*qs.shape, qs.quant_type, qs.nested, offset=offset)
    correction = offset_text_correction(model, method.split("-")[1]) if method.endswith("-dq") else 0
    assert row.saved_exact == (not method.endswith("-dq"))
    assert row.saved_bytes + correction == storage_bytes(state.values())
    model.save_pretrained(tmp_path)  # before any forward (see the notes' AVX512-BF16 repacking bug)
    assert row.saved_bytes + correction == safetensors_data_bytes(tmp_path)


# ---------------------------------------------------------------- measured: GPTQ and ONNX layouts


@pytest.mark.slow
def test_gptq_layer_bytes_match_gptqmodel_buffers(monkeypatch) -> None:
    import torch

    monkeypatch.setenv("HF_HOME", os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface")))
    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    for bits in (4, 8):
        for group in (32, 128, -1):
            for out, inp in ((192, 768), (768, 256), (64, 192)):
                if group != -1 and inp % group:
                    continue
                layer = TorchLinear(bits=bits, group_size=group, sym=True, desc_act=False, in_features=inp,
                                    out_features=out, bias=True, register_buffers=True, pack_dtype=torch.int32)
                buffers = dict(layer.named_buffers())
                assert buffers["bias"].dtype == torch.float16 and buffers["bias"].numel() == out
                measured = {
                    "quantized weights": buffers["qweight"].nbytes,
                    "zeros": buffers["qzeros"].nbytes,
                    "scales": buffers["scales"].nbytes,
                    "g_idx": buffers["g_idx"].nbytes,
                }
                assert fp.gptq_layer_bytes(out, inp, bits, group) == measured, (bits, group, out, inp)


@pytest.mark.parametrize("float_type", ["fp32", "fp16"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_matmul_nbits_bytes_match_onnxruntime_quantizer(float_type: str, symmetric: bool) -> None:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    elem, np_type, size = {"fp32": (TensorProto.FLOAT, np.float32, 4), "fp16": (TensorProto.FLOAT16, np.float16, 2)}[
        float_type]
    rng = np.random.default_rng(0)
    for k, n, block in ((192, 80, 128), (192, 80, 32), (256, 64, 128), (200, 48, 32)):
        weight = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np_type), "W")
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", elem, [1, k])],
                                  [helper.make_tensor_value_info("y", elem, [1, n])], [weight])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        quantizer = MatMulNBitsQuantizer(model, algo_config=DefaultWeightOnlyQuantConfig(block_size=block,
                                                                                         is_symmetric=symmetric))
        quantizer.process()
        inits = {i.name: numpy_helper.to_array(i).nbytes for i in quantizer.model.model.graph.initializer}
        measured = {"quantized weights": inits.pop("W_Q4"), "scales": inits.pop("W_scales")}
        if "W_zero_points" in inits:
            measured["zeros"] = inits.pop("W_zero_points")
        assert not inits
        assert fp.matmul_nbits_bytes(n, k, block, symmetric, size) == measured, (k, n, block)


# ---------------------------------------------------------------- measured: KV cache


@pytest.mark.parametrize(("prompt", "steps"), [(40, 3), (8, 2), (15, 1)])
def test_transformers_kv_cache_keeps_the_window(small_dir: Path, small_shape: fp.Shape, prompt: int,
                                                steps: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(small_dir, dtype=torch.bfloat16, device_map="cpu")
    ids = torch.randint(0, small_shape.vocab, (2, prompt), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        for _ in range(steps):
            cache = model(ids[:, -1:], past_key_values=cache, use_cache=True).past_key_values
    measured = storage_bytes(t for layer in cache.layers for t in (layer.keys, layer.values))
    context = prompt + steps
    assert measured == fp.kv_cache_bytes(small_shape, context, batch=2, dtype_bytes=2, windowed=True)
    if context > small_shape.sliding_window:
        assert measured < fp.kv_cache_bytes(small_shape, context, batch=2, dtype_bytes=2, windowed=False)


def test_kv_cache_arithmetic_7b() -> None:
    s = fp.PRESETS["7b"]
    # 2 (k, v) * 32 layers * 4 kv heads * 128 dims * 16384 tokens * 2 bytes
    assert fp.kv_cache_bytes(s, 16384, 1, 2) == 1_073_741_824
    assert fp.kv_cache_bytes(s, 16384, 3, 2, windowed=True) == 3 * 268_435_456
    assert fp.kv_cache_bytes(s, 1000, 1, 2, windowed=True) == fp.kv_cache_bytes(s, 1000, 1, 2)


# ---------------------------------------------------------------- the command line


def invoke(*args: str):
    from typer.testing import CliRunner

    from sc2quant.cli import app

    return CliRunner().invoke(app, ["footprint", *args], env={"COLUMNS": "200"})


def test_cli_table_shows_methods_and_kv_rows() -> None:
    result = invoke("--shape", "7b", "--context", "8192", "--batch", "2")
    assert result.exit_code == 0, result.output
    for text in ("bnb-nf4-dq", "gptq-int4-g128", "onnx-int4-b32", "14347.85", "transformers 5.x DynamicCache",
                 "8192"):
        assert text in result.output


def test_cli_legacy_card_shows_the_card_and_the_reason() -> None:
    result = invoke("--legacy-card")
    assert result.exit_code == 0, result.output
    for text in ("29232.57", "14616.29", "7670.52", "4197.64", "7402.08", "3929.20", "cos"):
        assert text in result.output


def test_cli_json() -> None:
    result = invoke("--shape", "15b", "--json", "--legacy-card")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["parameters"]["P"] == 15_957_889_024
    bf16 = next(r for r in data["methods"] if r["method"] == "bf16")
    assert bf16["weight_bytes"] == 2 * 15_957_889_024
    assert data["kv_cache"]["context"] == 16384
    assert len(data["legacy_card"]["rows"]) == 4


@pytest.mark.parametrize(("args", "word"), [(("--shape", "20b"), "20b"), (("--context", "0"), "--context")])
def test_cli_bad_input_exits_2_with_one_line(args: tuple[str, ...], word: str) -> None:
    result = invoke(*args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and word in lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("lm_head,name", [("int8", "onnx-int4-b128-sym-lm8"), ("int4", "onnx-int4-b128-sym"),
                                          ("float", "onnx-int4-b128-sym-lmf")])
def test_onnx_int4_rows_count_every_initializer_of_a_real_export(embedded_model_dir, tmp_path, lm_head, name):
    """Whole graphs, byte for byte: the int4 body, the lm_head at its precision, the tied embedding
    (shared with an int4/int8 head, stored once in float), the rotary tables."""
    import onnx
    from onnx import numpy_helper

    from sc2quant.core.hf import read_config
    from sc2quant.export.onnx import export_onnx

    out = export_onnx(None, tmp_path / "onnx", weights="int4", lm_head=lm_head)
    proto = onnx.load(str(out / "model.onnx"))
    stored = sum(numpy_helper.to_array(i).nbytes for i in proto.graph.initializer)
    row = fp.predict_method(fp.shape_from_config(read_config(embedded_model_dir)), name)
    assert (row.method, row.saved_bytes) == (name, stored)
