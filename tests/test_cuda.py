"""CUDA paths: bitsandbytes and GPTQ quantization and loading on a GPU, the torch engine in bf16
on CUDA, and the ONNX engine's CUDA provider. Skipped on machines without a GPU (CI); run on a
GPU machine with `pytest tests/test_cuda.py`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from sc2quant.evaluate.metrics import compare

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def windows(embedded_model_dir):
    from sc2quant.core.data import eval_documents
    from sc2quant.core.hf import load_tokenizer
    from sc2quant.evaluate.metrics import eval_sets

    return eval_sets(load_tokenizer(embedded_model_dir), eval_documents(), seqlen=256, max_windows=2)


@pytest.fixture(scope="module")
def cpu_fp32(embedded_model_dir):
    from sc2quant.runtime import load

    return load(embedded_model_dir, device="cpu", dtype="fp32")


def test_bf16_on_cuda_matches_fp32_on_cpu(embedded_model_dir, windows, cpu_fp32):
    from sc2quant.runtime import load

    gpu = load(embedded_model_dir, device="cuda")
    assert gpu.engine.dtype in ("bf16", "fp16")
    drift = compare(windows, lambda ids: gpu.logits(ids).float().cpu(), cpu_fp32.logits)["all"]
    assert drift["kl_mean"] < 2e-3, drift  # bf16 activations only
    assert drift["top1_agreement"] > 0.97, drift
    assert gpu.generate("def add(a, b):", max_new_tokens=8)  # sampling loop on the GPU


@pytest.mark.parametrize("bits,quant_type,kl_max", [(8, "nf4", 2e-3), (4, "nf4", 2e-2), (4, "fp4", 3e-2)])
def test_bnb_on_cuda_quantizes_loads_and_drifts_little(embedded_model_dir, tmp_path, windows, cpu_fp32, bits, quant_type,
                                                       kl_max):
    from sc2quant.core import artifact
    from sc2quant.quant import QuantizeOptions, quantize
    from sc2quant.runtime import load

    out = quantize(QuantizeOptions(model=str(embedded_model_dir), out=str(tmp_path / "a"), method="bnb", bits=bits,
                                   quant_type=quant_type, device="cuda"))
    assert artifact.verify(out).params["device"] == "cuda"
    model = load(out, device="cuda")
    drift = compare(windows, lambda ids: model.logits(ids).float().cpu(), cpu_fp32.logits)["all"]
    assert drift["kl_mean"] < kl_max, drift
    assert model.generate("import os\n", max_new_tokens=8)


@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None, reason="needs gptqmodel")
def test_gptq_on_cuda_quantizes_and_loads(embedded_model_dir, tmp_path, windows, cpu_fp32):
    from sc2quant.quant import QuantizeOptions, quantize
    from sc2quant.runtime import load

    out = quantize(QuantizeOptions(model=str(embedded_model_dir), out=str(tmp_path / "g"), method="gptq", bits=4,
                                   group_size=128, calib_samples=32, calib_seqlen=256, device="cuda"))
    on_gpu = load(out, device="cuda")
    drift = compare(windows, lambda ids: on_gpu.logits(ids).float().cpu(), cpu_fp32.logits)["all"]
    assert drift["kl_mean"] < 1e-2, drift
    on_cpu = load(out, device="cpu")  # the same checkpoint on the CPU kernels: same model
    cross = compare(windows, on_cpu.logits, lambda ids: on_gpu.logits(ids).float().cpu())["all"]
    assert cross["top1_agreement"] > 0.97, cross


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime_genai") is None, reason="needs onnxruntime-genai (export)")
def test_onnx_fp16_on_cuda_provider(embedded_model_dir, tmp_path, windows, cpu_fp32):
    import onnxruntime as ort

    from sc2quant.export.onnx import export_onnx
    from sc2quant.runtime import load

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA provider (install onnxruntime-gpu)")
    out = export_onnx(embedded_model_dir, Path(tmp_path / "o"), dtype="fp16", device="cuda")
    model = load(out, device="cuda")
    drift = compare(windows, lambda ids: model.logits(ids).float().cpu(), cpu_fp32.logits)["all"]
    assert drift["top1_agreement"] > 0.97, drift
