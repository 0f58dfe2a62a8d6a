"""`sc2quant footprint`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from sc2quant.cli.common import JsonOpt, VerboseOpt, app, command, print_json


@app.command("footprint")
@command("footprint")
def footprint_cmd(
    shape: Annotated[str, typer.Option(help="3b, 7b, 15b, or a config.json / model directory.")] = "7b",
    context: Annotated[Optional[int], typer.Option(help="KV cache tokens per sequence (default: the shape's).")] = None,
    batch: Annotated[int, typer.Option(help="Sequences in the KV cache.")] = 1,
    legacy_card: Annotated[bool, typer.Option("--legacy-card", help="Also count as the model card did.")] = False,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Predict the memory of every method (weights, resident bytes, KV cache) without loading a model.

    \b
    Examples:
      sc2quant footprint                     # StarCoder2-7B at its 16384-token context
      sc2quant footprint --shape 15b --context 4096 --batch 8
      sc2quant footprint --shape ./starcoder2-3b/config.json --json
      sc2quant footprint --legacy-card       # the 7B model card's figures explained
    """
    from sc2quant.core.console import out
    from sc2quant.core.tables import Table, show
    from sc2quant.footprint import report, tables

    data = report(shape, context=context, batch=batch, legacy=legacy_card)
    if as_json:
        print_json(data)
        return
    for item in tables(data):
        if isinstance(item, Table):
            show(item)
        else:
            out.print(item, highlight=False, soft_wrap=False)
