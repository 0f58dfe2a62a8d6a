"""The Python API never writes to file descriptor 1: an app (a language server speaking JSON-RPC
over stdio) owns it. Each case runs in a fresh process whose fd 1 is a file, C-level writes
included, and checks that the file stays empty and the caller's logging setup is unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import json, logging, sys
root = logging.getLogger()
handler = logging.StreamHandler(sys.stderr)
root.addHandler(handler)
root.setLevel(logging.DEBUG)
before = [root.level, [id(h) for h in root.handlers]]
import sc2quant
from pathlib import Path
case, path, work, result = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
if case == "quantize":
    sc2quant.quantize(path, method="rtn", out=str(work / "rtn"))
    sc2quant.export_onnx(path, work / "onnx", weights="int4")
    sc2quant.report([str(work / "rtn")], max_windows=1, speed=False)
else:
    engine = case.split(":")[1] if ":" in case else "auto"
    m = sc2quant.load(path, engine=engine)
    m.generate("def add(a, b):", max_new_tokens=4)
    list(m.stream("def add(a, b):", max_new_tokens=4))
    m.infill(prefix="def add(a, b):\n    ", suffix="\n    return c\n", max_new_tokens=4)
    list(m.stream_generate(["x = 1", "def f():"], max_new_tokens=3))
logging.getLogger("app").info("the caller's own log line")
after = [root.level, [id(h) for h in root.handlers]]
Path(result).write_text(json.dumps({"before": before, "after": after}))
"""


def run_case(case: str, path: Path, tmp_path: Path) -> tuple[str, subprocess.CompletedProcess[str]]:
    stdout, result = tmp_path / "fd1.txt", tmp_path / "result.json"
    with open(stdout, "w") as fd1:
        done = subprocess.run([sys.executable, "-c", SCRIPT, case, str(path), str(tmp_path), str(result)], stdout=fd1,
                              stderr=subprocess.PIPE, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads(result.read_text())
    assert state["before"] == state["after"]  # the caller's root level and handlers, as they were
    assert "the caller's own log line" in done.stderr  # and its handler still works
    return stdout.read_text(), done


@pytest.mark.slow
@pytest.mark.parametrize("case", ["hf", "bnb", "gptq:torch", "gptq:onnx", "onnx"])
def test_load_and_generate_write_nothing_to_fd1(case, embedded_model_dir, bnb_artifacts, gptq_artifact,
                                                onnx_int4_artifact, tmp_path, monkeypatch):
    monkeypatch.setenv("SC2QUANT_CACHE", str(tmp_path / "cache"))  # a first GPTQ conversion, in this process
    path = {"hf": embedded_model_dir, "bnb": bnb_artifacts["nf4"], "gptq": gptq_artifact,
            "onnx": onnx_int4_artifact}[case.split(":")[0]]
    written, _ = run_case(case, path, tmp_path)
    assert written == "", written[:2000]


@pytest.mark.slow
def test_quantize_export_and_report_write_nothing_to_fd1(embedded_model_dir, tmp_path):
    written, _ = run_case("quantize", embedded_model_dir, tmp_path)
    assert written == "", written[:2000]


@pytest.mark.slow
def test_library_output_goes_to_stderr_when_asked(gptq_artifact, tmp_path, monkeypatch):
    monkeypatch.setenv("SC2QUANT_LIBRARY_OUTPUT", "stderr")
    written, done = run_case("gptq:torch", gptq_artifact, tmp_path)
    assert written == "" and "GPT-QModel" in done.stderr  # its banner, on stderr instead of stdout
