"""Every variant `sc2quant quantize` accepts runs with a plain `sc2quant run`, no engine flag.

The format picks the fastest engine that can take the artifact; when ONNX Runtime cannot (3 or
8 bits, act-order, one group per row), the artifact runs in torch and `run` says so once on
stderr. Each case is quantized in-process (small calibration: correctness of routing, not of
GPTQ, is under test) and run as a user would, in a fresh process.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import quantize_to

CALIB = dict(calib_samples=16, calib_seqlen=128)
PROMPT = "def add(a, b):"

# (options, the engine `run` picks on a CPU)
VARIANTS = {
    "gptq-int2-g128": (dict(method="gptq", bits=2, **CALIB), "torch"),
    "gptq-int3-g128": (dict(method="gptq", bits=3, **CALIB), "torch"),
    "gptq-int8-g128": (dict(method="gptq", bits=8, **CALIB), "torch"),
    "gptq-int4-g-1": (dict(method="gptq", group_size=-1, **CALIB), "torch"),
    "gptq-int4-g64-asym": (dict(method="gptq", group_size=64, sym=False, **CALIB), "onnx"),
    "gptq-int4-g128-act-order": (dict(method="gptq", act_order=True, **CALIB), "torch"),
    "rtn-int2-g128": (dict(method="rtn", bits=2), "torch"),
    "rtn-int8-g128": (dict(method="rtn", bits=8), "torch"),
    "rtn-int4-g-1": (dict(method="rtn", group_size=-1), "torch"),
    "rtn-int4-g32": (dict(method="rtn", group_size=32), "onnx"),
}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sc2quant", *args], capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)


def assert_runs(path, engine: str) -> None:
    done = run_cli("run", str(path), "--prompt", PROMPT, "--max-new-tokens", "4")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(PROMPT) and len(done.stdout) > len(PROMPT), done.stdout
    if engine == "torch":  # the faster engine could not take it: said once, naming both engines
        assert done.stderr.count("running in torch, not onnx") == 1, done.stderr
    else:
        assert "running in torch" not in done.stderr and "ONNX Runtime" in done.stderr, done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_gptq_grid_variant_runs_by_default(name, embedded_model_dir, tmp_path):
    options, engine = VARIANTS[name]
    assert_runs(quantize_to(tmp_path / name, **options), engine)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["int8", "nf4", "nf4-dq", "fp4"])
def test_every_bnb_variant_runs_by_default(variant, bnb_artifacts):
    done = run_cli("run", str(bnb_artifacts[variant]), "--prompt", PROMPT, "--max-new-tokens", "4")
    assert done.returncode == 0 and done.stdout.startswith(PROMPT), done.stderr[-2000:]
    assert done.stderr == "", done.stderr  # torch is bitsandbytes' only engine: nothing to say
