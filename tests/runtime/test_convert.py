"""The GPTQ-to-ONNX conversion cache: safe under concurrent first use, a fallback when it cannot be
written, and no conversion child outliving the process that started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sc2quant.core import artifact
from sc2quant.core.errors import UserError
from sc2quant.runtime import cache, convert

CONVERT = ("import sys\nfrom pathlib import Path\nfrom sc2quant.core import artifact\n"
           "from sc2quant.runtime.convert import converted_onnx\n"
           "p = Path(sys.argv[1])\nprint(converted_onnx(p, artifact.read_manifest(p)), flush=True)\n")


def _spawn(path: Path, cache: Path) -> subprocess.Popen:
    env = {**os.environ, "SC2QUANT_CACHE": str(cache)}
    return subprocess.Popen([sys.executable, "-c", CONVERT, str(path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_two_first_uses_at_once_convert_once_and_both_succeed(tiny_gptq_artifact, tmp_path):
    """Two `serve` processes starting on the same new GPTQ artifact: the second exited 2."""
    cache = tmp_path / "cache"
    procs = [_spawn(tiny_gptq_artifact, cache) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    outs = {stdout.strip() for stdout, _ in results}
    assert len(outs) == 1
    converted = Path(outs.pop())
    assert artifact.verify(converted).kind == "onnx"
    assert [p.name for p in (cache / "converted").iterdir()] == [converted.name]  # no staging left behind
    assert sum(stderr.count("to ONNX Runtime's int4 kernels once") for _, stderr in results) == 1


def test_an_unwritable_cache_falls_back_to_a_private_temporary_folder(tiny_gptq_artifact, tmp_path, monkeypatch):
    """A read-only $HOME made `run`/`serve` of a GPTQ artifact exit 1."""
    (tmp_path / "home").write_text("a file where the cache's parent should be: nothing can be created under it")
    monkeypatch.delenv("SC2QUANT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home" / "cache"))
    monkeypatch.setattr(cache.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    root = convert.writable_cache_root()
    assert root == tmp_path / "tmp" / f"sc2quant-{os.getuid()}" / "converted" and root.is_dir()
    assert (root.parent.stat().st_mode & 0o777) == 0o700
    out = convert.converted_onnx(tiny_gptq_artifact, artifact.read_manifest(tiny_gptq_artifact))
    assert out.parent == root and artifact.verify(out)
    monkeypatch.setenv("SC2QUANT_CACHE", str(tmp_path / "home" / "cache"))  # asked for: said, not replaced
    with pytest.raises(UserError, match="set SC2QUANT_CACHE to a writable directory"):
        convert.writable_cache_root()


def test_a_shared_fallback_folder_of_someone_else_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SC2QUANT_CACHE", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file" / "cache"))
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(cache.tempfile, "gettempdir", lambda: str(tmp_path))
    (tmp_path / f"sc2quant-{os.getuid()}").mkdir(mode=0o777)
    os.chmod(tmp_path / f"sc2quant-{os.getuid()}", 0o777)  # writable by others: not ours to trust
    with pytest.raises(UserError, match="SC2QUANT_CACHE"):
        convert.writable_cache_root()


def test_sigterm_during_the_first_conversion_ends_the_child(tiny_gptq_artifact, tmp_path):
    """SIGTERM's default action runs no Python code: the conversion child kept running, orphaned."""
    parent = _spawn(tiny_gptq_artifact, tmp_path / "cache")
    deadline = time.monotonic() + 120
    children: list[int] = []
    while not children and time.monotonic() < deadline and parent.poll() is None:
        children = _children(parent.pid)
        time.sleep(0.05)
    assert children, parent.communicate()
    time.sleep(0.5)  # the child is importing or converting (a conversion takes seconds)
    parent.send_signal(signal.SIGTERM)
    parent.communicate(timeout=60)
    assert parent.returncode == -signal.SIGTERM
    deadline = time.monotonic() + 30
    while any(_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(c) for c in children), "the conversion child outlived its parent"
    deadline = time.monotonic() + 10  # the child removes its staging directory as it ends
    while list((tmp_path / "cache" / "converted").glob(artifact.TMP_PREFIX + "*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list((tmp_path / "cache" / "converted").iterdir()) == []  # an orphan would have finished and published it


# Found by the red team: two conversions' folders swapped with `mv` (a rename keeps every identity stamp,
# and each folder still verifies against its own manifest) and the first GPTQ artifact ran the second's
# weights; a cache folder others can write was trusted.


@pytest.fixture(scope="module")
def other_gptq_artifact(tiny_model_dir, tmp_path_factory) -> Path:
    """The same tiny model in groups of 64: another artifact of the same shapes."""
    from tests.conftest import quantize_to

    return quantize_to(tmp_path_factory.mktemp("other") / "tiny-rtn-int4-g64", model=str(tiny_model_dir),
                       method="rtn", bits=4, group_size=64)


def _logits(path: Path) -> list[float]:
    from sc2quant.runtime import load

    model = load(path, prefix_cache_bytes=0)
    _, logits = model.engine.start([model.encode("def f(x):\n    return")])
    return logits.ravel().tolist()


def _converted(path: Path) -> Path:
    return convert.converted_onnx(path, artifact.read_manifest(path))


def _lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def test_conversions_swapped_with_mv_are_converted_again(tiny_gptq_artifact, other_gptq_artifact, tmp_path,
                                                         monkeypatch, capsys):
    monkeypatch.setenv("SC2QUANT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SC2QUANT_PREPACKED", "0")
    mine, theirs = _logits(tiny_gptq_artifact), _logits(other_gptq_artifact)
    assert mine != theirs
    first, second = _converted(tiny_gptq_artifact), _converted(other_gptq_artifact)
    os.rename(first, tmp_path / "aside")
    os.rename(second, first)
    os.rename(tmp_path / "aside", second)
    capsys.readouterr()
    assert _logits(tiny_gptq_artifact) == mine
    [line] = _lines(capsys.readouterr().err)
    assert f"the ONNX conversion in {first} was made from another artifact: converting again" in line
    assert artifact.read_manifest(first).group_size == 32


def test_a_conversion_edited_with_its_times_restored_is_converted_again(tiny_gptq_artifact, tmp_path, monkeypatch,
                                                                      capsys):
    from sc2quant.core import files

    monkeypatch.setenv("SC2QUANT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(files, "SETTLED_NS", 0)  # recorded at once: the edit is caught on the records' path
    out = _converted(tiny_gptq_artifact)
    assert _converted(tiny_gptq_artifact) == out
    data = out / "model.onnx.data"
    info = data.stat()
    with open(data, "r+b") as fh:
        fh.seek(info.st_size // 2)
        fh.write(bytes(64))
    os.utime(data, ns=(info.st_atime_ns, info.st_mtime_ns))
    capsys.readouterr()
    assert _converted(tiny_gptq_artifact) == out and artifact.verify(out)
    [line] = _lines(capsys.readouterr().err)
    assert f"the ONNX conversion in {out} does not match its checksums" in line and line.endswith("converting again")


@pytest.mark.parametrize("shared", ["cache root", "kind folder"])
def test_a_cache_others_can_write_is_not_trusted(tiny_gptq_artifact, tmp_path, monkeypatch, capsys, shared):
    """Asked for with SC2QUANT_CACHE: refused in one line naming it; the default cache: a private
    temporary folder instead, said in one line."""
    root = tmp_path / "xdg" / "sc2quant"  # the default cache of XDG_CACHE_HOME=xdg, given first as SC2QUANT_CACHE
    monkeypatch.setenv("SC2QUANT_CACHE", str(root))
    out = _converted(tiny_gptq_artifact)
    folder = root if shared == "cache root" else root / convert.KIND
    os.chmod(folder, 0o777)
    try:
        capsys.readouterr()
        with pytest.raises(UserError, match="SC2QUANT_CACHE") as refused:
            _converted(tiny_gptq_artifact)
        assert "\n" not in str(refused.value) and str(folder) in str(refused.value)
        monkeypatch.delenv("SC2QUANT_CACHE")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        monkeypatch.setattr(cache.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
        (tmp_path / "tmp").mkdir()
        private = _converted(tiny_gptq_artifact)
    finally:
        os.chmod(folder, 0o700)
    assert private.parent == tmp_path / "tmp" / f"sc2quant-{os.getuid()}" / convert.KIND and artifact.verify(private)
    [line] = _lines(capsys.readouterr().err)[:1]
    assert "other users can write" in line and str(private.parent) in line
    assert out.is_dir()  # left as it was


def test_a_conversion_that_is_a_link_to_a_users_folder_is_replaced_and_the_folder_left_alone(
        tiny_gptq_artifact, other_gptq_artifact, tmp_path, monkeypatch, capsys):
    """A cache entry replaced by a link to a folder of the user's (holding another artifact's conversion and
    a file of theirs): the link is the cache's, the folder is not. It is converted again, the folder kept."""
    monkeypatch.setenv("SC2QUANT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SC2QUANT_PREPACKED", "0")
    mine = _logits(tiny_gptq_artifact)
    first, second = _converted(tiny_gptq_artifact), _converted(other_gptq_artifact)
    users = tmp_path / "users-folder"
    os.rename(second, users)
    (users / "notes.txt").write_text("mine")
    before = sorted(p.name for p in users.iterdir())
    import shutil

    shutil.rmtree(first)
    os.symlink(users, first)
    capsys.readouterr()
    assert _logits(tiny_gptq_artifact) == mine
    assert sorted(p.name for p in users.iterdir()) == before and (users / "notes.txt").read_text() == "mine"
    assert first.is_dir() and not first.is_symlink()
