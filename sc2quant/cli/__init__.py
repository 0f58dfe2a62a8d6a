"""The command line: `sc2quant <verb>`, one module per verb, each only parsing flags and calling
the verb's library function. Importing this package registers every verb on `app`."""

from sc2quant.cli import export, footprint, formats, inspect, quantize, report, run, serve  # noqa: F401  (registration)
from sc2quant.cli.common import app


def main() -> None:
    from sc2quant.core.signals import defer_sigint

    defer_sigint()  # a Ctrl-C while the command starts is its to answer (`take_sigint`, serve's StopSignals)
    app()


__all__ = ["app", "main"]
