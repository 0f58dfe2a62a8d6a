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
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from sc2quant.core.errors import UserError
from sc2quant.runtime.backends import Backend, Request, Stream, Unavailable

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


def create_app(backend: Backend, model_name: str, limits: Limits = Limits()) -> FastAPI:
    gate = Gate(limits.concurrency + limits.max_queue)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
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
        return error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", code="invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: HttpRequest, exc: StarletteHTTPException) -> JSONResponse:
        message = "request body is not valid UTF-8 JSON" if exc.status_code == 400 else str(exc.detail)
        return error(exc.status_code, message)

    @app.get("/health")
    async def health() -> JSONResponse:
        state = backend.health()
        body = {**state, "model": model_name, "kind": backend.kind, "queued": gate.admitted}
        return JSONResponse(body, status_code=200 if state["status"] == "ok" else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                            "owned_by": "sc2quant"}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: HttpRequest) -> Any:
        if req.model not in (None, model_name):
            return error(404, f"model '{req.model}' is not served here; this server serves '{model_name}'",
                         code="model_not_found")
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not 1 <= len(prompts) <= MAX_PROMPTS:
            return error(400, f"prompt must be a string or a list of 1 to {MAX_PROMPTS} strings")
        if req.stream and len(prompts) != 1:
            return error(400, "streaming supports one prompt per request")
        stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
        request_ = Request(prompts, req.max_tokens, req.temperature, req.top_p, stop, req.seed, req.suffix)
        try:  # every check (sampling, UTF-8, empty or too long prompts) happens here, before any output
            prepared = await backend.prepare(request_)
        except UserError as exc:
            return error(400, str(exc))
        except Unavailable as exc:
            return error(503, str(exc), kind="server_error", code="engine_unavailable")
        if not gate.admit():
            return error(429, "too many requests in flight; retry later", kind="rate_limit_error", code="queue_full")
        job = backend.start(prepared, gate.leave)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return JobStream(job, _events(job, cid, created, model_name, prompts[0] if req.echo else ""))
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        try:
            rows = await _collect(job, len(prompts))
        except UserError as exc:
            return error(400, str(exc))
        except Unavailable as exc:
            return error(503, str(exc), kind="server_error", code="engine_unavailable")
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


async def _cancel_on_disconnect(request: HttpRequest, job: Stream) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


async def _collect(job: Stream, n: int) -> list[dict[str, Any]]:
    rows = [{"text": "", "finish_reason": None, "prompt_tokens": 0, "completion_tokens": 0, "seed": None}
            for _ in range(n)]
    async for c in job:
        row = rows[c.row]
        row["text"] += c.text
        row.update(finish_reason=c.finish_reason, prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
                   seed=c.seed)
    return rows


async def _events(job: Stream, cid: str, created: int, name: str, echo: str) -> AsyncIterator[str]:
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
    except (UserError, Unavailable) as exc:  # raised after the stream started: tell the client in the stream
        kind = "server_error" if isinstance(exc, Unavailable) else "invalid_request_error"
        yield f"data: {json.dumps({'error': {'message': str(exc), 'type': kind}})}\n\n"
    yield "data: [DONE]\n\n"


def serve(model_path: str | None, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
          limits: Limits = Limits(), verify: bool = True, api_key: str | None = None, allow_no_api_key: bool = False,
          threads: int | None = None, dtype: str = "auto", engine: str = "auto", vllm: dict[str, Any] | None = None) -> None:
    """Check the address and the key, bind, start the backend, print one startup line, serve until SIGTERM/SIGINT.

    engine: "auto", "torch" or "onnx" (sc2quant's runtime), or "vllm" (a vLLM process doing the
    generation, see `sc2quant.runtime.vllm`; `vllm` holds its options)."""
    import uvicorn

    from sc2quant.core.console import console
    from sc2quant.core.source import resolve_source
    from sc2quant.embedded import EMBEDDED_MODEL_DIR
    from sc2quant.runtime.http_guard import ApiKeyGuard, BodyGuard, GuardedH11Protocol, bind, is_loopback

    limits.check()
    if api_key is not None and not api_key.strip():
        raise UserError("the API key is empty: give a non-empty --api-key (or SC2QUANT_API_KEY)")
    if not is_loopback(host) and api_key is None and not allow_no_api_key:
        raise UserError(f"--host {host} exposes the model to the network without an API key: add --api-key "
                        "(or SC2QUANT_API_KEY), or --allow-no-api-key if that is really what you want")
    source = resolve_source(model_path)
    name = "sc2quant-embedded" if source.path.resolve() == EMBEDDED_MODEL_DIR.resolve() else source.path.name
    sock = bind(host, port)
    backend: Backend | None = None
    try:
        if engine == "vllm":
            from sc2quant.runtime.vllm import VllmBackend

            backend = VllmBackend.start_process(source.path, name, verify=verify, **(vllm or {}))
        else:
            from sc2quant.runtime import load
            from sc2quant.runtime.backends import LocalBackend

            model = load(source.path, device=device, verify=verify, threads=threads, dtype=dtype, engine=engine)
            backend = LocalBackend(model, limits.concurrency)
        GuardedH11Protocol.header_timeout = limits.header_timeout
        app = ApiKeyGuard(BodyGuard(create_app(backend, name, limits), limits.body_bytes, limits.body_timeout), api_key)
        shown = f"[{host}]" if ":" in host else host
        console.print(f"serving {name} ({backend.describe()}) at http://{shown}:{port}/v1 - {limits.describe()}; "
                      f"auth {'on' if api_key else 'off'}", highlight=False, soft_wrap=True)
        config = uvicorn.Config(app, http=GuardedH11Protocol, log_level="warning", lifespan="on",
                                limit_concurrency=limits.max_connections,
                                timeout_graceful_shutdown=int(limits.graceful_timeout) or 1)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        if backend is not None and hasattr(backend, "stop_process"):
            backend.stop_process()
