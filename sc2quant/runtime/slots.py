"""Continuous batching: several requests generated together on one engine, as llama-server's slots.

`Slots` owns N rows of the engine's cache buffers (`OnnxEngine.pool`) and one thread that loops:

1. Admit: a waiting request takes the idle row sharing the longest token prefix with it (when it
   shares more than `prefix.MIN_SHARE` of the request: llama-server's slot similarity), else the
   least recently used idle row, whose keys and values go to the byte-bounded prompt cache first
   (`PrefixCache`), and the cache's best entry for the request is copied in. Interactive requests
   are admitted before background ones (`/infill` with `n_predict: 0`, an editor's cache warm-up).
2. Decode: every generating row samples its next token (its own sampling, seed, stop strings and
   limits) and the rows still going run one step together (`step_rows`: the weights are read once).
3. Prefill: admitted rows prefill their prompts in chunks, at most `budget` tokens per iteration
   (interactive first), so a new request starts at the next iteration and decoding rows wait one
   chunk at most.

Each request's chunks go to a queue of its own: a caller that stops reading never blocks the loop,
and one that goes away (the iterator closed) frees its row at the next iteration. The text a row
produces is its text alone up to rounding: a batched decode step computes each row with a kernel
of another shape (see the README's statement and tests/runtime/test_slots.py).
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import queue
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sc2quant.core.errors import UserError
from sc2quant.runtime.prefix import MIN_SHARE, PrefixCache, common_prefix
from sc2quant.runtime.sampling import Chunk, RowText, Sampling, sample

_LIVE: weakref.WeakSet[Slots] = weakref.WeakSet()  # closed and joined at exit (see Slots.close)


@atexit.register
def _close_all() -> None:
    for slots in list(_LIVE):
        slots.close(wait=30)


HEARTBEAT_S = 0.05  # a waiting caller gets an empty chunk this often: a place to notice it was cancelled
_END = object()


@dataclass
class Job:
    """One prompt of a request, from admission to its last chunk."""

    ids: list[int]
    sampling: Sampling
    seed: int
    index: int  # the prompt's row in its request (Chunk.row)
    out: queue.SimpleQueue
    background: bool
    order: int
    budget: int
    rng: np.random.Generator = field(init=False)
    text: RowText = field(init=False)
    cancelled: bool = False
    slot: int | None = None
    done: int = 0  # prompt tokens whose keys and values are in the row
    cached: int = 0  # of them, reused
    logits: np.ndarray | None = None  # the next token's, once the prompt is in

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.text = RowText(len(self.ids), self.sampling.stop)

    def chunk(self, piece: str, finish: str | None) -> Chunk:
        return Chunk(self.index, piece, finish, len(self.ids), len(self.text.ids), self.seed, self.cached, 0, 0,
                     self.text.filter.word if finish else "")


@dataclass
class Row:
    kv_ids: list[int] = field(default_factory=list)  # the tokens whose keys and values the row holds
    job: Job | None = None
    used: int = 0  # when it was last given a job (least recently used first)


class Slots:
    """N rows decoded together on `engine` (see the module docstring)."""

    def __init__(self, engine: Any, rows: int, tokenizer: Any, stop_ids: set[int], cache: PrefixCache | None,
                 budget: int) -> None:
        self.engine, self.tokenizer, self.stop_ids, self.cache, self.budget = engine, tokenizer, stop_ids, cache, budget
        self.pool = engine.pool(rows)
        self.rows = [Row() for _ in range(rows)]
        self.waiting: list[Job] = []
        self._arrivals: list[Job] = []
        self._cv = threading.Condition()
        self._order = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="sc2quant-slots", daemon=True)
        self._thread.start()
        _LIVE.add(self)

    # --- callers ---------------------------------------------------------------------------

    def submit(self, prompts: list[list[int]], s: Sampling, budget: int, background: bool = False) -> Iterator[Chunk]:
        """Queue every prompt (one job each; the same sampling, each its own generator from the seed) and
        stream their chunks as the loop makes them, rows interleaved; closing the iterator cancels them."""
        seed = s.resolved_seed()
        out: queue.SimpleQueue = queue.SimpleQueue()
        jobs = [Job(p, s, seed, i, out, background, next(self._order), min(budget, self.engine.context - len(p)))
                for i, p in enumerate(prompts)]
        with self._cv:
            if self._closed:
                raise UserError("the model is closed: load it again")
            self._arrivals.extend(jobs)
            self._cv.notify()
        return self._stream(jobs, out)

    def _stream(self, jobs: list[Job], out: queue.SimpleQueue) -> Iterator[Chunk]:
        """The jobs' chunks as they come; when nothing came for HEARTBEAT_S, an empty chunk repeating the
        counts of a row still going (a place for the caller to notice it was cancelled)."""
        left = len(jobs)
        going = {j.index: j.chunk("", None) for j in jobs}  # each unfinished row's last counts
        try:
            while left:
                try:
                    item = out.get(timeout=HEARTBEAT_S)
                except queue.Empty:
                    if going:
                        yield dataclasses.replace(next(iter(going.values())), text="")
                    continue
                if item is _END:
                    left -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    if item.finish_reason:
                        going.pop(item.row, None)
                    elif item.row in going:
                        going[item.row] = item
                    yield item
        finally:
            if left:
                with self._cv:
                    for job in jobs:
                        job.cancelled = True
                    self._cv.notify()

    def describe(self) -> dict[str, int]:
        with self._cv:
            return {"rows": len(self.rows), "busy": sum(r.job is not None for r in self.rows),
                    "waiting": len(self.waiting) + len(self._arrivals), "kv_bytes": self.pool.nbytes()}

    def close(self, wait: float = 0.0) -> None:
        """Stop the loop (every request in flight gets an error); wait: seconds to let a forward in progress
        end (the interpreter must not finalize while the loop's thread is inside ONNX Runtime: it aborts)."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if wait and self._thread is not threading.current_thread():
            self._thread.join(wait)

    # --- the loop --------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._closed or self._arrivals or self.waiting or any(r.job for r in self.rows)):
                    self._cv.wait()
                if self._closed:
                    break
                self.waiting += self._arrivals
                self._arrivals.clear()
            try:
                self._drop_cancelled()
                self._admit()
                self._decode()
                self._prefill()
            except BaseException as exc:  # noqa: BLE001 - every request in flight gets it; the loop goes on
                for i, row in enumerate(self.rows):
                    if row.job is not None:
                        self._end(i, exc)
                    row.kv_ids = []  # nothing the failed forward touched is reused
                    self.pool.states[i].lengths = [0]
        for job in [*self.waiting, *self._arrivals, *(r.job for r in self.rows if r.job)]:
            job.out.put(UserError("the model was closed while generating"))
            job.out.put(_END)

    def _end(self, slot: int, error: BaseException | None = None) -> None:
        job = self.rows[slot].job
        assert job is not None
        self.rows[slot].job = None
        if error is not None:
            job.out.put(error)
        job.out.put(_END)

    def _drop_cancelled(self) -> None:
        self.waiting = [j for j in self.waiting if not j.cancelled]
        for i, row in enumerate(self.rows):
            if row.job is not None and row.job.cancelled:
                self._end(i)

    def _admit(self) -> None:
        self.waiting.sort(key=lambda j: (j.background, j.order))  # interactive first, then in arrival order
        while self.waiting:
            idle = [i for i, r in enumerate(self.rows) if r.job is None]
            if not idle:
                return
            job = self.waiting.pop(0)
            # prompt reuse off (--prompt-cache-mb 0): no row's prompt is reused either
            shares = {i: common_prefix(self.rows[i].kv_ids, job.ids) if self.cache is not None else 0 for i in idle}
            best = max(idle, key=lambda i: (shares[i], -self.rows[i].used))
            if shares[best] <= MIN_SHARE * len(job.ids):  # no row of its own: the least recently used one
                best = min(idle, key=lambda i: self.rows[i].used)
                shares[best] = self._swap(best, job.ids)
            row, state = self.rows[best], self.pool.states[best]
            reused = max(0, min(shares[best], len(job.ids) - 2))  # the last two are computed (prefix.prefill)
            state.lengths = [reused]
            row.kv_ids = job.ids[:reused]
            row.job, row.used, job.slot, job.done, job.cached = job, next(self._order), best, reused, reused
            if self.cache is not None:
                self.cache.count(reused, len(job.ids) - reused)

    def _swap(self, slot: int, ids: list[int]) -> int:
        """Give row `slot` up for a prompt it shares little with: its keys and values go to the prompt
        cache, and the cache's entry sharing most with `ids` comes in. Returns the tokens shared."""
        row, state = self.rows[slot], self.pool.states[slot]
        if self.cache is None:
            return 0
        entry, shared = self.cache.take(ids)
        if row.kv_ids:
            kept = self.engine.new_state()
            self.engine.copy_positions(state, kept, len(row.kv_ids))
            self.cache.put(row.kv_ids, kept, self.engine.state_bytes(kept))
        if entry is None:
            return 0
        self.engine.copy_positions(entry, state, shared)
        return shared

    def _decode(self) -> None:
        going: list[tuple[int, int]] = []
        for i, row in enumerate(self.rows):
            job = row.job
            if job is None or job.logits is None:
                continue
            tok = int(sample(job.logits[None], job.sampling, job.rng)[0])
            job.logits = None
            piece = job.text.add(tok, tok in self.stop_ids, self.tokenizer)
            if job.text.finish is not None:
                job.out.put(job.chunk(piece, job.text.finish))
                self._end(i)
            elif len(job.text.ids) >= job.budget:
                job.out.put(job.chunk(piece + job.text.flush(self.tokenizer), "length"))
                self._end(i)
            else:
                if piece:
                    job.out.put(job.chunk(piece, None))
                going.append((i, tok))
        if going:
            rows = [i for i, _ in going]
            for i in range(min(rows), max(rows) + 1):  # a padding token must fit after a row's cached positions
                if self.pool.states[i].lengths[0] >= self.engine.context and self.rows[i].job is None:
                    self.rows[i].kv_ids, self.pool.states[i].lengths = [], [0]
            logits = self.engine.step_rows(self.pool, rows, [t for _, t in going])
            for (i, tok), row_logits in zip(going, logits):
                self.rows[i].kv_ids.append(tok)
                self.rows[i].job.logits = row_logits  # type: ignore[union-attr]

    def _prefill(self) -> None:
        """Prefill chunks, interactive prompts first, until `budget` tokens ran (one chunk at least). A prompt
        is cut into the chunks it would get alone (`prefix.prefill`'s, from the position its reuse starts at),
        whatever runs beside it: with int8 activations the chunks' shapes round differently, and a prompt's
        keys and values must not depend on its companions (a seeded sample would)."""
        budget = self.budget
        filling = sorted((r.job for r in self.rows if r.job is not None and r.job.done < len(r.job.ids)),
                         key=lambda j: (j.background, j.order))
        for job in filling:
            left = len(job.ids) - job.done
            n = left if left <= self.budget + 1 else self.budget  # never a one-token chunk last (prefix.prefill)
            piece = job.ids[job.done: job.done + n]
            logits = self.engine.extend(self.pool.states[job.slot], piece)
            self.rows[job.slot].kv_ids += piece  # type: ignore[index]
            job.done += n
            if job.done == len(job.ids):
                job.logits = logits[0]
            budget -= n
            if budget <= 0:  # decoding rows wait one chunk at most
                return
