"""`sc2quant serve`: an OpenAI-compatible completions server (FIM via `suffix`) for any artifact.

Built on the runtime's public API (`load`, `Model.stream_generate`). What one client cannot do:
- wedge it: every generation runs as a `Job` that stops at the next token when its client
  disconnects, when it is cancelled while queued, or when the server stops;
- flood it: `concurrency` jobs generate at once and `max_queue` more may wait (429 beyond);
  uvicorn's `limit_concurrency` caps connections (503 beyond); bodies are limited to 1 MiB
  whatever their framing and must arrive within a timeout, headers too (`http_guard`);
- crash it: every client error is a 4xx JSON error raised before a stream starts; a 500 is a bug.
An API key (`--api-key` or SC2QUANT_API_KEY) is checked on every route but /health.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from sc2quant.core.errors import UserError
from sc2quant.runtime import Chunk, Model

MAX_BODY_BYTES = 1 << 20
MAX_TOKENS_LIMIT = 2048
MAX_PROMPTS = 8
API_KEY_ENV = "SC2QUANT_API_KEY"


@dataclass(frozen=True)
class Limits:
    concurrency: int = 1  # generations at once
    max_queue: int = 16  # generations waiting; more get 429
    max_connections: int = 64  # open connections and requests; more get 503 (uvicorn's limit_concurrency)
    body_bytes: int = MAX_BODY_BYTES
    header_timeout: float = 10.0  # seconds for a request line and headers
    body_timeout: float = 10.0  # seconds between two pieces of a request body
    graceful_timeout: float = 3.0  # seconds in-flight requests get when the server stops

    def check(self) -> None:
        if self.concurrency < 1 or self.max_queue < 0 or self.max_connections < 2:
            raise UserError("--concurrency must be at least 1, --max-queue at least 0 and --max-connections at least 2")
        if not (0 < self.header_timeout <= 3600 and 0 < self.body_timeout <= 3600):
            raise UserError("--read-timeout must be between 0 and 3600 seconds")

    def describe(self) -> str:
        return (f"{self.concurrency} generating, {self.max_queue} queued, {self.max_connections} connections, "
                f"body {self.body_bytes // 1024} KiB, header/body timeouts {self.header_timeout:g}/{self.body_timeout:g} s")


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use

    model: str | None = None
    prompt: str | list[str]
    suffix: str | None = None
    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)
    echo: bool = False


class Gate:
    """Admission control: how many requests are generating or waiting to."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.admitted = 0
        self.lock = threading.Lock()

    def admit(self) -> bool:
        with self.lock:
            if self.admitted >= self.limit:
                return False
            self.admitted += 1
            return True

    def leave(self) -> None:
        with self.lock:
            self.admitted -= 1


class Job:
    """One generation: runs a chunk iterator on a worker thread and hands the chunks to the event
    loop. `cancel()` stops it at the next token (or before it starts); the gate slot is freed once."""

    _END = object()

    def __init__(self, chunks: Iterator[Chunk], executor: ThreadPoolExecutor, gate: Gate,
                 stopping: threading.Event) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.chunks, self.gate, self.stopping = chunks, gate, stopping
        self._left = threading.Lock()
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
            self._leave()
            self._put(self._END)

    def _leave(self) -> None:
        if self._left.acquire(blocking=False):
            self.gate.leave()

    def cancel(self) -> None:
        self.cancelled.set()
        if self.future.cancel():  # still queued: it will never run
            self._leave()

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        while (item := await self.queue.get()) is not self._END:
            if isinstance(item, BaseException):
                raise item
            yield item


class JobStream(StreamingResponse):
    """Server-sent events of a job; whatever ends the response (done, client gone, server
    stopping) cancels the job."""

    def __init__(self, job: Job, events: AsyncIterator[str]) -> None:
        super().__init__(events, media_type="text/event-stream")
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


def error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status_code=status)


