"""`sc2quant serve` with rows decoded together (--parallel): concurrent streams answered as alone, /health
counting busy rows, a client that never reads its stream not holding the others back, and every row free
after a crowd of clients that connect, hang up or never read at random moments."""

from __future__ import annotations

import json
import random
import socket
import threading
import time

import httpx
import pytest

from sc2quant.runtime import load
from tests.runtime.prefix_engines import check_greedy, ties_possible
from tests.serving import sse, start_server, stop_server

PROMPTS = ["def add(a, b):\n    return a + b\n\ndef mul(a, b):\n", "import os\nimport sys\n\nclass Stack:\n",
           "for i in range(10):\n    print(i)\n", "# sort a list\ndef quicksort(xs):\n"]


@pytest.fixture(scope="module")
def served(onnx_int4_artifact):
    proc, url = start_server(onnx_int4_artifact, "--parallel", "2", "--max-queue", "64")
    try:
        yield url, load(onnx_int4_artifact, prefix_cache_bytes=0)
    finally:
        stop_server(proc)


def _slots(url: str) -> dict:
    return httpx.get(url + "/health", timeout=10).json()["slots"]


def _wait_idle(url: str, seconds: float = 30) -> dict:
    deadline = time.monotonic() + seconds
    while (s := _slots(url))["busy"] or s["waiting"]:
        assert time.monotonic() < deadline, s
        time.sleep(0.05)
    return s


def test_concurrent_streams_are_decoded_together_and_answered_as_alone(served):
    url, plain = served
    got: dict[int, str] = {}
    busy: list[int] = []

    def work(i: int) -> None:
        status, events, done = sse(url, {"prompt": PROMPTS[i], "max_tokens": 48, "temperature": 0}, timeout=120)
        assert status == 200 and done, events[-1:]
        got[i] = "".join(e["choices"][0]["text"] for e in events if e.get("choices"))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        busy.append(_slots(url)["busy"])
        time.sleep(0.02)
    assert max(busy) == 2 and _slots(url)["rows"] == 2  # two rows at once, never more
    identical = sum(check_greedy(plain, PROMPTS[i], got[i], 48) for i in range(4))
    assert identical == 4 or (ties_possible(plain) and identical >= 3)
    _wait_idle(url)


def _unread_stream(url: str, body: dict) -> socket.socket:
    """A streaming request whose answer is never read (the socket stays open)."""
    host, port = url.removeprefix("http://").split(":")
    raw = json.dumps({**body, "stream": True}).encode()
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
    return s


def test_a_client_that_never_reads_its_stream_does_not_hold_the_others(served):
    url, plain = served
    silent = _unread_stream(url, {"prompt": PROMPTS[0], "max_tokens": 900, "temperature": 0})
    try:
        time.sleep(0.5)
        t0 = time.monotonic()
        r = httpx.post(url + "/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 16, "temperature": 0},
                       timeout=120)
        assert r.status_code == 200 and time.monotonic() - t0 < 60
        assert check_greedy(plain, PROMPTS[1], r.json()["choices"][0]["text"], 16) or ties_possible(plain)
    finally:
        silent.close()
    _wait_idle(url, 60)  # the vanished reader's row is freed too


@pytest.mark.slow
def test_a_crowd_that_connects_hangs_up_and_never_reads_leaves_every_row_free(served):
    url, _ = served
    rng = random.Random(7)
    errors: list[str] = []

    def client(i: int) -> None:
        body = {"prompt": PROMPTS[i % 4] * (1 + i % 3), "max_tokens": rng.randint(1, 200), "temperature": 0}
        kind = i % 3
        try:
            if kind == 0:  # hangs up at a random moment
                s = _unread_stream(url, body)
                time.sleep(rng.uniform(0, 1.5))
                s.close()
            elif kind == 1:  # never reads, then goes away
                s = _unread_stream(url, body)
                time.sleep(rng.uniform(1, 3))
                s.close()
            else:  # an ordinary client, or an editor's warm-up (n_predict 0)
                if i % 2:
                    r = httpx.post(url + "/infill", json={"input_prefix": PROMPTS[i % 4], "input_suffix": "\n",
                                                          "n_predict": 0}, timeout=120)
                else:
                    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
                if r.status_code >= 500 or r.status_code not in (200, 429):
                    errors.append(f"{r.status_code} {r.text[:200]}")
        except httpx.HTTPError as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
        time.sleep(rng.uniform(0, 0.05))
    for t in threads:
        t.join(180)
    assert not errors, errors[:5]
    _wait_idle(url, 120)
    r = httpx.post(url + "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}, timeout=60)
    assert r.status_code == 200  # healthy afterwards
