"""`sc2quant serve`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from sc2quant.cli.common import ModelArg, app, user_errors


@app.command("serve")
@user_errors
def serve_cmd(
    model: ModelArg = None,
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(
        envvar="SC2QUANT_API_KEY", show_envvar=True,
        help="Require 'Authorization: Bearer KEY' on every route but /health.")] = None,
    allow_no_api_key: Annotated[bool, typer.Option(
        "--allow-no-api-key", help="Serve a non-loopback --host without an API key.")] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="Compute dtype: auto (the CPU's policy), fp32, bf16 or fp16.")] = "auto",
    threads: Annotated[Optional[int], typer.Option(help="CPU threads (default: all).")] = None,
    concurrency: Annotated[int, typer.Option(help="Requests generating at once.")] = 1,
    max_queue: Annotated[int, typer.Option(help="Requests waiting at most; more get 429.")] = 16,
    max_connections: Annotated[int, typer.Option(help="Open connections at most; more get 503.")] = 64,
    read_timeout: Annotated[float, typer.Option(help="Seconds a client may take to send headers or a body piece.")] = 10.0,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Check artifact checksums first.")] = True,
) -> None:
    """Serve an artifact over the OpenAI completions API (POST /v1/completions, GET /v1/models, /health).

    Examples:

        sc2quant serve out/embedded-gptq-int4-g128 --port 8000

        curl -s localhost:8000/v1/completions -d '{"prompt": "def add(a, b):", "max_tokens": 32}'

        SC2QUANT_API_KEY=secret sc2quant serve --host 0.0.0.0
    """
    from sc2quant.core.system import check_threads
    from sc2quant.runtime.server import Limits, serve

    check_threads(threads)
    limits = Limits(concurrency=concurrency, max_queue=max_queue, max_connections=max_connections,
                    header_timeout=read_timeout, body_timeout=read_timeout)
    serve(model, host=host, port=port, device=device, limits=limits, verify=verify, api_key=api_key,
          allow_no_api_key=allow_no_api_key, threads=threads, dtype=dtype)
