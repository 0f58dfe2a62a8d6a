"""Where the ONNX runtime's decode time goes: ONNX Runtime's own profiler over decode steps,
summed per operator type (MatMulNBits, GroupQueryAttention, ...)."""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path


def profile_decode(path: Path, threads: int, prompt: int = 128, steps: int = 32) -> dict:
    """Run `steps` decode steps after a `prompt`-token prompt with profiling on; return the share
    of operator time per op type over those steps alone (the prompt's run is left out)."""
    from sc2quant.runtime import load

    with tempfile.TemporaryDirectory() as tmp:
        model = load(path, threads=threads, profile_dir=Path(tmp))
        engine = model.engine
        state, logits = engine.start([list(range(64, 64 + prompt))])
        tok = logits.argmax(-1)
        for _ in range(steps):
            tok = engine.step(state, tok).argmax(-1)
        trace = engine.end_profiling()
        if trace is None:
            raise ValueError(f"{path} runs on an engine without an operator profiler")
        events = json.loads(trace.read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    first = runs[-steps]["ts"]  # the decode steps are the last `steps` runs
    per_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["ts"] >= first and e.get("name", "").endswith("_kernel_time"):
            per_op[e.get("args", {}).get("op_name", "?")] += e["dur"]
    run_us = sum(e["dur"] for e in runs[-steps:])
    total = sum(per_op.values())
    return {"steps": steps, "ms_per_step": run_us / steps / 1e3, "operator_share_of_step": total / run_us,
            "by_op": {op: {"ms_per_step": us / steps / 1e3, "share": us / total}
                      for op, us in sorted(per_op.items(), key=lambda kv: -kv[1])}}
