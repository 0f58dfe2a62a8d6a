"""GPTQ (GPTQModel) and RTN artifacts: standard GPTQ checkpoints, GPTQ beats RTN, bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from sc2quant.cli import app
from sc2quant.core.artifact import read_manifest
from sc2quant.core.data import calibration_samples
from sc2quant.core.errors import UserError
from sc2quant.evaluate.metrics import compare
from sc2quant.quant.gptq_format import dequantize, quantize_rtn
from sc2quant.runtime import load

runner = CliRunner()


def test_rtn_format_round_trip():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    q = quantize_rtn(w, bits=4, group_size=128, sym=True)
    assert q["qweight"].shape == (32, 64) and q["qweight"].dtype == torch.int32
    assert q["qzeros"].shape == (2, 8) and q["scales"].shape == (2, 64) and q["g_idx"].shape == (256,)
    back = dequantize(q["qweight"], q["qzeros"], q["scales"], q["g_idx"], 4)
    step = q["scales"].float().max()
    assert (back - w).abs().max() <= step / 2 + 1e-6  # error at most half a quantization step
    q8 = quantize_rtn(w, bits=8, group_size=-1, sym=False)
    assert (dequantize(q8["qweight"], q8["qzeros"], q8["scales"], q8["g_idx"], 8) - w).abs().max() < 0.02


@pytest.mark.slow
def test_gptq_checkpoint_is_standard_v1(gptq_artifact):
    cfg = json.loads((gptq_artifact / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["bits"] == 4 and cfg["group_size"] == 128
    assert cfg.get("checkpoint_format", cfg.get("format")) == "gptq"
    with safe_open(str(gptq_artifact / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.layers.0.self_attn.q_proj.qweight").get_dtype() == "I32"
        assert f.get_slice("model.layers.0.self_attn.q_proj.scales").get_dtype() == "F16"
    for suffix in ("qweight", "qzeros", "scales", "g_idx"):
        assert f"model.layers.5.mlp.c_fc.{suffix}" in keys
    assert "model.embed_tokens.weight" in keys  # tied lm_head reads the embedding


@pytest.mark.slow
def test_gptq_manifest(gptq_artifact):
    m = read_manifest(gptq_artifact)
    assert (m.kind, m.method, m.bits, m.group_size) == ("gptq", "gptq", 4, 128)
    calib = m.params["calibration"]
    assert calib["source"] == "calib_data" and calib["samples"] == 64 and calib["seqlen"] == 256
    assert calib["seed"] == 0 and calib["tokens"] == 64 * 256
    assert m.params["peak_rss_bytes"] > 100 * 2**20
    assert len(m.params["layer_errors"]) == 36 and all("loss" in e for e in m.params["layer_errors"])


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["gptq_artifact", "rtn_artifact"])
def test_same_logits_through_sc2quant_and_transformers(request, fixture):
    from transformers import AutoModelForCausalLM

    from sc2quant.formats.gptq import gptqmodel_imported

    path = request.getfixturevalue(fixture)
    ours = load(path, engine="torch")
    ids = torch.tensor([ours.encode("def add(a, b):\n    return a + b\n\nclass Stack:\n    def push(self, x):")])
    with gptqmodel_imported():
        plain = AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu")
    with torch.no_grad():
        assert torch.equal(ours.logits(ids), plain(ids).logits.float())
    lm_head = plain.get_output_embeddings().weight
    assert lm_head.abs().sum() > 0 and lm_head.data_ptr() == plain.get_input_embeddings().weight.data_ptr()


@pytest.mark.slow
def test_gptq_beats_rtn(gptq_artifact, rtn_artifact, eval_sets_small, baseline_logits_fn):
    gptq = compare(eval_sets_small, load(gptq_artifact).logits, baseline_logits_fn)["all"]
    rtn = compare(eval_sets_small, load(rtn_artifact).logits, baseline_logits_fn)["all"]
    print("gptq", gptq, "\nrtn", rtn)
    assert gptq["kl_mean"] < rtn["kl_mean"]
    assert abs(gptq["perplexity_drift_pct"]) < abs(rtn["perplexity_drift_pct"])


def test_importing_gptqmodel_keeps_hf_home(monkeypatch, tmp_path):
    from sc2quant.formats.gptq import gptqmodel_imported

    monkeypatch.delenv("HF_HOME", raising=False)
    with gptqmodel_imported():
        pass
    assert "HF_HOME" not in os.environ
    assert int(os.environ["GPTQMODEL_CPU_WORKERS"]) >= 2


def test_calibration_is_deterministic_and_sized(tokenizer):
    a, desc = calibration_samples(tokenizer, "calib_data", 8, 64, seed=1)
    b, _ = calibration_samples(tokenizer, "calib_data", 8, 64, seed=1)
    c, _ = calibration_samples(tokenizer, "calib_data", 8, 64, seed=2)
    assert a == b and a != c and all(len(s) == 64 for s in a)
    assert desc["tokens"] == 512 and desc["tokens_available"] > 10_000


def test_user_calibration_files(tokenizer, tmp_path):
    (tmp_path / "a.py").write_text("def f(x):\n    return x * 2\n" * 200)
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "int main(void) { return 0; }\n" * 100}) + "\n")
    samples, desc = calibration_samples(tokenizer, [str(tmp_path)], 4, 32)
    assert len(samples) == 4 and desc["documents"] == 2


@pytest.mark.parametrize("content,message", [
    (b"", "has 0 tokens"),
    (b"x = 1\n", "need 4,096"),
    (b"\x00\x01\x02binary", "binary file"),
    (b"caf\xe9 latin-1", "not UTF-8"),
])
def test_bad_calibration_data(tokenizer, tmp_path, content, message):
    f = tmp_path / "calib.txt"
    f.write_bytes(content)
    with pytest.raises(UserError, match=message):
        calibration_samples(tokenizer, [str(f)], 16, 256)


def test_bad_jsonl(tokenizer, tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"content": "x"}\n')
    with pytest.raises(UserError, match="no string 'text' field"):
        calibration_samples(tokenizer, [str(f)], 1, 8)


@pytest.mark.parametrize("args,message", [
    (["--bits", "5"], "GPTQ supports 2, 3, 4, 8 bits"),
    (["--group-size", "48"], "does not divide the input features"),
    (["--group-size", "32", "--calib-seqlen", "4096"], "exceeds the model's context"),
    (["--group-size", "32", "--calib-seqlen", "64", "--calib", "/no/such/file"], "does not exist"),
])
def test_gptq_bad_input_exit_2(tiny_model_dir, tmp_path, args, message):
    out = tmp_path / "out"
    result = runner.invoke(app, ["quantize", str(tiny_model_dir), *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_relative_output_path_and_no_logs_left(tiny_model_dir, tmp_path, monkeypatch):
    """GPTQModel runs in a scratch folder (it writes logs/); a relative --out must still work."""
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["quantize", str(tiny_model_dir), "--group-size", "32", "--calib-samples", "8",
                                 "--calib-seqlen", "64", "--out", "rel/gptq"])
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp_path / "rel" / "gptq").kind == "gptq"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rel"]
