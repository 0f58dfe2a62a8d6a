"""Peak memory of each verb stays within a bound derived from what it writes, not from the model.

A medium random StarCoder2 (16 layers, hidden 768, 214 MB of bf16 weights in 17 shards) is
quantized and exported in a fresh process each. The process imports everything it needs, resets
its peak resident size (/proc/self/clear_refs), runs the verb, and reports how far its peak rose
above where it started. The bound is the bytes the verb writes plus a few of the model's largest
tensors (one is being read, one written, one converted) plus 64 MB of allocator and library
slack: loading the model whole would exceed it (its bf16 weights alone are about twice an int4
output). The real 3B and 7B shapes are measured by `make bench-scale` (bench/scale.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sc2quant.core.files import dir_bytes

pytestmark = pytest.mark.slow
MEDIUM = dict(hidden_size=768, num_hidden_layers=16, num_attention_heads=12, num_key_value_heads=4,
              intermediate_size=3072, vocab_size=8192, sliding_window=256, max_position_embeddings=2048)
SLACK = 64 << 20
LARGEST_FP32 = 3072 * 768 * 4  # an MLP matrix in fp32 (the embedding, 8192 x 768 in bf16, is smaller)

CHILD = textwrap.dedent("""
    import json, sys
    import torch, transformers, bitsandbytes, onnxruntime  # imported before the baseline
    from onnxruntime_genai.models import builder
    import sc2quant
    from sc2quant.core.system import vm_hwm
    from sc2quant.quant import bnb, rtn  # noqa: F401
    from sc2quant.export import onnx_builder  # noqa: F401
    from sc2quant.formats.gptq import gptqmodel_imported
    with gptqmodel_imported():
        import gptqmodel  # noqa: F401  (a GPTQ load imports it: ~400 MB of modules)

    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

    verb, args = sys.argv[1], json.loads(sys.argv[2])
    open("/proc/self/clear_refs", "w").write("5")  # the peak starts again from here
    base = rss()
    if verb == "quantize":
        out = sc2quant.quantize(**args)
    elif verb == "export":
        out = sc2quant.export_onnx(**args)
    else:
        model = sc2quant.load(args["path"])
        model.generate("def f(x):", max_new_tokens=8)
        out = None
    import resource  # a first GPTQ load converts in a child process: its peak counts too
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps({"rise": vm_hwm() - base, "out": str(out), "base": base, "child_peak": child}))
""")


def rise(verb: str, **args) -> int:
    return measure(verb, **args)["rise"]


def measure(verb: str, **args) -> dict:
    env = {k: os.environ[k] for k in ("SC2QUANT_CACHE", "SC2QUANT_LOG_DIR", "HOME") if k in os.environ}
    done = subprocess.run([sys.executable, "-c", CHILD, verb, json.dumps(args)], capture_output=True, text=True,
                          timeout=900, env={"SC2QUANT_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1",
                                            "PATH": "/usr/bin:/bin", **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> Path:
    from bench.models import write_random_sharded

    return write_random_sharded(tmp_path_factory.mktemp("medium") / "model", **MEDIUM)


@pytest.mark.parametrize("method", [dict(method="rtn", bits=4, group_size=128), dict(method="bnb", bits=8),
                                    dict(method="bnb", bits=4, quant_type="nf4")], ids=["rtn", "bnb-int8", "bnb-nf4"])
def test_quantize_peak_is_bounded_by_its_output(medium, tmp_path, method):
    out = tmp_path / "q"
    peak = rise("quantize", model=str(medium), out=str(out), **method)
    written = dir_bytes(out)
    assert peak <= written + 3 * LARGEST_FP32 + SLACK, (peak >> 20, written >> 20)
    assert peak < dir_bytes(medium)  # the whole model was never in memory


# int4 by round-to-nearest: the builder's streaming alone (GPTQ's calibration adds its working set: activations,
# one layer's Hessians and their Cholesky factors; measured at the 3B shape by bench/scale.py)
@pytest.mark.parametrize("options", [dict(weights="int4", int4_method="rtn"),
                                     dict(weights="int4", lm_head="int8", int4_method="rtn"),
                                     dict(dtype="fp16"), dict(dtype="fp32")], ids=["int4", "int4-lm8", "fp16", "fp32"])
def test_export_peak_is_bounded_by_its_output(medium, tmp_path, options):
    out = tmp_path / "onnx"
    peak = rise("export", model=str(medium), out=str(out), **options)
    written = dir_bytes(out)
    assert peak <= written + 3 * LARGEST_FP32 + SLACK, (peak >> 20, written >> 20)
    if options.get("weights") == "int4":
        assert peak < dir_bytes(medium)
    facts = json.loads((out / "sc2quant.json").read_text())["params"]["graph"]
    assert facts["attention_nodes"] == 16 and facts["local_window_size"] == 256


def test_export_from_a_gptq_checkpoint_is_bounded(medium, tmp_path):
    gptq = tmp_path / "gptq"
    rise("quantize", model=str(medium), out=str(gptq), method="rtn", bits=4, group_size=128)
    out = tmp_path / "onnx"
    peak = rise("export", model=str(gptq), out=str(out))
    written = dir_bytes(out)
    assert peak <= written + 3 * LARGEST_FP32 + SLACK, (peak >> 20, written >> 20)


@pytest.mark.parametrize("kind", ["gptq", "onnx"])
def test_loading_an_int4_artifact_is_bounded_by_its_weights(medium, tmp_path, kind, monkeypatch):
    monkeypatch.setenv("SC2QUANT_CACHE", str(tmp_path / "cache"))  # this artifact's conversion alone
    gptq = tmp_path / "gptq"
    rise("quantize", model=str(medium), out=str(gptq), method="rtn", bits=4, group_size=128)
    path = gptq
    if kind == "onnx":
        path = tmp_path / "onnx"
        rise("export", model=str(medium), out=str(path), weights="int4")
    weights = sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".data", ".onnx"))
    kv = 2 * 16 * 4 * 64 * 2048 * 4  # layers x K,V x heads x dim x context, fp32 at most
    bound = weights + kv + SLACK + 3 * LARGEST_FP32
    first = measure("load", path=str(path))  # a GPTQ artifact is converted to ONNX here, in a child process
    assert first["rise"] <= bound, (first["rise"] >> 20, weights >> 20)
    if kind == "gptq":
        # the child imports what this process imported before its baseline, then exports: bounded as an
        # export is (its output: the converted artifact, about the size of the GPTQ weights)
        [converted] = [dir_bytes(p) for p in (tmp_path / "cache" / "converted").iterdir() if p.is_dir()]
        excess = first["child_peak"] - first["base"]
        assert excess <= converted + 3 * LARGEST_FP32 + SLACK, (excess >> 20, converted >> 20)
    peak = rise("load", path=str(path))
    assert peak <= bound, (peak >> 20, weights >> 20)
