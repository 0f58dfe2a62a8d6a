"""`sc2quant report`: accuracy drift, footprint and speed of artifacts next to the bf16 baseline.

Drift is measured in this process on the same token windows for every model (only the
baseline and one other model are loaded at a time). Speed, peak RSS and weight bytes are
measured in a fresh process per model (`sc2quant.evaluate.speed`), so one model's memory never
leaks into another's numbers. Each artifact's checksums are verified once, up front.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from sc2quant.core import artifact
from sc2quant.core.console import api_output, progress
from sc2quant.core.errors import UserError
from sc2quant.core.files import dir_bytes
from sc2quant.core.tables import Table, fmt, markdown

VERB = "report"
COLUMNS = ("model", "ppl", "ppl drift %", "KL mean", "KL p99", "top-1 agree", "disk MB", "weights MB", "peak RSS MB",
           "prefill tok/s", "decode tok/s")


def model_label(path: Path) -> str:
    if artifact.is_artifact(path):
        return artifact.read_manifest(path).method
    return "baseline"


@api_output("report")
def report(artifacts: list[str | Path], baseline: str | Path | None = None, eval_paths: list[str] | None = None,
           seqlen: int = 512, stride: int | None = None, max_windows: int = 8, humaneval: bool = False,
           humaneval_limit: int | None = None, device: str = "cpu", speed: bool = True,
           out: Path | None = None, force: bool = False, write_manifests: bool = True, threads: int | None = None,
           dtype: str = "auto", engine: str = "auto") -> dict[str, Any]:
    """Measure every artifact against the baseline; optionally write report.md/json and tradeoff.png."""
    from sc2quant.core.data import eval_documents
    from sc2quant.core.source import resolve_source
    from sc2quant.evaluate.metrics import compare, eval_sets
    from sc2quant.evaluate.speed import measure_in_child
    from sc2quant.runtime import load

    if not artifacts:
        raise UserError("give at least one artifact to report on")
    paths = [resolve_source(a).path for a in artifacts]
    base_source = resolve_source(baseline)
    inputs = [*paths, base_source.path, *(e for e in eval_paths or [] if e != "calib_data")]
    if out is not None:
        out = artifact.output_path(out, Path("report"))
        artifact.check_output_path(out, force, VERB, inputs)
    from sc2quant.core.hf import read_config

    context = min(int(read_config(p).get("max_position_embeddings", 2048)) for p in [*paths, base_source.path])
    if seqlen > context:
        raise UserError(f"--seqlen {seqlen} is longer than the models' context ({context} tokens): "
                        f"use --seqlen {context} or less")
    for p in paths:
        if artifact.is_artifact(p):
            artifact.verify(p)  # once: the loads below skip it
    base = load(baseline, device=device, threads=threads, dtype=dtype)
    sets = eval_sets(base.tokenizer, eval_documents(eval_paths), seqlen=seqlen, stride=stride, max_windows=max_windows)
    if not sets or all(s.windows.shape[1] < 2 for s in sets):
        raise UserError("the evaluation text is too short to measure anything: give longer files")
    rows: dict[str, Any] = {}
    labels = [model_label(p) for p in paths]
    labels = [f"{lab} ({p.name})" if labels.count(lab) > 1 else lab for lab, p in zip(labels, paths)]
    entries = [(base_source.path, "baseline", base)] + [(p, lab, None) for p, lab in zip(paths, labels)]
    steps = len(sets) + (1 if speed else 0)  # per model: one step per evaluation source, one for speed
    with progress() as bar:
        task = bar.add_task("report", total=len(entries) * steps)
        for path, label, model in entries:
            def step(what: str, label: str = label) -> None:
                bar.update(task, description=f"{label}: {what}")

            step("loading")
            # verified again in the load: a GPTQ artifact's cached ONNX conversion is keyed by checked checksums
            model = model or load(path, device=device, threads=threads, dtype=dtype, engine=engine)
            row: dict[str, Any] = {"path": str(path), "label": label, "bytes_on_disk": dir_bytes(path)}
            step("drift")
            row["drift"] = compare(sets, model.logits, base.logits, on_source=lambda _: bar.advance(task))
            if humaneval:
                step("HumanEval")
                row["humaneval"] = _humaneval(model, humaneval_limit)
            if speed:
                step("speed and peak memory (fresh process)")
                row.update(measure_in_child(path, device, threads=threads, dtype=dtype, verify=False, engine=engine))
                bar.advance(task)
            rows[str(path)] = row
            if model is not base:
                del model
    result = {"baseline": str(base_source.path), "evaluation": {"sources": [s.name for s in sets], "seqlen": seqlen,
              "stride": stride or seqlen, "windows_per_source": max_windows,
              "tokens": {s.name: int(s.windows.numel()) for s in sets}}, "models": list(rows.values())}
    if out is not None:
        write_outputs(result, Path(out), force, inputs)
    if write_manifests:
        for row in rows.values():
            if artifact.is_artifact(Path(row["path"])):
                _record(Path(row["path"]), {"report": _metrics_for_manifest(row, result)})
    return result


def _record(path: Path, metrics: dict[str, Any]) -> None:
    """Merge the metrics into an artifact's manifest; a read-only artifact keeps its manifest (said in
    one line: the measurements are in the results and the report, not lost)."""
    from sc2quant.core.console import console

    try:
        artifact.update_metrics(path, metrics)
    except OSError as exc:
        console.print(f"note: {path} is not writable ({exc.strerror}): its manifest was not updated with these metrics",
                      highlight=False, markup=False, soft_wrap=True)


def _metrics_for_manifest(row: dict, result: dict) -> dict:
    keep = {k: v for k, v in row.items() if k not in ("path", "label")}
    return {**keep, "baseline": result["baseline"], "evaluation": result["evaluation"],
            "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _humaneval(model: Any, limit: int | None) -> dict:
    from sc2quant.evaluate.humaneval import STOP_SEQUENCES, evaluate, load_problems

    summary = evaluate(load_problems(limit), lambda p: model.generate(p, max_new_tokens=256, stop=STOP_SEQUENCES))
    return {k: summary[k] for k in ("pass@1", "n", "passed", "status")}


def table(result: dict) -> Table:
    """The main table: one row per model (pass@1 added when HumanEval ran)."""
    he = any("humaneval" in m for m in result["models"])
    t = Table(list(COLUMNS) + (["pass@1"] if he else []), right=set(range(1, len(COLUMNS) + he)))
    for m in result["models"]:
        d = m["drift"]["all"]
        t.add(m["label"], d["perplexity"], d["perplexity_drift_pct"], d["kl_mean"], d["kl_p99"], d["top1_agreement"],
              m["bytes_on_disk"] / 1e6, m.get("weight_bytes_in_memory", float("nan")) / 1e6,
              m.get("peak_rss_bytes", float("nan")) / 1e6, m.get("prefill_tokens_per_s"), m.get("decode_tokens_per_s"),
              *([m.get("humaneval", {}).get("pass@1")] if he else []))
    return t


def source_table(result: dict) -> Table:
    """Drift per evaluation source: KL mean / top-1 agreement / perplexity drift %."""
    sources = list(result["models"][0]["drift"])
    t = Table(["model", *sources], title="Drift per evaluation source (KL mean / top-1 agreement / ppl drift %)")
    for m in result["models"]:
        t.add(m["label"], *[f"{m['drift'][s]['kl_mean']:.2e} / {m['drift'][s]['top1_agreement']:.3f} / "
                            f"{m['drift'][s]['perplexity_drift_pct']:+.2f}" for s in sources])
    return t


def summary_line(result: dict) -> str:
    e = result["evaluation"]
    return (f"Baseline: `{result['baseline']}`. Evaluation: {', '.join(e['sources'])}, windows of {e['seqlen']} tokens, "
            f"stride {e['stride']}.")


def render_markdown(result: dict) -> str:
    lines = ["# sc2quant report", "", summary_line(result), "", *markdown(table(result)), "", *markdown(source_table(result))]
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


def write_outputs(result: dict, out: Path, force: bool, inputs: list[Path] | None = None) -> None:
    """report.json, report.md, tradeoff.png, and an sc2quant.json saying a report lives here."""
    with artifact.staging(out, force, VERB, inputs or []) as tmp:
        (tmp / "report.json").write_text(json.dumps(result, indent=2) + "\n")
        (tmp / "report.md").write_text(render_markdown(result))
        plot_tradeoff(result, tmp / "tradeoff.png")
        marker = {"format": artifact.REPORT_FORMAT, "verb": VERB, "baseline": result["baseline"],
                  "models": [m["path"] for m in result["models"]], "created": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "files": artifact.file_table(tmp)}  # what --force may later replace (artifact.check_replaceable)
        (tmp / artifact.MANIFEST_NAME).write_text(json.dumps(marker, indent=2) + "\n")
        artifact.publish(tmp, out, force, VERB)


__all__ = ["fmt", "render_markdown", "report", "source_table", "table"]
