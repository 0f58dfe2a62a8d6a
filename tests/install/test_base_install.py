"""The base install (`pip install sc2quant`: onnxruntime, tokenizers, numpy, the CLI; no torch)
runs an ONNX export as the full install does: the same text, token ids equal to transformers',
`run` and `serve` answering, torch and transformers never imported, and a verb that needs an
extra refused in one line. The environment is `.venv-base` (`make install-base`; CI builds it);
without it these tests skip, unless SC2QUANT_REQUIRE_BASE_ENV=1 (CI) makes that a failure."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from sc2quant.runtime import load
from tests.conftest import REPO

BASE = REPO / ".venv-base" / "bin"
# special and FIM tokens written in the text, unicode, whitespace runs: what the tokenizer must match
TEXT = ("<repo_name>sc2quant<file_sep>util.py\n<fim_prefix>def add(a, b):\n\t\"\"\"Σ → ∞ 🙂\"\"\"\n    "
        "<fim_suffix>\n\n\nprint(add(1,2))  # done<fim_middle>")


@pytest.fixture(scope="module")
def base_python() -> Path:
    if not (BASE / "python").exists():
        if os.environ.get("SC2QUANT_REQUIRE_BASE_ENV") == "1":
            pytest.fail("the base environment is missing: run `make install-base`")
        pytest.skip("no base environment (.venv-base): `make install-base` builds it")
    return BASE / "python"


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "SC2QUANT_NO_PROGRESS": "1"}, **kw)


def test_the_base_environment_has_no_torch(base_python):
    done = _run([str(base_python), "-c", "import importlib.util as u; print([m for m in ('torch', 'transformers', "
                 "'bitsandbytes', 'gptqmodel', 'matplotlib') if u.find_spec(m)])"])
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_an_onnx_export_runs_as_in_the_full_install(base_python, onnx_int4_artifact):
    from sc2quant.core.data import eval_documents
    from sc2quant.core.hf import load_tokenizer

    done = _run([str(base_python), str(REPO / "tests" / "install" / "base_checks.py"), str(onnx_int4_artifact), TEXT])
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout)
    assert got["heavy_modules"] == []
    assert "pip install 'sc2quant[quantize]'" in got["api_error"]
    full = load(onnx_int4_artifact, threads=1)
    assert got["greedy"] == full.generate("def fibonacci(n):\n", max_new_tokens=24)
    assert got["infill"] == full.infill("def add(a, b):\n    ", "\n\nprint(add(1, 2))\n", max_new_tokens=16)
    assert got["stopped"] == "".join(full.stream("class Stack:\n    def ", max_new_tokens=32, stop=["(", "\n"]))
    assert got["sampled"] == full.generate("import ", max_new_tokens=16, temperature=0.8, top_p=0.9, seed=7)
    hf = load_tokenizer(onnx_int4_artifact)  # transformers' tokenizer: the ids every other path uses
    assert got["ids"] == hf(TEXT, add_special_tokens=False)["input_ids"]
    assert got["decoded"] == hf.decode(got["ids"], skip_special_tokens=False) == TEXT
    assert got["eval_ids"] == hf("\n".join(d.text for d in eval_documents()[:20]), add_special_tokens=False)["input_ids"]


def test_run_and_serve_answer_in_the_base_install(base_python, onnx_int4_artifact):
    import httpx

    from tests.serving import start_server, stop_server

    full = load(onnx_int4_artifact)
    done = _run([str(BASE / "sc2quant"), "run", str(onnx_int4_artifact), "--prompt", "def add(a, b):",
                 "--max-new-tokens", "12"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip("\n") == "def add(a, b):" + full.generate("def add(a, b):", max_new_tokens=12)
    proc, url = start_server(onnx_int4_artifact, python=str(base_python))
    try:
        body = {"input_prefix": "def add(a, b):\n    ", "input_suffix": "\n", "n_predict": 12}
        answer = httpx.post(url + "/infill", json=body, timeout=120).json()
        assert answer["content"] == full.infill("def add(a, b):\n    ", "\n", max_new_tokens=12)
        completion = httpx.post(url + "/v1/completions", json={"prompt": "import ", "max_tokens": 8, "temperature": 0},
                                timeout=120)
        assert completion.json()["choices"][0]["text"] == full.generate("import ", max_new_tokens=8)
    finally:
        stop_server(proc)


@pytest.mark.parametrize("argv", [["quantize", "--bits", "4"], ["export", "onnx", "{model}"],
                                  ["run", "{model}", "--prompt", "def f("], ["report", "{artifact}"]],
                         ids=["quantize", "export", "run-torch", "report"])
def test_a_verb_needing_an_extra_says_which_in_one_line(base_python, onnx_int4_artifact, embedded_model_dir, argv):
    args = [a.format(model=embedded_model_dir, artifact=onnx_int4_artifact) for a in argv]
    done = _run([str(BASE / "sc2quant"), *args])
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "pip install 'sc2quant[" in lines[0] and "Traceback" not in done.stderr


def test_serve_with_vllm_refuses_an_onnx_export_in_one_line(base_python, onnx_int4_artifact):
    """Found by the red team: the base install lacked httpx, and `serve --engine vllm` failed as a bug."""
    done = _run([str(BASE / "sc2quant"), "serve", str(onnx_int4_artifact), "--engine", "vllm", "--port", "1"])
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "vLLM" in lines[0], done.stderr


def test_the_peers_bench_measures_an_onnx_export_in_the_base_install(base_python, tiny_onnx_artifact):
    """The bench's RSS ratio means what an app holds: an ONNX export is timed in the base install's
    interpreter (no torch imported), not in the full install's process (which imports torch)."""
    from bench.contenders import Contender
    from bench.run import BASE_PYTHON, measure_contender

    assert BASE_PYTHON == base_python
    c = Contender(name="tiny", path=tiny_onnx_artifact, runtime="sc2quant")
    row = measure_contender(c, "cpu", 1, {"prefill": 16, "prompt": 8, "decode": 4})
    assert row["process"] == "base install" and row["torch_imported"] is False
    assert row["peak_rss_bytes"] > 0 and row["decode_tokens_per_s"] > 0


def test_a_gptq_artifact_says_what_its_conversion_needs_in_one_line(base_python, tiny_gptq_artifact):
    """Found by the red team: the base install refused a GPTQ artifact with "this needs safetensors", which
    named neither what to install nor why: it runs in ONNX Runtime once converted, which needs torch."""
    done = _run([str(BASE / "sc2quant"), "run", str(tiny_gptq_artifact), "--prompt", "def f(", "--max-new-tokens", "2"])
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for said in ("GPTQ", "convert", "torch", "pip install 'sc2quant[quantize]'", "sc2quant export onnx"):
        assert said in lines[0], (said, lines[0])
    assert "safetensors" not in lines[0]
    api = _run([str(base_python), "-c", f"import sc2quant\ntry: sc2quant.load({str(tiny_gptq_artifact)!r})\n"
                "except sc2quant.UserError as exc: print(exc)"])
    assert api.stdout.strip() == lines[0].removeprefix("error: "), api.stdout + api.stderr
