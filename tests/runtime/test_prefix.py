"""Prompt reuse (the prefix cache) and chunked prefill on every engine that can extend a sequence: the same greedy text and
the same logits as a full prefill, across the sliding window, bounded in bytes, safe to cancel."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from sc2quant.runtime import load
from tests.runtime.prefix_engines import ENGINES, check_greedy, ties_possible, tolerance

SOURCE = (Path(__file__).resolve().parents[2] / "sc2quant" / "runtime" / "model.py").read_text()


def _prompts(model, shared: float) -> tuple[str, str]:
    """Two FIM-free prompts of ~600 tokens (past the embedded model's 256-token window) sharing `shared` of them."""
    ids = model.encode(SOURCE)[:600]
    cut = int(len(ids) * shared)
    other = model.encode(SOURCE[::-1])[: len(ids) - cut]
    return model.tokenizer.decode(ids), model.tokenizer.decode(ids[:cut] + other)


@pytest.fixture(scope="module", params=list(ENGINES))
def models(request):
    fixture, dtype = ENGINES[request.param]
    path = request.getfixturevalue(fixture)
    cached = load(path, prefill_chunk=100, dtype=dtype, lookup_tokens=0)
    assert cached.prefix_cache is not None, request.param
    return cached, load(path, prefix_cache_bytes=0, dtype=dtype, lookup_tokens=0)


@pytest.mark.parametrize("shared", [0.0, 0.5, 0.99])
def test_greedy_text_is_the_same_with_and_without_the_cache(models, shared):
    cached, plain = models
    first, second = _prompts(plain, shared)
    reused, identical = [], 0
    for prompt in (first, second, first):
        chunks = list(cached.stream_generate(prompt, max_new_tokens=32))
        identical += check_greedy(plain, prompt, "".join(c.text for c in chunks), 32)
        reused.append(chunks[-1].cached_tokens)
    assert identical == 3 or (ties_possible(plain) and identical >= 2), identical  # a tie is rare: once at most
    n = len(plain.encode(first))
    assert reused[1] >= shared * n - 2, reused  # the shared tokens (a token may straddle the cut)
    if shared == 0.0:  # the other prompt took no entry: the first one's is still there, whole
        assert reused[2] == n - 2, reused


def test_reused_and_chunked_prefill_give_the_logits_of_a_full_prefill(models):
    cached, plain = models
    ids = plain.encode(SOURCE)[:700]
    _, full = plain.engine.start([ids])
    cached.generate(plain.tokenizer.decode(ids[:400]), max_new_tokens=1)  # leaves 400+ positions in the cache
    chunks = list(cached.stream_generate(plain.tokenizer.decode(ids), max_new_tokens=1))
    assert chunks[-1].cached_tokens >= 399 and chunks[-1].prompt_tokens == len(ids)
    state, last = cached.prefix_cache.take(ids)
    assert state is not None and last >= 700
    cached.engine.truncate(state, 699)
    again = cached.engine.extend(state, ids[699:])
    # the keys and values of a position depend on its prefix only; what differs is the kernel shape (a
    # one-token matmul against a 700-row one): accumulation order in the compute dtype for float graphs
    # (fp32: 66 epsilons; bf16: two bf16 steps), and for the int4 export ONNX Runtime's int8 rounding of
    # activations, which its one-row and many-row kernels may do differently (tests/conftest.py derives
    # each bound; prefix_engines.tolerance picks the engine's)
    bound = tolerance(plain) * float(abs(full).max())
    assert float(abs(again - full).max()) <= bound, (float(abs(again - full).max()), bound)


def test_the_cache_is_bounded_in_bytes(onnx_int4_artifact):
    small = load(onnx_int4_artifact, prefill_chunk=64)
    state = small.engine.start([[1, 2, 3]])[0]
    small.engine.park(state)  # as a kept state is: its keys and values only
    slot = small.engine.state_bytes(state)
    assert slot == small.engine.min_state_bytes()
    bounded = load(onnx_int4_artifact, prefix_cache_bytes=2 * slot)
    for i in range(5):
        bounded.generate(f"def f{i}(x):\n    return x", max_new_tokens=2)
        info = bounded.prefix_cache.describe()
        assert info["bytes"] <= 2 * slot and info["entries"] <= 2
    tiny = load(onnx_int4_artifact, prefix_cache_bytes=slot - 1)
    tiny.generate("def f(x):", max_new_tokens=2)
    assert tiny.prefix_cache.describe()["entries"] == 0  # an entry larger than the cache is not kept


def test_a_cancelled_stream_leaves_a_usable_cache_and_a_long_prompt_yields_between_chunks(models):
    cached, plain = models
    prompt = plain.tokenizer.decode(plain.encode(SOURCE)[:650])
    stream = cached.stream_generate(prompt, max_new_tokens=40)
    first = next(stream)  # a prefill chunk boundary: nothing decoded yet
    assert first.text == "" and first.finish_reason is None and first.completion_tokens == 0
    for _ in range(5):
        next(stream)
    stream.close()  # the client went away
    # the cache's reused positions were computed by another chunking: identical in fp32, a near tie at most elsewhere
    assert check_greedy(plain, prompt, cached.generate(prompt, max_new_tokens=32), 32) or ties_possible(plain)


def test_concurrent_requests_never_share_an_entry(models):
    cached, plain = models
    prompts = [plain.tokenizer.decode(plain.encode(SOURCE)[i * 50: i * 50 + 400]) for i in range(4)]
    expected = [plain.generate(p, max_new_tokens=16) for p in prompts]
    got: dict[int, str] = {}

    def work(i: int) -> None:
        got[i] = cached.generate(prompts[i % 4], max_new_tokens=16)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [got[i] for i in range(8)] == expected * 2


@pytest.mark.slow
def test_the_server_reuses_prompts_and_reports_the_cached_tokens(onnx_int4_artifact):
    import httpx

    from tests.serving import start_server, stop_server

    proc, url = start_server(onnx_int4_artifact)
    try:
        prefix = SOURCE[:1500]
        body = {"prompt": prefix, "suffix": "\n    return c\n", "max_tokens": 8, "temperature": 0}
        first = httpx.post(url + "/v1/completions", json=body, timeout=120).json()
        typed = httpx.post(url + "/v1/completions", json={**body, "prompt": prefix + "x"}, timeout=120).json()
        again = httpx.post(url + "/v1/completions", json=body, timeout=120).json()
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert typed["usage"]["prompt_tokens_details"]["cached_tokens"] > first["usage"]["prompt_tokens"] // 2
        assert again["choices"][0]["text"] == first["choices"][0]["text"]
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > first["usage"]["prompt_tokens"] // 2
    finally:
        stop_server(proc)


def test_two_sessions_keep_their_own_entries(onnx_int4_artifact):
    """Two editors on two files, requests alternating: each request reuses its own file's entry (a
    request sharing only the first tokens with an entry leaves it to its session, as llama-server's
    slot similarity does)."""
    model = load(onnx_int4_artifact, prefill_chunk=64)
    files = [SOURCE[:1500], SOURCE[::-1][:1500]]
    for typed in ("", "    x = 1\n", "    x = 1\n    y = 2\n"):
        for text in files:
            chunk = list(model.stream_generate("<fim_prefix>" + text + typed, max_new_tokens=2))[-1]
            if typed:
                assert chunk.cached_tokens >= len(model.encode(text)) - 2, (typed, chunk)
            else:
                assert chunk.cached_tokens == 0
    assert model.prefix_cache.describe()["entries"] == 2


def test_a_cache_smaller_than_one_prompt_says_so(onnx_int4_artifact, capsys):
    """Found by the red team: --prompt-cache-mb 1 on the embedded export (3 MiB per cached prompt: its KV
    buffers span the whole context) silently reused nothing."""
    small = load(onnx_int4_artifact, prefix_cache_bytes=1 << 20)
    assert "cannot hold one prompt" in capsys.readouterr().err
    small.generate("def f(x):", max_new_tokens=2)
    assert small.prefix_cache.describe()["entries"] == 0
    enough = load(onnx_int4_artifact, prefix_cache_bytes=small.engine.min_state_bytes())
    assert "cannot hold" not in capsys.readouterr().err
    enough.generate("def f(x):", max_new_tokens=2)
    assert enough.prefix_cache.describe()["entries"] == 1


def test_the_default_cache_holds_one_prompt_of_any_model(onnx_int4_artifact, capsys, monkeypatch):
    """At 7B one prompt's KV (its whole 16,384-token context, fp32: 2 GiB) outgrew the 1 GiB default, so
    an editor pointed at a 7B export reused nothing by default; the default is now one prompt at least.
    Here the fixed part of the default is made smaller than the embedded export's slot (3 MiB)."""
    import sc2quant.runtime.model as model_module

    monkeypatch.setattr(model_module, "DEFAULT_CACHE_BYTES", 1 << 20)
    model = load(onnx_int4_artifact)
    assert "cannot hold" not in capsys.readouterr().err
    assert model.prefix_cache.max_bytes == model.engine.min_state_bytes() > 1 << 20
    model.generate("def f(x):\n    return", max_new_tokens=2)
    again = list(model.stream_generate("def f(x):\n    return x", max_new_tokens=2))
    assert model.prefix_cache.describe()["entries"] == 1 and again[-1].cached_tokens > 0


FLOOD = """
import sys
from sc2quant.runtime import load
from sc2quant.core.data import eval_documents

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

limit, n = int(sys.argv[2]), int(sys.argv[3])
model = load(sys.argv[1], prefix_cache_bytes=limit, lookup_tokens=0)
text = "\\n".join(d.text for d in eval_documents())
ids = model.encode(text)
prompts = [model.tokenizer.decode(ids[i * 97: i * 97 + 700]) for i in range(n + 4)]
for p in prompts[:4]:  # warm-up: allocator, kernels, one entry of every size class
    model.generate(p, max_new_tokens=1)
model.prefix_cache.entries.clear()
base = rss()
for p in prompts[4:]:
    model.generate(p, max_new_tokens=1)
info = model.prefix_cache.describe()
print(rss() - base, info["bytes"], info["entries"])
"""


@pytest.mark.slow
def test_a_flood_of_distinct_prompts_holds_no_more_than_the_cache_limit(onnx_fp32_artifact):
    """Found by the red team: the cache held about 2.5x --prompt-cache-mb in real memory (each kept state
    also held its last prefill chunk's logits buffer, [1, 128, vocab] fp32, uncounted). The limit must
    count what is held: after a flood of distinct prompts, RSS grows by at most the limit, plus 25 % and
    8 MiB for the allocator's slack (its pages are not returned at once)."""
    import subprocess
    import sys

    slot = load(onnx_fp32_artifact).engine.min_state_bytes()
    limit = 10 * slot
    out = subprocess.run([sys.executable, "-c", FLOOD, str(onnx_fp32_artifact), str(limit), "40"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    grown, held, entries = map(int, out.stdout.split())
    assert held <= limit and entries >= 8, (held, entries)
    assert grown <= 1.25 * limit + 8 * 2**20, (grown / 2**20, limit / 2**20)
