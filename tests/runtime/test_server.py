"""`sc2quant serve` as a real process, driven by a real HTTP client (httpx)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir, *extra: str, env: dict[str, str] | None = None):
    """`sc2quant serve` in a child process on a free port; returns (process, base URL) once healthy."""
    import os
    import tempfile

    port = _free_port()
    log = tempfile.TemporaryFile()  # never a pipe nobody reads: a full pipe would block the server
    proc = subprocess.Popen([sys.executable, "-m", "sc2quant", "serve", str(model_dir), "--port", str(port), *extra],
                            stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, **(env or {})})
    proc.log = log  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited: {log.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start in 120 s")


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


def test_fim_with_suffix(server):
    body = {"prompt": "def add(a, b):\n    ", "suffix": "\n    return c\n", "max_tokens": 16, "temperature": 0}
    r = httpx.post(server + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200
    assert "<fim_middle>" not in r.json()["choices"][0]["text"]


def test_openai_client_works_unchanged(server):
    openai = pytest.importorskip("openai")
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
