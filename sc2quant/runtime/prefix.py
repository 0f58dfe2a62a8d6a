"""Prompt reuse between requests (a prefix cache) and chunked prefill.

Editors re-send nearly the same fill-in-the-middle prompt on every pause in typing. An engine
that can extend a cached sequence (`Extendable`: the ONNX engine, whose KV cache holds every
position of the context, and the torch engine's dynamic cache, made without window-sized layers
for one row, so the sliding window still holds: the attention mask applies it) keeps each finished request's KV
and token ids here; the next request takes the entry sharing the longest token prefix with it,
cuts it back to that prefix and prefills only the rest. Keys and values at a position depend on
the tokens up to it alone, so the result is the same as prefilling the whole prompt (tested bit
for bit). Entries are bounded by bytes and evicted least recently used first; an entry is taken
out while a request uses it, so concurrent requests never share one.

Prompts are prefilled in chunks of `chunk` tokens: the activations a forward holds grow with the
chunk, not the prompt, and the decoding loop yields between chunks so a stream can be cancelled.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

DEFAULT_CACHE_BYTES = 1 << 30  # one 3B fp32 slot at its full 16,384-token context, many smaller ones
# tokens per prefill call: the fastest of 64-1024 for a 1,000-token prompt on the 315M and the embedded
# models' int4 exports (python -m bench.prefill; bench/results/*-prefill-*.md), and bounded activations
DEFAULT_CHUNK = 128
# an entry is taken by a request sharing more than this fraction of its tokens (llama-server's default
# --slot-prompt-similarity); others start a state of their own and leave the entry to its session
MIN_SHARE = 0.1


@runtime_checkable
class Extendable(Protocol):
    """An engine whose batch-1 state can be cut back and extended (see the module docstring)."""

    can_extend: bool  # False where this engine's states cannot be (the torch engine's static cache)
    kernel_tolerance: float  # relative logit difference between a one-token and a many-token forward (lookup.py)

    def extend(self, state: Any, ids: list[int], all_positions: bool = False) -> np.ndarray:
        """Append `ids` to a batch-1 state; float32 logits [1, V] of the last one (all_positions: [n, V])."""
        ...

    def truncate(self, state: Any, length: int) -> None:
        """Forget every position from `length` on."""
        ...

    def state_bytes(self, state: Any) -> int:
        """Every byte the state holds (buffers, storage under views): what the cache's limit counts."""
        ...

    def park(self, state: Any) -> None:
        """Drop buffers a kept state does not need (outputs), before it is counted and kept."""
        ...

    def min_state_bytes(self) -> int:
        """The bytes of the smallest state (the ONNX engine's are sized for the whole context)."""
        ...


def extendable(engine: object) -> bool:
    return isinstance(engine, Extendable) and engine.can_extend


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class PrefixCache:
    max_bytes: int = DEFAULT_CACHE_BYTES
    entries: OrderedDict[int, tuple[list[int], Any, int]] = field(default_factory=OrderedDict)  # oldest first
    hits: int = 0
    reused_tokens: int = 0
    prefilled_tokens: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _next: int = 0

    def take(self, ids: list[int]) -> tuple[Any | None, int]:
        """The entry sharing the longest prefix with `ids` (removed until `put` back) and that length;
        None when none shares more than MIN_SHARE of `ids`: an entry another session (another file)
        will want again is not overwritten for a few shared tokens."""
        with self._lock:
            best, shared = None, 0
            for key, (cached, _, _) in self.entries.items():
                if (n := common_prefix(cached, ids)) > shared:
                    best, shared = key, n
            if best is None or shared <= MIN_SHARE * len(ids):
                return None, 0
            return self.entries.pop(best)[1], shared

    def put(self, ids: list[int], state: Any, nbytes: int) -> None:
        """Keep a finished request's state for the next one; the least recently used go beyond max_bytes."""
        if nbytes > self.max_bytes:
            return
        with self._lock:
            self._next += 1
            self.entries[self._next] = (list(ids), state, nbytes)
            while sum(e[2] for e in self.entries.values()) > self.max_bytes:
                self.entries.popitem(last=False)

    def count(self, reused: int, prefilled: int) -> None:
        """One request's prompt: `reused` tokens from an entry, `prefilled` computed."""
        with self._lock:
            self.hits += reused > 0
            self.reused_tokens += reused
            self.prefilled_tokens += prefilled

    def describe(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self.entries), "bytes": sum(e[2] for e in self.entries.values()),
                    "max_bytes": self.max_bytes, "hits": self.hits, "reused_tokens": self.reused_tokens,
                    "prefilled_tokens": self.prefilled_tokens}


def prefill(engine: Extendable, ids: list[int], cache: PrefixCache | None,
            chunk: int) -> Iterator[tuple[Any, np.ndarray | None, int]]:
    """Prefill one prompt, reusing the cache's longest shared prefix; yields (state, logits, reused)
    after each chunk, logits None until the last one."""
    state, shared = cache.take(ids) if cache is not None else (None, 0)
    # at least the last two tokens are computed: the last one's logits are needed, and a one-token
    # forward rounds unlike the many-token prefill of the same prompt without the cache (lookup.py)
    reused = max(0, min(shared, len(ids) - 2))

    def end(done: int) -> int:  # the next chunk's end; never a one-token chunk last
        return len(ids) if len(ids) - done <= chunk + 1 else done + chunk

    if state is None:
        done = end(0)
        state, logits = engine.start([ids[:done]])  # type: ignore[attr-defined]
    else:
        engine.truncate(state, reused)
        done, logits = reused, None
    if cache is not None:  # counted under the cache's lock: requests run on several threads
        cache.count(reused, len(ids) - reused)
    while done < len(ids):
        yield state, None, reused
        logits = engine.extend(state, ids[done:end(done)])
        done = end(done)
    yield state, logits, reused
