"""What each CPU compute mode costs: the torch engine's prefill and decode speed per mode.

    python -m bench.modes [--models embedded,300m] [--rounds 3] [--threads N]

Modes (see sc2quant.core.hf's compute policy): a plain checkpoint computed in fp32 or in bf16;
bitsandbytes nf4 through its repacked AVX512-BF16 kernel or its plain kernel (SC2QUANT_CPU=avx2
forces the plain one); a GPTQ-format int4 checkpoint in bf16 (as transformers loads it) or fp32.
Each measurement runs in a fresh process, modes in a rotated order each round, medians. Results:
bench/results/<date>-<machine>-cpu-modes.{md,json}. A mode this CPU cannot run natively (bf16 on
an AVX2 CPU is emulated) is measured anyway and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from bench.models import embedded, random_300m
from bench.run import machine
from sc2quant.core.console import console
from sc2quant.core.system import cpu_caps, tool_versions
from sc2quant.core.tables import Table, markdown
from sc2quant.evaluate.speed import measure_in_child

WORKLOAD = {"prefill": 512, "prompt": 128, "decode": 128}


def modes(name: str, model_dir: Path, work: Path) -> list[tuple[str, Path, str, dict[str, str]]]:
    """(mode, artifact, dtype, env) for one model; the quantized artifacts are built once into `work`."""
    from sc2quant.quant import QuantizeOptions, quantize

    def q(dirname: str, **kw: Any) -> Path:
        out = work / f"{name}-cpu" / dirname
        if not out.exists():
            console.print(f"[bold]building[/] {out}")
            quantize(QuantizeOptions(model=str(model_dir), out=str(out), **kw))
        return out

    nf4 = q("bnb-nf4", method="bnb", bits=4, quant_type="nf4")
    gptq = q("gptq-format-rtn-int4-g128", method="rtn", bits=4, group_size=128)
    return [("plain checkpoint, fp32", model_dir, "fp32", {}),
            ("plain checkpoint, bf16", model_dir, "bf16", {}),
            ("bnb nf4, repacked AVX512-BF16 kernel", nf4, "auto", {"SC2QUANT_CPU": "bf16"}),
            ("bnb nf4, plain kernel", nf4, "auto", {"SC2QUANT_CPU": "avx2"}),
            ("GPTQ int4 g128, bf16 (as transformers)", gptq, "auto", {}),
            ("GPTQ int4 g128, fp32", gptq, "fp32", {})]


def run(a: argparse.Namespace) -> Path:
    caps = cpu_caps()
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "threads": a.threads,
                              "workload": WORKLOAD, "rounds": a.rounds, "versions": tool_versions(), "models": {}}
    for name in a.models.split(","):
        model_dir = embedded() if name == "embedded" else random_300m(a.work)
        runs = modes(name, model_dir, a.work)
        rows: dict[str, list[dict[str, Any]]] = {m: [] for m, *_ in runs}
        for r in range(a.rounds):
            for mode, path, dtype, env in runs[r % len(runs):] + runs[: r % len(runs)]:
                if "repacked" in mode and not caps.bnb_repack:
                    continue  # the kernel does not exist on this CPU
                console.print(f"{name} round {r + 1}/{a.rounds}: {mode}")
                rows[mode].append(measure_in_child(path, "cpu", env=env, threads=a.threads, dtype=dtype, **WORKLOAD))
        result["models"][name] = {
            mode: {"prefill_tokens_per_s": statistics.median(x["prefill_tokens_per_s"] for x in xs),
                   "decode_tokens_per_s": statistics.median(x["decode_tokens_per_s"] for x in xs),
                   "peak_rss_bytes": statistics.median(x["peak_rss_bytes"] for x in xs),
                   "engine": xs[-1]["engine"], "rounds": xs}
            for mode, xs in rows.items() if xs}
    a.out.mkdir(parents=True, exist_ok=True)
    simd = "bf16" if caps.native_bf16 else "avx2" if "avx2" in caps.flags else "other"
    stem = a.out / f"{result['date']}-{os.uname().machine}-{os.cpu_count()}cpu-{simd}-cpu-modes"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(render(result, caps.describe()))
    return stem.with_suffix(".md")


def render(result: dict[str, Any], cpu: str) -> str:
    w = result["workload"]
    lines = [f"# CPU compute modes of the torch engine, {result['date']}", "",
             f"Machine: {cpu}; {result['threads']} threads. Prefill: a {w['prefill']}-token prompt; decode: "
             f"{w['decode']} greedy tokens after a {w['prompt']}-token prompt, batch 1. Fresh process per "
             f"measurement, {result['rounds']} rounds in rotated order, medians.", ""]
    for name, entry in result["models"].items():
        t = Table(["mode", "prefill tok/s", "decode tok/s", "peak RSS MB", "computes in"], right={1, 2, 3},
                  title=f"{name}")
        for mode, m in entry.items():
            t.add(mode, m["prefill_tokens_per_s"], m["decode_tokens_per_s"], m["peak_rss_bytes"] / 1e6,
                  f"{m['engine']['dtype']}, {m['engine']['policy']}")
        lines += [*markdown(t), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="embedded,300m")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--work", type=Path, default=Path("bench/work"))
    console.print(f"[green]wrote[/] {run(ap.parse_args(argv))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
