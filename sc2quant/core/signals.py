"""Ctrl-C and SIGTERM, from the program's first line to its last.

A signal handler that raises `KeyboardInterrupt` runs between any two bytecodes: inside an
import, a `__del__` or a library's `except BaseException`, where it can be swallowed (a server
that keeps running after Ctrl-C) or turned into another exit status. So:

- `defer_sigint` (the program's first line): a Ctrl-C is only recorded until a command is ready;
- `take_sigint` (a command starting): Ctrl-C raises `KeyboardInterrupt` again, at once if one was
  recorded, so every verb answers Ctrl-C the same way whenever it comes (exit 130);
- `StopSignals` (`serve`): SIGINT and SIGTERM are recorded, never raised, and handed to callbacks
  that stop the server at its next check; the caller decides the exit status from `signum`.

Nothing here imports more than the standard library: it runs before anything slow.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_pending: list[int] = []  # signals recorded by `_record` and not taken yet


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _record(signum: int, frame: FrameType | None) -> None:
    _pending.append(signum)


def defer_sigint() -> None:
    """Record Ctrl-C (do not raise it) until `take_sigint` or `StopSignals.install` takes it over.

    Only where Python's own handler is installed (a program's main thread): a caller that set
    its own handler, or a test runner, keeps it."""
    if _main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _record)


def take_sigint() -> None:
    """From here Ctrl-C raises `KeyboardInterrupt`; one recorded since start-up raises it now."""
    if _main_thread() and signal.getsignal(signal.SIGINT) is _record:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if _pending:
        _pending.clear()
        raise KeyboardInterrupt


class StopSignals:
    """SIGINT and SIGTERM recorded while installed: `signum` is the first one, `count` how many came,
    and every callback is called (in the main thread, between two bytecodes: keep them to setting
    flags and `loop.call_soon_threadsafe`) for each one. A Ctrl-C recorded since start-up counts."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.count = 0
        self._callbacks: list[Callable[[int], None]] = []
        self._previous: dict[int, Any] = {}

    def install(self) -> StopSignals:
        if _main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        while _pending:
            self._handle(_pending.pop(0), None)
        return self

    def restore(self) -> None:
        """The handlers from before `install` again."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_signal(self, callback: Callable[[int], None]) -> None:
        """Call `callback(signum)` for every signal from now on, and at once if one came already
        (callbacks must be idempotent: a signal arriving during this call may call it twice)."""
        self._callbacks.append(callback)
        if self.signum is not None:
            callback(self.signum)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if self.signum is None:
            self.signum = signum
        for callback in list(self._callbacks):
            callback(signum)
