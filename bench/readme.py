"""The README's figures, rendered from the committed results files, never typed.

    python -m bench.readme            # re-make every marked block of README.md from bench/results/*.json
    python -m bench.readme --check    # exit 1 and name the blocks that differ (tests/test_bench_readme.py)

A block is the text between `<!-- bench.readme: NAME -->` and `<!-- /bench.readme -->`; `BLOCKS` maps
each name to the function that renders it from its results file(s). Verdicts ("meets", "misses by
x %") are computed here against the targets the benches define (`bench.results.TARGETS`,
`bench.embed.TARGETS`, `bench.editor.TARGETS`), every target listed, misses first.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import editor as editor_bench
from bench import embed as embed_bench
from bench.contenders import DEFAULT_EXPORT, DEFAULT_FROM_GPTQ, SPIN_OFF
from bench.results import BUSY_PEER, TARGETS, TARGETS_FROM_GPTQ

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
README = REPO / "README.md"
BLOCK = re.compile(r"(<!-- bench\.readme: ([a-z0-9-]+) -->\n)(.*?)(<!-- /bench\.readme -->)", re.S)

# The committed runs the README shows (their .md beside each .json is the full report).
PEERS = "2026-12-05-x86_64-2cpu-avx512-bf16"
PEERS_AMX = "2026-11-30-x86_64-2cpu-avx512-bf16-amx"
PEERS_AVX2 = "2026-11-26-x86_64-2cpu-avx2"
EMBED = "2026-12-05-avx512-embed-300m"
EDITOR = {1: "2026-12-05-avx512-editor-1session", 4: "2026-12-05-avx512-editor-4session"}
PREFILL = "2026-12-05-avx512-prefill-300m"
PARALLEL_SWEEP = "2026-12-08-avx512-editor-4session"  # the --parallel sweep, embedded model, four editors
BATCHED = "2026-12-08-avx512-editor"  # the 315M model, one and four editors, rows batched against --parallel 1
SERVING = "2026-11-30-serving"
MODES = "2026-11-30-x86_64-2cpu-bf16-cpu-modes"
REPORT = "2026-11-26-embedded-report/report"
# Scale runs, newest first: a row is taken from the newest file that measured it. What the export row
# ran is named per file: the export's defaults changed between these runs (the commands are in the files).
SCALE = {"2026-12-05-scale-3b-export-int4-gptq": "GPTQ, block 128 (today's default)",
         "2026-12-05-scale-only": "round-to-nearest, block 32 (the default before)",
         "2026-11-30-scale": "round-to-nearest, block 32 (the default before)"}  # keep GPTQ_EXPORT/RTN_EXPORT equal
RUN_BOUND_GB = 1.0  # issue 28: `run` of the 7B int4 export within its artifact + 1.0 GB
EXPORT_SECONDS_3B = 600  # issue 26/27: the 3B int4 export (GPTQ) in at most 10 minutes
GB = 10**9
MIB = 2**20

LABELS = {  # peers-table rows: the contender's name in the results file -> what a user types
    DEFAULT_EXPORT: "**`export onnx --weights int4`** (default: GPTQ, block 128, lm_head int8)",
    SPIN_OFF: "the same, `SC2QUANT_ORT_SPIN=0`",
    DEFAULT_FROM_GPTQ: "**GPTQ `quantize --bits 4`, then `export onnx`** (g128, lm_head int8; on the random 315M model "
                       "the GPTQ-format checkpoint is made by `--method rtn`: the same format and kernels, so the same "
                       "speed; the KL is GPTQ's, on the embedded model)",
    "sc2quant ONNX int4 (RTN b128, lm_head int8)": "`--int4-method rtn` (block 128)",
    "sc2quant ONNX int4 (GPTQ-lite b32, lm_head int8)": "`--block-size 32` (GPTQ)",
    "sc2quant ONNX int4 (RTN b32, lm_head int8; the defaults before)":
        "`--block-size 32 --int4-method rtn` (the default before)",
}


def load(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / f"{name}.json").read_text())


def link(name: str, text: str | None = None) -> str:
    path = f"bench/results/{name}.md"
    return f"[{text or path}]({path})"


@dataclass
class Verdict:
    """One target checked on one measured figure: `value` against `target` (at least or at most)."""
    what: str
    value: float
    target: float
    at_least: bool
    source: str
    spread: tuple[float, float] | None = None  # min-max over rounds
    rounds_missed: tuple[int, int] | None = None  # (rounds that miss, rounds)
    unit: str = "x"
    note: str = ""

    @property
    def met(self) -> bool:
        return self.value >= self.target if self.at_least else self.value <= self.target

    def words(self) -> str:
        if self.met:
            word = "meets"
        else:
            word = f"**misses** by {gap(self.value, self.target)}"
        if self.rounds_missed and self.rounds_missed[0]:
            word += f" ({self.rounds_missed[0]} of {self.rounds_missed[1]} rounds miss)"
        return word

    def row(self) -> str:
        fmt = _fmt_unit(self.unit)
        spread = f" ({fmt(self.spread[0])}-{fmt(self.spread[1])})" if self.spread else ""
        sign = ">=" if self.at_least else "<="
        note = f" {self.note}" if self.note else ""
        return (f"| {self.what}{note} | {sign} {fmt(self.target)} | {fmt(self.value)}{spread} | {self.words()} | "
                f"{link(self.source, 'results')} |")


def gap(value: float, target: float) -> str:
    """How far a figure is from its target, relative to the target: 1.197 against 1.2 is 0.2 %."""
    off = abs(value / target - 1) * 100
    return f"{off:.1f} %" if off < 10 else f"{off:.0f} %"


def _fmt_unit(unit: str) -> Callable[[float], str]:
    if unit == "x":
        return lambda v: f"{v:.2f}x"
    if unit == "GB":
        return lambda v: f"{v:.2f} GB"
    if unit == "MB":
        return lambda v: f"{v:.0f} MB"
    if unit == "s":
        return lambda v: f"{v:,.0f} s"
    if unit == "%":
        return lambda v: f"{v:.0%}"
    raise ValueError(unit)


def r2(v: float) -> str:
    return f"{v:.2f}"


# --- the peers bench -------------------------------------------------------------------------------

def per_round(result: dict, model: str, name: str, key: str) -> list[float]:
    """A contender's ratio to the reference in each round (the bench's pairing: same round index)."""
    cs = result["models"][model]["contenders"]
    ref = {r["round"]: r for r in cs[result["reference"]]["rounds"]}
    return [r[key] / ref[r["round"]][key] for r in cs[name]["rounds"] if r["round"] in ref]


def rss_process(result: dict) -> str:
    """Which process the peers run measured sc2quant's peak RSS in (runs before bench.run's
    `measure_contender` recorded none: the full install's, with torch imported)."""
    c = result["models"]["300m"]["contenders"][DEFAULT_EXPORT]
    return c["rounds"][0].get("process", "full install")


