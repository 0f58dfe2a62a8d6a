"""The maintainer tool that trains the embedded model (tools/train_embedded.py) still runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_training_script_runs_a_few_steps(tmp_path):
    out = tmp_path / "model"
    done = subprocess.run([sys.executable, "-m", "tools.train_embedded", "--out", str(out), "--steps", "2",
                           "--max-train-chars", "60000", "--threads", "1"], capture_output=True, text=True, timeout=600,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((out / "training.json").read_text())
    assert record["hyperparameters"]["steps"] == 2 and (out / "model.safetensors").is_file()
