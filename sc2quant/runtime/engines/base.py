"""The one engine protocol. Engines are registered in `sc2quant.runtime.engines.ENGINES`; which
of them runs an artifact is its format's choice (`sc2quant.formats`); engines only compute logits. Sampling, stop strings,
streaming and fill-in-the-middle live in `sc2quant.runtime.model`, written once for all.

Threads are handled the same way for every engine: `sc2quant.runtime.load` checks the count and
passes it to the engine: the torch engine sets torch's thread count for the process, ONNX
Runtime's session uses it for its intra-op pool.

Generation speaks numpy (token ids in, float32 logits out), so the ONNX engine and everything
above it run without torch (the base install); `logits`, for evaluation, returns a torch tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class EngineOptions:
    device: str = "cpu"  # cpu, cuda or auto
    threads: int | None = None  # intra-op threads (None: the library's default)
    dtype: str = "auto"  # compute dtype where the engine has a choice (see sc2quant.core.hf.compute_policy)
    profile_dir: Path | None = None  # write the runtime's operator profile here (ONNX Runtime)
    static_cache: bool | None = None  # torch: a static KV cache (+ CUDA graphs on CUDA); None: on CUDA only


@runtime_checkable
class Engine(Protocol):
    name: str  # "torch", "onnx"
    kind: str  # artifact kind served (a registered `sc2quant.formats.Format`)
    device: str  # resolved: "cpu" or "cuda"
    config: dict[str, Any]  # the model's HF config.json
    tokenizer: Any  # a transformers tokenizer
    context: int  # the longest sequence (prompt + generated tokens) the engine accepts

    def logits(self, input_ids: Any, attention_mask: Any = None) -> Any:
        """Full forward without cache: input_ids [B, T] (right-padded) -> a float32 torch tensor [B, T, V] on CPU."""
        ...

    def start(self, prompts: list[list[int]]) -> tuple[Any, np.ndarray]:
        """Prefill prompts of different lengths; return (cache state, float32 logits [B, V] of each last token)."""
        ...

    def step(self, state: Any, tokens: np.ndarray) -> np.ndarray:
        """Append one token per row (token ids [B]) to the cache; return float32 logits [B, V]."""
        ...

    def weight_bytes(self) -> int:
        """Bytes of the weights the engine holds (quantization metadata included, shared storage once)."""
        ...

    def describe(self) -> dict[str, Any]:
        """What computes: engine, kind, device, dtype, threads, kernel choices (for reports and logs)."""
        ...

    def end_profiling(self) -> Path | None:
        """Stop the operator profile started by EngineOptions.profile_dir; its trace file (None: no profile)."""
        ...
