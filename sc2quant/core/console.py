"""Terminal output: results on stdout (`out`), progress and messages on stderr (`console`),
progress bars with ETA, and the silencing of third-party libraries."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

# Results (tables, text, JSON) go to stdout; progress and messages to stderr, so that
# `sc2quant inspect > f.txt` or `--json | jq` get the results alone.
out = Console()
console = Console(stderr=True)


def progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=os.environ.get("SC2QUANT_NO_PROGRESS") == "1",
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar (ETA included)."""
    items = list(items) if total is None and not hasattr(items, "__len__") else items
    with progress() as bar:
        task = bar.add_task(description, total=total if total is not None else len(items))  # type: ignore[arg-type]
        for item in items:
            yield item
            bar.advance(task)


def quiet_libraries() -> None:
    """Silence import-time noise from optional libraries that a user cannot act on."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in ("torchao", "torch.utils._pytree", "bitsandbytes", "accelerate", "optimum"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt: inputs will be cast.*")
    warnings.filterwarnings("ignore", message=".*is an Enum subclass.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated.*")
    try:  # our own status line replaces transformers' per-tensor bars; its warnings are ours to phrase
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
