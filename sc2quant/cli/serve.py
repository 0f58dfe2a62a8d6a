"""`sc2quant serve`."""

from __future__ import annotations

from typing import Annotated

import typer

from sc2quant.cli.common import ModelArg, app, user_errors
from sc2quant.core.errors import UserError


@app.command("serve")
@user_errors
def serve_cmd(
    model: ModelArg = None,
    host: Annotated[str, typer.Option(help="Address to bind (localhost by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
    concurrency: Annotated[int, typer.Option(help="Requests generating at once.")] = 1,
    max_queue: Annotated[int, typer.Option(help="Requests waiting at most; more get 429.")] = 16,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Check artifact checksums first.")] = True,
) -> None:
    """Serve an artifact over the OpenAI completions API (POST /v1/completions, GET /v1/models, /health).

    Examples:

        sc2quant serve out/embedded-gptq-int4-g128 --port 8000

        curl -s localhost:8000/v1/completions -d '{"prompt": "def add(a, b):", "max_tokens": 32}'
    """
    from sc2quant.runtime.server import serve

    if concurrency < 1 or max_queue < 0:
        raise UserError("--concurrency must be at least 1 and --max-queue at least 0")
    if not 0 < port < 65536:
        raise UserError(f"port {port} is out of range: use 1-65535")
    serve(model, host=host, port=port, device=device, concurrency=concurrency, max_queue=max_queue, verify=verify)
