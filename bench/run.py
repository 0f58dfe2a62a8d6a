"""`make bench`: sc2quant's runtimes against llama.cpp and transformers on the same weights.

    python -m bench.run [--models embedded,300m] [--threads N] [--rounds 5] [--out bench/results]

Speed: every contender in a fresh child process per round, contenders in a rotated order each
round, medians over rounds, and ratios against llama.cpp Q4_0 taken within each round (absolute
numbers on a shared machine mean little; ratios from one run mean a lot). Drift (embedded model
only, since a random model's drift says nothing): KL divergence, top-1 agreement and perplexity
against the bf16 checkpoint on calib_data's evaluation text, identical token windows for all.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import llamacpp, results
from bench.bandwidth import decode_bound, onnx_bytes_read_per_token, read_bandwidth
from bench.contenders import REFERENCE, Contender, build_all
from bench.models import REAL_SHAPES, embedded, n_params, random_300m, write_random_sharded
from sc2quant.core.console import console
from sc2quant.core.errors import UserError
from sc2quant.core.files import dir_bytes
from sc2quant.core.system import cpu_caps, tool_versions
from sc2quant.evaluate.speed import measure_in_child, measure_with

MODELS = {  # name -> the checkpoint, built once under the work folder
    "embedded": lambda work: embedded(),
    "300m": random_300m,
    "3b": lambda work: work / "starcoder2-3b-random" if (work / "starcoder2-3b-random").exists()
    else write_random_sharded(work / "starcoder2-3b-random", embedded(), **REAL_SHAPES["3b"]),
}
SPEED = {"prefill": 512, "prompt": 128, "decode": 128}  # the workload
EMULATED_BF16 = {"prefill": 128, "prompt": 128, "decode": 8}  # bf16 without hardware support: prefill ~4x slower


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="embedded,300m", help="comma-separated: embedded, 300m, 3b (random, real shape)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for every contender")
    ap.add_argument("--rounds", type=int, default=5)  # fewer rounds give spreads too wide for a verdict
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--work", type=Path, default=Path("bench/work"), help="built contenders (reused across runs)")
    ap.add_argument("--no-llama", action="store_true", help="skip llama.cpp (no compiler or no network)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: a GPU user's contenders (transformers bf16, bitsandbytes, GPTQ)")
    ap.add_argument("--only", default="", help="comma-separated substrings: measure only contenders whose name has one")
    ap.add_argument("--busy", action="store_true",
                    help="measure every round twice: idle, then with one core kept busy by a bounded background "
                         "process (the same for every contender); reports each contender's slowdown")
    ap.add_argument("--eval-windows", type=int, default=8, help="evaluation windows per source (drift)")
    ap.add_argument("--rerender", type=Path, help="a results .json: summarise and write it again, measure nothing")
    a = ap.parse_args(argv)
    try:
        if a.rerender:
            console.print(f"[green]wrote[/] {rerender(a.rerender, a.out)}")
            return 0
        run(a)
    except UserError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    return 0


def run(a: argparse.Namespace) -> dict[str, Any]:
    started = time.time()
    names = [m.strip() for m in a.models.split(",") if m.strip()]
    unknown = set(names) - set(MODELS)
    if unknown:
        raise UserError(f"unknown model(s) {sorted(unknown)}: choose from {', '.join(MODELS)}")
    a.work.mkdir(parents=True, exist_ok=True)
    with console.status(f"measuring memory read bandwidth ({a.device}, {a.threads} threads)"):
        bandwidth = read_bandwidth(a.threads, a.device)
    reference = REFERENCE[a.device]
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": machine(a.device), "threads": a.threads,
                           "device": a.device, "rounds": a.rounds, "busy": a.busy,
                           "workload": SPEED, "read_bandwidth_bytes_per_s": bandwidth,
                           "reference": reference, "versions": versions(), "models": {}}
    for name in names:
        model_dir = MODELS[name](a.work)
        # GPTQ's calibration where it means something or costs little (see build_all); RTN otherwise
        calib = (64, 512) if name == "embedded" else (32, 256) if a.device == "cuda" and name == "300m" else None
        contenders = build_all(name, model_dir, a.work, a.threads, calib, llama=not a.no_llama and a.device == "cpu",
                               device=a.device, only=[x for x in a.only.split(",") if x])
        entry: dict[str, Any] = {"path": str(model_dir), "parameters": n_params(model_dir), "contenders": {}, "notes": []}
        if calib is None:
            entry["notes"].append("The GPTQ-format int4 checkpoint (and the ONNX int4 made from it) is written by "
                                  "round-to-nearest (`--method rtn`): same format, kernels and speed as GPTQ, without "
                                  "a Hessian solve that means nothing on random weights.")
        for c in contenders:
            entry["contenders"][c.name] = {"runtime": c.runtime, "path": str(c.path), "bytes_on_disk": dir_bytes(c.path),
                                           "env": dict(c.env), "rounds": [], "busy_rounds": []}
        speed_rounds(contenders, entry, a.threads, a.rounds, a.device, a.busy)
        if name == "embedded":
            drift(contenders, model_dir, entry, a.threads, a.eval_windows, a.device)
        if name == "300m" and a.device == "cpu":
            from bench.profile_onnx import profile_decode

            entry["onnx_int4_decode_profiles"] = {c.name: profile_decode(c.path, a.threads) for c in contenders
                                                  if c.name in results.DEFAULTS}
        summarize(entry, bandwidth, reference)
        out["models"][name] = entry
    out["seconds"] = time.time() - started
    path = results.write(out, a.out)
    console.print(f"[green]wrote[/] {path}")
    return out


def speed_rounds(contenders: list[Contender], entry: dict, threads: int, rounds: int, device: str,
                 busy: bool = False) -> None:
    """Each round measures every contender in a rotated order; with `busy`, each contender is measured
    again right after, with `busy_core` running beside it (rows in "busy_rounds")."""
    native_bf16 = device == "cuda" or _native_bf16()
    for r in range(rounds):
        order = contenders[r % len(contenders):] + contenders[: r % len(contenders)]
        for c in order:
            for loaded in (False, True) if busy else (False,):
                console.print(f"round {r + 1}/{rounds}: {c.name}{' (one core busy)' if loaded else ''}")
                with busy_core() if loaded else contextlib.nullcontext():
                    if c.is_gguf:
                        row = llamacpp.bench_once(c.path, threads, SPEED["prefill"], SPEED["prompt"], SPEED["decode"])
                    else:
                        work = SPEED if c.dtype != "bf16" or native_bf16 else EMULATED_BF16
                        row = measure_contender(c, device, threads, work)
                row["round"] = r
                entry["contenders"][c.name]["busy_rounds" if loaded else "rounds"].append(row)


BASE_PYTHON = Path(__file__).resolve().parents[1] / ".venv-base" / "bin" / "python"


def measure_contender(c: Contender, device: str, threads: int, work: dict[str, int]) -> dict[str, Any]:
    """One sc2quant contender in a fresh process. An ONNX export on the CPU is measured in the base
    install's interpreter (`make install-base`), as an app runs it: no torch imported, so its peak RSS
    is what users' processes hold; elsewhere (or without .venv-base, said in the row) the full install's."""
    onnx = c.path is not None and (Path(c.path) / "model.onnx").is_file() and device == "cpu"
    if onnx and BASE_PYTHON.is_file():
        row = measure_with(BASE_PYTHON, c.path, env=dict(c.env), threads=threads, dtype=c.dtype, **work)
        row["process"] = "base install"
        return row
    row = measure_in_child(c.path, device, env=dict(c.env), threads=threads, dtype=c.dtype,
                           static_cache=c.static_cache, **work)
    row["process"] = "full install"
    return row


BUSY_SECONDS = 900  # the busy process ends by itself after this, whatever happens to the bench


@contextlib.contextmanager
def busy_core() -> Iterator[None]:
    """One core kept busy (a pure-Python loop: one thread, no memory traffic to speak of) for the
    duration, as an editor, a build or a browser would on a developer's machine; bounded in time."""
    proc = subprocess.Popen([sys.executable, "-c", f"import time\nend = time.time() + {BUSY_SECONDS}\n"
                             "while time.time() < end:\n    pass\n"])
    time.sleep(0.5)  # running before the contender starts
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def _native_bf16() -> bool:
    return cpu_caps().native_bf16


