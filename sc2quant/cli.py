"""The Typer command line. It only parses flags and calls the library function of each verb."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.table import Table

from sc2quant.console import console, quiet_libraries
from sc2quant.errors import UserError

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="sc2quant",
    help="Quantize, export and run StarCoder2 code models, with honest accuracy numbers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_state = {"debug": False}

ModelArg = Annotated[
    Optional[str],
    typer.Argument(help="Model directory, hub id, or artifact. Omit for the embedded default model.", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False) -> None:
    _state["debug"] = debug
    quiet_libraries()


def user_errors(fn: F) -> F:
    """Turn a UserError into one line on stderr and exit status 2 (traceback only with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            if _state["debug"]:
                raise
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/]: nothing was written")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def json_safe(as_json: bool) -> contextlib.AbstractContextManager:
    """With --json, library chatter (GPTQModel logs to stdout) goes to stderr, keeping stdout parseable."""
    return contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()


@app.command("inspect")
@user_errors
def inspect_cmd(model: ModelArg = None, as_json: JsonOpt = False) -> None:
    """Show what the loader sees: architecture, shape, dtype, parameters, bytes on disk.

    Examples:

        sc2quant inspect                      # the embedded default model

        sc2quant inspect ./starcoder2-3b --json
    """
    from sc2quant.inspect import inspect_model

    info = inspect_model(model)
    if as_json:
        print_json(info)
        return
    table = Table(title=f"{info['architecture']}  ·  {info['source']['id']}", show_header=False)
    for key, value in info["shape"].items():
        table.add_row(key, str(value))
    table.add_row("dtype", str(info["dtype"]))
    table.add_row("parameters", f"{info['parameters']:,}")
    table.add_row("bytes on disk", f"{info['bytes_on_disk']:,}")
    if info.get("quantization"):
        q = info["quantization"]
        table.add_row("quantization", f"{q.get('quant_method')} {q.get('bits', '')}".strip())
    if info.get("artifact"):
        a = info["artifact"]
        table.add_row("artifact", f"{a['kind']} / {a['method']} (from {a['source']})")
    console.print(table)


