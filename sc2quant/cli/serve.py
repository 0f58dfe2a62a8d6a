"""`sc2quant serve`."""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Annotated, Optional

import typer

from sc2quant.cli.common import (
    DeviceOpt,
    DtypeOpt,
    ModelArg,
    RecipeOpt,
    ThreadsOpt,
    VerboseOpt,
    VerifyOpt,
    app,
    command,
    resolve,
)
from sc2quant.core.errors import UserError


@app.command("serve")
@command("serve", own_signals=True)  # SIGINT/SIGTERM: recorded by serve's StopSignals from its first line
def serve_cmd(
    ctx: typer.Context,
    model: ModelArg = None,
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(
        envvar="SC2QUANT_API_KEY", show_envvar=True, help="Require 'Authorization: Bearer KEY' on all but /health.")]
    = None,
    allow_no_api_key: Annotated[bool, typer.Option(
        "--allow-no-api-key", help="Serve a non-loopback --host without an API key.")] = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    engine: Annotated[str, typer.Option(
        help="auto (GPTQ on a CPU runs in ONNX Runtime), torch, onnx, or vllm (a vLLM process generates).")] = "auto",
    tensor_parallel_size: Annotated[int, typer.Option(help="vllm: GPUs to shard the model over.")] = 1,
    vllm_python: Annotated[Optional[str], typer.Option(
        envvar="SC2QUANT_VLLM_PYTHON", help="vllm: the python of an environment with vLLM [default: .venv-vllm]")]
    = None,
    threads: ThreadsOpt = None,
    parallel: Annotated[Optional[int], typer.Option(
        help="Rows generated together (continuous batching, as llama-server's slots): each step decodes one token "
             "of every generating row in one forward and prefills a chunk of a waiting prompt; an idle row keeps its "
             "prompt for the next request sharing it. ONNX exports on the CPU; 1: one request at a time. "
             "[default: 4 where the model runs in ONNX Runtime on the CPU, else 1: four editors on 2 cores got "
             "their first token 1.5x sooner than with --parallel 1, and --parallel 8 was within the rounds' spread "
             "of 4 with twice the memory (bench/results/2026-12-08-avx512-editor-4session.md)]", show_default=False)] = None,
    concurrency: Annotated[int, typer.Option(help="Requests generating at once (with --parallel: at least its rows).")] = 1,
    max_queue: Annotated[int, typer.Option(help="Requests waiting at most; more get 429.")] = 16,
    max_connections: Annotated[int, typer.Option(help="Open connections at most; more get 503.")] = 64,
    read_timeout: Annotated[float, typer.Option(help="Seconds a client may take to send headers or a body piece.")]
    = 10.0,
    prompt_cache_mb: Annotated[Optional[int], typer.Option(
        help="MiB of KV cache kept between requests: a prompt sharing a prefix with an earlier one prefills only "
             "the rest (0 = off) [default: 1024, or one prompt's KV where that is more]", show_default=False)] = None,
    lookup_tokens: Annotated[Optional[int], typer.Option(
        help="Lookup decoding: draft up to N tokens from the prompt per step, kept where greedy decoding agrees "
             "(same output; 0 = off) [default: the runtime's, sc2quant.runtime.model.DEFAULT_LOOKUP]",
        show_default=False)] = None,
    verify: VerifyOpt = True,
    recipe: RecipeOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Serve an artifact over the OpenAI completions API (/v1/completions with suffix for FIM, /v1/models, /health).

    \b
    Examples:
      sc2quant serve out/embedded-gptq-int4-g128 --port 8000
      curl -s localhost:8000/v1/completions -d '{"prompt": "def add(a, b):"}'
      SC2QUANT_API_KEY=secret sc2quant serve --host 0.0.0.0
      sc2quant serve out/embedded-gptq-int4-g128 --engine vllm
    """
    from sc2quant.core.system import check_threads
    from sc2quant.runtime.engines import ENGINE_CHOICES
    from sc2quant.runtime.launch import serve
    from sc2quant.runtime.server import Limits

    v, given = resolve(ctx, recipe)
    check_threads(v["threads"])
    vllm_only = {"tensor_parallel_size", "vllm_python"} & given
    if v["engine"] != "vllm" and vllm_only:
        raise UserError(f"{', '.join('--' + o.replace('_', '-') for o in sorted(vllm_only))} applies to --engine vllm "
                        "only: add --engine vllm or drop it")
    if v["engine"] not in (*ENGINE_CHOICES, "vllm"):
        raise UserError(f"unknown engine '{v['engine']}': choose one of {', '.join((*ENGINE_CHOICES, 'vllm'))}")
    not_for_vllm = {"threads", "device", "prompt_cache_mb", "lookup_tokens"} & given  # --dtype is forwarded to vLLM's own --dtype
    if v["engine"] == "vllm" and not_for_vllm:
        raise UserError(f"{', '.join('--' + o.replace('_', '-') for o in sorted(not_for_vllm))} cannot be passed to "
                        "vLLM, which sets its own threads, device and prefix cache (VLLM_CPU_OMP_THREADS_BIND, its CPU "
                        "or CUDA build, automatic prefix caching): drop it")
    if v["prompt_cache_mb"] is not None and v["prompt_cache_mb"] < 0:
        raise UserError(f"--prompt-cache-mb must be 0 (no prompt reuse) or more, got {v['prompt_cache_mb']}")
    if v["engine"] == "vllm" and v["parallel"] is not None:
        raise UserError("--parallel applies to sc2quant's own runtime: vLLM batches its requests itself; drop it")
    limits = Limits(concurrency=v["concurrency"], max_queue=v["max_queue"], max_connections=v["max_connections"],
                    header_timeout=v["read_timeout"], body_timeout=v["read_timeout"])
    stopped_by = serve(v["model"], host=v["host"], port=v["port"], device=v["device"], limits=limits, verify=v["verify"],
                       api_key=v["api_key"], allow_no_api_key=v["allow_no_api_key"], threads=v["threads"],
                       dtype=v["dtype"], engine=v["engine"],
                       vllm={"python": v["vllm_python"], "tensor_parallel_size": v["tensor_parallel_size"],
                             "dtype": v["dtype"]},
                       reuse={"prefix_cache_bytes": None if v["prompt_cache_mb"] is None else v["prompt_cache_mb"] << 20,
                              "parallel": v["parallel"],
                              **({} if v["lookup_tokens"] is None else {"lookup_tokens": v["lookup_tokens"]})})
    exit_as_signalled(stopped_by)


def exit_as_signalled(signum: int | None) -> None:
    """Ctrl-C: "stopped" and exit status 130 (the command wrapper); SIGTERM: the status of a process
    SIGTERM ended (143 in a shell), as a service manager expects; no signal: 0."""
    if signum == signal.SIGINT:
        from sc2quant.runtime.launch import LOADER_THREAD

        if any(t.name == LOADER_THREAD and t.is_alive() for t in threading.enumerate()):
            # the model is still loading inside native code (ONNX Runtime, torch): finalizing the
            # interpreter under it aborts the process (std::terminate, exit -6); leave without it
            from sc2quant.cli.common import INTERRUPTED
            from sc2quant.core.console import console

            console.print(INTERRUPTED["serve"])
            for stream in (sys.stdout, sys.stderr, console.file):
                stream.flush()
            os._exit(130)
        raise KeyboardInterrupt
    if signum == signal.SIGTERM:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)
