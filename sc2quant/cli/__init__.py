"""The command line: `sc2quant <verb>`, one module per verb, each only parsing flags and calling
the verb's library function. Importing this package registers every verb on `app`."""

from sc2quant.cli import export, footprint, formats, inspect, quantize, report, run, serve  # noqa: F401  (registration)
from sc2quant.cli.common import app


def main() -> None:
    from sc2quant.core.console import OutputError, reserve_stdout
    from sc2quant.core.signals import defer_sigint

    defer_sigint()  # a Ctrl-C while the command starts is its to answer (`take_sigint`, serve's StopSignals)
    reserve_stdout()  # `>&-`: descriptor 1 is never taken by a file opened later
    try:
        app()
    except OutputError as exc:  # raised outside a verb's command (`--version`)
        _cannot_write(str(exc))
    finally:
        _flush_stdout()


def _flush_stdout() -> None:
    """stdout closed by its reader (`sc2quant run ... | head`) after the results were written: exit quietly
    with the status a process ended by SIGPIPE shows in a shell (141), as Unix tools do. stdout that cannot
    be written (`>&-`, `>/dev/full`): one line, exit 2."""
    import sys

    from sc2quant.core.console import OutputError, discard_stdout

    try:
        sys.stdout.flush()
    except BrokenPipeError:
        discard_stdout()  # no second error at exit
        raise SystemExit(141) from None
    except OSError as exc:
        _cannot_write(str(OutputError(exc)))


def _cannot_write(message: str) -> None:
    from sc2quant.core.console import console, discard_stdout

    discard_stdout()
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise SystemExit(2)


__all__ = ["app", "main"]
