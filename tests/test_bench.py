"""The benchmark's bookkeeping: per-round ratios, peak RSS of a child, results files. The
benchmark itself (`make bench`) is not part of the test run."""

from __future__ import annotations

import json
import re
import sys

import pytest

from bench import results
from bench.bandwidth import decode_bound
from bench.contenders import REFERENCE as REFERENCES
from bench.run import main, summarize
from bench.timing import run_child

REFERENCE = REFERENCES["cpu"]


def _rounds(values: list[tuple[float, float]]) -> list[dict]:
    return [{"round": i, "prefill_tokens_per_s": p, "decode_tokens_per_s": d, "peak_rss_bytes": 100e6,
             "weight_bytes_in_memory": 50e6} for i, (p, d) in enumerate(values)]


def _entry() -> dict:
    # Round 1 is slow for everyone (a noisy machine): within-round ratios stay exact.
    return {"parameters": 1e6, "contenders": {
        REFERENCE: {"bytes_on_disk": 10e6, "rounds": _rounds([(100, 10), (50, 5), (100, 10)])},
        "ours": {"bytes_on_disk": 5e6, "rounds": _rounds([(200, 12), (100, 6), (200, 12)]),
                 "drift": {"kl_mean": 1e-3, "top1_agreement": 0.97, "perplexity_drift_pct": 0.5}},
    }}


def test_ratios_are_paired_within_rounds_and_medians_are_taken():
    entry = _entry()
    summarize(entry, bandwidth=1e9, reference=REFERENCE)
    ours = entry["contenders"]["ours"]
    assert ours["ratio_vs_reference"]["decode_tokens_per_s"] == pytest.approx(1.2)
    assert ours["ratio_vs_reference"]["prefill_tokens_per_s"] == pytest.approx(2.0)
    assert ours["ratio_vs_reference"]["bytes_on_disk"] == pytest.approx(0.5)
    assert ours["median"]["decode_tokens_per_s"] == 12
    assert ours["decode_bound_tokens_per_s"] == pytest.approx(decode_bound(50e6, 1e9)) == pytest.approx(20)
    assert ours["decode_fraction_of_bound"] == pytest.approx(0.6)
    assert entry["contenders"][REFERENCE]["ratio_vs_reference"]["decode_tokens_per_s"] == 1


def test_child_peak_rss_is_the_childs_own():
    parent = bytearray(600 * 2**20)  # a large parent must not inflate the child's figure (ru_maxrss would)
    parent[::4096] = b"x" * len(parent[::4096])
    code = "import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.3); print('ok')"
    out, rss = run_child([sys.executable, "-c", code])
    assert out.strip() == "ok"
    assert 200 * 2**20 < rss < 400 * 2**20
    del parent


def test_failing_child_is_one_clear_error():
    from sc2quant.core.errors import UserError

    with pytest.raises(UserError, match="boom"):
        run_child([sys.executable, "-c", "raise SystemExit('boom')"])


def test_results_files_say_the_target_verdict(tmp_path):
    entry = _entry()
    default = results.DEFAULTS[0]
    entry["contenders"][default] = entry["contenders"].pop("ours")
    entry["contenders"]["llama.cpp Q4_K_M+imatrix"] = {
        "bytes_on_disk": 4e6, "rounds": _rounds([(100, 10), (50, 5), (100, 10)]),
        "drift": {"kl_mean": 4e-3, "top1_agreement": 0.95, "perplexity_drift_pct": 1.0}}
    summarize(entry, bandwidth=1e9, reference=REFERENCE)
    result = {"date": "2026-11-26", "machine": {"cpu": "test", "logical_cpus": 2, "simd": ["avx2"], "memory_bytes": 2**34,
              "os": "linux"}, "threads": 2, "rounds": 3, "workload": {"prefill": 512, "prompt": 128, "decode": 128},
              "read_bandwidth_bytes_per_s": 1e9, "reference": REFERENCE, "versions": {"torch": "x"}, "seconds": 60,
              "models": {"300m": entry, "embedded": json.loads(json.dumps(entry))}}
    md = results.write(result, tmp_path)
    text = md.read_text()
    spread = r"median, rounds \d+\.\d\d-\d+\.\d\d \(n=3\)"  # "meets" is the median's; the spread is always shown
    assert re.search(rf"- 300M decode, {re.escape(default)} / Q4_0 = \*\*1\.20x\*\* {spread} \(misses >= 1\.30x, off by 8%\)",
                     text)
    assert re.search(rf"- 300M prefill, {re.escape(default)} / Q4_0 = \*\*2\.00x\*\* {spread} \(meets >= 1\.20x\)", text)
    assert f"- 300M disk, {default} / Q4_K_M+imatrix = **1.25x** median (misses <= 1.10x, off by 14%)" in text
    assert "(1.00e-03 vs 4.00e-03) = **0.25x** median (meets <= 0.50x)" in text
    assert md.with_suffix(".png").stat().st_size > 1000
    assert json.loads(md.with_suffix(".json").read_text())["models"]["300m"]["contenders"][REFERENCE]["median"]
    assert not list(tmp_path.glob(".*"))  # no partial files left behind


