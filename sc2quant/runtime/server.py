"""`sc2quant serve`: an OpenAI-compatible completions server (FIM via `suffix`) for any artifact.

Concurrency is bounded: `concurrency` requests generate at once, at most `max_queue` more
wait, and anything beyond that is answered 429 at once instead of piling up. Every error is
a JSON body `{"error": {"message", "type", "code"}}` with a 4xx/5xx status; one bad request
never takes the server down.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
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
    """Admission control: a slot counter for running + queued requests, a semaphore for running."""

    def __init__(self, concurrency: int, max_queue: int) -> None:
        self.limit = concurrency + max_queue
        self.admitted = 0
        self.lock = threading.Lock()
        self.running = threading.Semaphore(concurrency)

    def admit(self) -> bool:
        with self.lock:
            if self.admitted >= self.limit:
                return False
            self.admitted += 1
            return True

    def leave(self) -> None:
        with self.lock:
            self.admitted -= 1


def error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status_code=status)


def create_app(model: Model, model_name: str, concurrency: int = 1, max_queue: int = 16) -> FastAPI:
    app = FastAPI(title="sc2quant", docs_url=None, redoc_url=None)
    gate = Gate(concurrency, max_queue)
    started = int(time.time())

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return error(413, f"request body larger than {MAX_BODY_BYTES} bytes", code="body_too_large")
        try:
            return await call_next(request)
        except Exception as exc:  # noqa: BLE001 - the server must outlive any one request
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
    async def completions(req: CompletionRequest):
        if req.model not in (None, model_name):
            return error(404, f"model '{req.model}' is not served here; this server serves '{model_name}'",
                         code="model_not_found")
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts or len(prompts) > 8:
            return error(400, "prompt must be a string or a list of 1 to 8 strings")
        args = dict(max_new_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                    stop=[req.stop] if isinstance(req.stop, str) else req.stop or (), seed=req.seed, suffix=req.suffix)
        if not gate.admit():
            return error(429, "too many requests in flight; retry later", kind="rate_limit_error", code="queue_full")
        if req.stream and len(prompts) != 1:
            gate.leave()
            return error(400, "streaming supports one prompt per request")
        try:
            chunks = model.stream_generate(prompts if len(prompts) > 1 else prompts[0], **args)
        except UserError as exc:
            gate.leave()
            return error(400, str(exc))
        if req.stream:
            return StreamingResponse(_stream(gate, chunks, prompts[0] if req.echo else "", model_name),
                                     media_type="text/event-stream")
        try:
            rows = await run_in_threadpool(_complete, gate, chunks, len(prompts))
        except UserError as exc:
            return error(400, str(exc))
        finally:
            gate.leave()
        usage = {"prompt_tokens": sum(r["prompt_tokens"] for r in rows),
                 "completion_tokens": sum(r["completion_tokens"] for r in rows)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        choices = [{"text": (p if req.echo else "") + r["text"], "index": i, "logprobs": None,
                    "finish_reason": r["finish_reason"]} for i, (p, r) in enumerate(zip(prompts, rows))]
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name, "choices": choices, "usage": usage}

    return app


def _complete(gate: Gate, chunks: Iterator[Chunk], n: int) -> list[dict[str, Any]]:
    rows = [{"text": "", "finish_reason": None, "prompt_tokens": 0, "completion_tokens": 0} for _ in range(n)]
    with gate.running:
        for c in chunks:
            row = rows[c.row]
            row["text"] += c.text
            row.update(finish_reason=c.finish_reason, prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens)
    return rows


def _stream(gate: Gate, chunks: Iterator[Chunk], echo: str, name: str) -> Iterator[str]:
    """Server-sent events, one per decoded piece, then `[DONE]` (OpenAI's stream format)."""
    cid = f"cmpl-{uuid.uuid4().hex}"

    def event(text: str, finish: str | None) -> str:
        chunk = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": name,
                 "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
        return f"data: {json.dumps(chunk)}\n\n"

    try:
        with gate.running:
            if echo:
                yield event(echo, None)
            for c in chunks:
                if c.text or c.finish_reason:
                    yield event(c.text, c.finish_reason)
            yield "data: [DONE]\n\n"
    finally:
        gate.leave()


def serve(model_path: str | None, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
          concurrency: int = 1, max_queue: int = 16, verify: bool = True) -> None:
    import uvicorn

    from sc2quant.runtime import load

    model = load(model_path, device=device, verify=verify)
    name = model.path.name if model_path else "sc2quant-embedded"
    uvicorn.run(create_app(model, name, concurrency, max_queue), host=host, port=port, log_level="warning")
