"""`sc2quant report`: drift per source, footprint, speed, outputs and manifest metrics."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sc2quant.cli import app
from sc2quant.core.artifact import read_manifest, verify

pytestmark = pytest.mark.slow


def test_report_side_by_side(bnb_artifacts, gptq_artifact, onnx_int4_artifact, tmp_path):
    out = tmp_path / "report"
    arts = [bnb_artifacts["int8"], bnb_artifacts["nf4"], gptq_artifact, onnx_int4_artifact]
    result = CliRunner().invoke(app, ["report", *map(str, arts), "--seqlen", "256", "--max-windows", "2",
                                      "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = {m["label"]: m for m in data["models"]}
    assert set(rows) == {"baseline", "bnb-int8", "bnb-nf4", "gptq", "onnx-int4"}
    base = rows["baseline"]["drift"]["all"]
    assert base["kl_mean"] < 1e-9 and base["top1_agreement"] == 1.0
    assert rows["bnb-int8"]["drift"]["all"]["kl_mean"] < rows["bnb-nf4"]["drift"]["all"]["kl_mean"]
    assert {"humaneval", "python", "c", "cpp", "javascript", "tcl", "all"} <= set(rows["gptq"]["drift"])
    for row in rows.values():
        assert row["decode_tokens_per_s"] > 0 and row["prefill_tokens_per_s"] > 0
        assert row["peak_rss_bytes"] > row["weight_bytes_in_memory"] > 0 and row["bytes_on_disk"] > 0
        assert row["drift"]["all"]["kl_p99"] >= row["drift"]["all"]["kl_mean"]
    assert rows["bnb-nf4"]["weight_bytes_in_memory"] < rows["bnb-int8"]["weight_bytes_in_memory"]
    assert {p.name for p in out.iterdir()} == {"report.md", "report.json", "tradeoff.png", "sc2quant.json"}
    assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    assert "| gptq |" in (out / "report.md").read_text()
    m = read_manifest(gptq_artifact)
    assert m.metrics["report"]["drift"]["all"]["kl_mean"] == rows["gptq"]["drift"]["all"]["kl_mean"]
    verify(gptq_artifact)  # writing metrics keeps the checksums valid


def test_report_on_a_read_only_artifact_writes_the_report(tiny_model_dir, tiny_gptq_artifact, tmp_path, monkeypatch):
    """All the measuring was done, then PermissionError on the artifact's manifest, and no report was written.
    Root ignores permission bits: the kernel's answer is simulated."""
    import shutil

    from sc2quant.core import artifact

    art = shutil.copytree(tiny_gptq_artifact, tmp_path / "art")
    before = (art / "sc2quant.json").read_bytes()

    def read_only(path, metrics):
        raise PermissionError(13, "Permission denied", str(path / "sc2quant.json.tmp"))

    monkeypatch.setattr(artifact, "update_metrics", read_only)
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", str(art), "--baseline", str(tiny_model_dir), "--seqlen", "64",
                                      "--max-windows", "1", "--no-speed", "--engine", "torch", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "not writable (Permission denied): its manifest was not updated" in result.stderr
    assert {p.name for p in out.iterdir()} >= {"report.md", "report.json"}
    assert (art / "sc2quant.json").read_bytes() == before and verify(art)