def rss_note(result: dict) -> str:
    if rss_process(result) == "base install":
        return "(measured in the base install's process, as an app runs it)"
    return "(measured in the full install's process, torch imported)"


def peers_verdicts() -> list[Verdict]:
    result = load(PEERS)
    big, small = result["models"]["300m"]["contenders"], result["models"]["embedded"]["contenders"]
    q4km = "llama.cpp Q4_K_M+imatrix"
    out: list[Verdict] = []
    for name, targets, label in ((DEFAULT_EXPORT, TARGETS, "default export"),
                                 (DEFAULT_FROM_GPTQ, TARGETS_FROM_GPTQ, "GPTQ `quantize`, then export")):
        c = big[name]
        for key, what in (("decode_tokens_per_s", "decode"), ("prefill_tokens_per_s", "prefill")):
            rounds = per_round(result, "300m", name, key)
            target = targets[what]
            out.append(Verdict(f"{label}: {what} ÷ Q4_0", c["ratio_vs_reference"][key], target, True, PEERS,
                               (min(rounds), max(rounds)), (sum(r < target for r in rounds), len(rounds))))
        out.append(Verdict(f"{label}: peak RSS ÷ Q4_0", c["ratio_vs_reference"]["peak_rss_bytes"], targets["rss"],
                           False, PEERS, note=rss_note(result)))
    c = big[DEFAULT_EXPORT]
    out.append(Verdict("default export: disk ÷ Q4_K_M+imatrix", c["bytes_on_disk"] / big[q4km]["bytes_on_disk"],
                       TARGETS["disk_vs_q4_k_m"], False, PEERS))
    kl, ref = small[DEFAULT_EXPORT]["drift"]["kl_mean"], small[q4km]["drift"]["kl_mean"]
    out.append(Verdict("default export: KL ÷ Q4_K_M+imatrix (embedded model)", kl / ref,
                       TARGETS["kl_vs_q4_k_m_imatrix"], False, PEERS))
    peer = big[BUSY_PEER]["busy_kept"]
    for key, what in (("decode_tokens_per_s", "decode"), ("prefill_tokens_per_s", "prefill")):
        worst = min((c["busy_kept"][key], n) for n, c in big.items()
                    if c.get("runtime") == "sc2quant" and c.get("busy_kept"))
        out.append(Verdict(f"busy machine: {what} kept, every sc2quant row vs Q4_0's", worst[0], peer[key], True,
                           PEERS, unit="%"))
    return out


