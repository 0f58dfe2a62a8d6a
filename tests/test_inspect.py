"""`sc2quant inspect` on a local directory and an artifact, plus its clear errors."""

from __future__ import annotations

import json
import shutil

from typer.testing import CliRunner

from sc2quant.cli import app

runner = CliRunner()


def test_inspect_local_directory(tiny_model_dir):
    result = runner.invoke(app, ["inspect", str(tiny_model_dir), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    shape = info["shape"]
    assert (shape["layers"], shape["heads"], shape["kv_heads"], shape["hidden"]) == (2, 4, 2, 64)
    assert shape["sliding_window"] == 16 and shape["tied_embeddings"] is True
    assert info["dtype"] == "bfloat16" and info["bytes_on_disk"] > 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    assert info["parameters"] == sum(p.numel() for p in model.parameters())


def test_quantized_and_onnx_artifacts_report_the_models_parameters(embedded_model_dir, gptq_artifact, onnx_int4_artifact):
    from sc2quant.inspect import inspect_model

    expected = inspect_model(embedded_model_dir)["parameters"]
    assert expected > 6_000_000
    for path in (gptq_artifact, onnx_int4_artifact):
        assert inspect_model(path)["parameters"] == expected
    # the graph computes in fp32 whatever the source's config.json says (bf16): found by the red team
    assert inspect_model(onnx_int4_artifact)["dtype"] == "float32"


def test_inspect_table(tiny_model_dir):
    result = runner.invoke(app, ["inspect", str(tiny_model_dir)])
    assert result.exit_code == 0 and "kv_heads" in result.output and "sliding_window" in result.output


def test_inspect_errors_are_one_line_exit_2(tiny_model_dir, tmp_path):
    bad = tmp_path / "m"
    shutil.copytree(tiny_model_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    for args, message in [([str(bad)], "'gpt2' model"), ([str(tmp_path / "none")], "not found"),
                          ([str(tmp_path)], "no config.json")]:
        result = runner.invoke(app, ["inspect", *args])
        assert result.exit_code == 2 and message in result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_debug_shows_traceback(tmp_path):
    result = runner.invoke(app, ["--debug", "inspect", str(tmp_path)])
    assert result.exit_code != 0 and result.exception is not None


def test_every_verb_has_help_with_examples():
    result = runner.invoke(app, ["--help"])
    verbs = [v for v in ("inspect", "quantize", "run", "serve", "report", "footprint", "export") if v in result.output]
    assert {"inspect", "quantize", "run", "serve", "report"} <= set(verbs)
    for verb in verbs:
        sub = runner.invoke(app, [verb, "onnx", "--help"] if verb == "export" else [verb, "--help"])
        assert sub.exit_code == 0 and "Example" in sub.output, verb
