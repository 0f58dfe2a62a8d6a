"""The Typer command line. It only parses flags and calls the library function of each verb."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.table import Table

from sc2quant.console import console
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
