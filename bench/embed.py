"""The embeddable runtime against llama.cpp: what an app pays to run a 4-bit StarCoder2.

    python -m bench.embed [--model 300m] [--rounds 5] [--threads 2] [--out bench/results]
    (needs .venv-base: `make install-base`; builds llama.cpp once)

sc2quant is its base install (`.venv-base`: onnxruntime, tokenizers, numpy; no torch) running the
model's default int4 ONNX export through the public API (`sc2quant.load`, `stream_generate`), one
fresh process per measurement, as an app or a plugin starts it; llama.cpp is `llama-completion`
on the same weights as Q4_0 (its converter and quantizer), same threads, greedy. Per round, in
rotated order:
- cold start: a fresh process, a 16-token prompt, 32 new tokens: time from spawn to the first
  generated text on stdout, and to the process's exit (32 tokens and teardown);
- a 1,024-token prompt (evaluation text) and 128 new tokens: peak RSS of the process (VmHWM,
  polled), prefill and decode tokens/s (sc2quant: its timestamps around the first and last
  token; llama.cpp: its own `prompt eval` / `eval` figures).
Install size: the files of `.venv-base` and of `.venv` (the toolkit), and llama.cpp's binary with
its shared libraries. Results: bench/results/<date>-<cpu>-embed.{md,json}; medians over rounds
with min-max. Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import llamacpp
from bench.models import embedded, random_300m
from bench.results import write_named
from bench.scale import fresh_dir
from sc2quant import export_onnx
from sc2quant.core.data import eval_documents
from sc2quant.core.system import machine, vm_hwm

REPO = Path(__file__).resolve().parents[1]
BASE_PYTHON = REPO / ".venv-base" / "bin" / "python"
# peak-RSS target of issue 28 against llama.cpp Q4_0, and cold start to the first token
TARGETS = {"rss": 1.2, "cold_first": 1.5}
OURS, NO_PREPACK, PEER = "sc2quant (base install)", "sc2quant, SC2QUANT_PREPACKED=0", "llama.cpp Q4_0"

# What an app does with the public API, timed from inside: prints each piece of text as it comes,
# then one JSON line of timestamps (absolute, so the parent can subtract its spawn time).
DRIVER = """
import json, sys, time
path, threads, prompt, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
import sc2quant
model = sc2quant.load(path, threads=threads, prefix_cache_bytes=0)
loaded = time.time()
first = last = None
tokens = 0
for chunk in model.stream_generate(prompt, max_new_tokens=n):
    if chunk.completion_tokens and first is None:
        first = time.time()
    tokens = chunk.completion_tokens
    if chunk.text:
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
last = time.time()
sys.stdout.write("\\n" + json.dumps({"loaded": loaded, "first": first, "last": last, "tokens": tokens}) + "\\n")
"""


def _spawn(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `cmd`; the time from spawn to its first stdout byte and to its exit, its peak RSS, stdout, stderr."""
    with tempfile.TemporaryFile() as err:
        start = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err,
                                env={**os.environ, "SC2QUANT_NO_PROGRESS": "1", **(env or {})})
        os.set_blocking(proc.stdout.fileno(), False)  # type: ignore[union-attr]
        out, first, peak = b"", None, 0
        while True:
            chunk = proc.stdout.read() if proc.stdout else None  # type: ignore[union-attr]
            if chunk:
                first = first or time.time()
                out += chunk
            peak = max(peak, vm_hwm(proc.pid))
            if proc.poll() is not None:
                out += proc.stdout.read() or b""  # type: ignore[union-attr]
                break
            time.sleep(0.002)
        end = time.time()
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{Path(cmd[0]).name} failed ({proc.returncode}): {stderr.strip()[-500:]}")
    return {"start": start, "first": (first or end) - start, "exit": end - start, "peak_rss_bytes": peak,
            "stdout": out.decode(errors="replace"), "stderr": stderr}


