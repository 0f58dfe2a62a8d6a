"""`sc2quant run`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from sc2quant.cli.common import (
    DeviceOpt,
    DtypeOpt,
    EngineOpt,
    ModelArg,
    RecipeOpt,
    ThreadsOpt,
    VerboseOpt,
    VerifyOpt,
    app,
    command,
    resolve,
    text_or_file,
)
from sc2quant.core.errors import UserError


@app.command("run")
@command("run")
def run_cmd(
    ctx: typer.Context,
    model: ModelArg = None,
    prompt: Annotated[Optional[str], typer.Option(help="Text to complete (or a file holding it).")] = None,
    fim_prefix: Annotated[Optional[str], typer.Option(help="Fill-in-the-middle: the code before the gap (or a file).")]
    = None,
    fim_suffix: Annotated[Optional[str], typer.Option(help="Fill-in-the-middle: the code after the gap (or a file).")]
    = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop string (repeatable).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Sampling seed [default: random when sampling]")] = None,
    stream: Annotated[bool, typer.Option("--stream", help="Print tokens as they are generated.")] = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    engine: EngineOpt = "auto",
    threads: ThreadsOpt = None,
    verify: VerifyOpt = True,
    recipe: RecipeOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Generate code with any artifact (or the embedded model): completion or fill-in-the-middle.

    Completion prints the prompt and its continuation; fill-in-the-middle prints the middle.

    \b
    Examples:
      sc2quant run --prompt "def fibonacci(n):"
      sc2quant run out/embedded-gptq-int4-g128 --prompt prompt.py --stream
      sc2quant run --fim-prefix before.py --fim-suffix after.py
    """
    from sc2quant.core.console import write_result
    from sc2quant.core.system import check_threads
    from sc2quant.runtime import Sampling, load

    v, given = resolve(ctx, recipe)
    fim = {"fim_prefix", "fim_suffix"} & given
    if v["prompt"] is not None and fim:
        raise UserError("give either --prompt or --fim-prefix/--fim-suffix, not both")
    if v["prompt"] is None and (v["fim_prefix"] is None or v["fim_suffix"] is None):
        raise UserError("give --prompt, or both --fim-prefix and --fim-suffix")
    sampling = dict(max_new_tokens=v["max_new_tokens"], temperature=v["temperature"], top_p=v["top_p"],
                    stop=tuple(v["stop"] or ()), seed=v["seed"])
    Sampling(**sampling).validate()  # before loading a model
    check_threads(v["threads"])
    m = load(v["model"], device=v["device"], verify=v["verify"], threads=v["threads"], dtype=v["dtype"],
             engine=v["engine"])
    if v["prompt"] is not None:
        text, suffix = text_or_file(v["prompt"]), None
    else:
        text, suffix = text_or_file(v["fim_prefix"]), text_or_file(v["fim_suffix"])
    chunks = m.stream_generate(text, suffix=suffix, **sampling)  # every check happens here, before any output
    if suffix is None:
        write_result(text)
    if v["stream"]:
        for chunk in chunks:
            write_result(chunk.text)
    else:
        write_result("".join(chunk.text for chunk in chunks))
    write_result("\n")
