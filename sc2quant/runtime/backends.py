"""What generates for the server: sc2quant's own runtime (`LocalBackend`) or a vLLM process
(`sc2quant.runtime.vllm.VllmBackend`), behind one small protocol.

A backend checks a request completely before anything is sent (`prepare` raises `UserError`,
answered 400), then `start`s it as a `Stream`: an async iterator of `Chunk`s that stops at once
when cancelled (client gone, server stopping) and calls `done` exactly once when it ends.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.concurrency import run_in_threadpool

from sc2quant.core.errors import UserError
from sc2quant.runtime import Chunk, Model


def new_row() -> dict[str, Any]:
    """One prompt's answer as chunks arrive (`add_chunk`): its text and the last chunk's counts."""
    return {"text": "", "finish_reason": None, "prompt_tokens": 0, "completion_tokens": 0, "seed": None,
            "cached_tokens": 0, "draft_tokens": 0, "draft_accepted": 0, "stop_word": ""}


def add_chunk(row: dict[str, Any], c: Chunk, keep_text: bool = True) -> None:
    if keep_text:
        row["text"] += c.text
    row.update(finish_reason=c.finish_reason, prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
               seed=c.seed, cached_tokens=c.cached_tokens, draft_tokens=c.draft_tokens, draft_accepted=c.draft_accepted,
               stop_word=c.stop_word)


class Unavailable(Exception):
    """The backend cannot generate now (its engine process died): answered 503."""


@dataclass
class Request:
    """A completion request as the backends receive it: each prompt text or token ids (`suffix`: the
    code after the gap, for text prompts)."""

    prompts: list[str | list[int]]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    suffix: str | None
    extra: dict[str, Any] = field(default_factory=dict)


class Stream(Protocol):
    def __aiter__(self) -> AsyncIterator[Chunk]: ...

    def cancel(self) -> None: ...


class Backend(Protocol):
    kind: str  # the artifact kind served
    tokenizer: Any  # the model's (sc2quant.core.tokenizer.Tokenizer or transformers'): /infill builds token ids
    context: int  # tokens of context

    def describe(self) -> str: ...

    def health(self) -> dict[str, Any]:
        """{"status": "ok"} or {"status": "error", "reason": ...}, plus details."""
        ...

    async def prepare(self, request: Request) -> Any:
        """Check everything (raise UserError); return what `start` needs."""
        ...

    def start(self, prepared: Any, done: Callable[[], None]) -> Stream: ...

    async def close(self) -> None:
        """Stop generating and release the engine (the server is shutting down)."""
        ...

    def stop(self) -> None:
        """Release at once, synchronously: the server is exiting, possibly before `close` could run."""
        ...


class Job:
    """One generation on a worker thread, its chunks handed to the event loop. `cancel()` stops it
    at the next token (or before it starts); `done` is called once, whatever ends it."""

    _END = object()

    def __init__(self, chunks: Iterator[Chunk], executor: ThreadPoolExecutor, done: Callable[[], None],
                 stopping: threading.Event) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.chunks, self.done, self.stopping = chunks, done, stopping
        self._once = threading.Lock()
        self.future: Future[None] = executor.submit(self._run)

    def _put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def _run(self) -> None:
        try:
            for chunk in self.chunks:
                if self.cancelled.is_set() or self.stopping.is_set():
                    break
                self._put(chunk)
        except BaseException as exc:  # noqa: BLE001 - handed to the request, which answers it
            self._put(exc)
        finally:
            close = getattr(self.chunks, "close", None)
            if close is not None:  # a generator left early: its own cleanup runs now (a batched row is freed)
                close()
            self._finish()
            self._put(self._END)

    def _finish(self) -> None:
        if self._once.acquire(blocking=False):
            self.done()

    def cancel(self) -> None:
        self.cancelled.set()
        if self.future.cancel():  # still queued: it will never run
            self._finish()

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        while (item := await self.queue.get()) is not self._END:
            if isinstance(item, BaseException):
                raise item
            yield item


class LocalBackend:
    """sc2quant's own runtime: `concurrency` generations at once on worker threads."""

    def __init__(self, model: Model, concurrency: int) -> None:
        self.model = model
        self.kind = model.kind
        self.tokenizer = model.tokenizer
        self.context = model.context
        rows = model.slots.describe()["rows"] if model.slots is not None else 1  # batched rows: a thread waits on each
        self.executor = ThreadPoolExecutor(max_workers=max(concurrency, rows), thread_name_prefix="sc2quant-generate")
        self.stopping = threading.Event()

    def describe(self) -> str:
        d, slots = self.model.engine.describe(), self.model.slots
        rows = (f", {slots.describe()['rows']} rows batched ({slots.describe()['kv_bytes'] / 2**20:,.0f} MiB of KV)"
                if slots is not None else "")
        return f"{self.kind}, {d['engine']} {d['dtype']}{rows}"

    def health(self) -> dict[str, Any]:
        """With `--parallel` rows: how many there are, how many are busy and how many requests wait for one."""
        slots = self.model.slots
        return {"status": "ok", **({"slots": slots.describe()} if slots is not None else {})}

    async def prepare(self, request: Request) -> Iterator[Chunk]:
        # stream_generate checks sampling values and UTF-8, empty and too long prompts eagerly
        return await run_in_threadpool(self.model.stream_generate, request.prompts, max_new_tokens=request.max_tokens,
                                       temperature=request.temperature, top_p=request.top_p, stop=request.stop,
                                       seed=request.seed, suffix=request.suffix,
                                       background=bool(request.extra.get("background")))

    def start(self, prepared: Iterator[Chunk], done: Callable[[], None]) -> Job:
        return Job(prepared, self.executor, done, self.stopping)

    async def close(self) -> None:
        self.stop()

    def stop(self) -> None:
        self.stopping.set()  # every running generation stops at its next token
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.model.slots is not None:
            self.model.slots.close(wait=10)


__all__ = ["Backend", "Job", "LocalBackend", "Request", "Stream", "Unavailable", "UserError"]
