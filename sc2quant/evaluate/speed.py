"""Speed and memory of one model, measured in a fresh process so its peak RSS is its own.

`measure` loads a model, warms it up, times a prefill and greedy decode steps through the
engine protocol; `measure_in_child` runs it in a spawned interpreter (not a fork: a fork would
carry this process's memory and threads along). `sc2quant report` and the bench both use it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from sc2quant.core.errors import UserError
from sc2quant.core.system import peak_rss_self

PREFILL_TOKENS = 512
DECODE_TOKENS = 64


def measure(path: str | Path | None, device: str = "cpu", prefill: int = PREFILL_TOKENS, decode: int = DECODE_TOKENS,
            prompt: int | None = None, threads: int | None = None, dtype: str = "auto",
            verify: bool = True, engine: str = "auto", static_cache: bool | None = None) -> dict[str, Any]:
    """Load one model, warm up, time a `prefill`-token prompt, then `decode` greedy steps: after
    that prompt, or after a fresh `prompt`-token one. Token ids are deterministic and free of
    special tokens."""
    from sc2quant.runtime import load

    t0 = time.perf_counter()
    model = load(path, device=device, threads=threads, dtype=dtype, verify=verify, engine=engine,
                 static_cache=static_cache)
    load_s = time.perf_counter() - t0
    engine = model.engine
    prefill = min(prefill, model.context - decode - 1)
    ids = [i * 7919 % (len(model.tokenizer) - 64) + 64 for i in range(max(prefill, prompt or 0))]
    if engine.device == "cuda":
        import torch

        sync = torch.cuda.synchronize
    else:  # no torch on the CPU: an ONNX export measured in the base install imports none
        sync = lambda: None  # noqa: E731

    # warm-up: kernels, allocator, thread pools; on CUDA the timed decode once, so that every
    # static-cache bucket it reaches has its graph captured before the clock runs
    warm_prompt, warm_steps = (prompt or prefill, decode) if engine.device == "cuda" else (32, 4)
    state, logits = engine.start([ids[:warm_prompt]])
    for _ in range(warm_steps):
        logits = engine.step(state, logits.argmax(-1))
    sync()
    t = time.perf_counter()
    state, logits = engine.start([ids[:prefill]])
    sync()
    prefill_s = time.perf_counter() - t
    if prompt is not None:
        state, logits = engine.start([ids[:prompt]])
    tok = logits.argmax(-1)
    sync()
    t = time.perf_counter()
    for _ in range(decode):
        tok = engine.step(state, tok).argmax(-1)
    sync()
    decode_s = time.perf_counter() - t
    return {
        "load_seconds": load_s,
        "prefill_tokens_per_s": prefill / prefill_s,
        "decode_tokens_per_s": decode / decode_s,
        "prefill_tokens": prefill,
        "prompt_tokens": prefill if prompt is None else prompt,
        "decode_tokens": decode,
        "weight_bytes_in_memory": engine.weight_bytes(),
        "peak_rss_bytes": peak_rss_self(),
        "engine": engine.describe(),
        "torch_imported": "torch" in sys.modules,
    }


def _child_setup(env: dict[str, str]) -> None:
    os.environ.update({"SC2QUANT_NO_PROGRESS": "1", **env})


def measure_in_child(path: str | Path | None, device: str = "cpu", env: dict[str, str] | None = None,
                     **options: Any) -> dict[str, Any]:
    """`measure` in a freshly spawned process (options as `measure` takes them; `env` is set in
    the child, e.g. SC2QUANT_CPU to measure a forced CPU kind)."""
    from concurrent.futures.process import BrokenProcessPool

    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=_child_setup,
                                 initargs=(env or {},)) as pool:
            return pool.submit(measure, str(path) if path else None, device, **options).result()
    except BrokenProcessPool as exc:
        raise UserError("the speed measurement's child process died before answering: from a Python script, call "
                        "report() under `if __name__ == \"__main__\":` (the child re-imports the script), or pass "
                        "speed=False") from exc


def measure_with(python: str | Path, path: str | Path, env: dict[str, str] | None = None,
                 **options: Any) -> dict[str, Any]:
    """`measure` in a new process of another interpreter (the base install's, as an app runs an ONNX
    export: no torch imported), options as `measure` takes them; its peak RSS is that process's."""
    out = subprocess.run([str(python), "-m", "sc2quant.evaluate.speed", json.dumps({"path": str(path), **options})],
                         env={**os.environ, "SC2QUANT_NO_PROGRESS": "1", **(env or {})}, capture_output=True,
                         text=True, timeout=3600)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"the speed measurement in {python} failed: {last}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":  # measure_with's child: one JSON object of options in, one JSON line out
    _options = json.loads(sys.argv[1])
    print(json.dumps(measure(_options.pop("path"), **_options)))