def peers_table() -> str:
    result = load(PEERS)
    big, small = result["models"]["300m"]["contenders"], result["models"]["embedded"]["contenders"]
    q4km = "llama.cpp Q4_K_M+imatrix"
    lines = ["| 315M, ratio to Q4_0 | decode | prefill | peak RSS* | disk ÷ Q4_K_M+imatrix | KL ÷ Q4_K_M+imatrix | "
             "busy: decode / prefill kept |", "|---|---|---|---|---|---|---|"]
    names = [n for n in LABELS if n in big] + [n for n in big if n.startswith("llama.cpp")]
    for name in names:
        c = big[name]
        r, s = c["ratio_vs_reference"], c["ratio_spread"]
        cells = []
        for key in ("decode_tokens_per_s", "prefill_tokens_per_s"):
            cell = r2(r[key]) if name == result["reference"] else f"{r2(r[key])} ({r2(s[key][0])}-{r2(s[key][1])})"
            cells.append(f"**{cell}**" if name in (DEFAULT_EXPORT, DEFAULT_FROM_GPTQ) else cell)
        kl = small.get(name, {}).get("drift", {}).get("kl_mean")
        kept = c.get("busy_kept", {})
        lines.append(f"| {LABELS.get(name, name)} | {cells[0]} | {cells[1]} | {r2(r['peak_rss_bytes'])} | "
                     f"{r2(c['bytes_on_disk'] / big[q4km]['bytes_on_disk'])} | "
                     f"{r2(kl / small[q4km]['drift']['kl_mean']) if kl else '–'} | "
                     f"{kept['decode_tokens_per_s']:.0%} / {kept['prefill_tokens_per_s']:.0%} |")
    return "\n".join(lines)


def peers_profile() -> str:
    """Where a decode step goes, and how close to the bandwidth bound it runs, for the default export."""
    result = load(PEERS)
    entry = result["models"]["300m"]
    p = entry["onnx_int4_decode_profiles"][DEFAULT_EXPORT]
    mm = p["by_op"]["MatMulNBits"]
    c = entry["contenders"][DEFAULT_EXPORT]
    small = result["models"]["embedded"]["contenders"][DEFAULT_EXPORT]["ratio_vs_reference"]
    return (f"In the default export's decode step ({p['ms_per_step']:.1f} ms in ONNX Runtime's profiler), "
            f"MatMulNBits takes {mm['share']:.1%} of the operators' time and operators "
            f"{p['operator_share_of_step']:.0%} of the step: {mm['share'] * p['operator_share_of_step']:.0%} of the "
            f"step. Decode runs at {c['decode_fraction_of_bound']:.0%} of the memory-bandwidth bound, so a faster "
            "pipeline needs fewer bytes per token more than a faster kernel. On the embedded model (it fits in the "
            f"caches) the default decodes at {r2(small['decode_tokens_per_s'])}x Q4_0 and prefills at "
            f"{r2(small['prefill_tokens_per_s'])}x: per-call work of ONNX Runtime that a 6M-parameter model "
            f"cannot hide. Peak RSS (*) is {rss_note(result)[1:-1]}"
            + ("" if rss_process(result) == "base install" else ": not what an app using the base install holds (the "
               "embed bench measures that, on another export; `bench.run` now measures ONNX exports in the base "
               "install, this run predates it)")
            + f". Full tables, every round and the profile: {link(PEERS)}.")


def peers_spin() -> str:
    result = load(PEERS)
    big = result["models"]["300m"]["contenders"]
    on, off = big[DEFAULT_EXPORT], big[SPIN_OFF]
    k = "decode_tokens_per_s"

    def fig(c: dict, busy: bool) -> str:
        if busy:
            lo, hi, _ = c["busy_spread"][k]
            return f"{c['busy_median'][k]:.0f} ({lo:.0f}-{hi:.0f})"
        vals = [r[k] for r in c["rounds"]]
        return f"{c['median'][k]:.0f} ({min(vals):.0f}-{max(vals):.0f})"

    cost = 1 - off["median"][k] / on["median"][k]
    return (f"On the 315M export with one core kept busy, decode {fig(off, True)} tok/s with spinning off "
            f"against {fig(on, True)} with it on, at a cost of {cost:.0%} of idle decode ({fig(off, False)} against "
            f"{fig(on, False)} tok/s; medians and ranges of 5 rounds, {link(PEERS, 'results')}).")


def other_peers(name: str, rows: dict[str, str]) -> str:
    result = load(name)
    cs = result["models"]["300m"]["contenders"]
    parts = []
    for key, label in rows.items():
        r = cs[key]["ratio_vs_reference"]
        parts.append(f"{label} {r2(r['decode_tokens_per_s'])} / {r2(r['prefill_tokens_per_s'])}")
    m = result["machine"]
    return (f"{m['cpu']}, {result['rounds']} rounds, {result['date']} ({link(name, 'results')}), decode / prefill "
            f"÷ Q4_0: " + "; ".join(parts) + ".")


def peers_amx() -> str:
    return other_peers(PEERS_AMX, {"sc2quant ONNX int4 default (RTN b32, lm_head int8)": "RTN block 32 export",
                                   "sc2quant ONNX int4 from GPTQ g128 (default, lm_head int8)": "GPTQ g128 then export",
                                   "llama.cpp Q4_K_M+imatrix": "Q4_K_M+imatrix",
                                   "llama.cpp IQ4_XS+imatrix": "IQ4_XS+imatrix"})


