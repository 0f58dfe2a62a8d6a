"""The one model loader: sources, validation, dtypes, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sc2quant.core.errors import UserError
from sc2quant.core.hf import load_model, resolve_device
from sc2quant.core.source import resolve_source


def test_loads_local_directory_in_bf16(tiny_model_dir):
    loaded = load_model(tiny_model_dir, dtype="bf16")
    assert type(loaded.model).__name__ == "Starcoder2ForCausalLM"
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert loaded.source.kind == "local"
    ids = loaded.tokenizer("def f(x):\n    return x", return_tensors="pt").input_ids
    assert loaded.model(ids).logits.shape[-1] == loaded.model.config.vocab_size


@pytest.mark.parametrize("dtype,expected", [("fp32", torch.float32), ("fp16", torch.float16)])
def test_dtype_is_selectable(tiny_model_dir, dtype, expected):
    assert next(load_model(tiny_model_dir, dtype=dtype).model.parameters()).dtype == expected


def test_embedded_model_is_the_default(embedded_model_dir):
    loaded = load_model()
    assert loaded.source.kind == "embedded"
    assert loaded.model.config.model_type == "starcoder2"


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_wrong_model_type_names_the_type(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="'llama' model, not StarCoder2"):
        load_model(d)


def test_missing_weights(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no weight files"):
        load_model(d)


def test_truncated_weights(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated|corrupt"):
        load_model(d)


def test_garbage_weights(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"\x00not a safetensors file" * 10)
    with pytest.raises(UserError, match="corrupt"):
        load_model(d)


def test_pickle_weights_are_refused_without_flag(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(UserError, match="pickle.*--allow-pickle"):
        load_model(d)


def test_weights_not_matching_config_are_refused(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 3  # the file has 2 layers: layer 2 would be random noise
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="num_hidden_layers 3 but the weights hold 2 layers"):  # before loading
        load_model(d)


def test_unknown_path_and_file_path(tmp_path):
    with pytest.raises(UserError, match="not found"):
        resolve_source(tmp_path / "nope")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        resolve_source(f)


def test_hub_id_offline_fails_fast(monkeypatch, tmp_path):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    t = time.monotonic()
    with pytest.raises(UserError, match="unreachable"):
        resolve_source("bigcode/starcoder2-3b")
    assert time.monotonic() - t < 10


def test_device_errors():
    with pytest.raises(UserError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            resolve_device("cuda")
    assert resolve_device("auto") in ("cpu", "cuda")


def test_unknown_dtype(tiny_model_dir):
    with pytest.raises(UserError, match="unknown dtype"):
        load_model(tiny_model_dir, dtype="int3")
