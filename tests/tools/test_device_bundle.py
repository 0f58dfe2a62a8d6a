"""The device bundle tool replaces only a bundle it wrote itself."""

from __future__ import annotations

import pytest


def test_a_folder_that_is_not_a_bundle_is_refused_before_any_download(tmp_path, monkeypatch):
    from tools import device_bundle

    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("mine")
    monkeypatch.setattr(device_bundle, "pip", lambda *a: pytest.fail("downloaded before refusing"))
    with pytest.raises(SystemExit, match="not a bundle this script wrote"):
        device_bundle.main(["--out", str(mine)])
    assert [p.name for p in tmp_path.iterdir()] == ["notes"] and (mine / "todo.txt").read_text() == "mine"


def test_a_failed_build_leaves_neither_a_bundle_nor_a_temporary_folder(tmp_path, monkeypatch):
    from tools import device_bundle

    def offline(*args: str) -> None:
        raise OSError("no network")

    monkeypatch.setattr(device_bundle, "pip", offline)
    with pytest.raises(OSError):
        device_bundle.main(["--out", str(tmp_path / ".device")])
    assert list(tmp_path.iterdir()) == []
