"""`sc2quant report`: accuracy drift, footprint and speed of artifacts next to the bf16 baseline.

Drift is measured in this process on the same token windows for every model (baseline
recomputed batch by batch so only two models are ever loaded). Peak RSS, weight bytes and
speed are measured in a fresh child process per model, so one model's memory never leaks
into another's numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sc2quant import artifact
from sc2quant.console import console
from sc2quant.errors import UserError

PREFILL_TOKENS = 512
DECODE_TOKENS = 64


def model_label(path: Path) -> str:
    if artifact.is_artifact(path):
        return artifact.read_manifest(path).method
    return "baseline"


def measure(path: str | None, device: str = "cpu", prefill: int = PREFILL_TOKENS, decode: int = DECODE_TOKENS,
            prompt: int | None = None, threads: int | None = None, dtype: str = "auto") -> dict:
    """Load one model, warm up, time a `prefill`-token prompt, then `decode` greedy steps: after
    that prompt, or after a fresh `prompt`-token one. Token ids are deterministic and free of
    special tokens. Run in a child process (`python -m sc2quant.report --measure`)."""
    from sc2quant.runtime import load

    t0 = time.perf_counter()
    model = load(path, device=device, threads=threads, dtype=dtype)
    load_s = time.perf_counter() - t0
    prefill = min(prefill, model.context - decode - 1)
    ids = [i * 7919 % (len(model.tokenizer) - 64) + 64 for i in range(max(prefill, prompt or 0))]
    sync = torch.cuda.synchronize if model.engine.device == "cuda" and torch.cuda.is_available() else (lambda: None)

    state, logits = model.engine.start([ids[:32]])  # warm-up: kernels, allocator, thread pools
    for _ in range(4):
        logits = model.engine.step(state, logits.argmax(-1))
    sync()
    t = time.perf_counter()
    state, logits = model.engine.start([ids[:prefill]])
    sync()
    prefill_s = time.perf_counter() - t
    if prompt is not None:
        state, logits = model.engine.start([ids[:prompt]])
    tok = logits.argmax(-1)
    sync()
    t = time.perf_counter()
    for _ in range(decode):
        tok = model.engine.step(state, tok).argmax(-1)
    sync()
    decode_s = time.perf_counter() - t
    return {
        "load_seconds": load_s,
        "prefill_tokens_per_s": prefill / prefill_s,
        "decode_tokens_per_s": decode / decode_s,
        "prefill_tokens": prefill,
        "prompt_tokens": prefill if prompt is None else prompt,
        "decode_tokens": decode,
        "weight_bytes_in_memory": weight_bytes(model.engine, model.path),
        "peak_rss_bytes": peak_rss_self(),
    }


def vm_hwm(pid: int | str = "self") -> int:
    """A process's peak resident set since its exec (VmHWM, bytes); 0 where /proc cannot say.

    Not getrusage's ru_maxrss: Linux carries that across exec, so a child started from a parent
    holding 1 GB would report at least 1 GB whatever it did itself.
    """
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass  # not Linux, or the process is exiting
    return 0


def peak_rss_self() -> int:
    return vm_hwm() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: the best there is


def weight_bytes(engine: Any, path: Path) -> int:
    """Bytes of every tensor the model holds (quantization state included), shared storage once.

    ONNX Runtime owns its initializers; their bytes are those of the graph's weight files.
    """
    if not hasattr(engine, "model"):
        return sum(p.stat().st_size for p in Path(path).iterdir() if p.suffix in (".onnx", ".data", ".onnx_data"))
    seen, total = set(), 0
    for t in list(engine.model.state_dict().values()):
        if not isinstance(t, torch.Tensor):
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def measure_in_child(path: Path | None, device: str, **options: int | str | None) -> dict:
    """`measure` in a fresh process (options: prefill, decode, prompt, threads, dtype), so that
    its peak RSS is this model's alone."""
    cmd = [sys.executable, "-m", "sc2quant.report", "--measure", str(path) if path else "", "--device", device]
    cmd += [arg for k, v in options.items() if v is not None for arg in (f"--{k}", str(v))]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "SC2QUANT_NO_PROGRESS": "1"})
    if done.returncode != 0:
        raise UserError(f"measuring {path} failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'unknown'}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(artifacts: list[str | Path], baseline: str | Path | None = None, eval_paths: list[str] | None = None,
           seqlen: int = 512, stride: int | None = None, max_windows: int = 8, humaneval: bool = False,
           humaneval_limit: int | None = None, device: str = "cpu", speed: bool = True,
           out: Path | None = None, force: bool = False, write_manifests: bool = True) -> dict[str, Any]:
    """Measure every artifact against the baseline; optionally write report.md/json and tradeoff.png."""
    from sc2quant.data import eval_documents
    from sc2quant.loader import resolve_source
    from sc2quant.metrics import compare, eval_sets
    from sc2quant.runtime import load

    if not artifacts:
        raise UserError("give at least one artifact to report on")
    paths = [resolve_source(a).path for a in artifacts]
    for p in paths:
        artifact.verify(p) if artifact.is_artifact(p) else None
    if out is not None:
        artifact.check_output_path(Path(out), force)
    base_source = resolve_source(baseline)
    base = load(baseline, device=device)
    sets = eval_sets(base.tokenizer, eval_documents(eval_paths), seqlen=seqlen, stride=stride, max_windows=max_windows)
    if not sets or all(s.windows.shape[1] < 2 for s in sets):
        raise UserError("the evaluation text is too short to measure anything: give longer files")
    rows: dict[str, Any] = {}
    labels = [model_label(p) for p in paths]
    labels = [f"{lab} ({p.name})" if labels.count(lab) > 1 else lab for lab, p in zip(labels, paths)]
    entries = [(base_source.path, "baseline", base)] + [(p, lab, None) for p, lab in zip(paths, labels)]
    for path, label, model in entries:
        console.print(f"[bold]evaluating[/] {label} ({path})")
        model = model or load(path, device=device)
        row: dict[str, Any] = {"path": str(path), "label": label, "bytes_on_disk": artifact.dir_bytes(path)}
        row["drift"] = compare(sets, model.logits, base.logits)
        if humaneval:
            row["humaneval"] = _humaneval(model, humaneval_limit)
        if speed:
            row.update(measure_in_child(path, device))
        rows[str(path)] = row
        if model is not base:
            del model
    result = {"baseline": str(base_source.path), "evaluation": {"sources": [s.name for s in sets], "seqlen": seqlen,
              "stride": stride or seqlen, "windows_per_source": max_windows,
              "tokens": {s.name: int(s.windows.numel()) for s in sets}}, "models": list(rows.values())}
    if write_manifests:
        for row in rows.values():
            if artifact.is_artifact(Path(row["path"])):
                artifact.update_metrics(Path(row["path"]), {"report": _metrics_for_manifest(row, result)})
    if out is not None:
        write_outputs(result, Path(out), force)
    return result


