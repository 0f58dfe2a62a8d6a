"""`sc2quant serve`: an OpenAI-compatible completions server (FIM via `suffix`) for any artifact.

Generation is a backend's (`sc2quant.runtime.backends`): sc2quant's own runtime, built on its
public API (`load`, `Model.stream_generate`), or a vLLM process. What one client cannot do:
- wedge it: every generation runs as a `Job` that stops at the next token when its client
  disconnects, when it is cancelled while queued, or when the server stops;
- flood it: `concurrency` jobs generate at once and `max_queue` more may wait (429 beyond);
  uvicorn's `limit_concurrency` caps connections (503 beyond); bodies are limited to 1 MiB
  whatever their framing and must arrive within a timeout, headers too (`http_guard`);
- crash it: every client error is a 4xx JSON error raised before a stream starts; a 500 is a bug.
An API key (`--api-key` or SC2QUANT_API_KEY) is checked on every route but /health.

While the model loads on a thread, the app answers through `Loading` (/health and completions
503 until it is ready). When the server stops (`Drain`), new and queued requests get a 503 JSON
error, generating ones `graceful_timeout` seconds to finish, then a 503 (or, streaming, an error
event and `[DONE]`). The process around the app (signals, bind, load, stop) is `sc2quant.runtime.launch`.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import Field, StrictBool, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from sc2quant.core.errors import UserError
from sc2quant.runtime import MAX_TEMPERATURE, Chunk
from sc2quant.runtime.backends import Backend, Request, Stream, Unavailable, add_chunk, new_row
from sc2quant.runtime.http_guard import NOT_APPLIED, NOT_UTF8_JSON, ApiBody
from sc2quant.runtime.infill import InfillRequest, InfillTimer, infill_ids

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
        if bad := [t for t in (self.header_timeout, self.body_timeout) if not 0 < t <= 3600]:  # both --read-timeout
            raise UserError(f"--read-timeout must be more than 0 and at most 3600 seconds, got {bad[0]:g}")

    def describe(self) -> str:
        return (f"{self.concurrency} generating, {self.max_queue} queued, {self.max_connections} connections, "
                f"body {self.body_bytes // 1024} KiB, header/body timeouts {self.header_timeout:g}/{self.body_timeout:g} s")


class StreamOptions(ApiBody):
    include_usage: StrictBool = False  # a last chunk with `usage` and no choices, as OpenAI sends it


class CompletionRequest(ApiBody):
    not_applied = NOT_APPLIED  # vLLM's and llama-server's (http_guard)
    model: str | None = None
    prompt: str | list[str]
    suffix: str | None = None
    max_tokens: int | None = Field(16, ge=1, le=MAX_TOKENS_LIMIT)  # null: until the context or the server's limit
    temperature: float = Field(1.0, ge=0, le=MAX_TEMPERATURE)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: StrictBool = False
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)
    best_of: int = 1  # one completion per prompt: more is refused, not ignored
    logprobs: int | None = None  # not computed: asking for them is refused, not ignored
    echo: StrictBool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None  # these four are not applied: a value that would change the output
    presence_penalty: float = 0.0  # is refused, not ignored (a neutral one is accepted)
    frequency_penalty: float = 0.0
    top_k: int | None = None  # not OpenAI's (vLLM's, llama-server's): 0 or -1 is off; greedy decoding ignores it

    @model_validator(mode="after")
    def _refuse_what_is_not_done(self) -> CompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options applies to streamed requests only: add \"stream\": true or drop it")
        if self.logprobs is not None:  # 0 asks for the chosen tokens' own
            raise ValueError("logprobs are not computed by this server: drop logprobs")
        if self.best_of != 1:
            raise ValueError("best_of must be 1 (one completion per prompt): drop it")
        neutral = {"logit_bias": "{}", "presence_penalty": "0", "frequency_penalty": "0", "top_k": "0, or temperature 0"}
        changes = {"logit_bias": any((self.logit_bias or {}).values()), "top_k": self.top_k not in (None, 0, -1)
                   and self.temperature > 0, **{k: getattr(self, k) != 0 for k in ("presence_penalty", "frequency_penalty")}}
        for name in (k for k, changed in changes.items() if changed):
            raise ValueError(f"{name} is not applied by this server: drop it (or send {neutral[name]})")
        return self


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


class Loading:
    """The backend while it loads on a thread (`run`), then the backend itself: until it is ready,
    /health answers 503 {"status": "loading"} and completions 503; if loading fails, `error` holds why."""

    def __init__(self) -> None:
        self.backend: Backend | None = None
        self.error: BaseException | None = None

    def run(self, open_backend: Callable[[], Backend], ready: Callable[[Loading], None]) -> None:
        """Open the backend (on a thread), then call `ready` (also when it failed: `error` is set)."""
        try:
            self.backend = open_backend()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which reports it
            self.error = exc
        ready(self)

    @property
    def kind(self) -> str | None:
        return self.backend.kind if self.backend else None

    def describe(self) -> str:
        return self.backend.describe() if self.backend else "loading"

    def health(self) -> dict[str, Any]:
        if self.backend is not None:
            return self.backend.health()
        if self.error is not None:
            return {"status": "error", "reason": f"the model failed to load: {self.error}"}
        return {"status": "loading", "reason": "the model is loading"}

    def loaded(self) -> Backend:
        """The backend, once loaded (Unavailable before)."""
        if self.backend is None:
            raise Unavailable("the model is still loading: retry when /health answers 200")
        return self.backend

    async def prepare(self, request: Request) -> Any:
        return await self.loaded().prepare(request)

    def start(self, prepared: Any, done: Callable[[], None]) -> Stream:
        assert self.backend is not None  # prepare succeeded
        return self.backend.start(prepared, done)

    async def close(self) -> None:
        if self.backend is not None:
            await self.backend.close()

    def stop(self) -> None:
        if self.backend is not None:
            self.backend.stop()


class Stopping(Exception):
    """The server is stopping before this request's completion: answered 503 (or an error event)."""


