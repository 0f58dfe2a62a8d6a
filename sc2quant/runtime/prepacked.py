"""ONNX Runtime's prepacked weights, saved once per machine and mapped on later loads.

When a session starts, ONNX Runtime repacks every int4 `MatMulNBits` weight into the layout of this
CPU's kernel ("prepacking"): for the 315M bench model's export most of the session's start, and a
second copy of the weights in memory. ORT can write the optimized graph with those packed blobs to
a file (`session.save_external_prepacked_constant_initializers`, ORT PR 23069); a later session
maps them from there instead of packing again, with the same outputs bit for bit (tested).

The packing depends on the CPU and on ORT's version, so an entry is keyed by the artifact's
checksums and files (sizes, modification times), ORT's version and the CPU (model name and
instruction set). Entries live in the user cache (`prepacked/<artifact>-<key>`, runtime/cache.py),
are built by the first load under a lock (a second process waits, then maps the result), written
in a staging folder marked as artifacts' are (`artifact.clean_stale_tmp` sweeps a killed build's)
and renamed into place, and carry a small manifest of their files' sizes and
times, checked on every load (hashing half a gigabyte on each load would cost what the entry
saves); a changed or partial entry is built again. One entry per artifact folder: building a new
one removes the entries an earlier version of the same folder left.

Skipped, with a plain session, on CUDA, for graphs without a manifest, where the cache cannot be
written or the disk has not room for about three times the weights, and with SC2QUANT_PREPACKED=0.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sc2quant.core import artifact
from sc2quant.core.errors import UserError
from sc2quant.core.files import file_identity
from sc2quant.core.system import env_switch

KIND = "prepacked"  # the cache's folder of these entries
GRAPH = "model.opt.onnx"
DATA = "model.opt.onnx.data"
MANIFEST = "prepacked.json"
ROOM_FACTOR = 3  # disk wanted, in units of the artifact's weights: the saved file holds them and their packed copy


def session(model_file: Path, options: Callable[[], Any], providers: list[str], device: str,
            check: Callable[[Any], None] = lambda _: None) -> Any:
    try:
        return _session(model_file, options, providers, device, check)
    except _Refused as exc:  # the caller's own refusal, not a cache problem
        raise exc.args[0] from None


class _Refused(Exception):
    """`check` refused the graph (its UserError inside): passed through, never read as a cache problem."""


def _session(model_file: Path, options: Callable[[], Any], providers: list[str], device: str,
             check: Callable[[Any], None]) -> Any:
    """An ONNX Runtime session of `model_file` (in an artifact folder), `options()` making its
    SessionOptions: mapped from its cached prepacked form when there is one, else built and its
    prepacked form saved for the next load; a plain session where caching does not apply.
    `check(session)` raises UserError for a graph the caller refuses: nothing is kept for it."""
    import onnxruntime as ort

    folder = model_file.parent
    key = _key(folder) if device == "cpu" and enabled() else None
    if key is None:
        return _checked(ort.InferenceSession(str(model_file), options(), providers=providers), check)
    from sc2quant.runtime.cache import cache_root, entry_lock, writable_cache_root

    try:
        entry = cache_root(KIND) / f"{folder.name}-{key[:16]}"
        if (mapped := _open(entry, options, providers)) is not None:
            return _checked(mapped, check)
        entry = writable_cache_root(KIND, fix="or set SC2QUANT_PREPACKED=0") / entry.name
        with entry_lock(entry, f"another sc2quant process preparing {folder.name}'s weights for this CPU"):
            if (mapped := _open(entry, options, providers)) is not None:  # built by the process we waited for
                return _checked(mapped, check)
            return _build(model_file, entry, options, providers, check)
    except (UserError, OSError) as exc:  # no cache to use: this load runs as it would without one
        from sc2quant.core.console import console

        reason = str(exc) if isinstance(exc, UserError) else f"{exc.strerror or exc}: {getattr(exc, 'filename', '')}"
        console.print(f"not saving prepacked weights ({reason})", highlight=False, markup=False)
        return _checked(ort.InferenceSession(str(model_file), options(), providers=providers), check)


def _checked(made: Any, check: Callable[[Any], None]) -> Any:
    try:
        check(made)
    except UserError as exc:
        raise _Refused(exc) from exc
    return made


def enabled() -> bool:
    """SC2QUANT_PREPACKED: 0/false/no/off turn the cache off; 1/true/yes/on (or unset) keep it."""
    return env_switch("SC2QUANT_PREPACKED", True)


def _key(folder: Path) -> str | None:
    """What the packed weights depend on: the artifact's files and checksums, ORT, the CPU."""
    import onnxruntime as ort

    try:
        manifest = artifact.read_manifest(folder)
    except UserError:  # not an artifact (a graph written by hand): nothing to key a cache entry by
        return None
    stats = {name: _stat(folder / name) for name in sorted(manifest.files)}
    parts = [manifest.files, stats, ort.__version__, _cpu()]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _stat(path: Path) -> list[int] | None:
    """The artifact's files: size and modification time (a copy made with its times kept is the same)."""
    try:
        info = path.stat()
    except OSError:
        return None
    return [info.st_size, info.st_mtime_ns]


