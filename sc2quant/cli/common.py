"""The Typer application and what every verb's command shares.

- `command(verb)`: third-party output goes to a log file while the command runs (`--verbose`
  shows it instead); a `UserError` becomes one line on stderr and exit status 2; an unexpected
  error one line naming the log (which holds the traceback) and exit status 1; Ctrl-C exit 130.
- `resolve(ctx, recipe)`: defaults < `--recipe` < flags given, for every verb, and the set of
  options the user set (by flag or recipe), which the verbs use to refuse options that do not apply.
- Option types shared by several verbs.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import textwrap
import traceback
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.markup import escape

from sc2quant.core.console import console, current_log, library_output, quiet_libraries, write_result
from sc2quant.core.errors import UserError
from sc2quant.core.extras import missing_extra
from sc2quant.core.signals import take_sigint

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="sc2quant",
    help="Quantize, export and run StarCoder2 code models, with honest accuracy numbers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: flags shown as flags, examples kept as written
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
_state = {"debug": False}
NOT_RECIPE_KEYS = ("ctx", "recipe", "as_json", "verbose")

ModelArg = Annotated[Optional[str], typer.Argument(
    help="Model directory, hub id, or artifact. Omit for the embedded default model.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show the libraries' own output (else: a log file).")]
RecipeOpt = Annotated[Optional[str], typer.Option(help="YAML recipe (a path or a name in recipes/); flags override it.")]
ThreadsOpt = Annotated[Optional[int], typer.Option(help="CPU threads (default: all).")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda or auto.")]
DtypeOpt = Annotated[str, typer.Option(help="Compute dtype: auto (this CPU's policy), fp32, bf16 or fp16.")]
VerifyOpt = Annotated[bool, typer.Option("--verify/--no-verify", help="Check artifact checksums first.")]
EngineOpt = Annotated[str, typer.Option(
    help="auto (the artifact's fastest engine that can take it: GPTQ on a CPU runs in ONNX Runtime, converted "
         "once, when its grid allows), torch or onnx.")]


def version_text() -> str:
    """sc2quant's version, the libraries that shape its results, and this CPU's compute mode."""
    from sc2quant.core.hf import compute_policy
    from sc2quant.core.system import cpu_caps, tool_versions

    versions = tool_versions()
    libs = ", ".join(f"{k} {v}" for k, v in versions.items() if k != "sc2quant")
    plain = compute_policy(None, "cpu")
    nf4 = compute_policy({"quant_method": "bitsandbytes", "load_in_4bit": True}, "cpu")
    lines = [f"sc2quant {versions.get('sc2quant', '?')}", libs, f"cpu: {cpu_caps().describe()}",
             f"compute: plain checkpoints in {plain.dtype} ({plain.reason}); bnb 4-bit: {nf4.reason}"]
    # wrapped between words at 80 columns, continuation lines indented
    return "\n".join(textwrap.fill(line, width=80, subsequent_indent="  ", break_on_hyphens=False) for line in lines)


def _version(value: bool) -> None:
    if value:
        with library_output("version"):  # importing bitsandbytes to ask it logs a warning
            text = version_text()
        write_result(text + "\n")
        raise typer.Exit(0)


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show versions and this CPU's compute mode, then exit.")] = False,
) -> None:
    _state["debug"] = debug
    quiet_libraries()


INTERRUPTED = {verb: "[bold red]interrupted[/]: nothing was written" for verb in ("quantize", "export onnx", "report")}
INTERRUPTED["serve"] = "stopped"


def command(verb: str, own_signals: bool = False) -> Callable[[F], F]:
    """Wrap a verb's command: library output to a log, one-line errors with the right exit status.

    own_signals: the command installs its own SIGINT/SIGTERM handling (serve's `StopSignals`, which
    takes over a Ctrl-C recorded since start-up); otherwise Ctrl-C raises KeyboardInterrupt from here.
    """

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                with library_output(verb, verbose=bool(kwargs.get("verbose"))):
                    try:
                        if not own_signals:
                            take_sigint()
                        return fn(*args, **kwargs)
                    except (UserError, KeyboardInterrupt, typer.Exit):
                        raise
                    except BrokenPipeError:  # the reader of stdout went away (`| head`): not an error of ours
                        _close_stdout()
                        raise typer.Exit(141) from None
                    except Exception as exc:
                        if isinstance(exc, ModuleNotFoundError) and (missing := missing_extra(exc, verb)):
                            raise missing from None  # an extra not installed: which one, in one line
                        if _state["debug"]:
                            raise
                        logging.getLogger("sc2quant").error("unexpected error\n%s", traceback.format_exc())
                        raise _Internal(current_log()) from None
            except UserError as exc:
                if _state["debug"]:
                    raise
                console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None
            except _Internal as exc:
                where = f"the traceback is in {exc.log}" if exc.log else "run again with --debug for the traceback"
                console.print(f"[bold red]error:[/] sc2quant {verb} failed unexpectedly (a bug): {where}",
                              highlight=False, soft_wrap=True)
                raise typer.Exit(1) from None
            except KeyboardInterrupt:  # Ctrl-C: a verb that writes says its output was not; serve simply stopped
                console.print(INTERRUPTED.get(verb, "[bold red]interrupted[/]"))
                raise typer.Exit(130) from None

        return wrapper  # type: ignore[return-value]

    return decorate


def _close_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit raises nothing more."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class _Internal(Exception):
    def __init__(self, log: Path | None) -> None:
        super().__init__(str(log))
        self.log = log


def resolve(ctx: typer.Context, recipe: str | None) -> tuple[dict[str, Any], set[str]]:
    """The command's option values after the recipe (defaults < recipe < flags given), and the
    names the user set (by flag or recipe)."""
    from sc2quant.core.recipes import load_recipe

    names = [k for k in ctx.params if k not in NOT_RECIPE_KEYS]
    # by name: typer ships its own copy of click, whose ParameterSource is not click's
    given = {k for k in names if getattr(ctx.get_parameter_source(k), "name", "DEFAULT") != "DEFAULT"}
    values = {k: ctx.params[k] for k in names}
    if recipe:
        hints = typing.get_type_hints(ctx.command.callback)
        for key, value in load_recipe(recipe, {k: hints[k] for k in names}).items():
            if key not in given:
                values[key] = value
                given.add(key)
    return values, given


def print_json(data: Any) -> None:
    write_result(json.dumps(data, indent=2, default=str) + "\n")


def text_or_file(value: str) -> str:
    """Options that take code accept either the text itself or a path to a file holding it."""
    path = Path(value)
    try:
        if len(value) < 4096 and "\n" not in value and path.is_file():
            return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text: convert it first") from exc
    except (OSError, ValueError):  # not a usable path (too long, a NUL, a lone surrogate...): the text itself
        pass
    return value
