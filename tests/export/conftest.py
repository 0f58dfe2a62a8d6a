"""Models and exports the ONNX export tests share (module-scoped: built once per test module)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sc2quant.export.onnx import export_onnx
from tests.conftest import make_random_model
from tests.export.onnx_support import (
    gptqmodel_env,
    perturb_vectors,
)


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

