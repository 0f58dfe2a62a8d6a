"""Prefill chunk size and prompt reuse on sc2quant's ONNX engine (the default chunk comes from here).

    python -m bench.prefill [--model DIR|300m] [--tokens 1000] [--rounds 5] [--out bench/results]

Exports the model (default: the embedded one) to int4 ONNX, then times prefilling one prompt of
`--tokens` tokens of evaluation text with each chunk size, and the same prompt again after a prompt
that shares all but its last line (prompt reuse), `--rounds` rounds in rotated order. Prints and
writes medians with the min-max spread (<date>-<cpu>-prefill.md/.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.models import random_300m
from sc2quant import export_onnx, load
from sc2quant.core.data import eval_documents
from sc2quant.core.system import machine

CHUNKS = (64, 128, 256, 512, 1024)


def _time(model, prompt: str) -> float:
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=1)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a model directory, or 300m (the bench's random 315M StarCoder2)")
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sc2quant-prefill-") as work:
        source = random_300m(Path(work)) if a.model == "300m" else a.model
        path = export_onnx(source, Path(work) / "onnx", weights="int4")
        probe = load(path, threads=a.threads, prefix_cache_bytes=0)
        text = "\n".join(d.text for d in eval_documents())
        ids = probe.encode(text)[: min(a.tokens, probe.context - 2)]
        prompt = probe.tokenizer.decode(ids)
        edited = probe.tokenizer.decode(ids[:-8])  # the same file, a line shorter: an edit near the cursor
        models = {c: load(path, threads=a.threads, prefix_cache_bytes=0, prefill_chunk=c) for c in CHUNKS}
        reuse = load(path, threads=a.threads, prefill_chunk=128)
        rows: dict[str, list[float]] = {f"chunk {c}": [] for c in CHUNKS} | {"reuse (chunk 128)": []}
        for r in range(a.rounds):
            order = list(CHUNKS[r % len(CHUNKS):] + CHUNKS[: r % len(CHUNKS)])
            for c in order:
                rows[f"chunk {c}"].append(len(ids) / _time(models[c], prompt))
            reuse.generate(edited, max_new_tokens=1)
            rows["reuse (chunk 128)"].append(len(ids) / _time(reuse, prompt))
    summary = {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in rows.items()}
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "tokens": len(ids), "rounds": a.rounds,
              "threads": a.threads, "model": a.model or "embedded", "prompt_tokens_per_s": summary, "raw": rows}
    simd = "avx512" if "avx512f" in result["machine"]["simd"] else "avx2"
    stem = f"{result['date']}-{simd}{'-amx' if 'amx_bf16' in result['machine']['simd'] else ''}-prefill-{result['model']}"
    lines = [f"# Prefill of a {len(ids)}-token prompt, sc2quant ONNX int4 ({result['model']})", "",
             f"{result['machine']['cpu']}, {a.threads} threads, {a.rounds} rounds in rotated order; prompt tokens "
             "per second, median (min-max). `python -m bench.prefill`.", "",
             "| prefill | tok/s median | min | max |", "|---|---|---|---|"]
    lines += [f"| {k} | {s['median']:.0f} | {s['min']:.0f} | {s['max']:.0f} |" for k, s in summary.items()]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (a.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