@app.command("quantize")
@user_errors
def quantize_cmd(
    model: ModelArg = None,
    method: Annotated[Optional[str], typer.Option(help="gptq (default), bnb or rtn.")] = None,
    bits: Annotated[Optional[int], typer.Option(help="Weight bits: gptq/rtn 2|3|4|8, bnb 4|8. Default 4.")] = None,
    group_size: Annotated[Optional[int], typer.Option(help="GPTQ/RTN group size (32, 64, 128, -1 = per row).")] = None,
    act_order: Annotated[Optional[bool], typer.Option("--act-order/--no-act-order", help="GPTQ activation order.")] = None,
    sym: Annotated[Optional[bool], typer.Option("--sym/--asym", help="GPTQ/RTN symmetric grid.")] = None,
    damp: Annotated[Optional[float], typer.Option(help="GPTQ Hessian dampening.")] = None,
    calib: Annotated[Optional[list[str]], typer.Option(help="calib_data, text files, a directory or JSONL.")] = None,
    calib_samples: Annotated[Optional[int], typer.Option(help="Calibration samples.")] = None,
    calib_seqlen: Annotated[Optional[int], typer.Option(help="Tokens per calibration sample.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Calibration sampling seed.")] = None,
    quant_type: Annotated[Optional[str], typer.Option(help="bnb 4-bit type: nf4 or fp4.")] = None,
    double_quant: Annotated[Optional[bool], typer.Option("--double-quant/--no-double-quant", help="bnb double quant.")] = None,
    compute_dtype: Annotated[Optional[str], typer.Option(help="bnb 4-bit compute dtype: bf16 or fp32.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or auto.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output directory (default out/<model>-<method>-<bits>).")] = None,
    force: Annotated[Optional[bool], typer.Option("--force", help="Replace an existing output directory.")] = None,
    allow_pickle: Annotated[Optional[bool], typer.Option("--allow-pickle", help="Accept *.bin (pickle) weights.")] = None,
    recipe: Annotated[Optional[str], typer.Option(help="YAML recipe (path or name in recipes/); flags override it.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Quantize a StarCoder2 model: GPTQ int4 by default, or bitsandbytes / round-to-nearest.

    Examples:

        sc2quant quantize --bits 4                                  # GPTQ int4 g128 of the embedded model

        sc2quant quantize ./starcoder2-3b --method bnb --bits 4 --quant-type nf4 --double-quant

        sc2quant quantize --recipe recipes/bnb-int8.yaml --out out/int8
    """
    from sc2quant.quantize import QuantizeOptions, quantize
    from sc2quant.recipes import merge

    overrides = dict(model=model, method=method, bits=bits, group_size=group_size, act_order=act_order, sym=sym,
                     damp=damp, calib=calib, calib_samples=calib_samples, calib_seqlen=calib_seqlen, seed=seed,
                     quant_type=quant_type, double_quant=double_quant, compute_dtype=compute_dtype, device=device,
                     out=str(out) if out else None, force=force, allow_pickle=allow_pickle)
    with json_safe(as_json):
        path = quantize(merge(QuantizeOptions, recipe, overrides))
    if as_json:
        from sc2quant.artifact import read_manifest

        print_json({"artifact": str(path), **read_manifest(path).__dict__})
    else:
        console.print(f"[green]wrote[/] {path}")


@app.command("footprint")
@user_errors
def footprint_cmd(
    shape: Annotated[str, typer.Option(help="3b, 7b, 15b, or a config.json / model directory.")] = "7b",
    context: Annotated[Optional[int], typer.Option(help="KV cache tokens per sequence (default: the shape's).")] = None,
    batch: Annotated[int, typer.Option(help="Sequences in the KV cache.")] = 1,
    legacy_card: Annotated[bool, typer.Option("--legacy-card", help="Also count as the model card did.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Predict the memory of every method (weights, true resident bytes, KV cache) without loading a model.

    Examples:

        sc2quant footprint                                  # StarCoder2-7B at its 16384-token context

        sc2quant footprint --shape 15b --context 4096 --batch 8

        sc2quant footprint --shape ./starcoder2-3b/config.json --json

        sc2quant footprint --legacy-card                    # the 7B model card's figures, and why today's differ
    """
    from sc2quant.footprint import render, report

    data = report(shape, context=context, batch=batch, legacy=legacy_card)
    if as_json:
        print_json(data)
        return
    for item in render(data):
        console.print(item, highlight=False)


export_app = typer.Typer(help="Export a model to another runtime's format.", no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command("onnx")
@user_errors
def export_onnx_cmd(
    model: ModelArg = None,
    dtype: Annotated[str, typer.Option(help="Activations, KV cache and logits: fp32 (CPU) or fp16 (CUDA).")] = "fp32",
    weights: Annotated[str, typer.Option(help="fp (same as --dtype) or int4 (MatMulNBits).")] = "fp",
    block_size: Annotated[int, typer.Option(help="int4 block size: 32, 64 or 128.")] = 32,
    symmetric: Annotated[bool, typer.Option("--symmetric/--asymmetric", help="int4 grid, or with zero points.")] = True,
    device: Annotated[str, typer.Option(help="Execution provider the graph is built for: cpu or cuda.")] = "cpu",
    lm_head: Annotated[Optional[str], typer.Option(
        help="int4 exports: lm_head int4 (tied with the embedding), int8, or float "
             "[default: int4; float for a GPTQ checkpoint].")] = None,
    out: Annotated[Optional[Path], typer.Option(
        help="Output directory (default out/<model>-onnx-<dtype|int4>)")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Export to ONNX Runtime: fused GroupQueryAttention with the sliding window, KV cache, fp32/fp16 or int4.

    The output runs in onnxruntime and onnxruntime-genai. A GPTQ artifact keeps its int4 weights.

    Examples:

        sc2quant export onnx                                         # the embedded model, fp32 for the CPU

        sc2quant export onnx ./starcoder2-3b --weights int4 --block-size 32

        sc2quant export onnx out/embedded-gptq-int4-g128             # GPTQ weights carried into MatMulNBits

        sc2quant export onnx out/embedded-gptq-int4-g128 --lm-head int8   # and an 8-bit lm_head
    """
    from sc2quant.artifact import read_manifest
    from sc2quant.export_onnx import export_onnx

    with json_safe(as_json):
        path = export_onnx(model, out, dtype=dtype, weights=weights, block_size=block_size, symmetric=symmetric,
                           device=device, force=force, lm_head=lm_head)
    if as_json:
        print_json({"artifact": str(path), **read_manifest(path).__dict__})


def _text_or_file(value: str) -> str:
    """Options that take code accept either the text itself or a path to a file holding it."""
    path = Path(value)
    try:
        if len(value) < 4096 and "\n" not in value and path.is_file():
            return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text: convert it first") from exc
    except OSError:  # not a usable path (too long, ...): it is the text itself
        pass
    return value


@app.command("run")
@user_errors
def run_cmd(
    model: ModelArg = None,
    prompt: Annotated[Optional[str], typer.Option(help="Text to complete (or a file holding it).")] = None,
    fim_prefix: Annotated[Optional[str], typer.Option(help="Fill-in-the-middle: code before the gap (text or file).")] = None,
    fim_suffix: Annotated[Optional[str], typer.Option(help="Fill-in-the-middle: code after the gap (text or file).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop string (repeatable).")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    stream: Annotated[bool, typer.Option("--stream", help="Print tokens as they are generated.")] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Check artifact checksums first.")] = True,
) -> None:
    """Generate code with any artifact (or the embedded model): completion or fill-in-the-middle.

    Examples:

        sc2quant run --prompt "def fibonacci(n):"

        sc2quant run out/embedded-gptq-int4-g128 --prompt prompt.py --max-new-tokens 128 --stream

        sc2quant run out/model-onnx-int4 --fim-prefix "def add(a, b):\n    " --fim-suffix "\n    return c\n"
    """
    from sc2quant.runtime import Sampling, load

    if prompt is None and (fim_prefix is None or fim_suffix is None):
        raise UserError("give --prompt, or both --fim-prefix and --fim-suffix")
    Sampling(max_new_tokens, temperature, top_p).validate()  # fail before loading a model
    m = load(model, device=device, verify=verify)
    args = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    if prompt is None:
        sys.stdout.write(m.infill(_text_or_file(fim_prefix or ""), _text_or_file(fim_suffix or ""), **args) + "\n")
        return
    text = _text_or_file(prompt)
    if stream:
        for piece in m.stream(text, stop=stop or (), **args):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        sys.stdout.write(text + m.generate(text, stop=stop or (), **args) + "\n")


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
    from sc2quant.server import serve

    if concurrency < 1 or max_queue < 0:
        raise UserError("--concurrency must be at least 1 and --max-queue at least 0")
    if not 0 < port < 65536:
        raise UserError(f"port {port} is out of range: use 1-65535")
    serve(model, host=host, port=port, device=device, concurrency=concurrency, max_queue=max_queue, verify=verify)


@app.command("report")
@user_errors
def report_cmd(
    artifacts: Annotated[list[str], typer.Argument(help="Artifacts (or model directories) to measure.")],
    baseline: Annotated[Optional[str], typer.Option(help="Baseline model (default: the embedded model).")] = None,
    eval: Annotated[Optional[list[str]], typer.Option("--eval", help="calib_data (default) or your files.")] = None,
    seqlen: Annotated[int, typer.Option(help="Tokens per evaluation window.")] = 512,
    stride: Annotated[Optional[int], typer.Option(help="Window stride (default: seqlen, no overlap).")] = None,
    max_windows: Annotated[int, typer.Option(help="Windows per evaluation source.")] = 8,
    humaneval: Annotated[bool, typer.Option("--humaneval", help="Also run HumanEval pass@1 (sandboxed).")] = False,
    humaneval_limit: Annotated[Optional[int], typer.Option(help="Only the first N HumanEval problems.")] = None,
    speed: Annotated[bool, typer.Option("--speed/--no-speed", help="Measure speed and peak RSS.")] = True,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
    out: Annotated[Optional[Path], typer.Option(help="Write report.md, report.json and tradeoff.png here.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out directory.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Accuracy drift (perplexity, KL, top-1), footprint and speed of artifacts against the baseline.

    Examples:

        sc2quant report out/embedded-bnb-int8 out/embedded-gptq-int4-g128 --out reports/today

        sc2quant report out/model-onnx-int4 --baseline ./starcoder2-3b --eval my_code/ --json
    """
    from sc2quant.report import render_markdown, report

    if seqlen < 8 or max_windows < 1 or (stride is not None and stride < 1):
        raise UserError("--seqlen must be at least 8, --max-windows and --stride at least 1")
    with json_safe(as_json):
        result = report(artifacts, baseline=baseline, eval_paths=eval, seqlen=seqlen, stride=stride,
                        max_windows=max_windows, humaneval=humaneval, humaneval_limit=humaneval_limit, device=device,
                        speed=speed, out=out, force=force)
    if as_json:
        print_json(result)
        return
    from rich.markdown import Markdown

    console.print(Markdown(render_markdown(result)))
    if out:
        console.print(f"[green]wrote[/] {out}/report.md, report.json, tradeoff.png")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
