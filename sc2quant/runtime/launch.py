"""`sc2quant serve`'s process around the app of `sc2quant.runtime.server`: SIGINT/SIGTERM recorded
from the first line (`sc2quant.core.signals.StopSignals`, never raised into the loading code), the
port bound and served at once while the model loads on a thread (503 until it is ready), one
startup line when it is, and a stop at any moment: the server drains (`server.Drain`), the caller
gets the signal that stopped it and turns it into the exit status.
"""

from __future__ import annotations

import functools
import socket
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import uvicorn

from sc2quant.core.errors import UserError
from sc2quant.core.signals import StopSignals
from sc2quant.runtime.backends import Backend
from sc2quant.runtime.server import Drain, Limits, Loading, create_app


def serve(model_path: str | None, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
          limits: Limits = Limits(), verify: bool = True, api_key: str | None = None, allow_no_api_key: bool = False,
          threads: int | None = None, dtype: str = "auto", engine: str = "auto",
          vllm: dict[str, Any] | None = None, reuse: dict[str, int] | None = None) -> int | None:
    """Check the address and the key, bind, serve at once (503 while the model loads on a thread), print
    one startup line when it is ready, serve until SIGINT/SIGTERM; return the signal that stopped it.

    Signals are recorded from the first line (`StopSignals`: never raised into the loading code), so
    one at any moment stops the server the same way; the caller turns it into an exit status.
    engine: "auto", "torch" or "onnx" (sc2quant's runtime), or "vllm" (a vLLM process doing the
    generation, see `sc2quant.runtime.vllm`; `vllm` holds its options). reuse: `load`'s prompt-reuse
    options (prefix_cache_bytes, prefill_chunk, lookup_tokens) for sc2quant's runtime."""
    stop = StopSignals().install()
    try:
        _serve(stop, model_path, host, port, device, limits, verify, api_key, allow_no_api_key, threads, dtype, engine,
               vllm or {}, reuse or {})
    finally:
        stop.restore()
    return stop.signum


def _serve(stop: StopSignals, model_path: str | None, host: str, port: int, device: str, limits: Limits, verify: bool,
           api_key: str | None, allow_no_api_key: bool, threads: int | None, dtype: str, engine: str,
           vllm: dict[str, Any], reuse: dict[str, int]) -> None:
    from sc2quant.core.source import resolve_source
    from sc2quant.embedded import EMBEDDED_MODEL_DIR
    from sc2quant.runtime.http_guard import bind, is_loopback
    from sc2quant.runtime.model import check_reuse

    limits.check()
    check_reuse(**reuse)
    if api_key is not None and not api_key.strip():
        raise UserError("the API key is empty: give a non-empty --api-key (or SC2QUANT_API_KEY)")
    if not is_loopback(host) and api_key is None and not allow_no_api_key:
        raise UserError(f"--host {host} exposes the model to the network without an API key: add --api-key "
                        "(or SC2QUANT_API_KEY), or --allow-no-api-key if that is really what you want")
    source = resolve_source(model_path)
    name = "sc2quant-embedded" if source.path.resolve() == EMBEDDED_MODEL_DIR.resolve() else source.path.name
    sock = bind(host, port)
    loading = Loading()
    open_backend = functools.partial(_open_backend, source.path, name, device, verify, threads, dtype, engine,
                                     limits.concurrency, reuse, vllm)
    try:
        if stop.signum is None:
            _run(stop, sock, loading, open_backend, name, f"[{host}]" if ":" in host else host, port, limits, api_key,
                 wait_for_load=engine == "vllm")
    finally:
        sock.close()
        loading.stop()
    if loading.error is not None and stop.signum is None:
        raise loading.error


def _open_backend(path: Path, name: str, device: str, verify: bool, threads: int | None, dtype: str, engine: str,
                  concurrency: int, reuse: dict[str, int], vllm: dict[str, Any]) -> Backend:
    if engine == "vllm":
        from sc2quant.runtime.vllm import VllmBackend

        return VllmBackend.start_process(path, name, verify=verify, **vllm)
    from sc2quant.runtime import load
    from sc2quant.runtime.backends import LocalBackend

    model = load(path, device=device, verify=verify, threads=threads, dtype=dtype, engine=engine,
                 **reuse)
    return LocalBackend(model, concurrency)


LOADER_THREAD = "sc2quant-load"  # the thread that loads the model while the server answers 503


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: `StopSignals` has them from the first line."""

    def capture_signals(self) -> AbstractContextManager[None]:
        return nullcontext()


def _run(stop: StopSignals, sock: socket.socket, loading: Loading, open_backend: Callable[[], Backend], name: str,
         host: str, port: int, limits: Limits, api_key: str | None, wait_for_load: bool) -> None:
    """Serve on `sock` while the backend loads on a thread; return when a signal (or a failed load) stops it."""
    from sc2quant.core.console import console
    from sc2quant.runtime.http_guard import ApiKeyGuard, BodyGuard, GuardedH11Protocol

    drain = Drain(limits.graceful_timeout)
    GuardedH11Protocol.header_timeout = limits.header_timeout
    app = ApiKeyGuard(BodyGuard(create_app(loading, name, limits, drain), limits.body_bytes, limits.body_timeout), api_key)
    config = uvicorn.Config(app, http=GuardedH11Protocol, log_level="warning", lifespan="on",
                            limit_concurrency=limits.max_connections,
                            timeout_graceful_shutdown=int(limits.graceful_timeout) + 2)  # after the drain's own cut
    server = _Server(config)

    def ready(done: Loading) -> None:
        if done.error is not None:
            server.should_exit = True  # the main thread raises the error
        elif stop.signum is None:
            console.print(f"serving {name} ({done.describe()}) at http://{host}:{port}/v1 - {limits.describe()}; "
                          f"auth {'on' if api_key else 'off'}", highlight=False, soft_wrap=True)

    def on_signal(signum: int) -> None:
        if server.should_exit and stop.count > 1:
            server.force_exit = True  # a second signal: stop waiting for requests
        server.should_exit = True
        drain.begin_threadsafe()

    stop.on_signal(on_signal)
    loader = threading.Thread(target=loading.run, args=(open_backend, ready), name=LOADER_THREAD, daemon=True)
    loader.start()
    server.run(sockets=[sock])
    if wait_for_load:
        loader.join()  # a vLLM process being started: stopped (by the caller) once it exists
