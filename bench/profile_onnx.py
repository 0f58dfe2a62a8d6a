"""Where the ONNX runtime's decode time goes: ONNX Runtime's own profiler over decode steps,
summed per operator type (MatMulNBits, GroupQueryAttention, ...)."""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path
from unittest import mock


def profile_decode(path: Path, threads: int, prompt: int = 128, steps: int = 32) -> dict:
    """Run `steps` decode steps after a `prompt`-token prompt with profiling on; return the share
    of operator time per op type over those steps alone (the prompt's run is left out)."""
    import onnxruntime as ort

    from sc2quant.engines import onnx as onnx_engine
    from sc2quant.runtime import load

    with tempfile.TemporaryDirectory() as tmp:
        plain = onnx_engine._session_options

        def profiled(n: int | None) -> ort.SessionOptions:
            opts = plain(n)
            opts.enable_profiling = True
            opts.profile_file_prefix = str(Path(tmp) / "ort")
            return opts

        with mock.patch.object(onnx_engine, "_session_options", profiled):
            model = load(path, threads=threads)
        engine = model.engine
        state, logits = engine.start([list(range(64, 64 + prompt))])
        tok = logits.argmax(-1)
        for _ in range(steps):
            tok = engine.step(state, tok).argmax(-1)
        events = json.loads(Path(engine.session.end_profiling()).read_text())
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
