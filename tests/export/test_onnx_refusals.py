"""What `sc2quant export onnx` refuses (nothing is written), its output paths, the CLI and recipes."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from sc2quant.core import artifact
from sc2quant.core.errors import UserError
from sc2quant.export.onnx import export_onnx
from tests.conftest import make_random_model
from tests.export.onnx_support import (
    REPO,
    assert_nothing_written,
    load_proto,
)

# --- refusals: nothing is written ------------------------------------------------------------




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
    # the default block (128) steps down to what GPTQ's groups can tile in a hidden size of 64
    manifest = artifact.read_manifest(tmp_path / out)
    assert manifest.group_size == 64 and manifest.params["int4_method"] == "gptq"
    assert sorted(p.name for p in (tmp_path / out).iterdir() if p.name.startswith(".")) == []  # the calibrated checkpoint is gone


@pytest.mark.parametrize("shape,message", [
    # found by the red team: ONNX Runtime's CPU attention refused these at the first `run`, as "a bug"
    ({"hidden": 96, "heads": 4, "kv_heads": 2}, "head size 24 is not a multiple of 16"),
    # a window too short for GPTQ's calibration windows: the way out named
    ({"sliding_window": 4}, "sliding window of 4 tokens, too short to calibrate (at least 8): use --int4-method rtn"),
])
def test_shapes_the_export_cannot_serve_are_refused_in_one_line(tmp_path, tokenizer, shape, message):
    src = make_random_model(tmp_path / "model", tokenizer=tokenizer, **shape)
    with pytest.raises(UserError, match=re.escape(message)):
        export_onnx(src, tmp_path / "out" / "onnx", weights="int4")
    assert_nothing_written(tmp_path / "out")


def test_a_lowered_default_block_is_said(tiny_dir, tmp_path, capsys):
    export_onnx(tiny_dir, tmp_path / "onnx", weights="int4")
    assert "block size 64: the default 128 does not divide the input features (64 and 256)" in capsys.readouterr().err


def test_a_block_that_gptq_cannot_tile_is_kept_with_round_to_nearest(tiny_dir, tmp_path):
    out = export_onnx(tiny_dir, tmp_path / "rtn", weights="int4", block_size=128, int4_method="rtn")
    manifest = artifact.read_manifest(out)
    assert manifest.group_size == 128 and manifest.params["int4_method"] == "rtn" and "calibration" not in manifest.params


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




@pytest.mark.parametrize("args,message", [
    (["--lm-head", "int8"], "--lm-head does not apply to a float export"),
    (["--weights", "int4", "--lm-head", "int2"], "unknown --lm-head"),
    (["--int4-method", "rtn"], "--int4-method does not apply to a float export"),
    (["--weights", "int4", "--int4-method", "awq"], "unknown --int4-method 'awq': choose one of gptq, rtn"),
    # the tiny model's hidden size is 64: GPTQ's groups cannot be 128 wide, and a chosen block is kept or refused
    (["--weights", "int4", "--block-size", "128"], "block size 128 does not divide the input features (64 and 256) "
                                                   "that GPTQ's groups must tile: choose --block-size 64 or --int4-method rtn"),
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




