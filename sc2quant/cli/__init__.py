"""The command line: `sc2quant <verb>`, one module per verb, each only parsing flags and calling
the verb's library function. Importing this package registers every verb on `app`."""

from sc2quant.cli import export, footprint, formats, inspect, quantize, report, run, serve  # noqa: F401  (registration)
from sc2quant.cli.common import app


def main() -> None:
    from sc2quant.core.signals import defer_sigint

    defer_sigint()  # a Ctrl-C while the command starts is its to answer (`take_sigint`, serve's StopSignals)
    try:
        app()
    finally:
        _flush_stdout()


def _flush_stdout() -> None:
    """stdout closed by its reader (`sc2quant run ... | head`) after the results were written: exit quietly
    with the status a process ended by SIGPIPE shows in a shell (141), as Unix tools do."""
    import os
    import sys

    try:
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        raise SystemExit(141) from None


__all__ = ["app", "main"]