def sc2quant_run(export: Path, threads: int, prompt: str, n: int, env: dict[str, str] | None = None) -> dict[str, Any]:
    got = _spawn([str(BASE_PYTHON), "-c", DRIVER, str(export), str(threads), prompt, str(n)], env)
    stamps = json.loads(got["stdout"].strip().splitlines()[-1])
    got["prefill_s"] = stamps["first"] - stamps["loaded"]
    got["decode_tokens_per_s"] = (stamps["tokens"] - 1) / (stamps["last"] - stamps["first"])
    return got


def llama_run(gguf: Path, threads: int, prompt: str, n: int, env: dict[str, str] | None = None) -> dict[str, Any]:
    got = _spawn([str(llamacpp.tool("llama-completion")), "-m", str(gguf), "-t", str(threads), "-p", prompt, "-n", str(n),
                  "--temp", "0", "-no-cnv", "--no-display-prompt", "--no-warmup", "-c", "2048"])
    prompt_ms = re.search(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens", got["stderr"])
    eval_ms = re.search(r"\beval time =\s*([\d.]+) ms /\s*(\d+) runs", got["stderr"])
    if not (prompt_ms and eval_ms):
        raise SystemExit("llama-completion printed no timings: " + got["stderr"][-500:])
    got["prefill_s"] = float(prompt_ms.group(1)) / 1000
    got["decode_tokens_per_s"] = int(eval_ms.group(2)) / (float(eval_ms.group(1)) / 1000)
    return got


def _size(paths: list[Path]) -> int:
    """Bytes of the files under `paths` (links not followed, each file once)."""
    total, seen = 0, set()
    for root in paths:
        for p in ([root] if root.is_file() else root.rglob("*")):
            st = p.lstat()
            if p.is_file() and not p.is_symlink() and st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_size
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="300m", help="300m (random weights, real proportions) or embedded")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    a = ap.parse_args(argv)
    if not BASE_PYTHON.exists():
        raise SystemExit("no .venv-base: run `make install-base` first")
    llamacpp.ensure_built()
    with tempfile.TemporaryDirectory(prefix="sc2quant-embed-") as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        source = embedded() if a.model == "embedded" else random_300m(work, decodable=True)
        export = work / f"{source.name}-onnx-int4"
        if not export.exists():
            export_onnx(source, export, weights="int4")
        gguf = llamacpp.quantize(llamacpp.convert(source, work / f"{source.name}-f16.gguf"), "Q4_0",
                                 work / f"{source.name}-Q4_0.gguf", a.threads)
        from sc2quant.core.tokenizer import Tokenizer

        tok = Tokenizer(export)
        long_prompt = tok.decode(tok.encode("\n".join(d.text for d in eval_documents()))[:1024])
        short_prompt = "def fibonacci(n):\n    "
        cache = work / "sc2quant-cache"  # sc2quant's user cache for these runs (prepacked weights)
        envs = {OURS: {"SC2QUANT_CACHE": str(cache)}, NO_PREPACK: {"SC2QUANT_CACHE": str(cache), "SC2QUANT_PREPACKED": "0"},
                PEER: {}}
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in envs}
        first_loads, entry_bytes = [], 0
        for r in range(a.rounds):
            fresh_dir(cache)  # the first load on this machine: it packs and saves the weights (only ours is emptied)
            first_loads.append(sc2quant_run(export, a.threads, short_prompt, 32, envs[OURS])["first"])
            entry_bytes = _size([cache / "prepacked"])
            order = list(runs)[r % len(runs):] + list(runs)[: r % len(runs)]
            for name in order:
                run = sc2quant_run if name != PEER else llama_run
                target = export if name != PEER else gguf
                cold = run(target, a.threads, short_prompt, 32, envs[name])
                long = run(target, a.threads, long_prompt, 128, envs[name])
                runs[name].append({"cold_first_s": cold["first"], "cold_exit_s": cold["exit"],
                                   "peak_rss_bytes": long["peak_rss_bytes"], "prefill_tokens_per_s": 1024 / long["prefill_s"],
                                   "decode_tokens_per_s": long["decode_tokens_per_s"]})
        libs = [llamacpp.tool("llama-completion"), *sorted(llamacpp.tool("x").parent.glob("lib*.so*"))]
        sizes = {"sc2quant base install (.venv-base)": _size([REPO / ".venv-base"]),
                 "sc2quant full install (.venv)": _size([REPO / ".venv"]) if (REPO / ".venv").exists() else None,
                 "llama.cpp (llama-completion + its shared libraries)": _size(libs)}
    summary = {name: {k: [statistics.median(v[k] for v in rs), min(v[k] for v in rs), max(v[k] for v in rs)]
                      for k in rs[0]} for name, rs in runs.items()}
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "model": a.model, "threads": a.threads,
              "rounds": a.rounds, "command": "python -m bench.embed " + " ".join(argv if argv is not None else sys.argv[1:]),
              "install_bytes": sizes, "summary": summary, "raw": runs,
              "first_load_first_token_s": [statistics.median(first_loads), min(first_loads), max(first_loads)],
              "prepacked_entry_bytes": entry_bytes, "export_bytes": _size([export])}
    text = render(result)
    write_named(result, f"embed-{a.model}", text, a.out)
    print(text)
    return 0


