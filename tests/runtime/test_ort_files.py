"""What loading an ONNX export leaves in the user's home: nothing outside the sc2quant cache.

ONNX Runtime 1.29+ starts its own telemetry on Linux when it is imported: a device id and an event
database (`~/.cache/Microsoft/DeveloperTools/.onnxruntime/onnxruntime.db*`) and uploads to Microsoft,
unless ORT_DISABLE_TELEMETRY is set before the import (it also stays off in CI, which ORT detects by
these variables: the child process runs without them, as on a user's machine)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
# what turns ORT's telemetry off by itself (ORT_DISABLE_TELEMETRY, its CI detection): left out of the child
ORT_SWITCHES = ("ORT_DISABLE_TELEMETRY", "ORT_RUNNING_UNIT_TESTS", "CI", "TF_BUILD", "GITHUB_ACTIONS", "GITLAB_CI",
                "CIRCLECI", "TRAVIS", "JENKINS_URL", "CODEBUILD_BUILD_ID", "BUILDKITE", "TEAMCITY_VERSION", "APPVEYOR",
                "BITBUCKET_BUILD_NUMBER")
API = "import sys, sc2quant; print(sc2quant.load(sys.argv[1], threads=1).generate('def f(', max_new_tokens=2))"


def _written_outside_the_cache(args: list[str], tmp_path: Path) -> list[str]:
    home, logs = tmp_path / "home", tmp_path / "logs"
    cache = home / "sc2quant-cache"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ORT_SWITCHES and not k.startswith("XDG_")}
    env.update(HOME=str(home), SC2QUANT_CACHE=str(cache), SC2QUANT_LOG_DIR=str(logs), SC2QUANT_NO_PROGRESS="1")
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return sorted(str(p.relative_to(home)) for p in home.rglob("*") if p != cache and cache not in p.parents)


def test_loading_an_onnx_export_writes_nothing_in_home_outside_the_cache(tiny_onnx_artifact, tmp_path):
    """Found by the red team: every load wrote ~/.cache/Microsoft/DeveloperTools/.onnxruntime/onnxruntime.db*."""
    assert _written_outside_the_cache([sys.executable, "-c", API, str(tiny_onnx_artifact)], tmp_path) == []


def test_the_cli_writes_nothing_in_home_outside_the_cache(tiny_onnx_artifact, tmp_path):
    args = [sys.executable, "-m", "sc2quant", "run", str(tiny_onnx_artifact), "--prompt", "def f(", "--max-new-tokens", "2"]
    assert _written_outside_the_cache(args, tmp_path) == []


def test_a_user_who_set_the_switch_keeps_it():
    code = "import os, sc2quant.runtime.engines.onnx_engine; print(os.environ['ORT_DISABLE_TELEMETRY'])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "ORT_DISABLE_TELEMETRY": "0"})
    assert done.stdout.strip() == "0", done.stderr
