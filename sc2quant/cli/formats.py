"""`sc2quant formats`."""

from __future__ import annotations

from sc2quant.cli.common import JsonOpt, VerboseOpt, app, command, print_json


@app.command("formats")
@command("formats")
def formats_cmd(as_json: JsonOpt = False, verbose: VerboseOpt = False) -> None:
    """List the artifact kinds: what each is, the engines that run it on a CPU (fastest first),
    whether vLLM serves it, and its method names (as `sc2quant footprint` counts them).

    \b
    Examples:
      sc2quant formats
      sc2quant formats --json
    """
    from sc2quant.core.tables import Table, show
    from sc2quant.formats import FORMATS

    rows = [fmt.describe() for fmt in FORMATS.values()]
    if as_json:
        print_json(rows)
        return
    table = Table(["kind", "what it is", "engines (cpu)", "vLLM", "methods"])
    for row in rows:
        methods = row["methods"][:3] + (["..."] if len(row["methods"]) > 3 else [])
        table.add(row["kind"], row["description"], ", ".join(row["engines_cpu"]), "yes" if row["vllm"] else "no",
                  ", ".join(methods))
    show(table)
