"""ONNX Runtime's prepacked weights, saved once and mapped on later loads (runtime/prepacked.py): the
same outputs bit for bit, one entry per artifact, rebuilt when damaged or stale, and never a failed
load because the cache could not be written."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from sc2quant.runtime import load, prepacked

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return"


def _outputs(path: Path) -> np.ndarray:
    """The prompt's last logits and four greedy steps' logits, stacked."""
    model = load(path, prefix_cache_bytes=0)
    state, logits = model.engine.start([model.encode(PROMPT)])
    rows = [logits]
    for _ in range(4):
        logits = model.engine.step(state, logits.argmax(-1))
        rows.append(logits)
    return np.concatenate(rows)


def _entries(cache: Path) -> list[Path]:
    root = cache / prepacked.KIND
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


@pytest.fixture
def artifact_copy(onnx_int4_artifact, tmp_path) -> Path:
    out = tmp_path / "onnx-int4"
    shutil.copytree(onnx_int4_artifact, out)
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SC2QUANT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SC2QUANT_PREPACKED", raising=False)
    return tmp_path / "cache"


def test_mapped_weights_give_the_same_outputs_bit_for_bit(artifact_copy, cache, monkeypatch):
    monkeypatch.setenv("SC2QUANT_PREPACKED", "0")
    plain = _outputs(artifact_copy)
    assert _entries(cache) == []
    monkeypatch.delenv("SC2QUANT_PREPACKED")
    building = _outputs(artifact_copy)
    [entry] = _entries(cache)
    written = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}
    assert set(written) == {prepacked.GRAPH, prepacked.DATA, prepacked.MANIFEST}
    mapped = _outputs(artifact_copy)
    assert np.array_equal(plain, building) and np.array_equal(plain, mapped)
    assert {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == written  # mapped, not built again
    assert json.loads((entry / prepacked.MANIFEST).read_text())["source"] == str(artifact_copy.resolve())


@pytest.mark.parametrize("damage", ["truncated", "rewritten", "times restored", "no manifest", "garbage manifest"])
def test_a_damaged_entry_is_built_again(artifact_copy, cache, damage):
    reference = _outputs(artifact_copy)
    [entry] = _entries(cache)
    data, manifest = entry / prepacked.DATA, entry / prepacked.MANIFEST
    if damage == "truncated":
        with open(data, "r+b") as fh:
            fh.truncate(data.stat().st_size // 2)
    elif damage in ("rewritten", "times restored"):  # same size, other bytes
        info = data.stat()
        time.sleep(0.05)
        with open(data, "r+b") as fh:
            fh.seek(info.st_size // 2)
            fh.write(bytes(4096))
        if damage == "times restored":  # `touch -r`: the change time still moves
            os.utime(data, ns=(info.st_atime_ns, info.st_mtime_ns))
    elif damage == "no manifest":
        manifest.unlink()
    else:
        manifest.write_text("[1, 2")
    assert np.array_equal(_outputs(artifact_copy), reference)
    [again] = _entries(cache)
    assert again == entry and json.loads((again / prepacked.MANIFEST).read_text())["files"][prepacked.DATA][0] > 0


def test_a_changed_artifact_gets_a_new_entry_and_its_old_one_goes(artifact_copy, cache):
    _outputs(artifact_copy)
    [first] = _entries(cache)
    os.utime(artifact_copy / "model.onnx.data")  # re-exported in place, as far as the files' times tell
    _outputs(artifact_copy)
    [second] = _entries(cache)
    assert second != first and not first.exists()


def test_another_artifact_keeps_its_own_entry(artifact_copy, onnx_int4_artifact, cache):
    os.utime(artifact_copy / "model.onnx.data")  # a copy made at another time (copytree kept the times)
    _outputs(artifact_copy)
    _outputs(onnx_int4_artifact)
    assert len(_entries(cache)) == 2
    _outputs(artifact_copy)  # mapped from its own entry, the other one left alone
    assert len(_entries(cache)) == 2


def test_no_cache_to_write_means_a_plain_load_and_one_note(artifact_copy, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("a file where the cache should be")
    monkeypatch.setenv("SC2QUANT_CACHE", str(tmp_path / "file" / "cache"))
    _outputs(artifact_copy)
    err = capsys.readouterr().err
    assert err.count("not saving prepacked weights") == 1 and "SC2QUANT_CACHE" in err


def test_a_full_disk_means_a_plain_load_and_one_note(artifact_copy, cache, monkeypatch, capsys):
    monkeypatch.setattr(prepacked.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    _outputs(artifact_copy)
    assert "GiB free" in capsys.readouterr().err and _entries(cache) == []
    assert not any((cache / prepacked.KIND).glob(".*"))  # nothing half-written left


def test_graphs_without_a_manifest_are_not_cached(artifact_copy, cache):
    from sc2quant.runtime.engines.base import EngineOptions
    from sc2quant.runtime.engines.onnx_engine import OnnxEngine

    (artifact_copy / "sc2quant.json").unlink()  # a graph folder written by hand: no checksums to key an entry by
    engine = OnnxEngine(artifact_copy, EngineOptions())
    engine.start([[1, 2, 3]])
    assert _entries(cache) == []


def test_a_build_killed_midway_leaves_nothing_behind_after_the_next(artifact_copy, cache):
    _outputs(artifact_copy)
    [entry] = _entries(cache)
    shutil.rmtree(entry)
    import subprocess

    from sc2quant.core import artifact

    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that has ended
    stale, other, live = (entry.parent / (artifact.TMP_PREFIX + name) for name in
                          (f"{entry.name}-killed", "another-0123456789abcdef-killed", "another-building"))
    for folder, pid in ((stale, gone.pid), (other, gone.pid), (live, os.getpid())):  # what SIGKILLed builds leave
        folder.mkdir()
        (folder / artifact.PID_FILE).write_text(str(pid))
        (folder / prepacked.DATA).write_bytes(b"half")
    _outputs(artifact_copy)
    assert _entries(cache) == [entry] and not stale.exists() and not other.exists()
    assert sorted(p.name for p in entry.parent.iterdir()) == sorted([entry.name, live.name])  # a live build is left


def test_two_first_loads_at_once_build_one_entry(artifact_copy, cache):
    import subprocess
    import sys

    script = ("import sys, sc2quant\nm = sc2quant.load(sys.argv[1], prefix_cache_bytes=0)\n"
              "print(m.generate('def f(x):', max_new_tokens=4))\n")
    env = {**os.environ, "SC2QUANT_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(artifact_copy)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0][0] == outs[1][0]
    assert sum(err.count("prepared onnx-int4's int4 weights") for _, err in outs) == 1  # one built, one mapped
    [entry] = _entries(cache)
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no staging left behind


@pytest.mark.parametrize("value,on", [("false", False), ("OFF", False), ("no", False), ("yes", True), ("1", True)])
def test_the_switch_reads_the_usual_words(value, on, artifact_copy, cache, monkeypatch):
    monkeypatch.setenv("SC2QUANT_PREPACKED", value)
    _outputs(artifact_copy)
    assert bool(_entries(cache)) is on


def test_a_switch_set_to_nonsense_is_one_line(artifact_copy, cache, monkeypatch):
    from sc2quant.core.errors import UserError

    monkeypatch.setenv("SC2QUANT_PREPACKED", "2")
    with pytest.raises(UserError, match="SC2QUANT_PREPACKED='2' is neither on nor off"):
        load(artifact_copy)


def test_a_save_that_fails_says_so(artifact_copy, cache):
    """Found by the red team: with the disk full (here a file size limit) the first load said "preparing ...
    (saved in ...)", saved nothing, and said the same at every load."""
    import subprocess
    import sys

    script = "import sys, sc2quant\nprint(sc2quant.load(sys.argv[1]).generate('def f(x):', max_new_tokens=2))\n"
    done = subprocess.run(["bash", "-c", f'ulimit -f 4000; exec "{sys.executable}" -c "$0" "$1"', script,
                           str(artifact_copy)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "SC2QUANT_CACHE": str(cache)})
    assert done.returncode == 0, done.stderr
    assert "not saving prepacked weights" in done.stderr and _entries(cache) == []


