"""Lookup decoding: drafts from the prompt, verified in one forward, give exactly greedy decoding's
text on every engine that extends a sequence, and leave the state the next request reuses whole."""

from __future__ import annotations

import numpy as np
import pytest

from sc2quant.core.data import eval_documents
from sc2quant.core.tokens import fim_prompt
from sc2quant.runtime import load
from sc2quant.runtime.lookup import Drafter, verify
from tests.runtime.prefix_engines import ENGINES, check_greedy, ties_possible


def test_the_drafter_proposes_what_followed_the_latest_match_longest_ngram_first():
    d = Drafter([5, 1, 2, 9, 9, 1, 2, 7, 8, 3, 1, 2], capacity=4)
    assert d.draft(3) == [7, 8, 3]  # "1 2" last seen at 5-6: what followed it (not 9 9 from 1-2)
    d.add(7)
    assert d.draft(2) == [8, 3]  # "1 2 7" matched as a trigram
    d.add(4)  # past the capacity: the buffer grows
    assert d.draft(5) == [] and d.length == 14  # "4" never seen before
    d.add(9)
    assert d.draft(10) == []  # "4 9" never seen, and a lone "9" is not looked up (MIN_NGRAM)
    again = Drafter([1, 2, 3, 4, 5, 1, 2], capacity=8)
    assert again.draft(2) == [3, 4] and again.draft(0) == [] and again.draft(50) == [3, 4, 5, 1, 2]
    assert Drafter([3], capacity=1).draft(4) == []


def test_verify_keeps_the_draft_up_to_its_first_wrong_token():
    logits = np.zeros((4, 10), dtype=np.float32)
    for row, tok in enumerate([4, 6, 1, 2]):
        logits[row, tok] = 1.0
    assert verify([4, 6, 3], logits, 0.1) == 2
    assert verify([4, 6, 1], logits, 0.1) == 3
    assert verify([5], logits[:2], 0.1) == 0
    logits[1, 3] = 0.95  # row 1's top two within 2 x 0.1 x 1.0 of each other: not trusted
    assert verify([4, 6, 1], logits, 0.1) == 1 and verify([4, 6, 1], logits, 0.01) == 3


def _fim_prompts(model, n: int = 6) -> list[tuple[str, str]]:
    """(prefix, suffix) pairs cut from evaluation files at line starts, as an editor sends them."""
    out = []
    for doc in eval_documents():
        lines = doc.text.splitlines(keepends=True)
        if len(lines) < 30 or len(model.encode(doc.text)) > 700:
            continue
        cut = len(lines) // 2
        out.append(("".join(lines[:cut]), "".join(lines[cut:])))
        if len(out) == n:
            return out
    return out


# engines whose many-token forward rounds like one-token steps (fp32 throughout): lookup decoding is offered there
EXACT = [name for name in ENGINES if name in ("onnx-fp32", "torch-fp32")]


@pytest.fixture(scope="module", params=EXACT)
def pair(request):
    fixture, dtype = ENGINES[request.param]
    path = request.getfixturevalue(fixture)
    return load(path, dtype=dtype, lookup_tokens=8, prefill_chunk=96), load(path, dtype=dtype, lookup_tokens=0,
                                                                           prefix_cache_bytes=0)


def test_lookup_decoding_gives_greedy_text_and_keeps_and_rejects_drafts(pair):
    looked, plain = pair
    proposed = accepted = identical = 0
    prompts = _fim_prompts(plain)
    for prefix, suffix in prompts:
        chunks = list(looked.stream_generate(prefix, max_new_tokens=48, suffix=suffix))
        identical += check_greedy(plain, fim_prompt(prefix, suffix), "".join(c.text for c in chunks), 48)
        proposed += chunks[-1].draft_tokens
        accepted += chunks[-1].draft_accepted
    # both outcomes happened: drafts kept (tokens skipped) and drafts cut back (the state truncated)
    assert 0 < accepted < proposed, (accepted, proposed)
    # a tie is rare: one prompt of six at most, and only where rounding can break one (bf16, int8 activations)
    assert identical == len(prompts) or (ties_possible(plain) and identical >= len(prompts) - 1), identical


def test_the_state_after_lookup_is_what_the_next_request_reuses(pair):
    looked, plain = pair
    prefix, suffix = _fim_prompts(plain, 1)[0]
    looked.infill(prefix, suffix, max_new_tokens=40)
    typed = prefix + "    "  # the user typed on: the cached KV of the first request (drafts included) is reused
    chunks = list(looked.stream_generate(typed, max_new_tokens=40, suffix=suffix))
    assert chunks[-1].cached_tokens > len(plain.encode(prefix)) // 2
    assert check_greedy(plain, fim_prompt(typed, suffix), "".join(c.text for c in chunks), 40) or ties_possible(plain)