def peers_avx2() -> str:
    return other_peers(PEERS_AVX2, {"sc2quant ONNX int4 (RTN b32, lm_head int8)": "RTN block 32 export, lm_head int8",
                                    "sc2quant ONNX int4 (GPTQ g128, lm_head int8)": "GPTQ g128 export, lm_head int8",
                                    "llama.cpp Q4_K_M": "Q4_K_M"})


# --- the other benches -----------------------------------------------------------------------------

def embed_verdicts() -> list[Verdict]:
    result = load(EMBED)
    s = result["summary"]
    ours, peer = s[embed_bench.OURS], s[embed_bench.PEER]
    ratio = {k: [o / p for o, p in zip(ours[k], peer[k])] for k in ("peak_rss_bytes", "cold_first_s")}
    install = result["install_bytes"]["sc2quant base install (.venv-base)"] / 1e6
    note = "(RTN block 32 export, the default before)"
    return [Verdict("app (base install): peak RSS ÷ llama.cpp Q4_0", ratio["peak_rss_bytes"][0],
                    embed_bench.TARGETS["rss"], False, EMBED, note=note),
            Verdict("app (base install): cold start to the first token ÷ llama.cpp", ratio["cold_first_s"][0],
                    embed_bench.TARGETS["cold_first"], False, EMBED, note=note),
            Verdict("base install on disk", install, 300, False, EMBED, unit="MB")]


def embed_text() -> str:
    result = load(EMBED)
    s, ib = result["summary"], result["install_bytes"]
    ours, off, peer = s[embed_bench.OURS], s[embed_bench.NO_PREPACK], s[embed_bench.PEER]

    def rng(v: list[float], f: str = ".2f") -> str:
        return f"{v[0]:{f}} ({v[1]:{f}}-{v[2]:{f}})"

    return (f"What an app pays, against llama.cpp's `llama-completion` on the same weights as Q4_0 (315M "
            f"model, int4 export by round-to-nearest at block 32, the export default before this round's GPTQ at "
            f"block 128; {result['threads']} threads, idle {result['machine']['cpu']}, medians of {result['rounds']} "
            f"rounds (min-max), {link(EMBED)}, `python -m bench.embed`): peak RSS for a 1,024-token prompt and 128 new "
            f"tokens {ours['peak_rss_bytes'][0] / MIB:.0f} vs {peer['peak_rss_bytes'][0] / MIB:.0f} MiB "
            f"({ours['peak_rss_bytes'][0] / peer['peak_rss_bytes'][0]:.2f}x); cold start to the first token "
            f"{rng(ours['cold_first_s'])} vs {rng(peer['cold_first_s'])} s "
            f"({ours['cold_first_s'][0] / peer['cold_first_s'][0]:.2f}x; {off['cold_first_s'][0]:.2f} s when ONNX "
            f"Runtime packs the weights again at every load, `SC2QUANT_PREPACKED=0`). The first load on a machine "
            f"packs and saves the weights once ({result['first_load_first_token_s'][0]:.1f} s to the first token; "
            f"{result['prepacked_entry_bytes'] / MIB:.0f} MiB in the user cache for a "
            f"{result['export_bytes'] / MIB:.0f} MiB export). Prefill {ours['prefill_tokens_per_s'][0]:.0f} vs "
            f"{peer['prefill_tokens_per_s'][0]:.0f} tokens/s, decode {ours['decode_tokens_per_s'][0]:.0f} vs "
            f"{peer['decode_tokens_per_s'][0]:.0f} tokens/s; install "
            f"{ib['sc2quant base install (.venv-base)'] / MIB:.0f} MiB vs "
            f"{ib['llama.cpp (llama-completion + its shared libraries)'] / MIB:.0f} MiB.")


def installs() -> str:
    ib = load(EMBED)["install_bytes"]
    return ("| install | what it runs | what it brings | on disk |\n|---|---|---|---|\n"
            "| `make install` (or `pip install 'sc2quant[all]'`) | everything: quantize, export, report, the torch and "
            "ONNX engines | torch, transformers, GPTQModel, bitsandbytes, ONNX tools, HumanEval | "
            f"{ib['sc2quant full install (.venv)'] / MIB:,.0f} MiB |\n"
            "| `pip install sc2quant` (`make install-base`: `.venv-base`) | ONNX exports: `sc2quant.load`, "
            "`generate`/`stream`/`infill`, `run`, `serve`, `inspect` | onnxruntime (CPU), tokenizers, numpy, the CLI "
            f"and server | {ib['sc2quant base install (.venv-base)'] / MIB:,.0f} MiB |\n\n"
            f"(Sizes measured by `python -m bench.embed`, {link(EMBED, 'results')}.)")


