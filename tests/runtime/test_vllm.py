"""`sc2quant serve --engine vllm`: the same API with vLLM generating, FIM included.

Skipped where vLLM is not installed (`make install-vllm` builds .venv-vllm; .ci/run does); the
GPTQ cases also where the CPU lacks the AVX512 kernels vLLM's CPU build uses for GPTQ.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import httpx
import pytest

from sc2quant.core.system import cpu_flags
from sc2quant.runtime.vllm import default_python
from tests.serving import start_server, stop_server

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(default_python() is None, reason="vLLM is not installed (make install-vllm)")]
AVX512 = "avx512f" in cpu_flags()
needs_avx512 = pytest.mark.skipif(not AVX512, reason="vLLM's CPU build runs GPTQ only with AVX512 (cpu_gemm_wna16)")
PROMPT = "def fibonacci(n):\n"
FIM = {"prompt": "def add(a, b):\n    ", "suffix": "\n    return c\n"}


def vllm_server(model_dir):
    return start_server(model_dir, "--engine", "vllm", "--max-queue", "8", timeout=600)  # vLLM loads in 15-30 s idle


def _sse(url: str, body: dict) -> str:
    text = ""
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += json.loads(line[6:])["choices"][0]["text"]
    return text


def _same_answers_as_sc2quant(url: str, model) -> None:
    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0}
    got = httpx.post(url + "/v1/completions", json=body, timeout=120).json()
    assert got["choices"][0]["text"] == model.generate(PROMPT, max_new_tokens=24)
    assert got["usage"]["prompt_tokens"] == len(model.encode(PROMPT)) and got["usage"]["completion_tokens"] == 24
    fim = httpx.post(url + "/v1/completions", json={**FIM, "max_tokens": 16, "temperature": 0}, timeout=120).json()
    assert fim["choices"][0]["text"] == model.infill(FIM["prompt"], FIM["suffix"], max_new_tokens=16)
    stop = got["choices"][0]["text"][3:5]
    cut = httpx.post(url + "/v1/completions", json={**body, "stop": stop}, timeout=120).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and _sse(url, {**body, "stop": stop}) == cut["text"]
    assert _sse(url, body) == got["choices"][0]["text"]


def test_the_embedded_model_through_vllm_answers_as_sc2quant_does(embedded_model_dir):
    from sc2quant.runtime import load

    proc, url = vllm_server(embedded_model_dir)
    try:
        assert httpx.get(url + "/health", timeout=10).json()["engine"] == "vllm"
        _same_answers_as_sc2quant(url, load(embedded_model_dir, dtype="bf16"))  # vLLM computes in bf16
    finally:
        stop_server(proc)


@needs_avx512
def test_a_gptq_artifact_through_vllm_answers_as_sc2quant_does(gptq_artifact):
    from sc2quant.runtime import load

    proc, url = vllm_server(gptq_artifact)
    try:
        _same_answers_as_sc2quant(url, load(gptq_artifact, engine="torch", dtype="bf16"))
    finally:
        stop_server(proc)


def _health_turns_503(url: str, killed_at: float) -> float:
    """Seconds from the kill until /health answers 503 (polled every 50 ms for 10 s)."""
    while time.monotonic() < killed_at + 10:
        health = httpx.get(url + "/health", timeout=5)
        if health.status_code == 503:
            assert "exited" in health.json()["reason"], health.json()
            return time.monotonic() - killed_at
        time.sleep(0.05)
    raise AssertionError("/health still answers 200 10 s after vLLM died")


@pytest.mark.parametrize("when", ["idle", "mid-request", "mid-stream"])
def test_a_dead_vllm_gives_503_and_a_failing_health_check_not_a_hang(embedded_model_dir, when):
    """vLLM's process group is killed; within 2 s /health says 503, requests get 503, nothing hangs."""
    proc, url = vllm_server(embedded_model_dir)
    try:
        pid = httpx.get(url + "/health", timeout=10).json()["vllm_pid"]
        answer: dict = {}
        started = threading.Event()

        def long_request() -> None:
            body = {"prompt": PROMPT, "max_tokens": 900, "temperature": 0, "stream": when == "mid-stream"}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                answer["status"] = r.status_code
                for line in r.iter_lines():
                    started.set()  # the first streamed event (or the whole answer) has arrived
                    if line:
                        answer.setdefault("lines", []).append(line)
            started.set()

        worker = threading.Thread(target=long_request)
        if when != "idle":
            worker.start()
            started.wait(60) if when == "mid-stream" else time.sleep(1.0)
        os.killpg(pid, signal.SIGKILL)
        seconds = _health_turns_503(url, time.monotonic())
        assert seconds <= 2.0, f"/health turned 503 only {seconds:.2f} s after vLLM died ({when})"
        if when != "idle":
            worker.join(30)
            assert not worker.is_alive(), "the request hung after vLLM died"
            if when == "mid-stream":  # the stream ends with an error event and [DONE], not a cut connection
                assert answer["lines"][-1] == "data: [DONE]" and any('"error"' in ln for ln in answer["lines"])
            else:
                assert answer["status"] in (200, 503)  # it may have finished just before the kill
        late = httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 4}, timeout=30)
        assert late.status_code == 503 and late.json()["error"]["code"] == "engine_unavailable"
        assert proc.poll() is None  # sc2quant's server itself is still up and says what is wrong
    finally:
        stop_server(proc)


def test_artifacts_vllm_cannot_run_are_refused_in_one_line(bnb_artifacts, onnx_int4_artifact):
    import sys

    for path, message in ((bnb_artifacts["nf4"], "no bitsandbytes method"), (onnx_int4_artifact, "does not run ONNX")):
        done = subprocess.run([sys.executable, "-m", "sc2quant", "serve", str(path), "--engine", "vllm"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_gptq_artifacts_are_what_vllms_marlin_kernels_take(gptq_artifact):
    """vLLM's own GPTQ config parser and Marlin support check, run in vLLM's environment."""
    check = (
        "import json, sys\n"
        "from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig\n"
        "from vllm.model_executor.layers.quantization.utils.marlin_utils import check_marlin_supported\n"
        "from vllm.scalar_type import scalar_types\n"
        "cfg = json.load(open(sys.argv[1]))['quantization_config']\n"
        "parsed = AutoGPTQConfig.from_config(cfg)\n"
        "qtype = {4: scalar_types.uint4b8, 8: scalar_types.uint8b128}[parsed.weight_bits]\n"
        "print(json.dumps({'method': AutoGPTQConfig.override_quantization_method(cfg, None),\n"
        "  'marlin': {cap: check_marlin_supported(qtype, parsed.group_size, not parsed.is_sym, cap) for cap in (80, 89, 90)},\n"
        "  'desc_act': parsed.desc_act, 'format': cfg.get('checkpoint_format')}))\n")
    done = subprocess.run([str(default_python()), "-c", check, str(gptq_artifact / "config.json")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["method"] is not None and result["format"] == "gptq" and result["desc_act"] is False
    assert all(result["marlin"].values()), result  # Ampere, Ada and Hopper take these weights in Marlin