@pytest.mark.parametrize("budget", [1, 2, 3, 9])
def test_drafts_never_run_past_the_token_budget(pair, budget):
    looked, plain = pair
    prefix, suffix = _fim_prompts(plain, 1)[0]
    chunks = list(looked.stream_generate(prefix, max_new_tokens=budget, suffix=suffix))
    assert chunks[-1].completion_tokens <= budget
    assert check_greedy(plain, fim_prompt(prefix, suffix), "".join(c.text for c in chunks), budget) or ties_possible(plain)


def test_drafts_never_run_past_the_context(pair):
    looked, plain = pair
    ids = plain.encode("\n".join(d.text for d in eval_documents()))[: plain.context - 5]
    prompt = plain.tokenizer.decode(ids)
    n = len(plain.encode(prompt))
    chunks = list(looked.stream_generate(prompt, max_new_tokens=64))
    assert chunks[-1].completion_tokens <= plain.context - n
    assert check_greedy(plain, prompt, "".join(c.text for c in chunks), min(64, plain.context - n)) or ties_possible(plain)


def test_sampling_and_batches_decode_without_drafts(pair):
    looked, _ = pair
    sampled = list(looked.stream_generate("def add(a, b):\n    return a + b\n\ndef add(", max_new_tokens=16,
                                          temperature=0.7, seed=1))
    assert sampled[-1].draft_tokens == 0
    batch = list(looked.stream_generate(["def add(a, b):\n    return a + b\n\ndef add(", "import os\nimport"],
                                        max_new_tokens=8))
    assert all(c.draft_tokens == 0 for c in batch)


@pytest.mark.slow
def test_the_server_reports_drafts_as_openai_and_llama_server_do(onnx_fp32_artifact):
    import httpx

    from tests.serving import start_server, stop_server

    proc, url = start_server(onnx_fp32_artifact, "--lookup-tokens", "4")
    try:
        model = load(onnx_fp32_artifact, lookup_tokens=0, prefix_cache_bytes=0)
        prefix, suffix = _fim_prompts(model, 1)[0]
        suffix = "".join(suffix.splitlines(keepends=True)[:3])  # what /infill keeps untrimmed at a 1,024 context
        body = {"prompt": prefix, "suffix": suffix, "max_tokens": 40, "temperature": 0}
        usage = httpx.post(url + "/v1/completions", json=body, timeout=120).json()["usage"]
        details = usage["completion_tokens_details"]
        infill = httpx.post(url + "/infill", json={"input_prefix": prefix, "input_suffix": suffix, "n_predict": 40},
                            timeout=120).json()
        assert infill["truncated"] is False and infill["content"] == model.infill(prefix, suffix, max_new_tokens=40)
        t = infill["timings"]
        # the same request twice: the same drafts, kept and rejected alike
        assert t["draft_n_accepted"] == details["accepted_prediction_tokens"] > 0
        assert t["draft_n"] - t["draft_n_accepted"] == details["rejected_prediction_tokens"]
        sampled = httpx.post(url + "/v1/completions", json={**body, "temperature": 0.5}, timeout=120).json()
        assert sampled["usage"]["completion_tokens_details"] == {"accepted_prediction_tokens": 0,
                                                                 "rejected_prediction_tokens": 0}
    finally:
        stop_server(proc)


def test_lookup_is_refused_where_it_would_change_greedy_text(onnx_int4_artifact, embedded_model_dir):
    """Found by the red team: on int4 exports (the default one included) lookup decoding changed 12 of 90
    greedy completions: the verifying forward's int8 rounding of activations differs from one-token steps',
    and the following steps read its keys and values. Refused there, and in bf16, in one line."""
    from sc2quant.core.errors import UserError

    with pytest.raises(UserError, match="lookup decoding would change greedy text.*int8") as err:
        load(onnx_int4_artifact, lookup_tokens=8)
    assert "\n" not in str(err.value) and "--lookup-tokens 0" in str(err.value)
    with pytest.raises(UserError, match="computes in bfloat16"):
        load(embedded_model_dir, dtype="bf16", lookup_tokens=8)
    assert load(onnx_int4_artifact, lookup_tokens=0).lookup_tokens == 0
    assert load(embedded_model_dir, dtype="fp32", lookup_tokens=8).lookup_tokens == 8


@pytest.mark.slow
def test_serve_refuses_lookup_on_an_int4_export_in_one_line(onnx_int4_artifact):
    import subprocess
    import sys

    from tests.serving import free_port

    done = subprocess.run([sys.executable, "-m", "sc2quant", "serve", str(onnx_int4_artifact), "--lookup-tokens", "4",
                           "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "lookup decoding would change greedy text" in done.stderr
