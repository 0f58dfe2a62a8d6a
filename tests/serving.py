"""`sc2quant serve` as a real child process, and a client for its streams: what the server tests share."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import httpx

JSON = {"content-type": "application/json"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_server(model_dir: Any, *extra: str, env: dict[str, str] | None = None,
                 python: str = sys.executable) -> tuple[subprocess.Popen, str]:
    """`sc2quant serve` started in a child process on a free port, not waited for; `proc.log` holds its stderr.
    python: the environment's interpreter (the base install's, for its tests)."""
    port = free_port()
    log = tempfile.TemporaryFile()  # never a pipe nobody reads: a full pipe would block the server
    args = [python, "-m", "sc2quant", "serve", *([str(model_dir)] if model_dir else []), "--port", str(port), *extra]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, **(env or {})})
    proc.log = log  # type: ignore[attr-defined]
    return proc, f"http://127.0.0.1:{port}"


def start_server(model_dir: Any, *extra: str, env: dict[str, str] | None = None,
                 timeout: float = 120, python: str = sys.executable) -> tuple[subprocess.Popen, str]:
    """`sc2quant serve` in a child process on a free port; returns (process, base URL) once healthy."""
    proc, url = spawn_server(model_dir, *extra, env=env, python=python)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {said(proc)[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not start in {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def said(proc: subprocess.Popen) -> str:
    """Everything the server wrote on stderr so far."""
    proc.log.seek(0)  # type: ignore[attr-defined]
    return proc.log.read().decode(errors="replace")  # type: ignore[attr-defined]


def sse(url: str, body: dict, timeout: float = 60) -> tuple[int, list[dict], bool]:
    """A streamed completion: (status, the JSON events or the error body, whether `[DONE]` came)."""
    events, done = [], False
    raw = json.dumps({**body, "stream": True}).encode()  # ASCII JSON: a lone surrogate travels as \\ud800
    with httpx.stream("POST", url + "/v1/completions", content=raw, headers=JSON, timeout=timeout) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, [r.json()], False
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                events.append(json.loads(line[6:]))
    return 200, events, done
