"""The artifact module: atomic writes, checksums, refusal of tampered artifacts."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from sc2quant.core import artifact
from sc2quant.core.errors import IntegrityError, UserError
from sc2quant.core.files import sha256_file


def _make(tmp_path, name="art", force=False, verb="quantize"):
    out = tmp_path / name
    with artifact.staging(out, force, verb) as tmp:
        (tmp / "model.safetensors").write_bytes(b"weights" * 100)
        (tmp / "config.json").write_text("{}")
        artifact.commit(tmp, out, artifact.Manifest(kind="hf", method="bf16", verb=verb), force)
    return out


def test_commit_writes_manifest_with_checksums(tmp_path):
    out = _make(tmp_path)
    m = artifact.read_manifest(out)
    assert set(m.files) == {"model.safetensors", "config.json"}
    assert m.files["model.safetensors"]["sha256"] == sha256_file(out / "model.safetensors")
    assert m.tools["torch"] and m.created
    assert artifact.verify(out).kind == "hf"
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no temporary directory left
    assert not (out / artifact.PID_FILE).exists()


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
    out = tmp_path / "new" / "deeper" / "art"
    with pytest.raises(UserError, match="disk is full"), artifact.staging(out) as tmp:
        raise OSError(28, "No space left on device", str(tmp / "model.safetensors"))
    assert list(tmp_path.iterdir()) == []  # the parents it created are gone too


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


# --- what --force may replace -------------------------------------------------------------


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


@pytest.mark.parametrize("out,message", [
    ("", "--out is empty"), (".", "working directory"), ("..", "working directory"), ("/", "working directory"),
    ("/dev/null/x", "/dev/null is not a directory"),
])
def test_paths_that_are_never_outputs(workdir, out, message):
    for force in (False, True):
        with pytest.raises(UserError, match=message):
            artifact.check_output_path(artifact.output_path(out, Path("x")), force, "quantize")


def test_force_never_replaces_an_input_or_its_parent(workdir):
    model = workdir / "models" / "starcoder2-3b"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    for out in (model, model.parent, workdir / "models" / "starcoder2-3b" / ".."):
        with pytest.raises(UserError, match="an input of this command"):
            artifact.check_output_path(out, True, "quantize", [model])
    link = workdir / "link"
    link.symlink_to(model)
    with pytest.raises(UserError, match="an input of this command"):
        artifact.check_output_path(link, True, "quantize", [model])
    assert (model / "config.json").read_text() == "{}"


def test_force_replaces_only_empty_dirs_and_the_same_verbs_outputs(workdir):
    mine = workdir / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="has no sc2quant.json"):
        _make(workdir, "mine", force=True)
    assert (mine / "notes.txt").read_text() == "keep me"
    (workdir / "empty").mkdir()
    _make(workdir, "empty", force=True)  # an empty directory is fine
    exported = _make(workdir, "exported", verb="export onnx")
    with pytest.raises(UserError, match="written by `sc2quant export onnx`"):
        _make(workdir, "exported", force=True, verb="quantize")
    assert artifact.read_manifest(exported).verb == "export onnx"
    _make(workdir, "exported", force=True, verb="export onnx")  # its own previous output
    legacy = _make(workdir, "legacy")
    data = json.loads((legacy / "sc2quant.json").read_text())
    del data["verb"]  # a manifest written before manifests said which verb wrote them
    (legacy / "sc2quant.json").write_text(json.dumps(data))
    _make(workdir, "legacy", force=True)


def test_force_rechecks_at_rename_time(workdir):
    """Something the user put at --out while we worked is not replaced either."""
    out = workdir / "art"
    with pytest.raises(UserError, match="has no sc2quant.json"), artifact.staging(out, True, "quantize") as tmp:
        (tmp / "model.safetensors").write_bytes(b"x")
        out.mkdir()
        (out / "precious.txt").write_text("mine")
        artifact.commit(tmp, out, artifact.Manifest(kind="hf", method="bf16", verb="quantize"), True)
    assert (out / "precious.txt").read_text() == "mine"
    assert [p.name for p in workdir.iterdir()] == ["art"]


@pytest.mark.parametrize("files", [[], None, {"model.safetensors": {"sha256": "0" * 64}},
                                   {"model.safetensors": {"sha256": "0" * 64, "bytes": "7"}}])
def test_malformed_files_table_is_refused(tmp_path, files):
    out = _make(tmp_path)
    data = json.loads((out / "sc2quant.json").read_text())
    data["files"] = files
    (out / "sc2quant.json").write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match="malformed 'files'"):
        artifact.read_manifest(out)


@pytest.mark.parametrize("name,add", [
    ("notes.txt", lambda d: (d / "notes.txt").write_text("my notes")),
    ("mydata/", lambda d: (d / "mydata").mkdir()),
    ("mydata/a.csv", lambda d: ((d / "mydata").mkdir(), (d / "mydata" / "a.csv").write_text("1,2"))),
    ("config.json (changed)", lambda d: (d / "config.json").write_text('{"edited": true}')),
    ("model.safetensors (missing)", lambda d: (d / "model.safetensors").unlink()),
    ("link", lambda d: (d / "link").symlink_to(d.parent / "elsewhere")),
])
def test_force_never_replaces_an_output_the_user_added_to_or_changed(workdir, name, add):
    out = _make(workdir, "art")
    (workdir / "elsewhere").mkdir()
    add(out)
    before = {p.relative_to(out).as_posix(): (p.read_bytes() if p.is_file() else None) for p in out.rglob("*")}
    with pytest.raises(UserError, match=r"--force will not replace .*" + re.escape(name) + ".*move those files out"):
        _make(workdir, "art", force=True)
    after = {p.relative_to(out).as_posix(): (p.read_bytes() if p.is_file() else None) for p in out.rglob("*")}
    assert after == before
    assert sorted(p.name for p in workdir.iterdir()) == ["art", "elsewhere"]  # no temporary directory left


def test_force_names_the_first_few_foreign_files(workdir):
    out = _make(workdir, "art")
    for i in range(5):
        (out / f"mine{i}.txt").write_text(str(i))
    with pytest.raises(UserError, match=r"mine0.txt, mine1.txt, mine2.txt and 2 more\); move those") as caught:
        _make(workdir, "art", force=True)
    assert "\n" not in str(caught.value)


def test_force_rechecks_the_manifest_at_rename_time(workdir):
    """A file the user drops into the previous output while we work keeps it from being replaced."""
    out = _make(workdir, "art")
    with pytest.raises(UserError, match="notes.txt"), artifact.staging(out, True, "quantize") as tmp:
        (tmp / "model.safetensors").write_bytes(b"x")
        (out / "notes.txt").write_text("mine")
        artifact.commit(tmp, out, artifact.Manifest(kind="hf", method="bf16", verb="quantize"), True)
    assert (out / "notes.txt").read_text() == "mine" and artifact.verify(out)


def test_force_replaces_an_output_that_verifies(workdir):
    out = _make(workdir, "art")
    (out / "sub").mkdir()
    (out / "sub" / "x.bin").write_bytes(b"x")
    data = json.loads((out / "sc2quant.json").read_text())
    data["files"]["sub/x.bin"] = {"sha256": sha256_file(out / "sub" / "x.bin"), "bytes": 1}
    (out / "sc2quant.json").write_text(json.dumps(data))
    _make(workdir, "art", force=True)
    assert not (out / "sub").exists() and set(artifact.verify(out).files) == {"model.safetensors", "config.json"}


def test_an_out_that_is_a_link_or_too_long_is_refused_before_any_work(workdir):
    """Found by the red team: --force on a link replaced the link (the export it pointed to stayed, and a
    hidden link was left behind); a name over 255 bytes ended as "a bug"."""
    target = workdir / "mine"
    target.mkdir()
    link = workdir / "link"
    link.symlink_to(target)
    with pytest.raises(UserError, match="is a link .*give the directory it points to"):
        artifact.output_path(str(link), workdir / "default")
    with pytest.raises(UserError, match="too long for the file system"):
        artifact.output_path(str(workdir / ("a" * 260)), workdir / "default")
    assert link.is_symlink() and sorted(p.name for p in workdir.iterdir()) == ["link", "mine"]