def file_verdicts(name: str, model: str = "300m", label: str = "editor") -> list[Verdict]:
    """Every target an editor results file scores, as `bench.editor` scores them: first token and whole
    request against llama-server (bench.editor.TARGETS), the prompt cache's gain where measured, and with
    rows batched (a `--parallel 1` row in the run) one editor against `--parallel 1` and several against
    llama-server (TARGETS_BATCHED)."""
    T, B = editor_bench.TARGETS, editor_bench.TARGETS_BATCHED
    out = []
    for n, per in load(name)["models"][model]["runs"].items():
        s, who = per["summary"][editor_bench.MAIN], f"{label}, {'one editor' if n == '1' else f'{n} editors at once'}"

        def add(what: str, key: str, target: float, at_least: bool = False, s: dict = s, who: str = who) -> None:
            out.append(Verdict(f"{who}: {what}", s[key][0], target, at_least, name, (s[key][1], s[key][2])))

        add("first token p50 ÷ llama-server", "ttft_p50_vs_llama", T["ttft_vs_llama"])
        add("whole request p50 ÷ llama-server", "latency_p50_vs_llama", T["latency_vs_llama"])
        if "ttft_gain_from_cache" in s:
            add("first token gain from the prompt cache", "ttft_gain_from_cache", T["ttft_gain_from_cache"], True)
        if "ttft_p50_vs_parallel_1" in s:
            for key, what in (("ttft_p50", "first token"), ("latency_p50", "whole request")):
                if n == "1":
                    add(f"rows batched, {what} p50 ÷ `--parallel 1`", f"{key}_vs_parallel_1", B["vs_parallel_1"])
                else:
                    add(f"rows batched, {what} p50 ÷ llama-server -np {n}", f"{key}_vs_llama",
                        B[f"{key.split('_')[0]}_vs_llama"])
    return out


def editor_verdicts() -> list[Verdict]:
    return [v for name in EDITOR.values() for v in file_verdicts(name)]


def verdict_lines(verdicts: list[Verdict]) -> str:
    """The verdicts of one run, in words, misses first (under a table showing its figures)."""
    return "Against the targets: " + "; ".join(f"{v.what} {_fmt_unit(v.unit)(v.value)} "
                                               f"({'>=' if v.at_least else '<='} {_fmt_unit(v.unit)(v.target)}): "
                                               f"{v.words()}"
                                               for v in sorted(verdicts, key=lambda v: v.met)) + "."


def editor_table() -> str:
    lines = ["| 315M model, int4 export | first token p50 | whole request p50 | vs llama-server: first token | "
             "whole request |", "|---|---|---|---|---|"]
    for n, name in EDITOR.items():
        s = load(name)["models"]["300m"]["runs"][str(n)]["summary"][editor_bench.MAIN]
        who = "one editor" if n == 1 else "four editors at once"
        t, w = s["ttft_p50_vs_llama"], s["latency_p50_vs_llama"]
        lines.append(f"| {who} ({link(name, 'results')}) | {s['ttft_p50'][0] * 1000:,.0f} ms | "
                     f"{s['latency_p50'][0] * 1000:,.0f} ms | {t[0]:.2f}x ({t[1]:.2f}-{t[2]:.2f}) | "
                     f"{w[0]:.2f}x ({w[1]:.2f}-{w[2]:.2f}) |")
    one = load(EDITOR[1])["models"]
    s = one["300m"]["runs"]["1"]["summary"]
    main, cold = s[editor_bench.MAIN], s[editor_bench.NO_CACHE]
    small = {n: load(name)["models"]["embedded"]["runs"][str(n)]["summary"] for n, name in EDITOR.items()}
    look = small[1].get(f"{editor_bench.MAIN} --lookup-tokens 4")
    lookup = (f"; lookup decoding there: whole request {look['latency_p50'][0] * 1000:.0f} ms against "
              f"{small[1][editor_bench.MAIN]['latency_p50'][0] * 1000:.0f} ms without (acceptance "
              f"{look['acceptance'][0]:.0%}; measured before lookup decoding was refused on int4 exports)") if look else ""
    emb = "; ".join(f"{'one editor' if n == 1 else 'four'} {sm[editor_bench.MAIN]['ttft_p50_vs_llama'][0]:.2f}x / "
                    f"{sm[editor_bench.MAIN]['latency_p50_vs_llama'][0]:.2f}x" for n, sm in small.items())
    return "\n".join(lines) + (
        f"\n\nWith one editor the cache makes the first token {main['ttft_gain_from_cache'][0]:.1f}x sooner than "
        f"without it ({cold['ttft_p50'][0] * 1000:,.0f} ms); every request still prefills the line typed and the "
        f"whole suffix after the cursor ({main['prefilled_mean'][0]:,.0f} of {cold['prefilled_mean'][0]:,.0f} "
        f"tokens per request). On the embedded model: {emb}{lookup}. One cached prompt holds "
        f"{one['300m']['slot_bytes'] / MIB:.0f} MiB of KV on the 315M model ({one['embedded']['slot_bytes'] / MIB:.0f}"
        " MiB on the embedded one): its whole context, in fp32.")


