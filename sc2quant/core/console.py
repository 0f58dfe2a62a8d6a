"""Terminal output: results on stdout (`out`), progress and messages on stderr (`console`),
one progress display per stage (`progress`, `status`, `track`), and third-party output kept
off the terminal (`library_output`).

Libraries print banners, INFO lines, tqdm bars and C++ warnings on stdout and stderr; a user
cannot act on them and they bury the results. While a command runs, `library_output` sends
file descriptors 1 and 2 (so C/C++ output too), Python's sys.stdout/sys.stderr, `logging` and
`warnings` into a log file under the user cache (`SC2QUANT_LOG_DIR`, default
~/.cache/sc2quant/logs), while `out` and `console` keep writing to the real terminal. With
`--verbose` nothing is redirected. Progress displays draw only on a terminal, and never when
SC2QUANT_NO_PROGRESS is set.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

from rich.console import Console

from sc2quant.core.errors import UserError

if TYPE_CHECKING:
    from rich.progress import Progress

T = TypeVar("T")
LIBRARY_LOGGERS = ("transformers", "torch", "torchao", "bitsandbytes", "accelerate", "optimum", "gptqmodel",
                   "tokenicer", "logbar", "onnxruntime", "onnx", "onnxscript", "onnx_ir", "uvicorn", "httpx",
                   "huggingface_hub", "datasets", "urllib3", "matplotlib")
KEEP_LOGS = 30  # of our own logs (LOG_PREFIX name and LOG_MARKER first line); nothing else in the folder is touched
LOG_PREFIX = "sc2quant-"
LOG_MARKER = "# sc2quant log:"

# Results (tables, text, JSON) go to stdout; progress and messages to stderr, so that
# `sc2quant inspect > f.txt` or `--json | jq` get the results alone.
class _Results(Console):
    def on_broken_pipe(self) -> None:
        """stdout closed by its reader (`| head`): exit quietly with the status a shell shows for a process
        ended by SIGPIPE (141), as Unix tools do (rich's default exits 1, which reads as a failure)."""
        self.quiet = True
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141)

    def _check_buffer(self) -> None:
        try:
            super()._check_buffer()
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise OutputError(exc) from None


class OutputError(UserError):
    """stdout cannot be written (closed: `>&-`; a full disk or /dev/full): the user's environment, not a bug
    (exit 2, one line). A reader that goes away (BrokenPipeError) is not this: it ends quietly, 141."""

    def __init__(self, exc: OSError) -> None:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        super().__init__(f"cannot write the output: {reason} (stdout)")


def reserve_stdout() -> None:
    """With stdout closed (`>&-`) Python sets sys.stdout to None and the next file opened takes descriptor 1,
    so results would land in it (a log file). Descriptor 1 is held by /dev/null opened read-only instead:
    writing the results fails with EBADF, which `OutputError` reports; a command that writes none succeeds."""
    try:
        os.fstat(1)
        return
    except OSError:
        pass
    fd = os.open(os.devnull, os.O_RDONLY)
    if fd != 1:
        os.dup2(fd, 1)
        os.close(fd)
    sys.stdout = open(1, "w", encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115 - lives as stdout


def discard_stdout() -> None:
    """Point descriptor 1 at /dev/null, so that the results still buffered cannot fail a second time at exit."""
    fd = os.open(os.devnull, os.O_WRONLY)
    os.dup2(fd, 1)
    os.close(fd)


out = _Results(soft_wrap=True)
console = Console(stderr=True)
_state: dict[str, Any] = {"log": None}


def write_result(text: str) -> None:
    """Raw result text (generated code) on stdout, flushed at once (streaming)."""
    stream = out.file
    try:
        stream.write(text)
        stream.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise OutputError(exc) from None


def progress_enabled() -> bool:
    return console.is_terminal and not os.environ.get("SC2QUANT_NO_PROGRESS")


def progress(transient: bool = False) -> Progress:
    """A progress display with ETA (on stderr; drawn only on a terminal). rich.progress is imported
    here, not with the module: an app that only generates never draws one (cold start)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
        disable=not progress_enabled(),
        redirect_stdout=False,  # library prints must not reach the terminal through the display
        redirect_stderr=False,
    )


@contextlib.contextmanager
def status(text: str) -> Iterator[None]:
    """A spinner with elapsed time, for a stage whose length is unknown."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True, disable=not progress_enabled(), redirect_stdout=False,
                  redirect_stderr=False) as bar:
        bar.add_task(text, total=None)
        yield


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar (ETA included)."""
    items = list(items) if total is None and not hasattr(items, "__len__") else items
    with progress() as bar:
        task = bar.add_task(description, total=total if total is not None else len(items))  # type: ignore[arg-type]
        for item in items:
            yield item
            bar.advance(task)


def quiet_onnxruntime() -> None:
    """ONNX Runtime (1.29+, Linux included) starts its telemetry when it is imported: a device id and an event
    database under ~/.cache/Microsoft/DeveloperTools/.onnxruntime, and uploads to Microsoft. Off unless the
    user set ORT_DISABLE_TELEMETRY; it must be set before the import (CLI start, `api_output`, onnx_engine)."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


