"""`known_sha256`: a file's checksum is not computed again while the file is provably unchanged since
it was (same inode, size, modification and change time), and is whenever anything about it changed."""

from __future__ import annotations

import json
import os
import time

import pytest

from sc2quant.core import artifact, files
from sc2quant.core.errors import IntegrityError


@pytest.fixture
def counted(tmp_path, monkeypatch):
    monkeypatch.setenv("SC2QUANT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(files, "SETTLED_NS", 0)  # the file below is seconds old at most
    calls = []
    real = files.sha256_file

    def counting(path, *a, **k):
        calls.append(path)
        return real(path, *a, **k)

    monkeypatch.setattr(files, "sha256_file", counting)
    return calls


def test_an_unchanged_file_is_hashed_once(tmp_path, counted):
    f = tmp_path / "w.bin"
    f.write_bytes(os.urandom(1 << 16))
    first = files.known_sha256(f)
    assert files.known_sha256(f) == first == files.sha256_file(f) and len(counted) == 2  # the last call is ours


@pytest.mark.parametrize("change", ["same size", "times restored", "replaced", "appended"])
def test_any_change_is_hashed_again(tmp_path, counted, change):
    f = tmp_path / "w.bin"
    data = os.urandom(1 << 16)
    f.write_bytes(data)
    before = files.known_sha256(f)
    info = f.stat()
    time.sleep(0.05)  # past the timestamps' granularity (the two seconds SETTLED_NS waits, shortened here)
    if change == "same size":
        f.write_bytes(bytes(len(data)))
    elif change == "times restored":  # modified, then its modification time set back: the change time moves on
        with open(f, "r+b") as fh:
            fh.write(b"\0" * 16)
        os.utime(f, ns=(info.st_atime_ns, info.st_mtime_ns))
    elif change == "replaced":
        other = tmp_path / "other.bin"
        other.write_bytes(bytes(len(data)))
        os.utime(other, ns=(info.st_atime_ns, info.st_mtime_ns))
        other.replace(f)
    else:
        with open(f, "ab") as fh:
            fh.write(b"x")
    assert files.known_sha256(f) != before and len(counted) == 2


def test_a_record_of_another_state_or_a_broken_one_is_not_believed(tmp_path, counted):
    f = tmp_path / "w.bin"
    f.write_bytes(b"weights")
    truth = files.known_sha256(f)
    [record] = (tmp_path / "cache" / "verified").iterdir()
    data = json.loads(record.read_text())
    record.write_text(json.dumps({**data, "stat": [0, 0, 7, 0, 0], "sha256": "0" * 64}))
    assert files.known_sha256(f) == truth
    record.write_text("{")
    assert files.known_sha256(f) == truth and len(counted) == 3


def test_a_recently_changed_file_is_not_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("SC2QUANT_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"fresh")
    files.known_sha256(f)  # written a moment ago: a write in the same timestamp tick could go unseen
    assert not (tmp_path / "cache" / "verified").exists()


def test_an_unwritable_cache_still_verifies(tmp_path, counted, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("SC2QUANT_CACHE", str(tmp_path / "file" / "cache"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"weights")
    files.known_sha256(f)
    files.known_sha256(f)
    assert len(counted) == 2  # nothing recorded, nothing believed: hashed each time


def test_records_in_a_folder_others_can_write_are_not_believed(tmp_path, counted):
    """A shared cache: anyone able to write there could write a record with the right identity."""
    f = tmp_path / "w.bin"
    f.write_bytes(b"weights")
    files.known_sha256(f)
    folder = tmp_path / "cache" / "verified"
    assert folder.stat().st_mode & 0o777 == 0o700
    os.chmod(folder, 0o777)
    files.known_sha256(f)
    assert len(counted) == 2


def test_verify_catches_damage_after_a_verified_load(onnx_int4_artifact, tmp_path, counted):
    import shutil

    art = tmp_path / "art"
    shutil.copytree(onnx_int4_artifact, art)
    artifact.verify(art)
    hashed = len(counted)
    artifact.verify(art)
    assert len(counted) == hashed  # nothing hashed again
    data = art / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 1
    info = data.stat()
    data.write_bytes(bytes(raw))
    os.utime(data, ns=(info.st_atime_ns, info.st_mtime_ns))
    with pytest.raises(IntegrityError, match="does not match its checksum"):
        artifact.verify(art)


def test_full_verification_on_request_and_a_cache_path_with_a_tilde(tmp_path, counted, monkeypatch):
    """What the identity cannot see (writes through a memory map whose pages were already written move no
    time): SC2QUANT_VERIFY=full hashes every time. And SC2QUANT_CACHE='~/x' is the home's x."""
    f = tmp_path / "w.bin"
    f.write_bytes(b"weights")
    files.known_sha256(f)
    [record] = (tmp_path / "cache" / "verified").iterdir()
    record.write_text(json.dumps({**json.loads(record.read_text()), "sha256": "0" * 64}))  # as if changed unseen
    assert files.known_sha256(f) == "0" * 64
    monkeypatch.setenv("SC2QUANT_VERIFY", "full")
    assert files.known_sha256(f) == files.sha256_file(f) != "0" * 64
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SC2QUANT_CACHE", "~/x")
    assert files.cache_base() == tmp_path / "home" / "x"


@pytest.mark.parametrize("mode", [0o777, 0o770])
def test_records_under_a_cache_root_others_can_write_are_not_believed(tmp_path, counted, mode):
    """Found by the red team: only the records' own folder was checked; whoever can write the cache root
    can put another folder of this user's in its place (a rename keeps its owner and mode)."""
    f = tmp_path / "w.bin"
    f.write_bytes(b"weights")
    files.known_sha256(f)
    root = tmp_path / "cache"
    assert root.stat().st_mode & 0o777 == 0o700  # made private, whatever the umask
    os.chmod(root, mode)
    files.known_sha256(f)
    assert len(counted) == 2


def test_a_record_file_others_can_write_is_not_believed_and_records_are_written_private(tmp_path, counted):
    """Found by the red team: under umask 000 the record files were world-writable inside a private
    folder, so another user could forge one for a tampered file. Records are written 0600 whatever the
    umask, and a record file another user could have written is not believed."""
    f = tmp_path / "w.bin"
    f.write_bytes(os.urandom(1 << 12))
    old = os.umask(0)
    try:
        files.known_sha256(f)
    finally:
        os.umask(old)
    [record] = (tmp_path / "cache" / "verified").glob("*.json")
    assert record.stat().st_mode & 0o777 == 0o600
    files.known_sha256(f)
    assert len(counted) == 1  # believed: its own private record
    forged = json.loads(record.read_text())
    forged["sha256"] = "0" * 64
    record.write_text(json.dumps(forged))
    record.chmod(0o666)  # as another user could have written it
    assert files.known_sha256(f) == files.sha256_file(f) != "0" * 64