def _metrics_for_manifest(row: dict, result: dict) -> dict:
    keep = {k: v for k, v in row.items() if k not in ("path", "label")}
    return {**keep, "baseline": result["baseline"], "evaluation": result["evaluation"],
            "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _humaneval(model: Any, limit: int | None) -> dict:
    from sc2quant.humaneval import evaluate, load_problems

    stops = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]
    summary = evaluate(load_problems(limit), lambda p: model.generate(p, max_new_tokens=256, stop=stops))
    return {k: summary[k] for k in ("pass@1", "n", "passed", "status")}


def table_rows(result: dict) -> list[dict[str, Any]]:
    rows = []
    for m in result["models"]:
        d = m["drift"]["all"]
        rows.append({
            "model": m["label"], "ppl": d["perplexity"], "ppl drift %": d["perplexity_drift_pct"], "KL mean": d["kl_mean"],
            "KL p99": d["kl_p99"], "top-1 agree": d["top1_agreement"], "disk MB": m["bytes_on_disk"] / 1e6,
            "weights MB": m.get("weight_bytes_in_memory", float("nan")) / 1e6,
            "peak RSS MB": m.get("peak_rss_bytes", float("nan")) / 1e6,
            "prefill tok/s": m.get("prefill_tokens_per_s", float("nan")),
            "decode tok/s": m.get("decode_tokens_per_s", float("nan")),
            **({"pass@1": m["humaneval"]["pass@1"]} if "humaneval" in m else {}),
        })
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 and v != 0 else f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def render_markdown(result: dict) -> str:
    rows = table_rows(result)
    head = list(rows[0])
    lines = ["# sc2quant report", "", f"Baseline: `{result['baseline']}`. Evaluation: {result['evaluation']['sources']}, "
             f"windows of {result['evaluation']['seqlen']} tokens, stride {result['evaluation']['stride']}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_fmt(r[h]) for h in head) + " |" for r in rows]
    lines += ["", "## Drift per evaluation source (KL mean / top-1 agreement / perplexity drift %)", ""]
    sources = list(result["models"][0]["drift"])
    lines += ["| model | " + " | ".join(sources) + " |", "|" + "---|" * (len(sources) + 1)]
    for m in result["models"]:
        cells = [f"{m['drift'][s]['kl_mean']:.2e} / {m['drift'][s]['top1_agreement']:.3f} / "
                 f"{m['drift'][s]['perplexity_drift_pct']:+.2f}" for s in sources]
        lines.append(f"| {m['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_tradeoff(result: dict, file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in result["models"]:
        x = m.get("weight_bytes_in_memory", m["bytes_on_disk"]) / 1e6
        y = max(m["drift"]["all"]["kl_mean"], 1e-7)
        is_base = m["label"] == "baseline"
        ax.scatter([x], [y], s=80, marker="*" if is_base else "o", color="black" if is_base else None, zorder=3)
        ax.annotate(m["label"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=9)
    ax.set_yscale("log")
    ax.set_xlabel("weights in memory (MB)")
    ax.set_ylabel("mean KL divergence to baseline (log)")
    ax.set_title("Memory vs accuracy drift (baseline = star, KL floored at 1e-7)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def write_outputs(result: dict, out: Path, force: bool) -> None:
    with artifact.staging(out, force) as tmp:
        (tmp / "report.json").write_text(json.dumps(result, indent=2) + "\n")
        (tmp / "report.md").write_text(render_markdown(result))
        plot_tradeoff(result, tmp / "tradeoff.png")
        artifact.publish(tmp, out, force)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="internal: measure one model's speed and memory")
    ap.add_argument("--measure", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prefill", type=int, default=PREFILL_TOKENS)
    ap.add_argument("--decode", type=int, default=DECODE_TOKENS)
    ap.add_argument("--prompt", type=int, help="decode after a fresh prompt of this length (default: after the prefill)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--dtype", default="auto")
    a = ap.parse_args()
    print(json.dumps(measure(a.measure or None, a.device, a.prefill, a.decode, a.prompt, a.threads, a.dtype)))
