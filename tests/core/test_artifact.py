"""The artifact module: atomic writes, checksums, refusal of tampered artifacts."""

from __future__ import annotations

import json
import os

import pytest

from sc2quant.core import artifact
from sc2quant.core.errors import IntegrityError, UserError


def _make(tmp_path, name="art", force=False):
    out = tmp_path / name
    with artifact.staging(out, force) as tmp:
        (tmp / "model.safetensors").write_bytes(b"weights" * 100)
        (tmp / "config.json").write_text("{}")
        artifact.commit(tmp, out, artifact.Manifest(kind="hf", method="bf16"), force)
    return out


def test_commit_writes_manifest_with_checksums(tmp_path):
    out = _make(tmp_path)
    m = artifact.read_manifest(out)
    assert set(m.files) == {"model.safetensors", "config.json"}
    assert m.files["model.safetensors"]["sha256"] == artifact.sha256_file(out / "model.safetensors")
    assert m.tools["torch"] and m.created
    assert artifact.verify(out).kind == "hf"
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no temporary directory left


def test_failure_leaves_nothing(tmp_path):
    out = tmp_path / "art"
    with pytest.raises(RuntimeError), artifact.staging(out) as tmp:
        (tmp / "half.safetensors").write_bytes(b"x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_keyboard_interrupt_leaves_nothing(tmp_path):
    out = tmp_path / "art"
    with pytest.raises(KeyboardInterrupt), artifact.staging(out):
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_stale_tmp_of_dead_process_is_cleaned(tmp_path):
    stale = tmp_path / (artifact.TMP_PREFIX + "art-xyz")
    stale.mkdir()
    (stale / ".pid").write_text("999999999")
    alive = tmp_path / (artifact.TMP_PREFIX + "other-abc")
    alive.mkdir()
    (alive / ".pid").write_text(str(os.getpid()))
    _make(tmp_path)
    assert not stale.exists() and alive.exists()


def test_existing_output_and_file_output(tmp_path):
    _make(tmp_path)
    with pytest.raises(UserError, match="already exists"):
        _make(tmp_path)
    _make(tmp_path, force=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        _make(tmp_path, name="file")


def test_read_only_location(tmp_path, monkeypatch):
    """Root ignores permission bits here, so the kernel's answer is simulated."""
    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setattr(artifact.os, "access", lambda path, mode: False)
    with pytest.raises(UserError, match="permission denied"):
        _make(ro)
    assert list(ro.iterdir()) == []


def test_disk_full_is_a_clear_error(tmp_path, monkeypatch):
    out = tmp_path / "art"
    with pytest.raises(UserError, match="disk is full"), artifact.staging(out) as tmp:
        raise OSError(28, "No space left on device", str(tmp / "model.safetensors"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tamper,message", [
    (lambda d: (d / "model.safetensors").write_bytes(b"Weights" * 100), "does not match its checksum"),
    (lambda d: (d / "model.safetensors").write_bytes(b"weights" * 99), "does not match its checksum"),
    (lambda d: (d / "model.safetensors").unlink(), "is missing"),
    (lambda d: (d / "extra.safetensors").write_bytes(b"x"), "unexpected weight file"),
    (lambda d: (d / "sc2quant.json").write_text("{"), "not valid JSON"),
])
def test_tampering_is_refused(tmp_path, tamper, message):
    out = _make(tmp_path)
    tamper(out)
    with pytest.raises(IntegrityError, match=message):
        artifact.verify(out)


def test_manifest_pointing_outside_is_refused(tmp_path):
    out = _make(tmp_path)
    (tmp_path / "elsewhere.safetensors").write_bytes(b"x")
    data = json.loads((out / "sc2quant.json").read_text())
    data["files"]["../elsewhere.safetensors"] = data["files"].pop("model.safetensors")
    (out / "sc2quant.json").write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match="outside the artifact"):
        artifact.verify(out)


def test_update_metrics_keeps_checksums_valid(tmp_path):
    out = _make(tmp_path)
    artifact.update_metrics(out, {"kl": 0.1})
    assert artifact.verify(out).metrics == {"kl": 0.1}