def create_app(model: Model, model_name: str, limits: Limits = Limits()) -> FastAPI:
    gate = Gate(limits.concurrency + limits.max_queue)
    executor = ThreadPoolExecutor(max_workers=limits.concurrency, thread_name_prefix="sc2quant-generate")
    stopping = threading.Event()
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        stopping.set()  # every running generation stops at its next token
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="sc2quant", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(Exception)
    async def bug(_: Request, exc: Exception) -> JSONResponse:  # the server outlives any one request
        return error(500, f"internal error: {type(exc).__name__}", kind="server_error")

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return error(400, "request body is not valid JSON", code="invalid_json")
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", code="invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = "request body is not valid UTF-8 JSON" if exc.status_code == 400 else str(exc.detail)
        return error(exc.status_code, message)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "kind": model.kind, "queued": gate.admitted}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                            "owned_by": "sc2quant"}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        if req.model not in (None, model_name):
            return error(404, f"model '{req.model}' is not served here; this server serves '{model_name}'",
                         code="model_not_found")
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not 1 <= len(prompts) <= MAX_PROMPTS:
            return error(400, f"prompt must be a string or a list of 1 to {MAX_PROMPTS} strings")
        if req.stream and len(prompts) != 1:
            return error(400, "streaming supports one prompt per request")
        stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
        try:  # every check (sampling, UTF-8, empty or too long prompts) happens here, before any output
            chunks = await run_in_threadpool(model.stream_generate, prompts, max_new_tokens=req.max_tokens,
                                             temperature=req.temperature, top_p=req.top_p, stop=stop, seed=req.seed,
                                             suffix=req.suffix)
        except UserError as exc:
            return error(400, str(exc))
        if not gate.admit():
            return error(429, "too many requests in flight; retry later", kind="rate_limit_error", code="queue_full")
        job = Job(chunks, executor, gate, stopping)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return JobStream(job, _events(job, cid, created, model_name, prompts[0] if req.echo else ""))
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        try:
            rows = await _collect(job, len(prompts))
        except UserError as exc:
            return error(400, str(exc))
        finally:
            watcher.cancel()
            job.cancel()
        usage = {"prompt_tokens": sum(r["prompt_tokens"] for r in rows),
                 "completion_tokens": sum(r["completion_tokens"] for r in rows)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        choices = [{"text": (p if req.echo else "") + r["text"], "index": i, "logprobs": None,
                    "finish_reason": r["finish_reason"]} for i, (p, r) in enumerate(zip(prompts, rows))]
        return {"id": cid, "object": "text_completion", "created": created, "model": model_name,
                "choices": choices, "usage": usage, "seed": rows[0]["seed"]}

    return app


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


async def _collect(job: Job, n: int) -> list[dict[str, Any]]:
    rows = [{"text": "", "finish_reason": None, "prompt_tokens": 0, "completion_tokens": 0, "seed": None}
            for _ in range(n)]
    async for c in job:
        row = rows[c.row]
        row["text"] += c.text
        row.update(finish_reason=c.finish_reason, prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
                   seed=c.seed)
    return rows


async def _events(job: Job, cid: str, created: int, name: str, echo: str) -> AsyncIterator[str]:
    """Server-sent events, one per decoded piece, then `[DONE]` (OpenAI's stream format)."""

    def event(text: str, finish: str | None, seed: int | None) -> str:
        chunk = {"id": cid, "object": "text_completion", "created": created, "model": name, "seed": seed,
                 "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
        return f"data: {json.dumps(chunk)}\n\n"

    if echo:
        yield event(echo, None, None)
    try:
        async for c in job:
            if c.text or c.finish_reason:
                yield event(c.text, c.finish_reason, c.seed)
    except UserError as exc:  # raised after the stream started: tell the client in the stream
        yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'invalid_request_error'}})}\n\n"
    yield "data: [DONE]\n\n"


def serve(model_path: str | None, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
          limits: Limits = Limits(), verify: bool = True, api_key: str | None = None, allow_no_api_key: bool = False,
          threads: int | None = None, dtype: str = "auto") -> None:
    """Check the address and the key, bind, load the model, print one startup line, serve until SIGTERM/SIGINT."""
    import uvicorn

    from sc2quant.core.console import console
    from sc2quant.runtime import load
    from sc2quant.runtime.http_guard import ApiKeyGuard, BodyGuard, GuardedH11Protocol, bind, is_loopback

    limits.check()
    if api_key is not None and not api_key.strip():
        raise UserError("the API key is empty: give a non-empty --api-key (or SC2QUANT_API_KEY)")
    if not is_loopback(host) and api_key is None and not allow_no_api_key:
        raise UserError(f"--host {host} exposes the model to the network without an API key: add --api-key "
                        "(or SC2QUANT_API_KEY), or --allow-no-api-key if that is really what you want")
    sock = bind(host, port)
    try:
        model = load(model_path, device=device, verify=verify, threads=threads, dtype=dtype)
        from sc2quant.embedded import EMBEDDED_MODEL_DIR

        name = "sc2quant-embedded" if model.path.resolve() == EMBEDDED_MODEL_DIR.resolve() else model.path.name
        GuardedH11Protocol.header_timeout = limits.header_timeout
        app = ApiKeyGuard(BodyGuard(create_app(model, name, limits), limits.body_bytes, limits.body_timeout), api_key)
        shown = f"[{host}]" if ":" in host else host
        d = model.engine.describe()
        console.print(f"serving {name} ({model.kind}, {d['engine']} {d['dtype']}) at http://{shown}:{port}/v1 - "
                      f"{limits.describe()}; auth {'on' if api_key else 'off'}", highlight=False, soft_wrap=True)
        config = uvicorn.Config(app, http=GuardedH11Protocol, log_level="warning", lifespan="on",
                                limit_concurrency=limits.max_connections,
                                timeout_graceful_shutdown=int(limits.graceful_timeout) or 1)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