def render(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["summary"]
    lines = [f"# The embeddable runtime vs llama.cpp ({result['model']} model, {result['date']})", "",
             f"{m['cpu']}, {result['threads']} threads, {result['rounds']} rounds, medians (min-max). "
             f"`{result['command']}`", "",
             "| | cold start: first token s | cold start: 32 tokens + exit s | peak RSS MiB (1,024 + 128) | "
             "prefill tok/s | decode tok/s |", "|---|---|---|---|---|---|"]
    for name, v in s.items():
        lines.append(f"| {name} | {_r(v['cold_first_s'], 2)} | {_r(v['cold_exit_s'], 2)} | "
                     f"{_r([x / 2**20 for x in v['peak_rss_bytes']], 0)} | {_r(v['prefill_tokens_per_s'], 0)} | "
                     f"{_r(v['decode_tokens_per_s'], 1)} |")
    ours, peer = s[OURS], s[PEER]
    rss = ours["peak_rss_bytes"][0] / peer["peak_rss_bytes"][0]
    cold = ours["cold_first_s"][0] / peer["cold_first_s"][0]
    lines += ["", f"sc2quant's first load on a machine packs the int4 weights for its CPU and saves them in the user "
              f"cache ({result['prepacked_entry_bytes'] / 2**20:.0f} MiB for a {result['export_bytes'] / 2**20:.0f} MiB "
              f"export); its first token then came after {_r(result['first_load_first_token_s'], 2)} s. The rows above "
              f"are later loads, which map the saved weights (`{NO_PREPACK}`: packed again at every load)."]
    lines += ["", "| install | MiB on disk |", "|---|---|"]
    lines += [f"| {k} | {v / 2**20:.0f} |" for k, v in result["install_bytes"].items() if v is not None]
    lines += ["", "Targets:",
              f"- peak RSS vs llama.cpp Q4_0: **{rss:.2f}x** of the medians ({'meets' if rss <= TARGETS['rss'] else 'misses'}"
              f" <= {TARGETS['rss']}x)",
              f"- cold start to the first token vs llama.cpp: **{cold:.2f}x** of the medians "
              f"({'meets' if cold <= TARGETS['cold_first'] else 'misses'} <= {TARGETS['cold_first']}x)",
              f"- base install on disk: **{result['install_bytes']['sc2quant base install (.venv-base)'] / 1e6:.0f} MB** "
              f"({'meets' if result['install_bytes']['sc2quant base install (.venv-base)'] <= 300e6 else 'misses'}"
              " <= 300 MB)", ""]
    return "\n".join(lines)


def _r(v: list[float], digits: int) -> str:
    return f"{v[0]:.{digits}f} ({v[1]:.{digits}f}-{v[2]:.{digits}f})"


if __name__ == "__main__":
    raise SystemExit(main())
