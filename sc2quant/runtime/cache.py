"""The user cache (`$SC2QUANT_CACHE`, else `$XDG_CACHE_HOME/sc2quant`, else `~/.cache/sc2quant`):
one folder per kind of entry (GPTQ artifacts converted to ONNX: runtime/convert.py; ONNX Runtime's
prepacked weights: runtime/prepacked.py; records of verified checksums: core/files.py) and a
`locks` folder beside them, so that concurrent first
uses build an entry once. A read-only home falls back to a private temporary folder.

What is cached runs (a graph, weights), so an entry is used only from folders no one else can write
(`shared`: the entry, its kind's folder and the cache root, each this user's and not group- or
world-writable; the folders made here are made 0700), and each entry records the checksums of the
artifact it was made from and of its own files, checked at every load (prepacked.py, convert.py)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sc2quant.core.errors import UserError
from sc2quant.core.files import cache_base


def cache_root(kind: str = "converted") -> Path:
    """The folder of one kind of entry ("converted", "prepacked") in the user cache."""
    return cache_base() / kind


def writable_cache_root(kind: str = "converted", fix: str = "or run with --engine torch") -> Path:
    """`cache_root(kind)`, created; when it cannot be written (a read-only $HOME) or others can write it
    (`shared`) and SC2QUANT_CACHE was not given, a private folder under the system's temporary
    directory, said once on stderr; else UserError naming SC2QUANT_CACHE and `fix`."""
    root = cache_root(kind)
    problem = _unwritable(root)
    if problem is None and (problem := shared(root.parent, root)) is None:
        return root
    want = "a writable directory" if "other users" not in problem else f"{PRIVATE} (or `chmod go-w` it)"
    refusal = f"cannot use the cache {root} ({problem}): set SC2QUANT_CACHE to {want}, {fix}"
    if os.environ.get("SC2QUANT_CACHE"):
        raise UserError(refusal)
    fallback = Path(tempfile.gettempdir()) / f"sc2quant-{os.getuid()}" / kind
    if _unwritable(fallback, private=True) is not None or shared(fallback) is not None:
        raise UserError(refusal)
    note(f"the cache {root} cannot be used ({problem}): using {fallback} (set SC2QUANT_CACHE to keep what is cached)")
    return fallback


PRIVATE = "a directory of yours that no one else can write"


def shared(*folders: Path) -> str | None:
    """Why what is in `folders` (cache folders: an entry, its kind's folder, the cache root) must not be
    trusted: one of them belongs to another user or others can write to it (group or world), so
    someone else could have put, changed or swapped what is there. None: trusted. A folder not there
    yet is skipped (this process makes it, private)."""
    for folder in folders:
        try:
            info = os.stat(folder)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            return f"cannot read {folder} ({exc.strerror})"
        if info.st_uid != os.getuid():
            return f"{folder} belongs to another user (other users can write what is in it)"
        if info.st_mode & 0o022:
            return f"other users can write to {folder}"
    return None


def note(text: str) -> None:
    """One line on stderr, however long `text` is or whatever line breaks it holds (an OS error's)."""
    from sc2quant.core.console import console

    console.print(one_line(text), highlight=False, markup=False, soft_wrap=True)


def remove_entry(entry: Path) -> None:
    """Remove cache entry `entry`, ours to remove (in a folder of entries checked private). An entry that is
    a link, whatever it points to, loses the link only: the folder behind it may be anyone's."""
    if entry.is_symlink() or (entry.exists() and not entry.is_dir()):
        with contextlib.suppress(OSError):
            entry.unlink()
    else:
        shutil.rmtree(entry, ignore_errors=True)


def one_line(text: str) -> str:
    """`text` on one line, without the source locations ONNX Runtime puts in its errors ("/onnxruntime_src/
    onnxruntime/core/graph/graph.cc:5543 Status Graph::...")."""
    text = re.sub(r"/onnxruntime_src/\S+:\d+ [^\n]*\) ", "", str(text))
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _unwritable(root: Path, private: bool = False) -> str | None:
    """Why `root` cannot hold cache entries (None: it can); the folders it makes are made 0700. private:
    refused unless its parent is a real directory of this user (a shared temporary directory)."""
    try:
        if private:
            root.parent.mkdir(mode=0o700, exist_ok=True)
            info = os.lstat(root.parent)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
                return f"{root.parent} is not a private directory of this user"
        root.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        root.mkdir(mode=0o700, exist_ok=True)
        if not os.access(root, os.W_OK | os.X_OK):
            return "permission denied"
        probe = tempfile.NamedTemporaryFile(dir=root, prefix=".probe-")  # noqa: SIM115 - closed at once
        probe.close()
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


@contextlib.contextmanager
def entry_lock(entry: Path, holder: str) -> Iterator[None]:
    """Hold an exclusive lock for cache entry `entry` (a file in the cache's `locks` folder, beside the
    entries' folders), waiting for `holder`, another process building the same entry; released
    when the process ends, however it ends."""
    locks = entry.parent.parent / "locks"  # beside the cache, not in it: the cache holds only entries
    try:
        locks.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {locks} ({exc.strerror}): set SC2QUANT_CACHE to a writable directory") from exc
    with open(locks / f"{entry.name}.lock", "a+b") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            note(f"waiting for {holder}")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