def quiet_libraries() -> None:
    """Silence import-time noise from libraries that a user cannot act on."""
    quiet_onnxruntime()
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("torchao", "torch.utils._pytree", "bitsandbytes", "accelerate", "optimum"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt: inputs will be cast.*")
    warnings.filterwarnings("ignore", message=".*is an Enum subclass.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated.*")
    # our own displays replace transformers' per-tensor bars; transformers is not imported for this
    # (an ONNX export runs without it): it reads these when it is imported, or is told now if it was
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def log_dir() -> Path:
    root = os.environ.get("SC2QUANT_LOG_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / \
        "sc2quant" / "logs"
    return Path(root)


def current_log() -> Path | None:
    """The log file of the command running now (None with --verbose or outside a command)."""
    return _state["log"]


def _new_log(verb: str) -> Path:
    """A new log file, its first line our marker; the oldest of our own logs beyond KEEP_LOGS are removed."""
    folder = log_dir()
    folder.mkdir(parents=True, exist_ok=True)
    ours = sorted(p for p in folder.glob(LOG_PREFIX + "*.log") if _is_our_log(p))  # names start with the time
    for old in ours[:max(0, len(ours) - KEEP_LOGS)]:
        old.unlink(missing_ok=True)
    path = folder / f"{LOG_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{verb.replace(' ', '-')}-{os.getpid()}.log"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(f"{LOG_MARKER} {verb}, pid {os.getpid()}, {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
    return path


def _is_our_log(path: Path) -> bool:
    """A log sc2quant wrote: our name prefix and our marker on its first line (a user's *.log is never rotated)."""
    try:
        with open(path, "rb") as fh:
            return path.is_file() and not path.is_symlink() and fh.read(len(LOG_MARKER)) == LOG_MARKER.encode()
    except OSError:
        return False


def _own_stream(stream: IO[str], saved_fd: int) -> IO[str]:
    """A stream on the real terminal for `out`/`console` while fd 1/2 point at the log.

    A stream backed by fd 1 or 2 gets a duplicate of the saved descriptor; anything else (a test
    runner's buffer) stays as it is.
    """
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return stream
    if fd not in (1, 2):
        return stream
    return os.fdopen(os.dup(saved_fd), "w", buffering=1, encoding=getattr(stream, "encoding", None) or "utf-8",
                     errors="replace")


@contextlib.contextmanager
def library_output(verb: str, verbose: bool = False) -> Iterator[Path | None]:
    """Third-party output of the block goes to a log file (path yielded); ours to the terminal."""
    quiet_libraries()
    if verbose:
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).setLevel(logging.INFO)
        _state["verbose"] = True  # the user asked to see library output: api_output leaves it alone
        try:
            yield None
        finally:
            _state["verbose"] = False
        return
    try:
        path = _new_log(verb)
        log = open(path, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115 - closed below
    except OSError:  # no writable cache: fall back to discarding, never fail the command for a log
        path, log = None, open(os.devnull, "w")  # noqa: SIM115
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    files = {"out": out._file, "console": console._file}  # None: follow sys.stdout/sys.stderr (rich's default)
    mine = [_own_stream(sys.stdout, saved[1]), _own_stream(sys.stderr, saved[2])]
    out.file, console.file = mine
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.handlers, root.level = [handler], logging.INFO
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    logging.captureWarnings(True)
    _state["log"] = path
    try:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            yield path
    finally:
        for stream in (*mine, log):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        for stream in mine:
            if stream is not None and stream not in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
                with contextlib.suppress(Exception):
                    if stream.fileno() not in (0, 1, 2):
                        stream.close()
        out._file, console._file = files["out"], files["console"]
        root.handlers, root.level = handlers, level
        logging.captureWarnings(False)
        quiet_libraries()
        _state["log"] = None
        log.close()


API_OUTPUT_ENV = "SC2QUANT_LIBRARY_OUTPUT"  # "stderr": the Python API sends library output to stderr, not a log file


@contextlib.contextmanager
def api_output(verb: str) -> Iterator[None]:
    """Around a public Python API call (`load`, `quantize`, `export_onnx`, `report`): nothing that
    sc2quant calls writes to file descriptor 1, which belongs to the application (a language server
    speaking JSON-RPC over stdio, say). Library output goes to the log file, as in the CLI, or to
    stderr with SC2QUANT_LIBRARY_OUTPUT=stderr; the caller's logging setup is restored afterwards.
    Inside a CLI verb or another API call (already redirected) it does nothing."""
    quiet_onnxruntime()
    if _state["log"] is not None or _state.get("api") or _state.get("verbose"):
        yield
        return
    _state["api"] = True
    # the libraries' loggers as the caller left them (importing transformers, or quiet_libraries, changes them)
    saved = {name: (lg.level, lg.handlers[:], lg.propagate) for name in LIBRARY_LOGGERS
             for lg in [logging.getLogger(name)]}
    try:
        if os.environ.get(API_OUTPUT_ENV) == "stderr":
            with _stdout_to_stderr():
                yield
        else:
            with library_output(verb):
                yield
    finally:
        _state["api"] = False
        for name in LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            level, logger.handlers[:], logger.propagate = saved[name]
            logger.setLevel(level)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved, 1)
        os.close(saved)
