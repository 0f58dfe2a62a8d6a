"""What keeps one HTTP client from wedging or exhausting the server, below the application:

- `bind`: the listening socket, bound before the model loads (a port in use is one clear line);
- `GuardedH11Protocol`: uvicorn's HTTP/1.1 protocol with a header read timeout (a client that
  sends half a request line or headers, or idles between keep-alive requests after sending a
  first byte, is disconnected) - uvicorn itself has only the idle keep-alive timeout;
- `ApiKeyGuard`: `Authorization: Bearer <key>` on every route but /health (401 otherwise);
- `BodyGuard`: an ASGI middleware that reads the request body itself, whatever its framing
  (Content-Length or chunked), with a size limit (413 as soon as it is exceeded, before the body
  is parsed) and a read timeout (408), then replays it to the application as JSON (whatever its
  Content-Type: llama-server reads any body as JSON, and `curl -d` labels it a form);
- `ApiBody`: the base of the request bodies: `null` means "not given" (OpenAI's and llama-server's
  clients send it for defaults) except where a field gives null a meaning of its own; booleans
  must be booleans (not "yes").
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import socket
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator
from uvicorn.protocols.http.h11_impl import H11Protocol

from sc2quant.core.errors import UserError

Scope = dict[str, Any]
# what a body that cannot be parsed gets (the JSON parser's own errors are answered by the app: "not valid JSON")
# vLLM's and llama-server's sampling and output fields /v1/completions does not apply (the OpenAI ones it does
# not apply are declared on the request: logit_bias, penalties, logprobs, best_of)
NOT_APPLIED = {"min_p": (0,), "repetition_penalty": (1,), "min_tokens": (0,), "typical_p": (1,), "mirostat": (0,),
               "ignore_eos": (False,), "stop_token_ids": ([],), "response_format": ({"type": "text"},),
               "prompt_logprobs": (), "guided_json": (), "guided_regex": (), "guided_choice": (), "guided_grammar": (),
               "structured_outputs": (), "grammar": (), "json_schema": (), "use_beam_search": (False,),
               "length_penalty": (1,), "include_stop_str_in_output": (False,)}
NOT_UTF8_JSON = "request body is not valid UTF-8 JSON (or nests deeper, or holds a longer number, than a request can)"


class ApiBody(BaseModel):
    """A request body: unknown fields ignored (clients send fields a server does not use), `null` for a
    field that cannot be null read as "not given" (its default; `max_tokens: null` keeps its own
    meaning), booleans declared strict where they are (`StrictBool`)."""

    model_config = ConfigDict(extra="ignore")
    # fields other servers apply that this one does not: refused unless absent, null or a neutral value
    # (none: refused whatever the value)
    not_applied: typing.ClassVar[dict[str, tuple[Any, ...]]] = {}

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, neutral in cls.not_applied.items():
            if data.get(name) is not None and data[name] not in neutral:
                raise ValueError(f"{name} is not applied by this server: drop it"
                                 + (f" (or send {json.dumps(neutral[0])})" if neutral else ""))
        return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields
                or type(None) in typing.get_args(cls.model_fields[k].annotation)}


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv4 or IPv6), or one clear error."""
    if not 0 < port < 65536:
        raise UserError(f"port {port} is out of range: use 1-65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserError(f"cannot resolve --host {host} ({exc.strerror}): give an address such as 127.0.0.1") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        reason = "already in use" if exc.errno == 98 else exc.strerror
        raise UserError(f"cannot listen on {host}:{port} ({reason}): choose another --port") from None
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus: a request's line and headers must arrive within
    `header_timeout` seconds of the connection opening or of the previous response ending."""

    header_timeout: float = 10.0

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:
            self._cancel_header_timer()  # the headers are in: the body guard times the body

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()


def json_error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode()


async def refuse(send: Any, status: int, message: str, code: str | None,
                 kind: str = "invalid_request_error") -> None:
    body = json_error(status, message, kind, code)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class BodyGuard:
    """Read the whole request body (any framing) with a size limit and a read timeout, then pass
    the request on with the body replayed; later `receive` calls (disconnects) go through."""

    def __init__(self, app: Any, limit: int, timeout: float) -> None:
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await refuse(send, 413, f"request body larger than {self.limit} bytes", "body_too_large")
            return
        body = bytearray()
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except TimeoutError:
                await refuse(send, 408, f"request body not received within {self.timeout:g} s", "body_timeout")
                return
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.limit:
                await refuse(send, 413, f"request body larger than {self.limit} bytes", "body_too_large")
                return
            if not message.get("more_body", False):
                break
        if not _utf8(body):  # Python's json reads UTF-16 and UTF-32 too (by their BOM or NULs): every other is refused
            await refuse(send, 400, NOT_UTF8_JSON, None)
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        if body:  # every route takes JSON, whatever Content-Type says (llama-server does; `curl -d` sends a form type)
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, replay, send)


def _utf8(body: bytearray) -> bool:
    """UTF-8, and no NUL byte: JSON escapes every control character, and ASCII JSON in UTF-16 without a
    BOM is valid UTF-8 full of NULs, which Python's json would read as UTF-16."""
    if b"\x00" in body:
        return False
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class ApiKeyGuard:
    """Refuse every request but GET /health without the right bearer token (constant-time compare)."""

    def __init__(self, app: Any, api_key: str | None) -> None:
        self.app, self.key = app, (api_key or "").encode()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.key and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            token = given[7:].strip() if given[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.key):
                await refuse(send, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                        "invalid_api_key", kind="authentication_error")
                return
        await self.app(scope, receive, send)
