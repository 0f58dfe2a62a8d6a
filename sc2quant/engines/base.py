"""The one engine protocol: every artifact kind (hf, bnb, gptq, rtn, onnx) is served by an
engine with these three calls; sampling, stop strings, streaming and FIM live in the runtime,
written once for all engines."""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Engine(Protocol):
    kind: str  # artifact kind this engine serves
    device: str
    config: dict[str, Any]  # the model's HF config.json as a dict
    tokenizer: Any  # a transformers tokenizer

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Full forward without cache: input_ids [B, T] (right-padded) -> float32 logits [B, T, V] on CPU."""
        ...

    def start(self, prompts: list[list[int]]) -> tuple[Any, torch.Tensor]:
        """Prefill prompts of different lengths; return (cache state, float32 logits [B, V] of each last token)."""
        ...

    def step(self, state: Any, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row (tokens [B]) to the cache; return float32 logits [B, V]."""
        ...