def _identity(path: Path) -> list[int] | None:
    """The entry's own files: `file_identity` (an edited file with its times set back is caught by its
    change time)."""
    try:
        return file_identity(path)
    except OSError:
        return None


@functools.cache
def _cpu() -> str:
    """The CPU's model name and instruction-set flags (Linux), else what Python knows of it (read once)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in text.split("\n\n")[0].splitlines() if ":" in line)
    keys = ("model name", "flags", "Features", "CPU implementer", "CPU part")  # x86; Arm
    return " ".join([platform.machine(), *(fields[k].strip() for k in keys if k in fields)])


def _open(entry: Path, options: Callable[[], Any], providers: list[str]) -> Any:
    """A session mapped from cache entry `entry` if it is whole (None otherwise; a damaged one is removed)."""
    import onnxruntime as ort

    if not entry.is_dir():
        return None
    try:
        recorded = json.loads((entry / MANIFEST).read_text())["files"]
        whole = recorded.keys() == {GRAPH, DATA} and all(_identity(entry / name) == recorded[name] for name in recorded)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        whole = False
    if whole:
        saved = options()
        saved.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # optimized when it was saved
        try:
            return ort.InferenceSession(str(entry / GRAPH), saved, providers=providers)
        except Exception:  # noqa: BLE001 - ORT's own exception types: a damaged entry is built again
            pass
    shutil.rmtree(entry, ignore_errors=True)  # our own cache entry, changed or partial
    return None


def _build(model_file: Path, entry: Path, options: Callable[[], Any], providers: list[str],
           check: Callable[[Any], None]) -> Any:
    """A session of `model_file` that also writes its optimized graph with the packed weights to `entry`."""
    import onnxruntime as ort

    weights = sum(p.stat().st_size for p in model_file.parent.iterdir() if p.is_file())
    free = shutil.disk_usage(entry.parent).free
    if free < ROOM_FACTOR * weights:
        raise UserError(f"{free / 2**30:.1f} GiB free in {entry.parent}, about {ROOM_FACTOR * weights / 2**30:.1f} "
                        "wanted: free some space or set SC2QUANT_CACHE elsewhere")
    _drop_older(entry, model_file.parent)
    from sc2quant.core.console import console

    # staged as every artifact is (artifact.staging's marked folder): a build killed midway leaves a folder
    # marked with its dead pid, which the next build here removes
    artifact.clean_stale_tmp(entry.parent)
    staging = Path(tempfile.mkdtemp(prefix=artifact.TMP_PREFIX + entry.name + "-", dir=entry.parent))
    (staging / artifact.PID_FILE).write_text(str(os.getpid()))
    try:
        saving = options()
        saving.optimized_model_filepath = str(staging / GRAPH)
        saving.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
        saving.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA)
        saving.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            made = ort.InferenceSession(str(model_file), saving, providers=providers)
        except Exception as exc:  # noqa: BLE001 - saving failed (a full disk, an ORT without the option): run without it
            reason = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else type(exc).__name__
            console.print(f"not saving prepacked weights (ONNX Runtime could not write them: {reason})",
                          highlight=False, markup=False)
            return _checked(ort.InferenceSession(str(model_file), options(), providers=providers), check)
        _checked(made, check)  # a graph the caller refuses: nothing kept (the staging folder goes below)
        if not all((staging / name).is_file() for name in (GRAPH, DATA)):
            console.print(f"not saving prepacked weights (ONNX Runtime wrote no weights file in {staging.parent})",
                          highlight=False, markup=False)
        else:
            try:  # renaming the folder leaves its files' identities as they are
                record = {**_record(model_file.parent), "files": {n: _identity(staging / n) for n in (GRAPH, DATA)}}
                (staging / MANIFEST).write_text(json.dumps(record, indent=1) + "\n")
                os.replace(staging, entry)
                with contextlib.suppress(OSError):  # marked until renamed: never swept while being built
                    (entry / artifact.PID_FILE).unlink()
                console.print(f"prepared {model_file.parent.name}'s int4 weights for this CPU once (saved in {entry}; "
                              "later loads map them)", highlight=False, markup=False)
            except OSError as exc:  # a full disk, a leftover entry that could not be removed: the session runs anyway
                console.print(f"not saving prepacked weights ({exc.strerror or exc})", highlight=False, markup=False)
        return made
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _record(source: Path) -> dict[str, Any]:
    """What an entry was built from and for (and, in its manifest, its files' identities)."""
    import onnxruntime as ort

    return {"source": str(source.resolve()), "onnxruntime": ort.__version__,
            "cpu": hashlib.sha256(_cpu().encode()).hexdigest()[:16], "files": {}}


def _drop_older(entry: Path, source: Path) -> None:
    """Remove the entries an earlier version of the same artifact folder left on this kind of machine
    (built by this ORT for this CPU: another machine sharing the cache keeps its own); only folders
    whose manifest says they are ours for that source."""
    mine = _record(source)
    for other in entry.parent.glob(f"{source.name}-*"):
        try:
            theirs = json.loads((other / MANIFEST).read_text())
            if other != entry and all(theirs.get(k) == mine[k] for k in ("source", "onnxruntime", "cpu")):
                shutil.rmtree(other, ignore_errors=True)
        except (OSError, ValueError, AttributeError):
            continue