def parallel_sweep() -> str:
    """The measurement --parallel's default was chosen from (the embedded model, four editors at once)."""
    result = load(PARALLEL_SWEEP)
    per = result["models"]["embedded"]["runs"]["4"]["summary"]
    lines = ["| four editors at once, embedded model | first token p50 | whole request p50 | first token ÷ "
             "llama-server | whole request ÷ llama-server |", "|---|---|---|---|---|"]
    for name, s in per.items():
        if name.startswith("sc2quant"):
            label = name.replace("sc2quant serve", "`sc2quant serve`") + (" (default: 4 rows)" if name == editor_bench.MAIN
                                                                        else "")
            t, w = s["ttft_p50_vs_llama"], s["latency_p50_vs_llama"]
            lines.append(f"| {label} | {s['ttft_p50'][0] * 1000:.0f} ms | {s['latency_p50'][0] * 1000:.0f} ms | "
                         f"{t[0]:.2f}x ({t[1]:.2f}-{t[2]:.2f}) | {w[0]:.2f}x ({w[1]:.2f}-{w[2]:.2f}) |")
        else:
            lines.append(f"| {name} (`-np 4`) | {s['ttft_p50'][0] * 1000:.0f} ms | {s['latency_p50'][0] * 1000:.0f} ms "
                         "| | |")
    return "\n".join(lines) + (f"\n\n{result['rounds']} rounds, {result['machine']['cpu']}, {result['threads']} threads "
                               f"({link(PARALLEL_SWEEP, 'results')}). The targets are set for the 315M model; "
                               "scored here as the results file scores them: "
                               + verdict_lines(file_verdicts(PARALLEL_SWEEP, "embedded", "embedded model")
                                               ).removeprefix("Against the targets: "))


def batched_verdicts() -> list[Verdict]:
    """The targets the 315M run with rows batched scores (one editor and four; `file_verdicts`)."""
    return file_verdicts(BATCHED) if (RESULTS / f"{BATCHED}.json").is_file() else []


def batched_table() -> str:
    """The 315M model with rows batched (the default) and one request at a time, against llama-server."""
    result = load(BATCHED)
    lines = ["| 315M model, int4 export | first token p50 | whole request p50 | first token ÷ llama-server | "
             "whole request ÷ llama-server |", "|---|---|---|---|---|"]
    for n, per in result["models"]["300m"]["runs"].items():
        who = "one editor" if n == "1" else f"{n} editors at once"
        for name, s in per["summary"].items():
            t, w = s["ttft_p50_vs_llama"], s["latency_p50_vs_llama"]
            label = (f"`{name}`" + (" (default)" if name == editor_bench.MAIN else "")) if name.startswith("sc2quant") \
                else f"{name} (`-np {n}`)"
            lines.append(f"| {who}: {label} | {s['ttft_p50'][0] * 1000:,.0f} ms | {s['latency_p50'][0] * 1000:,.0f} ms | "
                         f"{t[0]:.2f}x ({t[1]:.2f}-{t[2]:.2f}) | {w[0]:.2f}x ({w[1]:.2f}-{w[2]:.2f}) |")
    return "\n".join(lines) + (f"\n\n{result['rounds']} rounds, {result['lines']} requests per editor, "
                               f"{result['machine']['cpu']}, {result['threads']} threads ({link(BATCHED, 'results')}). "
                               + verdict_lines(batched_verdicts()))


def prefill_text() -> str:
    result = load(PREFILL)
    p = result["prompt_tokens_per_s"]
    reuse, plain = p["reuse (chunk 128)"], p["chunk 128"]
    return (f"on this machine a {result['tokens']:,}-token prompt that differs from the previous one in its last line "
            f"prefills {reuse['median'] / plain['median']:.0f}x faster on the 315M model ({reuse['median']:,.0f} vs "
            f"{plain['median']:,.0f} tokens/s, medians of {result['rounds']} rounds, idle {result['machine']['cpu']}; "
            f"{link(PREFILL)}, `python -m bench.prefill --model 300m`)")


def serving_text() -> str:
    result = load(SERVING)
    servers = result["servers"]
    vllm = next(v for k, v in servers.items() if "vllm" in k)
    ours = servers["sc2quant serve (1 generating)"]

    def rps(rows: list[dict]) -> str:
        return " / ".join(f"{r['requests_per_s']:.1f}" for r in rows)

    def tps(rows: list[dict]) -> str:
        vals = [r["tokens_per_s"] for r in rows]
        return f"{min(vals):.0f}-{max(vals):.0f}"

    return (f"On a 2-core {result['machine']['cpu']} with the embedded model (`python -m bench.serving`, "
            f"{link(SERVING)}), vLLM's CPU build serves {rps(vllm)} requests/s ({tps(vllm)} tokens/s) with "
            f"{' / '.join(str(r['clients']) for r in vllm)} concurrent clients against {rps(ours)} ({tps(ours)} "
            "tokens/s) for sc2quant's own runtime on the same checkpoint (its torch engine, one request at a time) "
            f"(one round of {vllm[0]['requests']} requests per row: a single measurement, no spread).")