def test_busy_rounds_give_each_contender_the_share_of_its_idle_speed_it_keeps():
    entry = _entry()
    entry["contenders"][REFERENCE]["busy_rounds"] = _rounds([(50, 3), (40, 3), (50, 3)])  # llama.cpp keeps 50 % / 30 %
    entry["contenders"]["ours"]["busy_rounds"] = _rounds([(150, 6), (100, 6), (150, 6)])  # ours 75 % / 50 %
    entry["contenders"]["ours"]["runtime"] = "sc2quant"
    summarize(entry, bandwidth=1e9, reference=REFERENCE)
    ours = entry["contenders"]["ours"]
    assert ours["busy_kept"]["decode_tokens_per_s"] == pytest.approx(0.5)
    assert ours["busy_kept"]["prefill_tokens_per_s"] == pytest.approx(0.75)
    assert results.busy_verdict(entry["contenders"]) == [
        "- busy machine, 300M decode, ours: keeps **50%** of its idle speed, llama.cpp Q4_0 30% (meets: no more "
        "slowdown than llama.cpp's)",
        "- busy machine, 300M prefill, ours: keeps **75%** of its idle speed, llama.cpp Q4_0 50% (meets: no more "
        "slowdown than llama.cpp's)"]
    assert "| ours | 150 (100-150) | 6.00 (6.00-6.00) | 75% | 50% |" in "\n".join(results.busy_table(entry))


def test_the_busy_core_is_a_bounded_process_that_is_gone_afterwards():
    import os

    from bench import run

    def children() -> list[str]:
        return [p for p in os.listdir("/proc") if p.isdigit() and os.path.exists(f"/proc/{p}/stat")
                and open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1] == str(os.getpid())]

    before = set(children())
    with run.busy_core():
        started = set(children()) - before
        assert started
    assert run.BUSY_SECONDS <= 900 and not (set(children()) & started)


def test_unknown_model_is_refused(capsys):
    assert main(["--models", "7b", "--no-llama"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_bytes_read_per_token_skip_gather_only_initializers(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from bench.bandwidth import onnx_bytes_read_per_token

    emb = numpy_helper.from_array(np.zeros((100, 8), np.float32), "embedding")  # read by rows only
    w = numpy_helper.from_array(np.zeros((8, 8), np.float32), "w")  # read whole each step
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embedding", "ids"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"])],
        "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], initializer=[emb, w])
    onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"))
    assert onnx_bytes_read_per_token(tmp_path) == 8 * 8 * 4


def test_saved_run_renders_again(tmp_path):
    from bench.run import rerender

    entry = _entry()
    result = {"date": "2026-11-26", "machine": {"cpu": "test", "logical_cpus": 2, "simd": [], "memory_bytes": 2**34,
              "os": "linux"}, "threads": 2, "rounds": 3, "workload": {"prefill": 512, "prompt": 128, "decode": 128},
              "read_bandwidth_bytes_per_s": 1e9, "reference": REFERENCE, "versions": {}, "seconds": 60,
              "models": {"embedded": entry}}
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps(result))
    md = rerender(saved, tmp_path / "out")
    assert "| ours |" in md.read_text() and "1.20" in md.read_text()


def test_llama_cpp_is_built_native_except_its_crashing_amx_path():
    from bench.llamacpp import cpu_options

    assert cpu_options({"avx2", "fma", "avx512f", "avx512_bf16"}) == ["-DGGML_NATIVE=ON"]
    amx = cpu_options({"avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8"})
    assert amx[0] == "-DGGML_NATIVE=OFF" and not any("AMX" in o for o in amx)
    assert {"-DGGML_AVX512=ON", "-DGGML_AVX512_BF16=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_VBMI=OFF"} <= set(amx)


