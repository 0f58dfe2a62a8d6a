"""`sc2quant quantize`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from sc2quant.cli.common import JsonOpt, ModelArg, app, print_json, user_errors


@app.command("quantize")
@user_errors
def quantize_cmd(
    model: ModelArg = None,
    method: Annotated[Optional[str], typer.Option(help="gptq (default), bnb or rtn.")] = None,
    bits: Annotated[Optional[int], typer.Option(help="Weight bits: gptq 2|3|4|8, rtn 2|4|8, bnb 4|8. Default 4.")] = None,
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
    out: Annotated[Optional[str], typer.Option(help="Output directory (default out/<model>-<method>).")] = None,
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
    import contextlib
    import sys

    from sc2quant.core.artifact import read_manifest
    from sc2quant.core.console import console
    from sc2quant.core.recipes import merge
    from sc2quant.quant import QuantizeOptions, quantize

    overrides = dict(model=model, method=method, bits=bits, group_size=group_size, act_order=act_order, sym=sym,
                     damp=damp, calib=calib, calib_samples=calib_samples, calib_seqlen=calib_seqlen, seed=seed,
                     quant_type=quant_type, double_quant=double_quant, compute_dtype=compute_dtype, device=device,
                     out=out, force=force, allow_pickle=allow_pickle)
    with contextlib.redirect_stdout(sys.stderr):  # GPTQModel prints to stdout: keep stdout for results
        path = quantize(merge(QuantizeOptions, recipe, overrides))
    if as_json:
        print_json({"artifact": str(path), **read_manifest(path).__dict__})
    else:
        console.print(f"[green]wrote[/] {path}")