def modes_text() -> str:
    result = load(MODES)
    m = result["models"]["300m"]

    def f(name: str) -> str:
        c = m[name]
        return f"{c['prefill_tokens_per_s']:.0f} / {c['decode_tokens_per_s']:.1f}"

    names = list(m)
    parts = [f"{n.replace('plain checkpoint, ', '')} {f(n)}" for n in names]
    return (f"Measured on the torch engine, 2-core {result['machine']['cpu']} (AVX512-BF16 and AMX; {link(MODES)}, "
            "`make bench-modes`), 315M model, tok/s prefill / decode: " + "; ".join(parts) + ".")


def report_text() -> str:
    result = load(REPORT)
    parts = []
    for m in result["models"]:
        if m["label"] == "baseline":
            continue
        d = m["drift"]
        kl = statistics.fmean(v["kl_mean"] for v in d.values())
        top1 = statistics.fmean(v["top1_agreement"] for v in d.values())
        parts.append(f"{m['label']} {kl:.1e} / {top1:.1%}")
    return ("Mean KL divergence to the baseline / top-1 agreement, averaged over the evaluation sources "
            f"({link(REPORT.rsplit('/', 1)[0] + '/report')}): " + "; ".join(parts) + ".")


# --- real sizes --------------------------------------------------------------------------------------

GPTQ_EXPORT = "GPTQ, block 128 (today's default)"
RTN_EXPORT = "round-to-nearest, block 32 (the default before)"


def scale_rows(kind: str | None = None) -> dict[tuple[str, str], tuple[dict, str]]:
    """(shape, row name) -> (the row, its file), newest file first; `kind`: only files whose int4 export was that."""
    rows: dict[tuple[str, str], tuple[dict, str]] = {}
    for name, export in SCALE.items():
        if kind is None or export == kind:
            for shape, entry in load(name)["shapes"].items():
                for r in entry["rows"]:
                    rows.setdefault((shape, r["method"]), (r, name))
    return rows


SCALE_TABLE = (  # README row -> the bench's row name, and which int4 export it needs (None: any)
    ("`quantize --method rtn` (GPTQ format, int4 g128)", "quantize rtn int4 g128", None),
    ("`quantize --method bnb --bits 8`", "quantize bnb int8", None),
    ("`quantize --method bnb --bits 4`", "quantize bnb nf4", None),
    ("`quantize --bits 4` (GPTQ by GPTQModel, 32 x 512 calibration tokens)", "quantize gptq int4 g128", None),
    ("`export onnx --weights int4` (default: GPTQ, block 128)", "export onnx int4", GPTQ_EXPORT),
    ("`export onnx --weights int4 --int4-method rtn --block-size 32`", "export onnx int4", RTN_EXPORT),
    ("`export onnx` of a GPTQ artifact", "export onnx int4 from GPTQ-format", None),
    ("`export onnx --dtype fp16`", "export onnx fp16", None),
    ("`run` that RTN block-32 export (load + 8 tokens), first time", "run ONNX int4 (load + 8 tokens)", RTN_EXPORT),
    ("`run` it again (prepacked weights mapped)", "run ONNX int4 again (prepacked weights mapped)", RTN_EXPORT),
    ("`run` a GPTQ artifact (converted for ONNX Runtime on first use)", "run GPTQ-format int4 (load + 8 tokens)", None),
)