def test_the_scale_bench_removes_only_folders_it_made(tmp_path):
    from bench.scale import MARK, fresh_dir
    from sc2quant.core.errors import UserError

    mine = tmp_path / "3b-outputs"
    mine.mkdir()
    (mine / "todo.txt").write_text("mine")
    with pytest.raises(UserError, match="not a folder this bench made"):
        fresh_dir(mine)
    assert (mine / "todo.txt").read_text() == "mine"
    ours = fresh_dir(tmp_path / "7b-outputs")
    (ours / "rtn-int4-g128").mkdir()
    assert fresh_dir(ours) == ours and [p.name for p in ours.iterdir()] == [MARK]  # a previous run's: emptied


def test_bench_prose_states_no_figure_that_was_not_measured():
    """Explanations of missed bounds are words; the figures beside them come from the measured rows."""
    from bench.scale import WHY

    assert WHY and not [k for k, text in WHY.items() if re.search(r"(?<![A-Za-z0-9_])\d", text)]  # fp16 is a name


def test_the_peers_bench_runs_five_rounds_by_default():
    import inspect

    from bench import run

    assert 'ap.add_argument("--rounds", type=int, default=5)' in inspect.getsource(run.main)


def test_editor_sessions_type_a_function_under_fixed_budgets(embedded_model_dir):
    """bench/editor.py: each session's prefix starts at one line for the whole session and grows a line
    per request, suffix and prefix stay within their token budgets, the benches default to 5 rounds."""
    import inspect

    from bench import editor, embed
    from sc2quant.core.hf import load_tokenizer

    tok = load_tokenizer(embedded_model_dir)
    budget = editor.BUDGETS["embedded"]
    plan = editor.sessions(tok, 2, 6, budget)
    assert len(plan) == 2 and all(len(s) == 6 for s in plan)
    for session in plan:
        first = session[0]["input_prefix"]
        for i, body in enumerate(session):
            assert body["input_prefix"].startswith(first) and body["input_suffix"] == session[0]["input_suffix"]
            assert len(tok.encode(body["input_prefix"])) <= budget.prefix_tokens
            assert len(tok.encode(body["input_suffix"])) <= budget.suffix_tokens
            if i:
                assert body["input_prefix"].count("\n") == session[i - 1]["input_prefix"].count("\n") + 1
    for module in (editor, embed):
        assert 'ap.add_argument("--rounds", type=int, default=5)' in inspect.getsource(module.main)


def test_editor_ratios_are_taken_within_rounds_against_the_faster_peer():
    from bench.editor import MAIN, NO_CACHE, summarize

    def row(ttft: float, latency: float) -> dict:
        return {"ttft_p50": ttft, "latency_p50": latency}

    per = {MAIN: [row(1, 2), row(2, 4)], NO_CACHE: [row(4, 8), row(4, 8)],
           "llama-server Q4_0": [row(2, 4), row(1, 1)], "llama-server Q4_K_M": [row(4, 4), row(8, 8)]}
    summarize({"runs": {"1": per}})
    s = per["summary"][MAIN]
    assert s["ttft_p50_vs_llama"] == [1.25, 0.5, 2.0]  # 1/2 and 2/1: per round, against the faster peer
    assert s["ttft_gain_from_cache"] == [3.0, 2.0, 4.0]


def test_embed_results_say_what_the_first_load_costs_and_judge_the_later_ones():
    from bench.embed import NO_PREPACK, OURS, PEER, render

    def row(cold: float, rss: float) -> dict:
        return {"cold_first_s": [cold, cold, cold], "cold_exit_s": [1, 1, 1], "peak_rss_bytes": [rss, rss, rss],
                "prefill_tokens_per_s": [300, 300, 300], "decode_tokens_per_s": [60, 60, 60]}

    result = {"date": "2026-12-05", "machine": {"cpu": "AMD EPYC"}, "model": "300m", "threads": 2, "rounds": 5,
              "command": "python -m bench.embed", "install_bytes": {"sc2quant base install (.venv-base)": 250e6},
              "summary": {OURS: row(0.5, 500 << 20), NO_PREPACK: row(0.7, 500 << 20), PEER: row(0.25, 400 << 20)},
              "first_load_first_token_s": [1.5, 1.4, 1.7], "prepacked_entry_bytes": 535 << 20,
              "export_bytes": 220 << 20}
    text = render(result)
    assert "**2.00x** of the medians (misses <= 1.5x)" in text  # 0.5 / 0.25, the later loads
    assert "**1.25x** of the medians (meets <= 1.2x)" not in text and "**1.25x**" in text  # 500 / 400 MiB
    assert "535 MiB for a 220 MiB export" in text and "1.50 (1.40-1.70) s" in text
