"""The user cache (`$SC2QUANT_CACHE`, else `$XDG_CACHE_HOME/sc2quant`, else `~/.cache/sc2quant`):
one folder per kind of entry (GPTQ artifacts converted to ONNX: runtime/convert.py; ONNX Runtime's
prepacked weights: runtime/prepacked.py; records of verified checksums: core/files.py) and a
`locks` folder beside them, so that concurrent first
uses build an entry once. A read-only home falls back to a private temporary folder."""

from __future__ import annotations

import contextlib
import fcntl
import os
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
    """`cache_root(kind)`, created; when it cannot be written (a read-only $HOME) and SC2QUANT_CACHE was
    not given, a private folder under the system's temporary directory, said once on stderr; else
    UserError naming SC2QUANT_CACHE and `fix`."""
    from sc2quant.core.console import console

    root = cache_root(kind)
    problem = _unwritable(root)
    if problem is None:
        return root
    if os.environ.get("SC2QUANT_CACHE"):
        raise UserError(f"cannot write the cache {root} ({problem}): set SC2QUANT_CACHE to a writable directory, {fix}")
    fallback = Path(tempfile.gettempdir()) / f"sc2quant-{os.getuid()}" / kind
    if _unwritable(fallback, private=True) is not None:
        raise UserError(f"cannot write the cache {root} ({problem}): set SC2QUANT_CACHE to a writable directory, {fix}")
    console.print(f"the cache {root} is not writable ({problem}): using {fallback} "
                  "(set SC2QUANT_CACHE to keep what is cached)", highlight=False, markup=False)
    return fallback


def _unwritable(root: Path, private: bool = False) -> str | None:
    """Why `root` cannot hold cache entries (None: it can). private: created 0700, and refused unless
    it is a real directory of this user (a shared temporary directory)."""
    try:
        if private:
            root.parent.mkdir(mode=0o700, exist_ok=True)
            info = os.lstat(root.parent)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
                return f"{root.parent} is not a private directory of this user"
        root.mkdir(parents=True, exist_ok=True)
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
    from sc2quant.core.console import console

    locks = entry.parent.parent / "locks"  # beside the cache, not in it: the cache holds only entries
    try:
        locks.mkdir(exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {locks} ({exc.strerror}): set SC2QUANT_CACHE to a writable directory") from exc
    with open(locks / f"{entry.name}.lock", "a+b") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            console.print(f"waiting for {holder}", highlight=False, markup=False)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
