"""Log files: rotation removes only the logs sc2quant wrote, never a user's file in the same folder."""

from __future__ import annotations

from pathlib import Path

from sc2quant.core import console


def _ours(folder: Path, i: int) -> Path:
    path = folder / f"{console.LOG_PREFIX}20260101-0000{i:02d}-quantize-{1000 + i}.log"
    path.write_text(f"{console.LOG_MARKER} quantize, pid {1000 + i}\nlibrary noise\n")
    return path


def test_rotation_never_deletes_the_users_logs(tmp_path, monkeypatch):
    """$SC2QUANT_LOG_DIR pointed at a folder of the user's own logs: each run deleted all but the last 30 of them."""
    monkeypatch.setenv("SC2QUANT_LOG_DIR", str(tmp_path))
    users = {"mine.log": b"my own log\n", "0-first.log": b"sorts first\n",
             **{f"build-{i:02d}.log": f"build {i}\n".encode() for i in range(40)}}
    for name, data in users.items():
        (tmp_path / name).write_bytes(data)
    for verb in ("inspect", "report"):
        with console.library_output(verb):
            pass
    for name, data in users.items():
        assert (tmp_path / name).read_bytes() == data, name


def test_rotation_keeps_the_newest_of_our_own_logs(tmp_path, monkeypatch):
    monkeypatch.setenv("SC2QUANT_LOG_DIR", str(tmp_path))
    users = {"mine.log": b"my own log\n", "app.log": b"\x00binary\xff", "sc2quant-notes.log": b"named like ours, not ours\n",
             "sc2quant-19990101-000000-x-1.log": b"# sc2quant log? no: a different first line\n"}
    for name, data in users.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "sub.log").mkdir()
    ours = [_ours(tmp_path, i) for i in range(console.KEEP_LOGS + 10)]
    with console.library_output("inspect") as new:
        pass
    assert new is not None and new.read_text().startswith(f"{console.LOG_MARKER} inspect, pid ")
    for name, data in users.items():
        assert (tmp_path / name).read_bytes() == data, name
    assert (tmp_path / "sub.log").is_dir()
    kept = [p for p in ours if p.exists()]
    assert kept == ours[-console.KEEP_LOGS:]  # the oldest of our own went, the newest stayed


def test_a_new_log_is_rotated_by_the_next_run(tmp_path, monkeypatch):
    monkeypatch.setenv("SC2QUANT_LOG_DIR", str(tmp_path))
    monkeypatch.setattr(console, "KEEP_LOGS", 0)
    (tmp_path / "mine.log").write_text("mine")
    with console.library_output("inspect") as first:
        pass
    with console.library_output("report") as second:
        pass
    assert first is not None and second is not None and not first.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["mine.log", second.name])
    assert (tmp_path / "mine.log").read_text() == "mine"
