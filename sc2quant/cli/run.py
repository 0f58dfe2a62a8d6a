"""`sc2quant run`."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from sc2quant.cli.common import ModelArg, app, text_or_file, user_errors
from sc2quant.core.errors import UserError


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
    seed: Annotated[Optional[int], typer.Option(help="Sampling seed (default: random when sampling).")] = None,
    stream: Annotated[bool, typer.Option("--stream", help="Print tokens as they are generated.")] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="Compute dtype: auto (the CPU's policy), fp32, bf16 or fp16.")] = "auto",
    threads: Annotated[Optional[int], typer.Option(help="CPU threads (default: all).")] = None,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Check artifact checksums first.")] = True,
) -> None:
    """Generate code with any artifact (or the embedded model): completion or fill-in-the-middle.

    Examples:

        sc2quant run --prompt "def fibonacci(n):"

        sc2quant run out/embedded-gptq-int4-g128 --prompt prompt.py --max-new-tokens 128 --stream

        sc2quant run out/model-onnx-int4 --fim-prefix before.py --fim-suffix after.py
    """
    from sc2quant.runtime import Sampling, load

    if prompt is None and (fim_prefix is None or fim_suffix is None):
        raise UserError("give --prompt, or both --fim-prefix and --fim-suffix")
    Sampling(max_new_tokens, temperature, top_p, tuple(stop or ()), seed).validate()  # fail before loading a model
    m = load(model, device=device, verify=verify, threads=threads, dtype=dtype)
    args = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop or ())
    if prompt is None:
        sys.stdout.write(m.infill(text_or_file(fim_prefix or ""), text_or_file(fim_suffix or ""), **args) + "\n")
        return
    text = text_or_file(prompt)
    if stream:
        for piece in m.stream(text, **args):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        sys.stdout.write(text + m.generate(text, **args) + "\n")
