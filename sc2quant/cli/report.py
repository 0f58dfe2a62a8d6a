"""`sc2quant report`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from sc2quant.cli.common import JsonOpt, app, print_json, user_errors
from sc2quant.core.errors import UserError


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
    dtype: Annotated[str, typer.Option(help="Compute dtype: auto (the CPU's policy), fp32, bf16 or fp16.")] = "auto",
    threads: Annotated[Optional[int], typer.Option(help="CPU threads (default: all).")] = None,
    out: Annotated[Optional[str], typer.Option(help="Write report.md, report.json and tradeoff.png here.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out directory.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Accuracy drift (perplexity, KL, top-1), footprint and speed of artifacts against the baseline.

    Examples:

        sc2quant report out/embedded-bnb-int8 out/embedded-gptq-int4-g128 --out reports/today

        sc2quant report out/model-onnx-int4 --baseline ./starcoder2-3b --eval my_code/ --json
    """
    import contextlib
    import sys

    from sc2quant.core.console import console
    from sc2quant.core.console import out as stdout
    from sc2quant.core.tables import show
    from sc2quant.evaluate.report import report, source_table, summary_line, table

    if seqlen < 8 or max_windows < 1 or (stride is not None and stride < 1):
        raise UserError("--seqlen must be at least 8, --max-windows and --stride at least 1")
    with contextlib.redirect_stdout(sys.stderr):
        result = report(artifacts, baseline=baseline, eval_paths=eval, seqlen=seqlen, stride=stride,
                        max_windows=max_windows, humaneval=humaneval, humaneval_limit=humaneval_limit, device=device,
                        speed=speed, out=out, force=force, threads=threads, dtype=dtype)
    if as_json:
        print_json(result)
        return
    stdout.print(summary_line(result), highlight=False)
    show(table(result))
    show(source_table(result))
    if out:
        console.print(f"[green]wrote[/] {out}/report.md, report.json, tradeoff.png")
