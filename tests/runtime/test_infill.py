"""`/infill` as llama-server serves it, tried with the bodies editor plugins send (llama.vscode's
request and its cache warm-up, llama.vim's), streamed and not, against the runtime's own FIM."""

from __future__ import annotations

import json

import httpx
import pytest

from sc2quant.core.tokens import EOS, FILE_SEP, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, REPO_NAME
from sc2quant.runtime import load
from tests.serving import start_server, stop_server

pytestmark = pytest.mark.slow
# (prefix, the cursor's line, suffix): cases the embedded model fills with 16 tokens, not an end of file at once
PREFIX, LINE, SUFFIX = "def add(a, b):\n", "    ", "\n    return c\n"
VIM_PREFIX, VIM_LINE, VIM_SUFFIX = "def parse(text):\n    result = []\n", "    for ", "\n    return result\n"
EXTRA = [{"filename": "util.py", "text": "def helper(x):\n    return x * 2\n"}]
# llama.vscode (src/llama-server.ts): the completion request and the n_predict 0 request that fills the cache
VSCODE = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": EXTRA, "prompt": LINE, "n_predict": 16,
          "top_k": 40, "top_p": 0.99, "stream": False, "n_indent": 4, "samplers": ["top_k", "top_p", "infill"],
          "cache_prompt": True, "t_max_prompt_ms": 500, "t_max_predict_ms": 5000}
WARMUP = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": EXTRA, "prompt": LINE, "n_predict": 0,
          "samplers": [], "cache_prompt": True, "t_max_prompt_ms": 500, "t_max_predict_ms": 1}
# llama.vim: the same fields, greedy-ish sampling settings of its own
VIM = {"input_prefix": VIM_PREFIX, "input_suffix": VIM_SUFFIX, "input_extra": [], "prompt": VIM_LINE, "n_predict": 16,
       "top_k": 40, "top_p": 0.99, "stream": False, "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True,
       "t_max_prompt_ms": 500, "t_max_predict_ms": 1000}


@pytest.fixture(scope="module")
def served(onnx_int4_artifact):
    proc, url = start_server(onnx_int4_artifact)
    try:
        yield url, load(onnx_int4_artifact, prefix_cache_bytes=0)
    finally:
        stop_server(proc)


def _ids(model, body: dict, keep_prefix: int | None = None) -> list[int]:
    """The prompt written out by hand as llama-server builds it: each piece tokenized as plain text
    (special-token strings in code stay code), the prefix and the cursor's line apart."""
    tok = model.tokenizer

    def text(t: str) -> list[int]:
        return tok(t, add_special_tokens=False, split_special_tokens=True)["input_ids"] if t else []

    def special(t: str) -> list[int]:
        return [tok.convert_tokens_to_ids(t)]

    extra = []
    if body["input_extra"]:
        extra = special(REPO_NAME)
        for f in body["input_extra"]:
            extra += special(FILE_SEP) + text(f"{f['filename']}\n{f['text']}")
        extra += special(FILE_SEP)
    prefix = text(body["input_prefix"])[-keep_prefix if keep_prefix else 0:]
    return (extra + special(FIM_PREFIX) + prefix + text(body["prompt"]) + special(FIM_SUFFIX)
            + text(body["input_suffix"]) + special(FIM_MIDDLE))


def _expected(model, body: dict) -> str:
    return model.generate(_ids(model, body), max_new_tokens=body["n_predict"])


def test_llama_vscode_requests_get_llama_server_answers(served):
    url, model = served
    warm = httpx.post(url + "/infill", json=WARMUP, timeout=60)
    assert warm.status_code == 200 and warm.json()["content"] == "" and warm.json()["tokens_predicted"] == 0
    got = httpx.post(url + "/infill", json=VSCODE, timeout=60).json()
    assert got["content"] == _expected(model, VSCODE) and got["content"] and got["stop"] is True
    alone = httpx.post(url + "/infill", json={**VSCODE, "input_extra": []}, timeout=60).json()
    assert alone["content"] != got["content"]  # the other file was in the prompt
    assert got["tokens_cached"] >= got["tokens_evaluated"] - 2  # the warm-up filled the cache: the last two prefilled
    assert got["timings"]["predicted_n"] == got["tokens_predicted"] <= 16