class Drain:
    """The server stopping (`begin`, on the event loop): new requests and queued ones are refused at
    once, generating ones get `grace` seconds to finish (`cutoff`)."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.stopping = asyncio.Event()
        self.deadline = 0.0  # the event loop's clock
        self.loop: asyncio.AbstractEventLoop | None = None  # set when the server starts

    def begin(self) -> None:
        if not self.stopping.is_set():
            self.deadline = asyncio.get_running_loop().time() + self.grace
            self.stopping.set()

    def begin_threadsafe(self) -> None:
        """From a signal handler or another thread; before the server runs there is nothing to drain."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.begin)

    async def cutoff(self, job: Stream) -> None:
        """Return when `job` must stop: at once if it is still queued, at the deadline if it is generating."""
        await self.stopping.wait()
        if not _queued(job):
            await asyncio.sleep(max(0.0, self.deadline - asyncio.get_running_loop().time()))


def _queued(job: Stream) -> bool:
    """A local job whose generation has not started (vLLM queues on its side: never "queued" here)."""
    future = getattr(job, "future", None)
    return isinstance(future, Future) and not (future.running() or future.done())


async def _until_cut(job: Stream, drain: Drain) -> AsyncIterator[Chunk]:
    """The job's chunks, until it ends or the server's stop cuts it (then `Stopping`)."""
    chunks = job.__aiter__()
    while True:
        following = asyncio.ensure_future(chunks.__anext__())
        cut = asyncio.ensure_future(drain.cutoff(job))
        try:
            await asyncio.wait({following, cut}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cut.cancel()
            cut_off = not following.done()
            if cut_off:
                following.cancel()
                job.cancel()
        if cut_off:
            raise Stopping("the server is stopping: this completion was not finished; retry on a running server")
        try:
            chunk = following.result()
        except StopAsyncIteration:
            return
        yield chunk


class JobStream(StreamingResponse):
    """Server-sent events of a generation; whatever ends the response (done, client gone, server
    stopping) cancels the generation."""

    def __init__(self, job: Stream, events: AsyncIterator[str]) -> None:
        super().__init__(events, media_type="text/event-stream")
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


def error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status_code=status)


