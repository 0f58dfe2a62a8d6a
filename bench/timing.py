"""Running a peer's tool (llama-bench) in a child process and reading its peak RSS. sc2quant's
own contenders are measured by `sc2quant.evaluate.speed.measure_in_child`, one fresh process each."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

from sc2quant.core.errors import UserError
from sc2quant.core.system import vm_hwm


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants now (0 once it is gone)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def run_child(cmd: list[str], env: dict[str, str] | None = None) -> tuple[str, int]:
    """Run `cmd`, return (stdout, its peak RSS in bytes).

    The peak is the child's VmHWM, read every 20 ms while it runs (a page-table figure of the
    child's own address space), or, when the child starts helpers of its own (sc2quant converts a
    GPTQ checkpoint for ONNX Runtime in a child process), the largest sum of the resident sets of
    the whole process tree seen at one sample, whichever is larger. wait4's ru_maxrss would be
    wrong: Linux carries it across exec, so every child of this (large) process would report at
    least this process's peak.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True,
                                env={**os.environ, "SC2QUANT_NO_PROGRESS": "1", **(env or {})})
        peak = 0
        while proc.poll() is None:
            peak = max(peak, vm_hwm(proc.pid), _tree_rss(proc.pid))
            time.sleep(0.02)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        lines = stderr.strip().splitlines()
        raise UserError(f"{Path(cmd[0]).name} {' '.join(cmd[1:3])} failed: {lines[-1] if lines else 'no output'}")
    return stdout, peak
