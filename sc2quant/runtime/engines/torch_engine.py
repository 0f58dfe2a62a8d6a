"""PyTorch engine for every transformers-loadable artifact: plain bf16/fp32 checkpoints,
bitsandbytes (int8, nf4/fp4) and GPTQ (transformers' GPTQ kernels: torch's int4 CPU kernel,
triton on CUDA). Loaded through the one loader (`sc2quant.core.hf.load_model`) under its
compute policy.

Batch-1 decoding on a GPU is bound by kernel launches, not memory: each token runs hundreds of
small kernels. On CUDA a single prompt therefore decodes from a static KV cache (transformers'
`StaticCache`: fixed addresses, the sliding window honoured per layer) through a decode step
compiled with `torch.compile(mode="reduce-overhead")`, which captures it as a CUDA graph and
replays it. Caches come in buckets of powers of two tokens (256 up to the context; attention
reads the whole bucket each step, so a short generation should not pay for the full context),
each allocated and captured once per process and kept for reuse (at most twice the full-context
cache in all). A sequence that outgrows its bucket moves to the next one by one prefill of its
tokens so far. Capture time is recorded (`warmup_seconds` in `describe()`); a step that cannot
be captured (a quantized kernel that cannot be traced) runs eagerly on the same static cache.
Elsewhere (CPU, batches) the dynamic cache is used; `EngineOptions.static_cache` forces either.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from sc2quant.core.errors import UserError
from sc2quant.core.hf import load_model
from sc2quant.core.system import set_threads
from sc2quant.formats import get_format
from sc2quant.runtime.engines.base import EngineOptions
from sc2quant.runtime.lookup import kernel_tolerance

MIN_BUCKET = 256  # the smallest static cache, in tokens


class TorchEngine:
    name = "torch"

    def __init__(self, path: Path, options: EngineOptions, kind: str = "hf") -> None:
        set_threads(options.threads)  # torch's intra-op threads are the process's
        loaded = load_model(path, dtype=options.dtype, device=options.device, hooks=get_format(kind))
        self.kind = kind
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.config = loaded.config
        self.policy = loaded.policy
        self.kernel = loaded.kernel
        self.device = str(self.model.device.type)
        self.context = int(self.config.get("max_position_embeddings", 2048))
        self.threads = options.threads
        self.static = self.device == "cuda" if options.static_cache is None else options.static_cache
        self._buckets: dict[int, tuple[Any, Any]] = {}  # bucket -> (StaticCache, decode step)
        self.graphs = "off"
        self.warmup_seconds = 0.0

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        ids = input_ids.to(self.device)
        mask = None if attention_mask is None else attention_mask.to(self.device)
        return self.model(input_ids=ids, attention_mask=mask).logits.float().cpu()

    @torch.inference_mode()
    def start(self, prompts: list[list[int]]) -> tuple[Any, np.ndarray]:
        """Left-pad (transformers' convention) with explicit positions so padding changes nothing."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise UserError("every prompt needs at least one token")
        if self.static and len(prompts) == 1:
            return self._start_static(prompts[0])
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # one row: a cache of every position (no config: no window-sized layers), so it can be cut back
        # and extended (prompt reuse, lookup decoding); the attention mask still applies the window
        cache = DynamicCache() if len(prompts) == 1 else None
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                         logits_to_keep=1)
        state = {"cache": out.cache, "mask": mask, "next_pos": positions[:, -1] + 1}
        return state, _numpy(out.logits[:, -1])

    @torch.inference_mode()
    def step(self, state: Any, tokens: Any) -> np.ndarray:
        tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
        if "bucket" in state:
            return self._step_static(state, tokens)
        state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(len(tokens), 1)], dim=1)
        out = self.model(input_ids=tokens.view(-1, 1).to(self.device), attention_mask=state["mask"],
                         position_ids=state["next_pos"].view(-1, 1), cache=state["cache"], use_cache=True)
        state["cache"] = out.cache
        state["next_pos"] = state["next_pos"] + 1
        return _numpy(out.logits[:, -1])

    # --- prompt reuse and lookup decoding (sc2quant.runtime.prefix.Extendable) ----------------

    @property
    def can_extend(self) -> bool:
        """Every state but the static cache's (one shared buffer per bucket) can be kept and extended."""
        return not self.static

    @torch.inference_mode()
    def extend(self, state: Any, ids: list[int], all_positions: bool = False) -> np.ndarray:
        """Append `ids` to a one-row state; float32 logits of the last token [1, V] (all_positions: of each, [n, V])."""
        if len(state["mask"]) != 1 or not ids or "bucket" in state:
            raise UserError("extend takes one row of the dynamic cache and at least one token")
        n = len(ids)
        state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(1, n)], dim=1)
        positions = state["next_pos"].view(1, 1) + torch.arange(n, device=self.device).view(1, -1)
        out = self.model(input_ids=torch.tensor([ids], device=self.device), attention_mask=state["mask"],
                         position_ids=positions, cache=state["cache"], use_cache=True,
                         logits_to_keep=0 if all_positions else 1)
        state["cache"] = out.cache
        state["next_pos"] = state["next_pos"] + n
        return _numpy(out.logits[0] if all_positions else out.logits[:, -1])

    def truncate(self, state: Any, length: int) -> None:
        """Forget every position from `length` on."""
        for layer in state["cache"].layers:
            if layer.is_initialized and layer.get_seq_length() > length:
                layer.crop(length - layer.get_seq_length())
        state["mask"] = state["mask"][:, :length]
        state["next_pos"] = state["next_pos"].clamp(max=length)

    @property
    def kernel_tolerance(self) -> float:
        return kernel_tolerance(torch.finfo(next(self.model.parameters()).dtype).eps)

    def min_state_bytes(self) -> int:
        return 0  # the dynamic cache grows with the sequence

    def state_bytes(self, state: Any) -> int:
        """The storage the state's tensors hold (a cropped cache keeps its whole storage: counted whole)."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for layer in state["cache"].layers if layer.is_initialized for t in (layer.keys, layer.values)}
        for t in (state.get("mask"), state.get("next_pos")):
            if isinstance(t, torch.Tensor):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(storages.values())

    def park(self, state: Any) -> None:
        """Nothing to drop: the state holds its cache and mask only."""

    # --- one prompt from a static cache, decoded by a captured graph on CUDA ------------------

    def _bucket(self, tokens: int) -> int:
        """The static cache length for a sequence of `tokens`: a power of two >= 256, at most the context."""
        return min(self.context, max(MIN_BUCKET, 1 << tokens.bit_length()))

    def _start_static(self, prompt: list[int]) -> tuple[Any, np.ndarray]:
        from transformers import StaticCache

        bucket = self._bucket(len(prompt))
        if bucket not in self._buckets:
            cache = StaticCache(config=self.model.config, max_cache_len=bucket)
            self._buckets[bucket] = cache, self._compile(cache, bucket)
        cache = self._buckets[bucket][0]
        cache.reset()
        ids = torch.tensor([prompt], device=self.device)
        positions = torch.arange(len(prompt), device=self.device)
        out = self.model(input_ids=ids, position_ids=positions.view(1, -1), cache_position=positions,
                         past_key_values=cache, use_cache=True)
        return {"bucket": bucket, "ids": list(prompt)}, _numpy(out.logits[:, -1])

    def _step_static(self, state: Any, tokens: torch.Tensor) -> np.ndarray:
        pos = len(state["ids"])
        if pos >= self.context:
            raise UserError(f"the sequence reached the model's context ({self.context} tokens)")
        if pos >= state["bucket"]:  # outgrown: the next bucket, by one prefill of everything so far
            moved, logits = self._start_static([*state["ids"], int(tokens.view(-1)[0])])
            state.update(moved)
            return logits
        position = torch.tensor([pos], device=self.device)
        logits = self._buckets[state["bucket"]][1](tokens.view(1, 1).to(self.device), position)
        state["ids"].append(int(tokens.view(-1)[0]))
        return _numpy(logits)

    def _compile(self, cache: Any, bucket: int) -> Any:
        """The decode step on `cache`; on CUDA compiled to a CUDA graph (torch.compile
        "reduce-overhead"), captured on first use and timed, or eager if it cannot be compiled."""

        def eager(token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
            out = self.model(input_ids=token, position_ids=position.view(1, 1), cache_position=position,
                             past_key_values=cache, use_cache=True)
            return out.logits[:, -1].clone()  # a graph's output buffer is reused by the next replay

        if self.device != "cuda":
            return eager
        # every bucket of every engine in the process compiles the same function: allow them all
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        compiled = torch.compile(eager, mode="reduce-overhead", fullgraph=False, dynamic=False)

        def first_use(token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
            t = time.perf_counter()
            try:
                logits = compiled(token, position)
                step, self.graphs = compiled, "cuda graph (torch.compile reduce-overhead)"
            except Exception as exc:  # noqa: BLE001 - e.g. a quantized kernel that cannot be traced
                logging.getLogger("sc2quant").warning("decode step not compiled (%s): eager steps", exc)
                step, self.graphs = eager, f"eager ({type(exc).__name__} when compiling)"
                logits = eager(token, position)
            self.warmup_seconds += time.perf_counter() - t
            self._buckets[bucket] = cache, step
            return logits

        return first_use

    def weight_bytes(self) -> int:
        seen, total = set(), 0
        for t in self.model.state_dict().values():
            if not isinstance(t, torch.Tensor):
                continue
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
        return total

    def describe(self) -> dict[str, Any]:
        dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        return {"engine": self.name, "kind": self.kind, "device": self.device, "dtype": dtype,
                "threads": torch.get_num_threads(), "policy": self.policy.reason,
                "bnb_repack": self.policy.bnb_repack, "gptq_kernel": self.kernel,
                "kv_cache": "static" if self.static else "dynamic", "decode": self.graphs,
                "warmup_seconds": round(self.warmup_seconds, 2)}

    def end_profiling(self) -> Path | None:
        return None


def _numpy(logits: torch.Tensor) -> np.ndarray:
    """float32 logits on the CPU as numpy (generation speaks numpy: runtime/engines/base.py)."""
    return logits.float().cpu().numpy()