def test_a_graph_the_engine_refuses_is_not_kept(artifact_copy, cache):
    import onnxruntime as ort

    from sc2quant.core.errors import UserError

    def refuse(_session) -> None:
        raise UserError("not this graph")

    with pytest.raises(UserError, match="not this graph"):
        prepacked.session(artifact_copy / "model.onnx", ort.SessionOptions, ["CPUExecutionProvider"], "cpu", refuse)
    assert _entries(cache) == [] and not any((cache / prepacked.KIND).glob(".*"))


@pytest.mark.parametrize("value,spinning", [(None, True), ("0", False), (" off ", False), ("on", True)])
def test_thread_spinning_follows_its_switch_on_built_and_mapped_sessions(value, spinning, artifact_copy, cache,
                                                                        monkeypatch):
    """ONNX Runtime's intra-op spinning: on by default (fastest on an idle machine), SC2QUANT_ORT_SPIN=0 for a
    busy one (bench/results: the share of idle speed kept with one core busy); `describe()` says which."""
    if value is None:
        monkeypatch.delenv("SC2QUANT_ORT_SPIN", raising=False)
    else:
        monkeypatch.setenv("SC2QUANT_ORT_SPIN", value)
    for _ in range(2):  # the first load builds the prepacked entry, the second maps it
        model = load(artifact_copy)
        assert model.engine.describe()["thread_spinning"] is spinning


def test_a_bad_spinning_switch_is_one_line_before_any_work(artifact_copy, cache, monkeypatch, capsys):
    """Found by the red team: the value was read when the session was made, after a GPTQ conversion, and a
    "not saving prepacked weights" note came before the error."""
    from sc2quant.core.errors import UserError

    monkeypatch.setenv("SC2QUANT_ORT_SPIN", "sometimes")
    with pytest.raises(UserError, match="SC2QUANT_ORT_SPIN='sometimes' is neither on nor off"):
        load(artifact_copy)
    assert capsys.readouterr().err == "" and _entries(cache) == []
