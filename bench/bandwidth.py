"""The memory-bandwidth bound on decoding: at batch 1 every weight byte is read once per token,
so tokens/s can not exceed (read bandwidth) / (weight bytes read per token)."""

from __future__ import annotations

import time
from pathlib import Path


def read_bandwidth(threads: int, device: str = "cpu", gib: float = 1.0, repeats: int = 7) -> float:
    """Bytes/s that `threads` threads (or the GPU) read from memory: best of `repeats` sums over a
    buffer far larger than any cache (torch's sum is a plain streaming read, vectorised and threaded)."""
    import torch

    torch.set_num_threads(threads)
    gib = gib if device == "cpu" else 4 * gib  # past a GPU's L2 by far
    buf = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    buf.sum()  # touch every page first
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        buf.sum()
        sync()
        best = min(best, time.perf_counter() - t)
    return buf.numel() * 4 / best


def decode_bound(weight_bytes_per_token: float, bandwidth: float) -> float:
    """Upper bound on batch-1 decode tokens/s."""
    return bandwidth / weight_bytes_per_token


def onnx_bytes_read_per_token(model_dir: Path) -> int:
    """Initializer bytes of an ONNX graph, less those only a Gather reads (an untied float
    embedding: one row per token, not the whole matrix)."""
    import onnx

    proto = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    consumers: dict[str, set[str]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    total = 0
    for init in proto.graph.initializer:
        if consumers.get(init.name) == {"Gather"}:
            continue
        ext = {e.key: e.value for e in init.external_data}
        total += int(ext["length"]) if "length" in ext else len(init.raw_data)
    return total