def scale_table() -> str:
    used: list[str] = []
    lines = ["| command | 3B: peak GB (bound) | 7B: peak GB (bound) | time 3B / 7B |", "|---|---|---|---|"]
    for label, key, kind in SCALE_TABLE:
        rows = scale_rows(kind)
        cells, times = [], []
        for shape in ("3b", "7b"):
            found = rows.get((shape, key))
            if not found:
                cells.append("not measured")
                times.append("–")
                continue
            r, name = found
            if name not in used:
                used.append(name)
            b = r.get("bound_bytes")
            verdict = ("" if not b else f" (<= {b / GB:.2f}: "
                       f"{'meets' if r['within_bound'] else 'misses by ' + gap(r['peak_rss_bytes'], b)})")
            cells.append(f"{r['peak_rss_bytes'] / GB:.2f}{verdict} [{used.index(name) + 1}]")
            times.append(f"{r['seconds']:,.0f} s")
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {' / '.join(times)} |")
    tail = ""
    gptq7 = scale_rows().get(("7b", "quantize gptq int4 g128 (2 of 32 layers, 32 samples; projected)"))
    if gptq7:
        r = gptq7[0]
        tail = (f" GPTQModel's `quantize` on the 7B shape was not measured whole: 2 of 32 layers took "
                f"{r['seconds']:.0f} s ({r['projected_seconds_32_layers'] / 3600:.1f} h projected) at "
                f"{r['peak_rss_bytes'] / GB:.2f} GB.")
    proj: dict[str, tuple[dict, str]] = {}
    for name in SCALE:  # newest first
        for p in load(name).get("projection_15b", []):
            proj.setdefault(p["method"], (p, name))
    for _, name in proj.values():
        if name not in used:
            used.append(name)
    notes = [f"[{i + 1}] {link(n, n)}" for i, n in enumerate(used)]
    return "\n".join(lines) + "\n\n" + "; ".join(notes) + "." + tail + (
        "\n\n15B, projected per method from its own 3B and 7B rows of one file (a line through the two points): "
        + "; ".join(f"{m}{' (RTN block 32)' if m == 'export onnx int4' else ''} ~{p['projected_peak_rss_bytes'] / GB:.0f}"
                    f" GB{'' if p['fits_24_gib'] else ', does not fit 24 GiB'} [{used.index(n) + 1}]"
                    for m, (p, n) in proj.items())
        + ". The default export (GPTQ) was measured at 3B only: no 15B projection for it.")


def scale_verdicts() -> list[Verdict]:
    rows = scale_rows(RTN_EXPORT)
    out = []
    for shape in ("7b", "3b"):
        for key, what in (("run ONNX int4 (load + 8 tokens)", "first `run`"),
                          ("run ONNX int4 again (prepacked weights mapped)", "later `run`s")):
            if (shape, key) in rows:
                r, name = rows[(shape, key)]
                art = r["bound_bytes"] / GB - RUN_BOUND_GB
                out.append(Verdict(f"{shape.upper()} int4 export (RTN block 32), {what}: peak RSS (artifact "
                                   f"{art:.2f} GB + {RUN_BOUND_GB:.1f} GB)", r["peak_rss_bytes"] / GB,
                                   r["bound_bytes"] / GB, False, name, unit="GB"))
    r, name = scale_rows(GPTQ_EXPORT)[("3b", "export onnx int4")]
    out.append(Verdict("3B `export onnx --weights int4` (GPTQ): wall time", r["seconds"], EXPORT_SECONDS_3B, False,
                       name, unit="s"))
    out.append(Verdict("3B `export onnx --weights int4` (GPTQ): peak RSS (output + layer + Hessians + "
                       "activations)", r["peak_rss_bytes"] / GB, r["bound_bytes"] / GB, False, name, unit="GB"))
    return out


def targets() -> str:
    verdicts = peers_verdicts() + embed_verdicts() + scale_verdicts() + editor_verdicts() + batched_verdicts()
    verdicts.sort(key=lambda v: v.met)  # misses first, in the order above otherwise
    missed = sum(not v.met for v in verdicts)
    return "\n".join([f"{missed} of {len(verdicts)} targets missed (each checked on the median of its rounds).", "",
                      "| target | wanted | measured (range over rounds) | verdict | file |", "|---|---|---|---|---|",
                      *(v.row() for v in verdicts)])


BLOCKS: dict[str, Callable[[], str]] = {
    "installs": installs, "embed": embed_text, "modes": modes_text, "spin": peers_spin, "prefill": prefill_text,
    "editor": editor_table, "serving": serving_text, "scale": scale_table, "report": report_text,
    "targets": targets, "peers": peers_table, "parallel": parallel_sweep, "batched": batched_table,
    "peers-profile": peers_profile, "peers-amx": peers_amx, "peers-avx2": peers_avx2,
}


def render(text: str) -> str:
    """`text` with every marked block re-made; an unknown block name is an error."""
    def one(m: re.Match) -> str:
        name = m.group(2)
        if name not in BLOCKS:
            raise KeyError(f"README block {name!r} has no renderer in bench/readme.py")
        return m.group(1) + BLOCKS[name]() + "\n" + m.group(4)

    return BLOCK.sub(one, text)


def blocks(text: str) -> dict[str, str]:
    return {m.group(2): m.group(3) for m in BLOCK.finditer(text)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if any block differs from its rendering")
    p.add_argument("--readme", type=Path, default=README)
    a = p.parse_args(argv)
    text = a.readme.read_text()
    new = render(text)
    if a.check:
        old, fresh = blocks(text), blocks(new)
        differ = [n for n in fresh if old[n] != fresh[n]]
        for n in differ:
            print(f"README block {n!r} differs from its rendering: run python -m bench.readme", file=sys.stderr)
        return 1 if differ else 0
    if new != text:
        tmp = a.readme.with_name(f".{a.readme.name}.partial")
        tmp.write_text(new)
        tmp.replace(a.readme)
    print(f"{a.readme}: {len(blocks(new))} blocks rendered", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