def create_app(backend: Backend | Loading, model_name: str, limits: Limits = Limits(), drain: Drain | None = None) -> FastAPI:
    gate = Gate(limits.concurrency + limits.max_queue)
    started = int(time.time())
    drain = drain or Drain(limits.graceful_timeout)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        drain.loop = asyncio.get_running_loop()
        yield
        await backend.close()

    app = FastAPI(title="sc2quant", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(Exception)
    async def bug(_: HttpRequest, exc: Exception) -> JSONResponse:  # the server outlives any one request
        return error(500, f"internal error: {type(exc).__name__}", kind="server_error")

    @app.exception_handler(RequestValidationError)
    async def invalid(_: HttpRequest, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return error(400, "request body is not valid JSON", code="invalid_json")
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        if where or first.get("type") != "value_error":  # else our own check of the whole body: it names the field
            message = f"{where or 'body'}: {message}"
        return error(400, message, code="invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: HttpRequest, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, NOT_UTF8_JSON if exc.status_code == 400 else str(exc.detail))

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: health checkers that read the status only
    async def health() -> JSONResponse:
        state = {"status": "stopping", "reason": "the server is stopping"} if drain.stopping.is_set() else backend.health()
        body = {**state, "model": model_name, "kind": backend.kind, "queued": gate.admitted}
        return JSONResponse(body, status_code=200 if state["status"] == "ok" else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                            "owned_by": "sc2quant"}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: HttpRequest) -> Any:
        if drain.stopping.is_set():
            return _stopping_error()
        if req.model not in (None, model_name):
            return error(404, f"model '{req.model}' is not served here; this server serves '{model_name}'",
                         code="model_not_found")
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not 1 <= len(prompts) <= MAX_PROMPTS:
            return error(400, f"prompt must be a string or a list of 1 to {MAX_PROMPTS} strings")
        if req.stream and len(prompts) != 1:
            return error(400, "streaming supports one prompt per request")
        stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
        max_tokens = MAX_TOKENS_LIMIT if req.max_tokens is None else req.max_tokens  # the context ends it sooner
        request_ = Request(list(prompts), max_tokens, req.temperature, req.top_p, stop, req.seed, req.suffix)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        usage = bool(req.stream_options and req.stream_options.include_usage)

        def stream(job: Stream) -> JobStream:
            return JobStream(job, _events(_until_cut(job, drain), cid, created, model_name,
                                          prompts[0] if req.echo else "", usage))

        def answer(rows: list[dict[str, Any]]) -> dict[str, Any]:
            choices = [{"text": (p if req.echo else "") + r["text"], "index": i, "logprobs": None,
                        "finish_reason": r["finish_reason"]} for i, (p, r) in enumerate(zip(prompts, rows))]
            return {"id": cid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": choices, "usage": _usage(rows), "seed": rows[0]["seed"]}

        return await run(request_, request, stream if req.stream else None, answer)

    @app.post("/infill")
    async def infill_route(req: InfillRequest, request: HttpRequest) -> Any:
        """llama.cpp server's /infill, for editor plugins written for llama-server (llama.vscode, llama.vim)."""
        if drain.stopping.is_set():
            return _stopping_error()
        try:  # token ids, trimmed to the context as llama-server trims them (runtime/infill.py)
            loaded = backend.loaded() if isinstance(backend, Loading) else backend
            ids, truncated = await run_in_threadpool(infill_ids, loaded.tokenizer, loaded.context, req)
        except UserError as exc:
            return error(400, str(exc))
        except Unavailable as exc:
            return error(503, str(exc), kind="server_error", code="engine_unavailable")
        stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
        n_predict = MAX_TOKENS_LIMIT if req.n_predict < 0 else max(1, req.n_predict)  # 0: fill the cache, in the background
        request_ = Request([ids], n_predict, req.temperature, req.top_p, stop, req.seed, None, {"background": not req.n_predict})
        timer = InfillTimer(req.t_max_predict_ms, keep=req.n_predict != 0, truncated=truncated)
        if req.stream:
            return await run(request_, request, lambda job: JobStream(job, timer.events(_until_cut(job, drain), job)),
                             timer.answer)
        return await run(request_, request, None, timer.answer, lambda job: timer.limit(_until_cut(job, drain), job))

    async def run(request_: Request, request: HttpRequest, stream: Callable[[Stream], Any] | None,
                  answer: Callable[[list[dict[str, Any]]], Any],
                  chunks: Callable[[Stream], AsyncIterator[Chunk]] | None = None) -> Any:
        """One request on the backend: checked, admitted (or 429), streamed or collected, cancelled when the
        client goes, cut when the server stops; both routes share it."""
        try:  # every check (sampling, UTF-8, empty or too long prompts) happens here, before any output
            prepared = await backend.prepare(request_)
        except UserError as exc:
            return error(400, str(exc))
        except Unavailable as exc:
            return error(503, str(exc), kind="server_error", code="engine_unavailable")
        if not gate.admit():
            return error(429, "too many requests in flight; retry later", kind="rate_limit_error", code="queue_full")
        job = backend.start(prepared, gate.leave)
        if stream is not None:
            return stream(job)
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        try:
            rows = await _collect(chunks(job) if chunks else _until_cut(job, drain), len(request_.prompts))
        except Stopping:
            return _stopping_error()
        except UserError as exc:
            return error(400, str(exc))
        except Unavailable as exc:
            return error(503, str(exc), kind="server_error", code="engine_unavailable")
        finally:
            watcher.cancel()
            job.cancel()
        return answer(rows)

    return app


def _stopping_error() -> JSONResponse:
    return error(503, "the server is stopping: retry on a running server", kind="server_error", code="server_stopping")


async def _cancel_on_disconnect(request: HttpRequest, job: Stream) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


async def _collect(job: AsyncIterator[Chunk], n: int) -> list[dict[str, Any]]:
    rows = [new_row() for _ in range(n)]
    async for c in job:
        add_chunk(rows[c.row], c)
    return rows


def _usage(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """OpenAI's `usage` of a request's rows, with its details: prompt tokens reused from the cache, and
    lookup decoding's drafts as predicted-output tokens accepted and rejected."""
    usage: dict[str, Any] = {"prompt_tokens": sum(r["prompt_tokens"] for r in rows),
                             "completion_tokens": sum(r["completion_tokens"] for r in rows)}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    usage["prompt_tokens_details"] = {"cached_tokens": sum(r["cached_tokens"] for r in rows)}
    accepted = sum(r["draft_accepted"] for r in rows)
    usage["completion_tokens_details"] = {"accepted_prediction_tokens": accepted,
                                          "rejected_prediction_tokens": sum(r["draft_tokens"] for r in rows) - accepted}
    return usage


async def _events(job: AsyncIterator[Chunk], cid: str, created: int, name: str, echo: str,
                  include_usage: bool = False) -> AsyncIterator[str]:
    """Server-sent events, one per decoded piece, then (include_usage) one with the usage and no choices,
    then `[DONE]` (OpenAI's stream format), whatever ends it."""
    extra = {"usage": None} if include_usage else {}

    def event(text: str, finish: str | None, seed: int | None) -> str:
        chunk = {"id": cid, "object": "text_completion", "created": created, "model": name, "seed": seed,
                 "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(chunk)}\n\n"

    if echo:
        yield event(echo, None, None)
    row = new_row()
    try:
        async for c in job:
            add_chunk(row, c, keep_text=False)
            if c.text or c.finish_reason:
                yield event(c.text, c.finish_reason, c.seed)
    except (UserError, Unavailable, Stopping) as exc:  # raised after the stream started: tell the client in the stream
        kind = "invalid_request_error" if isinstance(exc, UserError) else "server_error"
        code = "server_stopping" if isinstance(exc, Stopping) else None
        yield f"data: {json.dumps({'error': {'message': str(exc), 'type': kind, 'code': code}})}\n\n"
    else:
        if include_usage:
            last = {"id": cid, "object": "text_completion", "created": created, "model": name, "seed": row["seed"],
                    "choices": [], "usage": _usage([row])}
            yield f"data: {json.dumps(last)}\n\n"
    yield "data: [DONE]\n\n"
