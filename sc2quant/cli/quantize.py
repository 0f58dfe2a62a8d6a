"""`sc2quant quantize`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from sc2quant.cli.common import (
    DeviceOpt,
    JsonOpt,
    ModelArg,
    RecipeOpt,
    ThreadsOpt,
    VerboseOpt,
    app,
    command,
    print_json,
    resolve,
)
from sc2quant.quant import QUANTIZERS
from sc2quant.quant.base import QuantizeOptions

D = QuantizeOptions()  # the defaults live in QuantizeOptions, shared with the Python API


@app.command("quantize")
@command("quantize")
def quantize_cmd(
    ctx: typer.Context,
    model: ModelArg = None,
    method: Annotated[str, typer.Option(help=f"{', '.join(QUANTIZERS)}.")] = D.method,
    bits: Annotated[int, typer.Option(help="Weight bits: gptq 2|3|4|8, rtn 2|4|8, bnb 4|8.")] = D.bits,
    group_size: Annotated[int, typer.Option(help="gptq/rtn: group size (32, 64, 128; -1 = per row).")] = D.group_size,
    act_order: Annotated[bool, typer.Option("--act-order/--no-act-order", help="gptq: activation order.")] = D.act_order,
    sym: Annotated[bool, typer.Option("--sym/--asym", help="gptq/rtn: symmetric grid.")] = D.sym,
    damp: Annotated[float, typer.Option(help="gptq: Hessian dampening, in (0, 1).")] = D.damp,
    calib: Annotated[Optional[list[str]], typer.Option(
        help="gptq: calib_data (default), text files, a directory or JSONL (repeatable).")] = None,
    calib_samples: Annotated[int, typer.Option(help="gptq: calibration samples.")] = D.calib_samples,
    calib_seqlen: Annotated[int, typer.Option(help="gptq: tokens per calibration sample.")] = D.calib_seqlen,
    seed: Annotated[int, typer.Option(help="gptq: calibration sampling seed.")] = D.seed,
    quant_type: Annotated[str, typer.Option(help="bnb 4-bit: nf4 or fp4.")] = D.quant_type,
    double_quant: Annotated[bool, typer.Option("--double-quant/--no-double-quant", help="bnb 4-bit: double quant.")]
    = D.double_quant,
    compute_dtype: Annotated[str, typer.Option(help="bnb 4-bit: compute dtype, bf16 or fp32.")] = D.compute_dtype,
    device: DeviceOpt = D.device,
    threads: ThreadsOpt = None,
    out: Annotated[Optional[str], typer.Option(help="Output directory [default: out/<model>-<method>]")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a previous quantize output or an empty directory.")]
    = D.force,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Accept *.bin (pickle) weights.")] = D.allow_pickle,
    recipe: RecipeOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Quantize a StarCoder2 model: GPTQ int4 by default, or bitsandbytes / round-to-nearest.

    \b
    Examples:
      sc2quant quantize --bits 4             # GPTQ int4 g128 of the embedded model
      sc2quant quantize ./starcoder2-3b --method bnb --bits 4 --double-quant
      sc2quant quantize --recipe bnb-int8 --out out/int8
    """
    from sc2quant.core.artifact import read_manifest
    from sc2quant.core.console import console
    from sc2quant.core.system import set_threads
    from sc2quant.quant import quantize

    values, given = resolve(ctx, recipe)
    set_threads(values.pop("threads"))
    if not values["calib"]:
        values["calib"] = D.calib
    path = quantize(QuantizeOptions(**values), given=given)
    if as_json:
        print_json({"artifact": str(path), **read_manifest(path).__dict__})
    else:
        console.print(f"[green]wrote[/] {path}", highlight=False)
