"""`sc2quant serve` as a real process, driven by a real HTTP client (httpx)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.serving import spawn_server, sse, start_server, stop_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(embedded_model_dir):
    proc, url = start_server(embedded_model_dir, "--max-queue", "32")
    yield url
    proc.terminate()
    proc.wait(10)


def test_models_and_health(server):
    assert httpx.get(server + "/health").json()["status"] == "ok"
    models = httpx.get(server + "/v1/models").json()
    assert models["object"] == "list" and len(models["data"]) == 1


def test_completion_matches_python_api(server, embedded_model_dir):
    from sc2quant.runtime import load

    prompt = "def fibonacci(n):\n"
    body = {"prompt": prompt, "max_tokens": 24, "temperature": 0}
    r = httpx.post(server + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()
    expected = load(embedded_model_dir).generate(prompt, max_new_tokens=24)
    assert data["choices"][0]["text"] == expected
    assert data["object"] == "text_completion" and data["usage"]["completion_tokens"] <= 24
    assert data["choices"][0]["finish_reason"] in ("stop", "length")


def test_streaming_concatenates_to_the_same_text(server):
    body = {"prompt": "import os\n\ndef main():\n", "max_tokens": 20, "temperature": 0}
    full = httpx.post(server + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    pieces, done = [], False
    with httpx.stream("POST", server + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            pieces.append(json.loads(line[6:])["choices"][0]["text"])
    assert done and "".join(pieces) == full and len(pieces) > 1


def test_usage_streamed_on_request_and_max_tokens_null(server, embedded_model_dir):
    """OpenAI clients send `stream_options: {"include_usage": true}` (a last chunk with the usage and no
    choices, `usage: null` before) and `max_tokens: null` (until the context ends)."""
    body = {"prompt": "import os\n\ndef main():\n", "max_tokens": 12, "temperature": 0}
    whole = httpx.post(server + "/v1/completions", json=body, timeout=60).json()
    with httpx.stream("POST", server + "/v1/completions", timeout=60,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert all(e["usage"] is None and e["choices"] for e in events[:-1])
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")  # cached_tokens: the second one reuses the first
    assert events[-1]["choices"] == [] and all(events[-1]["usage"][k] == whole["usage"][k] for k in counts)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == whole["choices"][0]["text"]
    with httpx.stream("POST", server + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert all("usage" not in json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {"))
    unbounded = httpx.post(server + "/v1/completions", timeout=120,
                           json={"prompt": "x = [", "max_tokens": None, "temperature": 0, "stop": ["\n\n\n"]})
    assert unbounded.status_code == 200, unbounded.text
    assert unbounded.json()["usage"]["completion_tokens"] > 16  # not the default of 16


def test_fim_with_suffix(server):
    body = {"prompt": "def add(a, b):\n    ", "suffix": "\n    return c\n", "max_tokens": 16, "temperature": 0}
    r = httpx.post(server + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200
    assert "<fim_middle>" not in r.json()["choices"][0]["text"]


def test_openai_client_works_unchanged(server):
    import openai  # in the dev extras: a missing client fails, never skips
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    out = client.completions.create(model=httpx.get(server + "/v1/models").json()["data"][0]["id"],
                                    prompt="class Stack:\n", max_tokens=8, temperature=0)
    assert isinstance(out.choices[0].text, str)


@pytest.mark.parametrize("body,status", [
    (b"{not json", 400),
    (b'{"prompt": "x", "max_tokens": -1}', 400),
    (b'{"prompt": "x", "max_tokens": 100000}', 400),
    (b'{"max_tokens": 4}', 400),
    (b'{"prompt": "x", "temperature": "hot"}', 400),
    (b'{"prompt": "x", "model": "gpt-4"}', 404),
    (b'\xff\xfe{"prompt": "x"}', 400),
])
def test_bad_requests_get_json_4xx(server, body, status):
    r = httpx.post(server + "/v1/completions", content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]


def test_oversized_request_and_prompt(server):
    r = httpx.post(server + "/v1/completions", json={"prompt": "x" * (2 << 20)}, timeout=30)
    assert r.status_code == 413
    r = httpx.post(server + "/v1/completions", json={"prompt": "def f():\n" * 2000, "max_tokens": 4}, timeout=30)
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]


def test_twenty_concurrent_requests_then_still_healthy(server):
    def one(i: int) -> tuple[int, str]:
        r = httpx.post(server + "/v1/completions", json={"prompt": f"def f{i}(x):\n", "max_tokens": 8, "temperature": 0},
                       timeout=120)
        return r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else ""

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    assert all(status == 200 for status, _ in results)
    assert httpx.get(server + "/health").json()["status"] == "ok"


def test_queue_full_gives_429(embedded_model_dir):
    proc, url = start_server(embedded_model_dir, "--max-queue", "0")
    try:
        def one(_: int) -> int:
            return httpx.post(url + "/v1/completions", json={"prompt": "def f():", "max_tokens": 48, "temperature": 0},
                              timeout=120).status_code

        with ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(one, range(6)))
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}
        assert httpx.get(url + "/health").status_code == 200
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("body,message", [
    ({"temperature": 1e-39}, "temperature must be 0 (greedy) or between 0.001"),
    ({"temperature": 1e-4}, "temperature must be 0 (greedy) or between 0.001"),
    ({"temperature": 0.5, "top_p": 1e-46}, "top_p must be between 1e-06 and 1"),
    ({"temperature": 0.5, "top_p": 1e-7}, "top_p must be between 1e-06 and 1"),
    ({"stop": [f"s{i}" for i in range(17)]}, "at most 16 stop sequences"),
    ({"stop": "x" * 1001}, "at most 1,000 characters"),
    ({"stop": ["\n", "y" * 100_000]}, "at most 1,000 characters, got one of 100,000"),
])
def test_sampling_values_the_sampler_cannot_take_are_400_streamed_or_not(server, body, message):
    """temperature 1e-39 or top_p 1e-46 passed validation and crashed the sampler (a 500, a broken stream)."""
    body = {"prompt": "def f(x):\n", "max_tokens": 64, **body}
    t0 = time.monotonic()
    r = httpx.post(server + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    status, events, done = sse(server, body, timeout=30)
    assert status == 400 and message in events[0]["error"]["message"] and not done, events
    assert time.monotonic() - t0 < 10  # refused before any work (a 100 KB stop string took seconds a token)


def test_the_smallest_sampling_values_accepted_generate(server):
    for body in ({"temperature": 1e-3}, {"temperature": 1.0, "top_p": 1e-6}):
        r = httpx.post(server + "/v1/completions", json={"prompt": "def f(x):\n", "max_tokens": 8, **body}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0, r.text


def test_health_answers_503_while_the_model_loads(embedded_model_dir):
    """The port is served at once: /health says 503 "loading" (it accepted connections and answered
    nothing for seconds), completions get a 503 JSON error, then /health turns 200."""
    proc, url = spawn_server(embedded_model_dir)
    answers: list[tuple[int, str]] = []
    refused = 0  # completions asked while loading
    try:
        deadline = time.monotonic() + 120
        while not answers or answers[-1][0] != 200:
            assert time.monotonic() < deadline and proc.poll() is None
            try:
                r = httpx.get(url + "/health", timeout=2)  # an accepted connection must be answered at once
            except httpx.ConnectError:  # not bound yet
                time.sleep(0.05)
                continue
            answers.append((r.status_code, r.json()["status"]))
            if r.status_code == 503:
                early = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
                if early.status_code != 200:  # 200: it became ready in between
                    assert early.status_code == 503 and "loading" in early.json()["error"]["message"], early.text
                    refused += 1
            time.sleep(0.05)
        assert answers[0] == (503, "loading") and set(answers[:-1]) == {(503, "loading")} and refused, answers
        assert httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30).status_code == 200
    finally:
        stop_server(proc)


@pytest.mark.parametrize("field", ["temperature", "top_p", "n", "stream", "echo", "best_of", "logprobs"])
def test_null_means_not_given(server, field):
    """Found by the red team: OpenAI clients send `null` for defaults; `temperature: null` got 400."""
    r = httpx.post(server + "/v1/completions", json={"prompt": "def f(", "max_tokens": 2, field: None}, timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("body,message", [
    ({"logprobs": 5}, "logprobs"), ({"best_of": 3}, "best_of"), ({"stream_options": {"include_usage": True}}, "stream"),
    ({"stream": "yes"}, "stream"), ({"echo": 1}, "echo"),
])
def test_what_is_not_done_is_refused_not_ignored(server, body, message):
    r = httpx.post(server + "/v1/completions", json={"prompt": "x", "max_tokens": 2, **body}, timeout=60)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def test_echo_head_and_a_deep_body(server):
    got = httpx.post(server + "/v1/completions", json={"prompt": "def f(", "max_tokens": 2, "echo": True,
                                                       "temperature": 0}, timeout=60).json()
    assert got["choices"][0]["text"].startswith("def f(")
    assert httpx.head(server + "/health").status_code == 200
    deep = httpx.post(server + "/v1/completions", content=b"[" * 50000, timeout=60)
    assert deep.status_code == 400 and "nests deeper" in deep.json()["error"]["message"]


@pytest.mark.parametrize("body,field", [
    ({"logit_bias": {"50256": -100}}, "logit_bias"), ({"presence_penalty": 1.5}, "presence_penalty"),
    ({"frequency_penalty": -0.5}, "frequency_penalty"), ({"top_k": 200}, "top_k"),
    ({"top_k": 1, "temperature": 0.7}, "top_k"), ({"logit_bias": {"1": 0, "2": 3}}, "logit_bias"),
    ({"min_p": 0.1}, "min_p"), ({"repetition_penalty": 1.2}, "repetition_penalty"), ({"min_tokens": 5}, "min_tokens"),
    ({"typical_p": 0.9}, "typical_p"), ({"mirostat": 2}, "mirostat"), ({"ignore_eos": True}, "ignore_eos"),
    ({"stop_token_ids": [5]}, "stop_token_ids"), ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"guided_regex": "a"}, "guided_regex"), ({"prompt_logprobs": 1}, "prompt_logprobs"), ({"logprobs": 0}, "logprobs"),
])
def test_sampling_options_not_applied_are_refused_naming_the_field(server, body, field):
    """Found by the red team: logit_bias, presence/frequency penalties and top_k were accepted and changed nothing."""
    r = httpx.post(server + "/v1/completions", json={"prompt": "def f(", "max_tokens": 2, **body}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith(field), r.text
    assert "Value error" not in r.json()["error"]["message"]


@pytest.mark.parametrize("body", [
    {"logit_bias": {}}, {"logit_bias": None}, {"logit_bias": {"50256": 0}}, {"presence_penalty": 0},
    {"frequency_penalty": 0.0}, {"top_k": 0}, {"top_k": -1}, {"top_k": 40, "temperature": 0}, {"user": "me"},
    {"seed": 7}, {"min_p": 0}, {"repetition_penalty": 1.0}, {"min_tokens": 0}, {"typical_p": None},
    {"ignore_eos": False}, {"stop_token_ids": []}, {"response_format": {"type": "text"}}, {"logprobs": None},
])
def test_neutral_values_of_those_options_are_accepted(server, body):
    r = httpx.post(server + "/v1/completions", json={"prompt": "def f(", "max_tokens": 2, **body}, timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("encoding,text", [(e, "def f(é") for e in ("utf-16", "utf-16-le", "utf-16-be", "utf-32", "latin-1")]
                         + [(e, "def f(x):") for e in ("utf-16-le", "utf-16-be", "utf-32-le")])
def test_every_body_that_is_not_utf8_is_refused_alike(server, encoding, text):
    """Found by the red team: a UTF-16 body was accepted (Python's json reads it), other non-UTF-8 bodies refused;
    then ASCII JSON in UTF-16 without a BOM (valid UTF-8 bytes, full of NULs) was still read as UTF-16."""
    body = json.dumps({"prompt": text, "max_tokens": 2}, ensure_ascii=False).encode(encoding)
    utf8 = httpx.post(server + "/v1/completions", content=b'{"prompt": "\xff", "max_tokens": 2}', timeout=60)
    for route in ("/v1/completions", "/infill"):
        r = httpx.post(server + route, content=body, headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 400 and r.json() == utf8.json(), (route, r.text)
    assert "UTF-8" in utf8.json()["error"]["message"]
