"""The CLI as a well-made Unix tool: results alone on stdout, messages on stderr, library output in
a log file, readable at 80 columns, flags that say what they are, and the options that do not
apply refused. Everything here runs the real `sc2quant` command in a child process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.terminal import run_in_terminal

pytestmark = pytest.mark.slow
SC2QUANT = [sys.executable, "-m", "sc2quant"]
# What libraries print when left alone: none of it may reach the terminal without --verbose.
NOISE = re.compile(r"GPT-QModel|^\s*(INFO|WARN|WARNING|W\d{4}) |\[ERROR\]|Traceback|gemm_4bit_forward|it/s\]|"
                   r"Loading weights|UserWarning|DeprecationWarning|FutureWarning", re.M)


def sc2quant(*args: str, log_dir: Path, cwd: Path | None = None, check: bool = True, timeout: float = 600,
             env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([*SC2QUANT, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, "SC2QUANT_LOG_DIR": str(log_dir), "COLUMNS": "80", **(env or {})})
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


def _clean(done: subprocess.CompletedProcess) -> None:
    assert not NOISE.search(done.stdout), done.stdout[-2000:]
    assert not NOISE.search(done.stderr), done.stderr[-2000:]


def test_each_verb_keeps_results_on_stdout_and_the_rest_off_it(tiny_model_dir, work, logs):
    bnb = work / "bnb"
    quantized = sc2quant("quantize", str(tiny_model_dir), "--method", "bnb", "--bits", "4", "--out", str(bnb),
                         "--json", log_dir=logs)
    assert json.loads(quantized.stdout)["artifact"] == str(bnb)
    _clean(quantized)
    text = sc2quant("quantize", str(tiny_model_dir), "--method", "rtn", "--group-size", "32", "--out",
                    str(work / "rtn"), log_dir=logs)
    assert text.stdout == "" and f"wrote {work / 'rtn'}" in text.stderr
    _clean(text)
    exported = sc2quant("export", "onnx", str(tiny_model_dir), "--out", str(work / "onnx"), log_dir=logs)
    assert exported.stdout == "" and "exported" in exported.stderr
    _clean(exported)
    for args in (["inspect", str(bnb)], ["footprint", "--shape", "3b"], ["inspect", "--json"]):
        shown = sc2quant(*args, log_dir=logs)
        assert shown.stdout.strip() and shown.stderr == "", args
        _clean(shown)
    generated = sc2quant("run", str(bnb), "--prompt", "def f(x):", "--max-new-tokens", "8", log_dir=logs)
    assert generated.stdout.startswith("def f(x):") and generated.stderr == ""
    _clean(generated)
    reported = sc2quant("report", str(bnb), "--baseline", str(tiny_model_dir), "--seqlen", "64", "--max-windows", "1",
                        "--no-speed", log_dir=logs)
    assert "bnb-nf4" in reported.stdout and "KL" in reported.stdout and reported.stderr == ""
    _clean(reported)
    version = sc2quant("--version", log_dir=logs)
    assert version.stdout.startswith("sc2quant ") and "cpu:" in version.stdout and version.stderr == ""
    logged = "".join(p.read_text(errors="replace") for p in logs.glob("*.log"))
    assert "bitsandbytes" in logged or "transformers" in logged or "onnx" in logged.lower()  # kept, not lost


def test_verbose_shows_the_libraries_else_they_go_to_the_log(tiny_model_dir, work, tmp_path):
    args = ["quantize", str(tiny_model_dir), "--group-size", "32", "--calib-samples", "8", "--calib-seqlen", "64"]
    quiet = sc2quant(*args, "--out", str(work / "gq"), log_dir=tmp_path / "quiet")
    _clean(quiet)
    log = next((tmp_path / "quiet").glob("*quantize*.log")).read_text(errors="replace")
    assert "GPT-QModel" in log or "gptqmodel" in log.lower()
    loud = sc2quant(*args, "--out", str(work / "gq-loud"), "--verbose", log_dir=tmp_path / "loud")
    assert NOISE.search(loud.stdout + loud.stderr) and not list((tmp_path / "loud").glob("*.log"))


def test_what_a_person_sees_in_an_80_column_terminal(embedded_model_dir, work, logs):
    out = work / "gptq"
    seen = run_in_terminal([*SC2QUANT, "quantize", "--bits", "4", "--calib-samples", "16", "--calib-seqlen", "256",
                            "--out", str(out)], columns=80, env={"SC2QUANT_LOG_DIR": str(logs)})
    assert seen.returncode == 0, "\n".join(seen.lines)
    text = [line for line in seen.lines if line.strip()]
    assert text[-1] == f"wrote {out}" and len(text) <= 4, text
    assert "GPTQ layer 6/6" in seen.raw and "eta" in seen.raw  # the per-layer display, with its ETA and loss
    assert "loss" in seen.raw and all(len(line) <= 80 for line in seen.lines)
    assert not NOISE.search("\n".join(seen.lines))


def test_tables_stay_readable_at_80_columns(logs):
    done = sc2quant("footprint", "--shape", "7b", log_dir=logs)
    lines = done.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines)
    from sc2quant.footprint import method_names

    for name in method_names():  # every method name appears whole, never cut or folded
        assert re.search(rf"(^|\s){re.escape(name)}(\s|$)", done.stdout, re.M), name
    assert "…" not in done.stdout
    narrow = sc2quant("footprint", "--shape", "7b", log_dir=logs, env={"COLUMNS": "50"})
    assert all(len(line) <= 50 for line in narrow.stdout.splitlines())
    assert all(name in narrow.stdout for name in method_names())


def test_help_shows_flags_as_flags_and_examples_whole(logs):
    for verb in (["quantize"], ["export", "onnx"], ["run"], ["serve"], ["report"], ["inspect"], ["footprint"]):
        shown = sc2quant(*verb, "-h", log_dir=logs)
        assert "--help" in shown.stdout and "<bool>" not in shown.stdout and "…" not in shown.stdout
        assert "BOOLEAN" not in shown.stdout
    run_help = sc2quant("run", "--help", log_dir=logs).stdout
    assert "sc2quant run --fim-prefix before.py --fim-suffix after.py" in run_help
    assert re.search(r"^\s+--stream\s+Print tokens", run_help, re.M)


@pytest.mark.parametrize("args,message", [
    (["quantize", "--method", "rtn", "--calib", "x.py"], "--calib does not apply to --method rtn"),
    (["quantize", "--quant-type", "fp4"], "--quant-type does not apply to --method gptq"),
    (["quantize", "--method", "bnb", "--act-order", "--damp", "0.1"], "--act-order, --damp do not apply"),
    (["run", "--prompt", "x", "--fim-prefix", "a"], "not both"),
    (["export", "onnx", "--block-size", "64"], "does not apply to a float export"),
    (["report", "out/x", "--humaneval-limit", "3"], "--humaneval-limit applies to --humaneval only"),
    (["run", "--prompt", "x", "--threads", "0"], "--threads 0 is out of range"),
    (["quantize", "--threads", "-1"], "--threads -1 is out of range"),
    (["serve", "--engine", "vllm", "--threads", "2"], "--threads cannot be passed to vLLM"),
    (["serve", "--engine", "vllm", "--device", "cpu", "--threads", "1"], "--device, --threads cannot be passed to vLLM"),
    (["quantize", "--method", "gptq", "--group-size", "3"], "group size 3 does not divide"),
    (["quantize", "--method", "bnb", "--bits", "8", "--quant-type", "fp4"], "--quant-type does not apply"),
    (["quantize", "--method", "bnb", "--bits", "8", "--double-quant"], "--double-quant does not apply"),
    (["serve", "--prompt-cache-mb", "-1"], "--prompt-cache-mb must be 0 (no prompt reuse) or more, got -1"),
    (["serve", "--lookup-tokens", "33"], "lookup tokens must be 0 (off) to 32, got 33"),
    (["serve", "--engine", "vllm", "--lookup-tokens", "4"], "--lookup-tokens cannot be passed to vLLM"),
    # found by the red team: "must be between 0 and 3600" refused 0, which is between them
    (["serve", "--read-timeout", "0"], "--read-timeout must be more than 0 and at most 3600 seconds, got 0"),
    (["serve", "--read-timeout", "3600.5"], "--read-timeout must be more than 0 and at most 3600 seconds, got 3600.5"),
])
def test_options_that_do_not_apply_are_refused(tmp_path, logs, args, message):
    done = sc2quant(*args, log_dir=logs, cwd=tmp_path, check=False)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and done.stdout == "" and list(tmp_path.iterdir()) == []


def test_recipes_work_for_every_verb_with_options(tiny_model_dir, tmp_path, logs):
    exported = sc2quant("export", "onnx", str(tiny_model_dir), "--recipe", "onnx-int4-cpu", "--out",
                        str(tmp_path / "o"), "--json", log_dir=logs)
    manifest = json.loads(exported.stdout)
    # the default block 128, stepped down to what GPTQ's groups can tile in the tiny model's 64 inputs
    assert manifest["method"] == "onnx-int4" and manifest["params"]["block_size"] == 64
    recipe = tmp_path / "run.yaml"
    recipe.write_text("max-new-tokens: 3\nprompt: 'def g():'\n")
    ran = sc2quant("run", str(tiny_model_dir), "--recipe", str(recipe), log_dir=logs)
    assert ran.stdout.startswith("def g():")
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    for verb in (["run"], ["quantize"], ["export", "onnx"], ["serve"], ["report", "x"]):
        done = sc2quant(*verb, "--recipe", str(empty), log_dir=logs, check=False)
        assert done.returncode == 2 and "sets no option" in done.stderr, (verb, done.stderr)
    bad = tmp_path / "bad.yaml"
    bad.write_text("block-size: [1]\n")
    done = sc2quant("export", "onnx", "--recipe", str(bad), log_dir=logs, check=False)
    assert done.returncode == 2 and "'block-size' has a list value" in done.stderr


def test_run_streams_fill_in_the_middle_with_stops_and_prints_the_prompt(embedded_model_dir, logs):
    plain = sc2quant("run", "--prompt", "def add(a, b):\n", "--max-new-tokens", "12", log_dir=logs).stdout
    streamed = sc2quant("run", "--prompt", "def add(a, b):\n", "--max-new-tokens", "12", "--stream", log_dir=logs).stdout
    assert plain == streamed and plain.startswith("def add(a, b):\n")
    args = ["run", "--fim-prefix", "def add(a, b):\n    ", "--fim-suffix", "\n    return c\n", "--max-new-tokens", "16"]
    middle = sc2quant(*args, log_dir=logs).stdout
    assert sc2quant(*args, "--stream", log_dir=logs).stdout == middle
    assert len(middle.strip()) > 2, middle  # greedy: the same middle every run, long enough to cut
    stop = middle.strip()[1:3]
    cut = sc2quant(*args, "--stop", stop, log_dir=logs).stdout
    assert stop not in cut and middle.startswith(cut.rstrip("\n"))


def test_a_missing_local_path_that_looks_like_a_hub_id(tmp_path, logs):
    (tmp_path / "out").mkdir()
    done = sc2quant("inspect", "out/model", log_dir=logs, cwd=tmp_path, check=False)
    assert done.returncode == 2 and "not found" in done.stderr and "hub" not in done.stderr.split(":", 1)[1][:40]


@pytest.mark.parametrize("args", [["footprint"], ["formats"], ["run", "--prompt", "def f():", "--max-new-tokens", "200",
                                                                  "--stream"]], ids=["footprint", "formats", "run"])
def test_a_reader_that_closes_stdout_early_is_not_an_error(args, logs):
    """Found by the red team: `sc2quant run ... | head` reported "failed unexpectedly (a bug)" and exited 1;
    `footprint | head -1` exited 1. A Unix tool whose reader goes away ends quietly, 141 as SIGPIPE would."""
    env = {**os.environ, "SC2QUANT_LOG_DIR": str(logs), "COLUMNS": "80"}
    proc = subprocess.Popen([*SC2QUANT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stdout.read(1)  # the first byte of the results, then the reader goes
    proc.stdout.close()
    _, err = proc.communicate(timeout=600)
    assert proc.returncode in (0, 141) and b"error" not in err and b"Traceback" not in err, err[-2000:]


UNWRITABLE = {"closed": ('"$@" >&-', "Bad file descriptor"), "full": ('"$@" >/dev/full', "No space left on device")}


@pytest.mark.parametrize("how", sorted(UNWRITABLE))
@pytest.mark.parametrize("args", [["footprint"], ["inspect"], ["formats"], ["--version"],
                                  ["run", "--prompt", "def f():", "--max-new-tokens", "4"]],
                         ids=["footprint", "inspect", "formats", "version", "run"])
def test_a_stdout_that_cannot_be_written_is_one_line_and_exit_2(args, how, logs):
    """Found by the red team: `sc2quant run ... >&-` ended in a traceback (exit 1), and `>/dev/full` said "a bug":
    a closed stdout or a full device is the user's environment, said in one line, exit 2 (as `ls >&-` does)."""
    shell, reason = UNWRITABLE[how]
    done = subprocess.run(["sh", "-c", shell, "sh", *SC2QUANT, *args], capture_output=False, stderr=subprocess.PIPE,
                          text=True, timeout=600, env={**os.environ, "SC2QUANT_LOG_DIR": str(logs), "COLUMNS": "80"})
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr == f"error: cannot write the output: {reason} (stdout)\n", done.stderr[-3000:]
