"""`sc2quant inspect`."""

from __future__ import annotations

from sc2quant.cli.common import JsonOpt, ModelArg, VerboseOpt, app, command, print_json


@app.command("inspect")
@command("inspect")
def inspect_cmd(model: ModelArg = None, as_json: JsonOpt = False, verbose: VerboseOpt = False) -> None:
    """Show what the loader sees: architecture, shape, dtype, parameters, bytes on disk.

    \b
    Examples:
      sc2quant inspect                       # the embedded default model
      sc2quant inspect ./starcoder2-3b --json
    """
    from sc2quant.core.tables import show
    from sc2quant.inspect import inspect_model, table

    info = inspect_model(model)
    if as_json:
        print_json(info)
    else:
        show(table(info))
