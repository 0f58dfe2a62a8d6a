"""The Typer application and what every verb's command shares: the error wrapper (one line,
exit 2), JSON output, option types. Each verb's command lives in its own module of this
package and only parses flags and calls the verb's library function."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer

from sc2quant.core.console import console, quiet_libraries
from sc2quant.core.errors import UserError

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="sc2quant",
    help="Quantize, export and run StarCoder2 code models, with honest accuracy numbers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
_state = {"debug": False}

ModelArg = Annotated[
    Optional[str],
    typer.Argument(help="Model directory, hub id, or artifact. Omit for the embedded default model.", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]


def version_text() -> str:
    """sc2quant's version, the libraries that shape its results, and this CPU's compute mode."""
    from sc2quant.core.hf import compute_policy
    from sc2quant.core.system import cpu_caps, tool_versions

    versions = tool_versions()
    libs = ", ".join(f"{k} {v}" for k, v in versions.items() if k != "sc2quant")
    plain = compute_policy(None, "cpu")
    nf4 = compute_policy({"quant_method": "bitsandbytes", "load_in_4bit": True}, "cpu")
    return (f"sc2quant {versions.get('sc2quant', '?')}\n{libs}\ncpu: {cpu_caps().describe()}\n"
            f"compute: plain checkpoints in {plain.dtype} ({plain.reason}); bnb 4-bit: {nf4.reason}")


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(version_text() + "\n")
        raise typer.Exit(0)


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show versions and this CPU's compute mode, then exit.")] = False,
) -> None:
    _state["debug"] = debug
    quiet_libraries()


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


def text_or_file(value: str) -> str:
    """Options that take code accept either the text itself or a path to a file holding it."""
    path = Path(value)
    try:
        if len(value) < 4096 and "\n" not in value and path.is_file():
            return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text: convert it first") from exc
    except OSError:  # not a usable path (too long, ...): it is the text itself
        pass
    return value
