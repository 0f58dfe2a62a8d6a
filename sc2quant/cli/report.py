"""`sc2quant report`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from sc2quant.cli.common import (
    DeviceOpt,
    DtypeOpt,
    EngineOpt,
    JsonOpt,
    RecipeOpt,
    ThreadsOpt,
    VerboseOpt,
    app,
    command,
    print_json,
    resolve,
)
from sc2quant.core.errors import UserError


@app.command("report")
@command("report")
def report_cmd(
    ctx: typer.Context,
    artifacts: Annotated[list[str], typer.Argument(help="Artifacts (or model directories) to measure.")],
    baseline: Annotated[Optional[str], typer.Option(help="Baseline model [default: the embedded model]")] = None,
    eval: Annotated[Optional[list[str]], typer.Option("--eval", help="calib_data (default) or your files.")] = None,
    seqlen: Annotated[int, typer.Option(help="Tokens per evaluation window.")] = 512,
    stride: Annotated[Optional[int], typer.Option(help="Window stride [default: seqlen, no overlap]")] = None,
    max_windows: Annotated[int, typer.Option(help="Windows per evaluation source.")] = 8,
    humaneval: Annotated[bool, typer.Option("--humaneval", help="Also run HumanEval pass@1 (sandboxed).")] = False,
    humaneval_limit: Annotated[Optional[int], typer.Option(help="Only the first N HumanEval problems.")] = None,
    speed: Annotated[bool, typer.Option("--speed/--no-speed", help="Measure speed and peak RSS.")] = True,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    engine: EngineOpt = "auto",
    threads: ThreadsOpt = None,
    out: Annotated[Optional[str], typer.Option(help="Write report.md, report.json and tradeoff.png here.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a previous report directory.")] = False,
    recipe: RecipeOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Accuracy drift (perplexity, KL, top-1), footprint and speed of artifacts against the baseline.

    \b
    Examples:
      sc2quant report out/embedded-bnb-int8 out/embedded-gptq-int4-g128
      sc2quant report out/model-onnx-int4 --baseline ./starcoder2-3b --eval src/
      sc2quant report out/a out/b --out reports/today --json
    """
    from sc2quant.core.console import console
    from sc2quant.core.console import out as stdout
    from sc2quant.core.system import check_threads
    from sc2quant.core.tables import show
    from sc2quant.evaluate.report import report, source_table, summary_line, table

    v, given = resolve(ctx, recipe)
    if v["seqlen"] < 8 or v["max_windows"] < 1 or (v["stride"] is not None and v["stride"] < 1):
        raise UserError("--seqlen must be at least 8, --max-windows and --stride at least 1")
    if "humaneval_limit" in given and not v["humaneval"]:
        raise UserError("--humaneval-limit applies to --humaneval only: add --humaneval or drop the limit")
    check_threads(v["threads"])
    result = report(v["artifacts"], baseline=v["baseline"], eval_paths=v["eval"], seqlen=v["seqlen"],
                    stride=v["stride"], max_windows=v["max_windows"], humaneval=v["humaneval"],
                    humaneval_limit=v["humaneval_limit"], device=v["device"], speed=v["speed"], out=v["out"],
                    force=v["force"], threads=v["threads"], dtype=v["dtype"], engine=v["engine"])
    if as_json:
        print_json(result)
        return
    stdout.print(summary_line(result), highlight=False)
    show(table(result))
    show(source_table(result))
    if v["out"]:
        console.print(f"[green]wrote[/] {v['out']}/report.md, report.json, tradeoff.png", highlight=False)