def drift(contenders: list[Contender], model_dir: Path, entry: dict, threads: int, windows: int, device: str) -> None:
    """Every contender's logits on the same windows against the bf16 checkpoint's.

    Windows are as long as the model's sliding window: llama.cpp's StarCoder2 ignores the window
    (../shared notes), so longer windows would measure that, not quantization.
    """
    import torch

    from sc2quant.core.data import eval_documents
    from sc2quant.core.hf import read_config
    from sc2quant.evaluate.metrics import compare, eval_sets
    from sc2quant.runtime import load

    torch.set_num_threads(threads)
    seqlen = int(read_config(model_dir).get("sliding_window") or 512)
    base = load(model_dir, threads=threads, device=device)
    base_fn = lambda ids: base.logits(ids).float().cpu()  # noqa: E731
    sets = eval_sets(base.tokenizer, eval_documents(), seqlen=seqlen, max_windows=windows)
    widened = base.engine.describe()["dtype"] == "float32"
    entry["drift_setup"] = {"seqlen": seqlen, "windows_per_source": windows, "sources": [s.name for s in sets],
                            "tokens": sum(int(s.windows.numel()) for s in sets),
                            "baseline": "the bf16 checkpoint in transformers" + (
                                " (fp32 compute: bf16 weights are exact)" if widened else "")}
    for c in contenders:
        if c.runtime == "transformers" or c.path == model_dir:
            continue  # the baseline itself
        console.print(f"drift: {c.name}")
        if c.is_gguf:
            with llamacpp.gguf_logits(c.path, seqlen, threads) as fn:
                entry["contenders"][c.name]["drift"] = compare(sets, fn, base_fn)["all"]
        else:
            model = load(c.path, threads=threads, device=device)
            fn = lambda ids, m=model: m.logits(ids).float().cpu()  # noqa: E731
            entry["contenders"][c.name]["drift"] = compare(sets, fn, base_fn)["all"]


