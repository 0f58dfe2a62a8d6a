"""CUDA paths: bitsandbytes and GPTQ quantization and loading on a GPU (offline, the GPTQ kernel
chosen by sc2quant), the torch engine in bf16 on CUDA with its static cache and captured decode
graphs, and the ONNX engine's CUDA provider. Skipped on machines without a GPU (CI); run on a
GPU machine by bench/device.sh."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from sc2quant.evaluate.metrics import compare
from sc2quant.formats.gptq import GPTQ_CUDA_KERNELS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_gptqmodel = pytest.mark.skipif(  # installed by `make install`; a lent GPU machine gets it from .device
    importlib.util.find_spec("gptqmodel") is None,
    reason="gptqmodel is not installed (make install; on a GPU machine, tools/device_bundle.py)")


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
    assert gpu.engine.describe()["dtype"] in ("bfloat16", "float16")
    drift = compare(windows, lambda ids: gpu.logits(ids).float().cpu(), cpu_fp32.logits)["all"]
    assert drift["kl_mean"] < 2e-3, drift  # bf16 activations only
    assert drift["top1_agreement"] > 0.97, drift
    assert gpu.generate("def add(a, b):", max_new_tokens=8)  # sampling loop on the GPU


def test_static_graph_decode_matches_dynamic_decode(embedded_model_dir):
    """The captured decode graph computes what the eager dynamic-cache steps compute, across a
    bucket move (256 -> 512) and past the sliding window."""
    from sc2quant.runtime import load
    from tests.conftest import logit_tolerance

    graphs, eager = load(embedded_model_dir, device="cuda"), load(embedded_model_dir, device="cuda", static_cache=False)
    ids = graphs.encode("def fibonacci(n):\n    if n < 2:\n        return n\n" * 20)[:200]
    sg, lg = graphs.engine.start([ids])
    se, le = eager.engine.start([ids])
    worst = 0.0
    for _ in range(120):
        worst = max(worst, (lg - le).abs().max().item())
        token = le.argmax(-1)
        lg, le = graphs.engine.step(sg, token), eager.engine.step(se, token)
    info = graphs.engine.describe()
    assert info["kv_cache"] == "static" and info["decode"].startswith("cuda graph"), info
    assert sg["bucket"] == 512
    assert worst <= 8 * logit_tolerance(le, torch.bfloat16), worst  # bf16: fused kernels differ


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


@needs_gptqmodel
def test_gptq_on_cuda_quantizes_and_loads(embedded_model_dir, tmp_path, windows, cpu_fp32):
    from sc2quant.quant import QuantizeOptions, quantize
    from sc2quant.runtime import load

    out = quantize(QuantizeOptions(model=str(embedded_model_dir), out=str(tmp_path / "g"), method="gptq", bits=4,
                                   group_size=128, calib_samples=32, calib_seqlen=256, device="cuda"))
    on_gpu = load(out, device="cuda")
    assert on_gpu.engine.describe()["gptq_kernel"] in GPTQ_CUDA_KERNELS
    assert on_gpu.generate("def add(a, b):", max_new_tokens=8)
    drift = compare(windows, lambda ids: on_gpu.logits(ids).float().cpu(), cpu_fp32.logits)["all"]
    assert drift["kl_mean"] < 1e-2, drift
    on_cpu = load(out, device="cpu")  # the same checkpoint on the CPU kernels: same model
    cross = compare(windows, on_cpu.logits, lambda ids: on_gpu.logits(ids).float().cpu())["all"]
    assert cross["top1_agreement"] > 0.97, cross


@needs_gptqmodel
@pytest.mark.parametrize("kernel", [None, "gptq_torch"])
def test_gptq_format_315m_loads_offline_and_generates(tmp_path_factory, monkeypatch, kernel):
    """A GPTQ-format checkpoint at a real model's proportions (315M) loads and decodes on CUDA
    with nothing downloaded: sc2quant's kernel choice, and the plain-torch fallback forced."""
    from bench.models import random_300m
    from sc2quant.quant import QuantizeOptions, quantize
    from sc2quant.runtime import load

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if kernel:
        monkeypatch.setenv("SC2QUANT_GPTQ_KERNEL", kernel)
    work = tmp_path_factory.getbasetemp() / "gptq-315m"
    model = random_300m(work)
    out = work / "rtn-int4-g128"
    if not out.exists():
        quantize(QuantizeOptions(model=str(model), out=str(out), method="rtn", bits=4, group_size=128))
    m = load(out, device="cuda")
    info = m.engine.describe()
    assert info["gptq_kernel"] == (kernel or GPTQ_CUDA_KERNELS[0]), info
    text = m.generate("def quicksort(items):", max_new_tokens=32)
    assert m.engine.describe()["decode"] != "off"
    assert isinstance(text, str)


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