def test_llama_vim_request_and_the_openai_suffix_route_agree(served):
    url, model = served
    got = httpx.post(url + "/infill", json=VIM, timeout=60).json()
    assert got["content"] == _expected(model, VIM) and got["content"]
    openai = httpx.post(url + "/v1/completions", json={"prompt": VIM_PREFIX + VIM_LINE, "suffix": VIM_SUFFIX,
                                                       "max_tokens": 16, "temperature": 0}, timeout=60).json()
    whole_line = httpx.post(url + "/infill", json={**VIM, "input_prefix": VIM_PREFIX + VIM_LINE, "prompt": ""},
                            timeout=60).json()
    assert openai["choices"][0]["text"] == whole_line["content"]  # one generation path for both routes
    assert whole_line["content"] == model.infill(VIM_PREFIX + VIM_LINE, VIM_SUFFIX, max_new_tokens=16)


def test_streamed_infill_is_the_same_text_then_a_final_answer(served):
    url, _ = served
    whole = httpx.post(url + "/infill", json=VSCODE, timeout=60).json()
    events = []
    with httpx.stream("POST", url + "/infill", json={**VSCODE, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert all(e["stop"] is False for e in events[:-1]) and events[-1]["stop"] is True
    assert "".join(e["content"] for e in events) == whole["content"]


def test_the_time_limit_stops_generation(served):
    url, _ = served
    body = {**VIM, "input_prefix": "x = [", "prompt": "", "input_suffix": "", "n_predict": 200}
    free = httpx.post(url + "/infill", json=body, timeout=60).json()
    assert free["stop_type"] == "limit" and free["tokens_predicted"] == 200  # n_predict reached
    got = httpx.post(url + "/infill", json={**body, "t_max_predict_ms": 1}, timeout=60).json()
    assert got["stop_type"] == "limit" and 1 <= got["tokens_predicted"] < 200


@pytest.mark.parametrize("body,message", [
    ({**VIM, "input_extra": "util.py"}, "input_extra"),
    ({**VIM, "n_predict": 100000}, "n_predict"),
    ({**VIM, "prompt": "x = 1; " * 3000}, "context"),
    ({**VIM, "temperature": -1}, "temperature"),
])
def test_bad_infill_requests_get_400_with_one_message(served, body, message):
    url, _ = served
    r = httpx.post(url + "/infill", json=body, timeout=60)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def test_answers_say_which_stop_string_ended_them_and_never_a_negative_time(served):
    """Found by the red team: a stop string reported as "eos" (llama-server says "word" and which), and
    predicted_ms below zero when no token was predicted."""
    url, model = served
    full = _expected(model, VSCODE)
    word = full.strip()[1:3]  # two characters the completion is known to contain, after its first
    got = httpx.post(url + "/infill", json={**VSCODE, "stop": [word, "never-there"]}, timeout=60).json()
    assert got["stop_type"] == "word" and got["stopping_word"] == word
    assert got["content"] == full[: full.index(word)]
    plain = httpx.post(url + "/infill", json=VSCODE, timeout=60).json()
    assert plain["stop_type"] in ("eos", "limit") and plain["stopping_word"] == ""
    warm = httpx.post(url + "/infill", json=WARMUP, timeout=60).json()
    assert warm["timings"]["predicted_n"] == 0 and warm["timings"]["predicted_ms"] >= 0


@pytest.mark.parametrize("headers", [{}, {"content-type": "application/x-www-form-urlencoded"},
                                     {"content-type": "text/plain"}], ids=["none", "form", "text"])
def test_a_json_body_is_read_whatever_its_content_type(served, headers):
    """`curl -d` (the serve --help example) labels JSON a form; llama-server reads it anyway."""
    url, model = served
    body = json.dumps({**VSCODE, "input_extra": []}).encode()
    got = httpx.post(url + "/infill", content=body, headers=headers, timeout=60)
    assert got.status_code == 200 and got.json()["content"] == _expected(model, {**VSCODE, "input_extra": []})
    completion = httpx.post(url + "/v1/completions", content=b'{"prompt": "def f(", "max_tokens": 2, "temperature": 0}',
                            headers=headers, timeout=60)
    assert completion.status_code == 200, completion.text
    bad = httpx.post(url + "/infill", content=b"input_prefix=x", headers=headers, timeout=60)
    assert bad.status_code == 400 and "error" in bad.json()


@pytest.mark.parametrize("value", [2.5, 10])
def test_one_temperature_range_everywhere(served, value):
    from sc2quant.core.errors import UserError

    url, model = served
    for route, body in (("/infill", {**VIM, "temperature": value}), ("/v1/completions", {"prompt": "x", "temperature": value})):
        assert httpx.post(url + route, json=body, timeout=60).status_code == 400
    with pytest.raises(UserError, match="between 0.001 and 2"):
        model.generate("x", temperature=value)
    assert httpx.post(url + "/infill", json={**VIM, "temperature": 2.0, "seed": 1}, timeout=60).status_code == 200


def test_special_token_strings_in_the_code_are_code(served):
    """Found by the red team: code containing `<fim_middle>` or `<|endoftext|>` was read as those tokens
    (the prompt ended early, or a file ended mid-prefix); llama-server tokenizes the pieces as text."""
    url, model = served
    body = {**VIM, "input_prefix": f'SEP = "{FIM_MIDDLE}"\nEND = "{EOS}"\n' + VIM_PREFIX,
            "input_extra": [{"filename": "a.py", "text": f"# {FIM_PREFIX} {FILE_SEP}\n"}]}
    got = httpx.post(url + "/infill", json=body, timeout=60).json()
    ids = _ids(model, body)
    specials = {model.tokenizer.convert_tokens_to_ids(t) for t in (FIM_MIDDLE, EOS, FIM_PREFIX, FILE_SEP)}
    assert sum(i in specials for i in ids) == 4  # the two <file_sep>, the prompt's <fim_prefix> and <fim_middle>
    assert got["tokens_evaluated"] == len(ids) and got["content"] == _expected(model, body)
    openai = httpx.post(url + "/v1/completions", json={"prompt": body["input_prefix"], "suffix": VIM_SUFFIX,
                                                       "max_tokens": 8, "temperature": 0}, timeout=60).json()
    assert openai["usage"]["prompt_tokens"] == len(_ids(model, {**body, "input_extra": [], "prompt": ""}))


def test_prompts_beyond_the_context_are_trimmed_as_llama_server_trims_them(served):
    """Found by the red team: a long file got 400 where llama-server keeps the prefix's last 3B/4 tokens, the
    suffix's first B/4 - 2 - len(prompt) and the other files' last context - B - 2 n_predict tokens
    (B = min(2048, context / 2): llama-server's batch, less where the context is small)."""
    url, model = served
    batch = min(2048, model.context // 2)
    lines = "".join(f"value_{i} = compute({i})\n" for i in range(2000))
    body = {**VIM, "input_prefix": lines + VIM_PREFIX, "input_suffix": VIM_SUFFIX + lines,
            "input_extra": [{"filename": "big.py", "text": lines}], "n_predict": 8}
    got = httpx.post(url + "/infill", json=body, timeout=120).json()
    assert got["truncated"] is True and got["tokens_evaluated"] < model.context
    tok = model.tokenizer
    suffix = tok(body["input_suffix"], add_special_tokens=False)["input_ids"]
    line = tok(body["prompt"], add_special_tokens=False)["input_ids"]
    n_suffix = batch // 4 - 2 - len(line)
    n_extra = max(0, model.context - batch - 2 * body["n_predict"])
    expected = _ids(model, {**body, "input_extra": [], "input_suffix": ""}, keep_prefix=3 * (batch // 4))
    expected = expected[:-1] + suffix[:n_suffix] + expected[-1:]
    extra = _ids(model, {**body, "input_prefix": "", "prompt": "", "input_suffix": ""})[:-3]  # the other file
    expected = (extra[len(extra) - n_extra:] if n_extra else []) + expected
    assert got["tokens_evaluated"] == len(expected)
    assert got["content"] == model.generate(expected, max_new_tokens=8)
    small = httpx.post(url + "/infill", json=VIM, timeout=60).json()
    assert small["truncated"] is False


@pytest.mark.parametrize("n_predict", [-1, 0, 16])
def test_other_files_leave_room_for_the_new_tokens(served, n_predict):
    """Found in review: with n_predict -1 (llama-server's default) the other files filled the context
    but for one token, so the answer was one token long."""
    from sc2quant.runtime.infill import InfillRequest, infill_ids

    _, model = served
    batch = min(2048, model.context // 2)
    lines = "".join(f"value_{i} = compute({i})\n" for i in range(2000))
    req = InfillRequest(**{**VIM, "input_extra": [{"filename": "big.py", "text": lines}], "n_predict": n_predict})
    ids, truncated = infill_ids(model.tokenizer, model.context, req)
    reserve = {-1: batch // 4, 0: 1, 16: 2 * 16}[n_predict]
    assert truncated and len(ids) <= model.context - reserve


def test_null_fields_are_defaults(served):
    url, model = served
    body = {**VIM, "n_predict": None, "input_suffix": None, "top_p": None, "t_max_predict_ms": None, "stop": None}
    got = httpx.post(url + "/infill", json={**body, "n_predict": 8}, timeout=60)
    assert got.status_code == 200, got.text
    nulls = httpx.post(url + "/infill", json={**body, "n_predict": None, "t_max_predict_ms": 2000}, timeout=120)
    assert nulls.status_code == 200, nulls.text