def summarize(entry: dict, bandwidth: float, reference: str) -> None:
    """Medians over rounds, ratios against the reference within each round, the bandwidth bound."""
    measured = {name: c for name, c in entry["contenders"].items() if c["rounds"]}
    for c in measured.values():
        rows = c["rounds"]
        c["median"] = {k: statistics.median(r[k] for r in rows)
                       for k in ("prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_bytes")}
        c["weight_bytes"] = weight_bytes_read(c, rows[-1])
        c["decode_bound_tokens_per_s"] = decode_bound(c["weight_bytes"], bandwidth)
        c["decode_fraction_of_bound"] = c["median"]["decode_tokens_per_s"] / c["decode_bound_tokens_per_s"]
    for c in measured.values():
        if c.get("busy_rounds"):  # the share of its idle speed each contender keeps with one core busy
            busy = {k: statistics.median(r[k] for r in c["busy_rounds"]) for k in ("prefill_tokens_per_s", "decode_tokens_per_s")}
            c["busy_median"] = busy
            c["busy_spread"] = {k: [min(r[k] for r in c["busy_rounds"]), max(r[k] for r in c["busy_rounds"]),
                                    len(c["busy_rounds"])] for k in busy}  # min, max, rounds
            c["busy_kept"] = {k: busy[k] / c["median"][k] for k in busy}
    entry["reference"] = reference
    ref = measured.get(reference)
    if ref is None:
        return
    ref_round = {r["round"]: r for r in ref["rounds"]}
    for c in measured.values():
        per_round = {k: [r[k] / ref_round[r["round"]][k] for r in c["rounds"] if r["round"] in ref_round]
                     for k in ("prefill_tokens_per_s", "decode_tokens_per_s")}
        ratio = {k: statistics.median(v) for k, v in per_round.items()}
        c["ratio_spread"] = {k: [min(v), max(v), len(v)] for k, v in per_round.items()}  # min, max, rounds
        ratio["peak_rss_bytes"] = c["median"]["peak_rss_bytes"] / ref["median"]["peak_rss_bytes"]
        ratio["bytes_on_disk"] = c["bytes_on_disk"] / ref["bytes_on_disk"]
        c["ratio_vs_reference"] = ratio


def weight_bytes_read(c: dict, row: dict) -> int:
    """Weight bytes one decode step reads: the tensors held (tied embedding once, as the lm_head
    reads it), ONNX initializers less Gather-only ones, or the GGUF file (llama.cpp reads the
    tied token_embd as its output matrix)."""
    if c.get("path") and (Path(c["path"]) / "model.onnx").is_file():
        return onnx_bytes_read_per_token(Path(c["path"]))
    return row.get("weight_bytes_in_memory") or c["bytes_on_disk"]


def rerender(json_file: Path, out: Path) -> Path:
    """Summarise and write a saved run again (after a change to the summary or the tables)."""
    result = json.loads(json_file.read_text())
    for entry in result["models"].values():
        summarize(entry, result["read_bandwidth_bytes_per_s"], result["reference"])
    return results.write(result, out)


def machine(device: str = "cpu") -> dict[str, Any]:
    from sc2quant.core.system import machine as this_machine

    out = this_machine()
    if device == "cuda":
        import torch

        out["gpu"] = torch.cuda.get_device_name()
    return out


def versions() -> dict[str, str]:
    build = llamacpp.cpu_options()
    flags = "native" if build == ["-DGGML_NATIVE=ON"] else (
        " ".join(o[2:-3] for o in build if o.endswith("=ON")) + " (AMX off: llama.cpp#20824)")
    return {"llama-cpp-python (vendored llama.cpp)": llamacpp.VERSION, "llama.cpp CPU build": flags, **tool_versions()}


if __name__ == "__main__":
    raise SystemExit(main())
