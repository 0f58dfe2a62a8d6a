"""Timing in child processes: one fresh process per contender per round, so no contender's
memory or warm caches leak into another's figures. Peak RSS is the child's own (wait4).

`python -m bench.timing PATH --threads T ...` times one sc2quant-loadable model and prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sc2quant.errors import UserError


def run_child(cmd: list[str], env: dict[str, str] | None = None) -> tuple[str, int]:
    """Run `cmd`, return (stdout, its peak RSS in bytes).

    The peak is the child's VmHWM, read every 20 ms while it runs (a page-table figure of the
    child's own address space). wait4's ru_maxrss would be wrong: Linux carries it across exec,
    so every child of this (large) process would report at least this process's peak.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True,
                                env={**os.environ, "SC2QUANT_NO_PROGRESS": "1", **(env or {})})
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _vm_hwm(proc.pid))
            time.sleep(0.02)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        lines = stderr.strip().splitlines()
        raise UserError(f"{Path(cmd[0]).name} {' '.join(cmd[1:3])} failed: {lines[-1] if lines else 'no output'}")
    return stdout, peak


def _vm_hwm(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass  # exiting
    return 0


def measure(path: str, threads: int, prefill: int, prompt: int, decode: int, dtype: str = "auto",
            device: str = "cpu") -> dict:
    """Load one model, warm up, then time a `prefill`-token prompt, and `decode` greedy steps after
    a `prompt`-token prompt. Token ids are deterministic and free of special tokens."""
    import torch

    from sc2quant.report import peak_rss_self, weight_bytes
    from sc2quant.runtime import load

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = load(path, device=device, threads=threads, dtype=dtype)
    load_s = time.perf_counter() - t0
    vocab = len(model.tokenizer)
    ids = [(i * 7919) % (vocab - 64) + 64 for i in range(max(prefill, prompt))]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    state, logits = model.engine.start([ids[:32]])  # warm-up: kernels, allocator, thread pools
    for _ in range(4):
        logits = model.engine.step(state, logits.argmax(-1))
    sync()

    t = time.perf_counter()
    model.engine.start([ids[:prefill]])
    sync()
    prefill_s = time.perf_counter() - t

    state, logits = model.engine.start([ids[:prompt]])
    tok = logits.argmax(-1)
    sync()
    t = time.perf_counter()
    for _ in range(decode):
        tok = model.engine.step(state, tok).argmax(-1)
    sync()
    decode_s = time.perf_counter() - t
    return {"load_seconds": load_s, "prefill_tokens_per_s": prefill / prefill_s, "decode_tokens_per_s": decode / decode_s,
            "prefill_tokens": prefill, "prompt_tokens": prompt, "decode_tokens": decode,
            "weight_bytes_in_memory": weight_bytes(model.engine, model.path), "peak_rss_bytes": peak_rss_self()}


def measure_in_child(path: Path, threads: int, prefill: int, prompt: int, decode: int, dtype: str = "auto",
                     device: str = "cpu") -> dict:
    cmd = [sys.executable, "-m", "bench.timing", str(path), "--threads", str(threads), "--prefill", str(prefill),
           "--prompt", str(prompt), "--decode", str(decode), "--dtype", dtype, "--device", device]
    out, polled = run_child(cmd)
    row = json.loads(out.strip().splitlines()[-1])
    row["peak_rss_bytes"] = max(row["peak_rss_bytes"], polled)  # its own VmHWM is exact; polling may miss the end
    return row


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="bench internal: time one model in this process")
    ap.add_argument("path")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    print(json.dumps(measure(a.path, a.threads, a.prefill, a.prompt, a.decode, a.dtype, a.device)))
