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
and renamed into place, and carry a small manifest (`prepacked.json`): the checksums of the
artifact they were made from (its manifest's, which the load verified), ORT's version and CPU they
were made for, and the sha256 and size of their own files. Every load checks all of it, an entry's
files through the unchanged-file records artifacts are verified with (`files.known_sha256`: hashed
once, not again while provably unchanged; hashing half a gigabyte on each load would cost what the
entry saves). An entry of another artifact (entry folders swapped or renamed: a rename keeps every
identity stamp), a changed or partial one, or one others could write is built again, said in one
line. One entry per artifact folder: building a new one removes the entries an earlier version of
the same folder left.

Skipped, with a plain session, on CUDA, for graphs without a manifest, where the cache cannot be
written or others can write to it (`cache.shared`: said in one line), where the disk has not room
for about three times the weights, and with SC2QUANT_PREPACKED=0.
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
from sc2quant.core.files import known_sha256, sha256_file
from sc2quant.core.system import env_switch
from sc2quant.runtime.cache import note, remove_entry, shared

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
    keyed = _key(folder) if device == "cpu" and enabled() else None
    if keyed is None:
        return _checked(ort.InferenceSession(str(model_file), options(), providers=providers), check)
    key, made_from = keyed
    from sc2quant.runtime.cache import PRIVATE, cache_root, entry_lock, writable_cache_root

    try:
        entry = cache_root(KIND) / f"{folder.name}-{key[:16]}"
        if (problem := shared(entry.parent.parent, entry.parent)) is not None:  # nothing there is used or touched
            note(f"not using the prepacked weights in the cache ({problem}): `chmod go-w` it, or set SC2QUANT_CACHE "
                 f"to {PRIVATE}")
            return _checked(ort.InferenceSession(str(model_file), options(), providers=providers), check)
        mapped, said = _open(entry, made_from, options, providers)
        if mapped is not None:
            return _checked(mapped, check)
        entry = writable_cache_root(KIND, fix="or set SC2QUANT_PREPACKED=0") / entry.name
        with entry_lock(entry, f"another sc2quant process preparing {folder.name}'s weights for this CPU"):
            mapped, again = _open(entry, made_from, options, providers)
            if mapped is not None:  # built by the process we waited for
                return _checked(mapped, check)
            return _build(model_file, entry, made_from, options, providers, check, quiet=said or again)
    except (UserError, OSError) as exc:  # no cache to use: this load runs as it would without one
        reason = str(exc) if isinstance(exc, UserError) else f"{exc.strerror or exc}: {getattr(exc, 'filename', '')}"
        note(f"not saving prepacked weights ({reason})")
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


def _key(folder: Path) -> tuple[str, dict[str, str]] | None:
    """What the packed weights depend on (the artifact's files and checksums, ORT, the CPU), hashed,
    and the artifact's checksums (name -> sha256, from its manifest: what its entry must record)."""
    import onnxruntime as ort

    try:
        manifest = artifact.read_manifest(folder)
    except UserError:  # not an artifact (a graph written by hand): nothing to key a cache entry by
        return None
    stats = {name: _stat(folder / name) for name in sorted(manifest.files)}
    parts = [manifest.files, stats, ort.__version__, _cpu()]
    key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    return key, {name: entry["sha256"] for name, entry in manifest.files.items()}


def _stat(path: Path) -> list[int] | None:
    """The artifact's files: size and modification time (a copy made with its times kept is the same)."""
    try:
        info = path.stat()
    except OSError:
        return None
    return [info.st_size, info.st_mtime_ns]


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


def _open(entry: Path, made_from: dict[str, str], options: Callable[[], Any],
          providers: list[str]) -> tuple[Any, bool]:
    """A session mapped from cache entry `entry` if it is whole and made from the artifact whose
    checksums are `made_from` (else None; an entry there that is not is removed, said in one line),
    and whether that was said."""
    import onnxruntime as ort

    if not entry.is_dir():
        return None, False
    problem = _mismatch(entry, made_from)
    if problem is None:
        saved = options()
        saved.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # optimized when it was saved
        try:
            return ort.InferenceSession(str(entry / GRAPH), saved, providers=providers), False
        except Exception as exc:  # noqa: BLE001 - ORT's own exception types: a damaged entry is built again
            problem = f"cannot be loaded ({str(exc).strip()[-200:] or type(exc).__name__})"
    note(f"prepacked weights in {entry} {problem}: rebuilding")
    remove_entry(entry)  # our own cache entry (its folders are checked private); a link loses the link only
    return None, True


def _mismatch(entry: Path, made_from: dict[str, str]) -> str | None:
    """What is wrong with cache entry `entry` (None: nothing): a folder others can write, no record, a
    record of another artifact, ORT or CPU, or files that do not match their recorded checksums (taken
    from the unchanged-file records: hashed only when changed since they were last hashed)."""
    if (problem := shared(entry, *(entry / name for name in (MANIFEST, GRAPH, DATA)))) is not None:
        return f"are in a folder or files others can write ({problem})"
    try:
        record = json.loads((entry / MANIFEST).read_text())
        built, files = record["artifact"], record["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "have no readable record of what they are (damaged, or saved by an earlier sc2quant)"
    if built != made_from:
        return "were made from another artifact"
    if any(record.get(k) != v for k, v in _made_for().items()):
        return "were made for another CPU or ONNX Runtime"
    if not isinstance(files, dict) or files.keys() != {GRAPH, DATA}:
        return "are incomplete"
    for name, want in files.items():
        try:
            same = (isinstance(want, dict) and (entry / name).stat().st_size == want["bytes"]
                    and known_sha256(entry / name) == want["sha256"])
        except (OSError, UserError, KeyError):
            same = False
        if not same:
            return f"do not match their checksums ({name} changed or missing)"
    return None


def _build(model_file: Path, entry: Path, made_from: dict[str, str], options: Callable[[], Any],
           providers: list[str], check: Callable[[Any], None], quiet: bool = False) -> Any:
    """A session of `model_file` that also writes its optimized graph with the packed weights to `entry`,
    recorded as made from the artifact whose checksums are `made_from`. quiet: the rebuild was said."""
    import onnxruntime as ort

    weights = sum(p.stat().st_size for p in model_file.parent.iterdir() if p.is_file())
    free = shutil.disk_usage(entry.parent).free
    if free < ROOM_FACTOR * weights:
        raise UserError(f"{free / 2**30:.1f} GiB free in {entry.parent}, about {ROOM_FACTOR * weights / 2**30:.1f} "
                        "wanted: free some space or set SC2QUANT_CACHE elsewhere")
    _drop_older(entry, model_file.parent)
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
            note(f"not saving prepacked weights (ONNX Runtime could not write them: {reason})")
            return _checked(ort.InferenceSession(str(model_file), options(), providers=providers), check)
        _checked(made, check)  # a graph the caller refuses: nothing kept (the staging folder goes below)
        if not all((staging / name).is_file() for name in (GRAPH, DATA)):
            note(f"not saving prepacked weights (ONNX Runtime wrote no weights file in {staging.parent})")
        else:
            try:  # what it was made from, and its files' checksums (hashed once here; records at later loads)
                files = {n: {"sha256": sha256_file(staging / n), "bytes": (staging / n).stat().st_size}
                         for n in (GRAPH, DATA)}
                record = {**_record(model_file.parent), "artifact": made_from, "files": files}
                (staging / MANIFEST).write_text(json.dumps(record, indent=1) + "\n")
                os.replace(staging, entry)
                with contextlib.suppress(OSError):  # marked until renamed: never swept while being built
                    (entry / artifact.PID_FILE).unlink()
                if not quiet:
                    note(f"prepared {model_file.parent.name}'s weights in ONNX Runtime's layout for this CPU once "
                         f"(saved in {entry}; later loads map them)")
            except (OSError, UserError) as exc:  # a full disk, a leftover entry that could not be removed: it runs anyway
                note(f"not saving prepacked weights ({(exc.strerror or exc) if isinstance(exc, OSError) else exc})")
        return made
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _record(source: Path) -> dict[str, Any]:
    """What an entry was built from and for (and, in its manifest, the artifact's checksums and its files')."""
    return {"source": str(source.resolve()), **_made_for(), "files": {}}


def _made_for() -> dict[str, str]:
    """The ORT and CPU an entry is packed for."""
    import onnxruntime as ort

    return {"onnxruntime": ort.__version__, "cpu": hashlib.sha256(_cpu().encode()).hexdigest()[:16]}


def _drop_older(entry: Path, source: Path) -> None:
    """Remove the entries an earlier version of the same artifact folder left on this kind of machine
    (built by this ORT for this CPU: another machine sharing the cache keeps its own); only folders
    whose manifest says they are ours for that source."""
    mine = _record(source)
    for other in entry.parent.glob(f"{source.name}-*"):
        try:
            theirs = json.loads((other / MANIFEST).read_text())
            if other != entry and all(theirs.get(k) == mine[k] for k in ("source", "onnxruntime", "cpu")):
                remove_entry(other)  # a link loses the link only
        except (OSError, ValueError, AttributeError):
            continue
