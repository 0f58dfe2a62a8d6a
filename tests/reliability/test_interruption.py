"""Killing `quantize` / `export onnx` at random moments never leaves a complete-looking output.

Each trial starts the real CLI on the embedded model and sends SIGINT or SIGKILL after a
random delay within the run's measured duration. Afterwards the output path either does
not exist or is a complete artifact that verifies; after SIGINT no temporary directory is
left; after SIGKILL the leftover temporary directory is removed by the next run, which
succeeds.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sc2quant.core import artifact

pytestmark = pytest.mark.slow
TRIALS = 10

COMMANDS = {
    "quantize": ["quantize", "--method", "bnb", "--bits", "8"],
    "export": ["export", "onnx", "--weights", "int4"],
}


def _start(verb: str, out: Path) -> subprocess.Popen:
    env = {**os.environ, "SC2QUANT_NO_PROGRESS": "1"}
    return subprocess.Popen([sys.executable, "-m", "sc2quant", *COMMANDS[verb], "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def _full_run_seconds(verb: str, folder: Path) -> float:
    t = time.monotonic()
    proc = _start(verb, folder / "reference")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-2000:]
    artifact.verify(folder / "reference")
    return time.monotonic() - t


def _assert_no_complete_looking_output(out: Path) -> None:
    if out.exists():  # only possible if the kill came after the final rename: then it is complete
        artifact.verify(out)


def _leftovers(folder: Path, name: str = "") -> list[Path]:
    return list(folder.glob(artifact.TMP_PREFIX + name + "*"))


@pytest.mark.parametrize("verb", list(COMMANDS))
def test_random_interrupts(verb, tmp_path, embedded_model_dir):
    duration = _full_run_seconds(verb, tmp_path)
    rng = random.Random(1234)
    for trial in range(2 * TRIALS):
        sig = signal.SIGINT if trial % 2 == 0 else signal.SIGKILL
        out = tmp_path / f"out-{trial}"
        proc = _start(verb, out)
        time.sleep(rng.uniform(0.2, duration))
        proc.send_signal(sig)
        proc.communicate(timeout=120)
        _assert_no_complete_looking_output(out)
        if sig == signal.SIGINT and proc.returncode != 0:
            assert not _leftovers(tmp_path, out.name + "-"), f"SIGINT left a temporary directory (trial {trial})"
    # a rerun after all that cleans whatever SIGKILL left and succeeds
    final = _start(verb, tmp_path / "final")
    _, err = final.communicate(timeout=600)
    assert final.returncode == 0, err.decode()[-2000:]
    artifact.verify(tmp_path / "final")
    assert not _leftovers(tmp_path)
