"""The sc2quant artifact: a directory of weights plus the manifest `sc2quant.json`.

This module is the only place that knows the layout. It writes artifacts atomically (into
a temporary sibling directory renamed into place when complete), records sha256 of every
file, and verifies them on load.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from sc2quant.core.errors import IntegrityError, UserError
from sc2quant.core.files import known_sha256, read_json, sha256_file
from sc2quant.core.names import WEIGHT_SUFFIXES
from sc2quant.core.system import tool_versions

MANIFEST_NAME = "sc2quant.json"
FORMAT_NAME = "sc2quant-artifact"
REPORT_FORMAT = "sc2quant-report"  # a `sc2quant report --out` directory (not loadable)
FORMAT_VERSION = 1
TMP_PREFIX = ".sc2quant-tmp-"
PID_FILE = ".pid"  # in a staging directory: the pid of the process writing it
MAX_MANIFEST_FILES = 10_000  # a 15B checkpoint has a few dozen files
# Files transformers or the runtime read from an artifact's top level besides its *.json (all of which are read
# or could be): an unlisted one would change the model or tokenizer without failing any checksum.
LOADER_FILES = ("merges.txt", "tokenizer.model", "chat_template.jinja", "vocab.txt", "spiece.model")
GENAI_CONFIG = "genai_config.json"  # an ONNX artifact's description of its graph (onnxruntime-genai's format)


@dataclass
class Manifest:
    kind: str  # the artifact kind (a registered `sc2quant.formats.Format`): decides how it loads and runs
    method: str  # the method's label (sc2quant.formats.Method.label): "bnb-nf4", "gptq", "onnx-int4", ...
    bits: int | None = None
    group_size: int | None = None
    params: dict[str, Any] = field(default_factory=dict)  # method-specific settings
    source: dict[str, Any] = field(default_factory=dict)  # id, kind, sha256 of its weights
    tools: dict[str, str] = field(default_factory=dict)
    created: str = ""
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> sha256, bytes
    metrics: dict[str, Any] = field(default_factory=dict)
    verb: str = ""  # the command that wrote it ("quantize", "export onnx"): what --force may replace
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})




def _is_kind(kind: Any) -> bool:
    """A kind as manifests write it (a short name); whether a format is registered for it is the
    formats' question (`sc2quant.formats.get_format`), asked where the artifact is used."""
    return isinstance(kind, str) and kind.isidentifier() and len(kind) <= 32


def source_identity(source_id: str, kind: str, path: Path) -> dict[str, Any]:
    """Who the weights came from: id plus sha256 of each weight file (so drift is traceable)."""
    weights = {p.name: sha256_file(p) for p in sorted(path.iterdir()) if p.suffix in WEIGHT_SUFFIXES and p.is_file()}
    ident: dict[str, Any] = {"id": source_id, "kind": kind, "weights_sha256": weights}
    manifest = path / MANIFEST_NAME
    if manifest.is_file():  # an artifact made from an artifact: keep the chain
        with contextlib.suppress(ValueError, RecursionError, OSError, AttributeError):
            ident["manifest"] = {k: json.loads(manifest.read_text()).get(k) for k in ("kind", "method", "bits", "source")}
    return ident


def output_verb(path: Path) -> str | None:
    """The sc2quant command that wrote directory `path` (from its sc2quant.json), or None."""
    file = Path(path) / MANIFEST_NAME
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    if data.get("format") == REPORT_FORMAT:
        return "report"
    if data.get("format") == FORMAT_NAME and _is_kind(data.get("kind")):
        return data.get("verb") or ("export onnx" if data["kind"] == "onnx" else "quantize")  # manifests before `verb`
    return None


def output_path(given: str | os.PathLike | None, default: Path) -> Path:
    """The --out a user gave (an empty string is refused, not read as "."), or the default."""
    if given is None:
        out = default
    elif not str(given).strip():
        raise UserError("--out is empty: give the path of a new directory")
    else:
        out = Path(given)
    check_out_location(out)
    return out


def check_out_location(out: Path) -> None:
    """Refuse an --out that cannot be renamed into place: a link to nowhere (the rename would
    replace the link, not write where it points) and a mount point (it cannot be renamed)."""
    out = Path(out).expanduser()
    too_long = [part for part in out.parts if len(part.encode()) > 255]
    if too_long or len(os.fsencode(out)) >= 4096:
        raise UserError("--out is too long for the file system (a name over 255 bytes or a path over 4,095): "
                        "choose a shorter path")
    if out.is_symlink() and not out.exists():
        raise UserError(f"--out {out} is a link to {os.readlink(out)}, which does not exist: "
                        "remove the link or choose another --out")
    if out.is_symlink():  # replacing it would replace the link, and leave what it points to where it is
        raise UserError(f"--out {out} is a link (to {os.readlink(out)}): give the directory it points to, "
                        "or another --out")
    target = out.resolve()
    cwd = Path.cwd().resolve()
    if out.exists() and os.path.ismount(target) and target != cwd and target not in cwd.parents:  # those: said below
        raise UserError(f"--out {out} is a mount point, which cannot be replaced: choose a new directory inside it")


def check_output_path(out: Path | str, force: bool, verb: str, inputs: Sequence[Path | str] = ()) -> None:
    """Refuse, before any work, an output path that would lose data.

    An existing directory is replaced only with `force`, and only when it is empty or a previous
    output of the same `verb` that verifies and holds nothing else (`check_replaceable`). Never a file, the working directory or
    one of its parents, an input of the command, a directory holding one or one inside it.
    """
    if not str(out).strip():
        raise UserError("--out is empty: give the path of a new directory")
    target = Path(out).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise UserError(f"--out {out} is the working directory or one of its parents: choose a new directory")
    for raw in inputs:
        inp = Path(raw).expanduser().resolve()
        if target == inp or target in inp.parents:
            what = "is" if target == inp else "holds"
            raise UserError(f"--out {out} {what} an input of this command ({raw}): choose another directory")
        if inp in target.parents:  # writing into an input changes it (an artifact then fails its own checks)
            raise UserError(f"--out {out} is inside an input of this command ({raw}): the input would change; "
                            "choose a directory outside it")
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"cannot create {out}: {ancestor} is not a directory; choose another --out")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"cannot write into {ancestor} (permission denied): choose a writable --out")
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise UserError(f"output path {out} is a file: choose a directory path")
        if not force:
            raise UserError(f"output directory {out} already exists: choose another --out or pass --force to replace it")
        check_replaceable(target, verb, out)


def check_replaceable(target: Path, verb: str, shown: Path | str | None = None) -> None:
    """--force replaces an empty directory, or a previous output of the same command that is exactly
    what sc2quant wrote: every file listed in its manifest, unchanged (size and sha256), nothing added."""
    if not any(target.iterdir()):
        return  # an empty directory holds nothing of the user's
    made_by = output_verb(target)
    if made_by != verb:
        why = f"it was written by `sc2quant {made_by}`" if made_by else f"it has no {MANIFEST_NAME}"
        raise UserError(f"--force will not replace {shown or target}: it is not an output of `sc2quant {verb}` ({why}); "
                        "choose another --out, or remove it yourself")
    files = listed_files(target)
    problems = ([f"{MANIFEST_NAME} lists no files (an older sc2quant wrote it)"] if files is None
                else not_ours(target, files))
    if problems:
        shown_problems = ", ".join(problems[:3]) + (f" and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise UserError(f"--force will not replace {shown or target}: it holds what sc2quant did not write "
                        f"({shown_problems}); move those files out of it, or choose another --out")


def file_table(root: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under `root` but the manifest and the staging marker: the manifest's `files`."""
    return {p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).as_posix() not in (MANIFEST_NAME, PID_FILE)}


def listed_files(target: Path) -> dict[str, dict[str, Any]] | None:
    """The `files` table of `target`'s sc2quant.json, or None if it has none of the right shape."""
    try:
        data = json.loads((target / MANIFEST_NAME).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        return None
    for entry in files.values():
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("bytes"), int)):
            return None
    return files


def not_ours(target: Path, files: dict[str, dict[str, Any]]) -> list[str]:
    """What in `target` its manifest does not vouch for: unlisted files, folders and links, changed or missing files."""
    folders = {parent.as_posix() for name in files for parent in PurePosixPath(name).parents}
    problems: list[str] = []
    found: set[str] = set()
    for path in sorted(target.rglob("*")):
        rel = path.relative_to(target).as_posix()
        if rel == MANIFEST_NAME or (rel == PID_FILE and _is_pid_file(path)):
            continue
        if path.is_symlink() or (not path.is_dir() and rel not in files):
            problems.append(rel)
        elif path.is_dir():
            if rel not in folders:
                problems.append(rel + "/")
        else:
            found.add(rel)
            if _changed(path, files[rel]):
                problems.append(f"{rel} (changed)")
    problems += [f"{name} (missing)" for name in files if name not in found]
    return problems


def _changed(path: Path, entry: dict[str, Any]) -> bool:
    return path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]


def _is_pid_file(path: Path) -> bool:
    """The staging marker a run killed between its rename and its cleanup left behind (only digits)."""
    try:
        return path.is_file() and path.stat().st_size < 32 and path.read_text().strip().isdigit()
    except (OSError, UnicodeDecodeError):
        return False


def clean_stale_tmp(parent: Path) -> None:
    """Remove temporary directories left by killed runs (their owner pid is gone)."""
    if not parent.is_dir():
        return
    for tmp in parent.glob(TMP_PREFIX + "*"):
        pid_file = tmp / PID_FILE
        try:
            pid = int(pid_file.read_text())
            os.kill(pid, 0)
            continue  # owner still running
        except (OSError, ValueError):
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staging(out: Path, force: bool = False, verb: str = "", inputs: Sequence[Path | str] = ()) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success the caller has called `commit` or `publish`.

    On any exception or SIGINT/SIGTERM the temporary directory is removed, and so are the parent
    directories this call created: nothing appears. After SIGKILL the directory stays, marked with
    the dead pid, and the next run in the same folder removes it.
    """
    out = Path(out)
    check_output_path(out, force, verb, inputs)
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_tmp(out.parent)
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + out.name + "-", dir=out.parent))
        (tmp / PID_FILE).write_text(str(os.getpid()))
    except OSError as exc:
        _remove_created(created)
        raise UserError(f"cannot create a directory next to {out} ({exc.strerror}): choose a writable --out") from exc
    previous = signal.getsignal(signal.SIGTERM)
    with contextlib.suppress(ValueError):  # only the main thread may set handlers
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        yield tmp
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        if exc.errno == errno.ENOSPC:
            raise UserError(f"the disk is full while writing {out}: free space and run again (nothing was written)") from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        raise
    finally:
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, previous)


def _remove_created(created: list[Path]) -> None:
    for path in created:  # innermost first; only if still empty
        with contextlib.suppress(OSError):
            path.rmdir()


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def commit(tmp: Path, out: Path, manifest: Manifest, force: bool = False) -> Manifest:
    """Checksum every file in `tmp`, write the manifest, then rename `tmp` to `out`."""
    manifest.created = manifest.created or datetime.now(UTC).isoformat(timespec="seconds")
    manifest.tools = manifest.tools or tool_versions()
    from sc2quant.core.console import status

    with status(f"checksums of {out.name}"):
        manifest.files = file_table(tmp)
    (tmp / MANIFEST_NAME).write_text(manifest.to_json())
    publish(tmp, out, force, manifest.verb)
    return manifest


def publish(tmp: Path, out: Path, force: bool = False, verb: str = "") -> None:
    """Make a finished staging directory readable and rename it to `out` (replacing, with force,
    only what `check_replaceable` allows, checked again now)."""
    os.chmod(tmp, 0o755)  # mkdtemp (and some writers) make files private; outputs are ordinary files
    for p in tmp.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    if out.exists() or out.is_symlink():
        if not force:
            raise UserError(f"output directory {out} appeared while writing: choose another --out or pass --force")
        check_replaceable(out.resolve(), verb, out)
        trash = out.with_name(f"{TMP_PREFIX}old-{out.name}-{os.getpid()}-{int(time.time())}")
        out.rename(trash)
        try:
            tmp.rename(out)
        except OSError:
            trash.rename(out)  # put the previous output back
            raise
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(out)
    (out / PID_FILE).unlink(missing_ok=True)  # the staging marker, not part of the output


def read_manifest(path: Path) -> Manifest:
    """The manifest of an artifact, its shape checked (a hand-edited manifest is refused, not trusted)."""
    file = Path(path) / MANIFEST_NAME
    if not file.is_file():
        raise UserError(f"{path} has no {MANIFEST_NAME}: it is not an sc2quant artifact")
    data = read_json(file, "the artifact is damaged; recreate it", IntegrityError)
    if isinstance(data, dict) and data.get("format") == REPORT_FORMAT:
        raise UserError(f"{path} is a `sc2quant report` directory, not an artifact: pass an artifact")
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME or not _is_kind(data.get("kind")):
        raise IntegrityError(f"{file} is not an sc2quant manifest (format/kind unknown): recreate the artifact")
    files = data.get("files")
    entries_ok = isinstance(files, dict) and all(
        isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("bytes"), int)
        and not isinstance(e.get("bytes"), bool) for e in files.values())
    if not entries_ok:
        raise IntegrityError(f"{file} has a malformed 'files' table (each file needs its sha256 and bytes): "
                             "recreate the artifact")
    for key, kind in (("params", dict), ("source", dict), ("metrics", dict), ("tools", dict)):
        if not isinstance(data.get(key, {}), kind):
            raise IntegrityError(f"{file} has a malformed '{key}' entry: recreate the artifact")
    return Manifest.from_dict(data)


def is_artifact(path: Path) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()


def verify(path: Path, manifest: Manifest | None = None) -> Manifest:
    """Check every listed file's size and sha256 (not hashed again while provably unchanged since it was:
    `known_sha256`), and that no unlisted weight file exists."""
    path = Path(path)
    manifest = manifest or read_manifest(path)
    root = path.resolve()
    if len(manifest.files) > MAX_MANIFEST_FILES:
        raise IntegrityError(f"the manifest of {path} lists {len(manifest.files):,} files, more than any artifact holds "
                             f"({MAX_MANIFEST_FILES:,}): recreate the artifact")
    checked: dict[Path, dict[str, Any]] = {}
    for name, entry in manifest.files.items():
        file = (path / name).resolve()
        if root not in file.parents:
            raise IntegrityError(f"manifest of {path} points outside the artifact ({name}): refusing to load it")
        if PurePosixPath(name).as_posix() != name or name.startswith("/") or ".." in PurePosixPath(name).parts:
            raise IntegrityError(f"manifest of {path} names a file as {name[:80]!r}, not as sc2quant writes it: "
                                 "recreate the artifact")
        if file in checked:  # one file listed under two names (a link): hashed once, both entries must agree
            if checked[file] != {"sha256": entry["sha256"], "bytes": entry["bytes"]}:
                raise IntegrityError(f"manifest of {path} lists {name} twice with different checksums: "
                                     "recreate the artifact")
            continue
        if not file.is_file():
            raise IntegrityError(f"{path} is incomplete: {name} is missing; recreate the artifact")
        try:
            changed = file.stat().st_size != entry["bytes"] or known_sha256(file) != entry["sha256"]
        except UserError as exc:  # not a regular file
            raise IntegrityError(f"{name} in {path}: {exc}") from exc
        except OSError as exc:
            raise IntegrityError(f"cannot read {name} in {path} ({exc.strerror}): make it readable") from exc
        if changed:
            raise IntegrityError(f"{name} in {path} does not match its checksum (modified or truncated): "
                                 "recreate the artifact, or load with verify=False")
        checked[file] = {"sha256": entry["sha256"], "bytes": entry["bytes"]}
    for file in path.rglob("*"):
        rel = file.relative_to(path).as_posix()
        if file.is_symlink() and root not in file.resolve().parents:
            raise IntegrityError(f"{path} holds a link {rel} to {file.resolve()}, outside the artifact: remove it")
        if rel in manifest.files or not file.is_file():
            continue
        if file.suffix in WEIGHT_SUFFIXES:
            raise IntegrityError(f"{path} holds an unexpected weight file {rel} not in its manifest: remove it")
        if "/" not in rel and (file.suffix == ".json" or rel in LOADER_FILES) and rel != MANIFEST_NAME:
            raise IntegrityError(f"{path} holds {rel}, which its manifest does not list and a loader would read: "
                                 "remove it, or recreate the artifact")
    return manifest


def update_metrics(path: Path, metrics: dict[str, Any]) -> None:
    """Merge measured metrics into an artifact's manifest (written atomically)."""
    manifest = read_manifest(path)
    manifest.metrics.update(metrics)
    tmp = Path(path) / (MANIFEST_NAME + ".tmp")
    try:
        tmp.write_text(manifest.to_json())
        tmp.replace(Path(path) / MANIFEST_NAME)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def read_genai_config(path: Path) -> dict[str, Any]:
    """genai_config.json of an ONNX export: what the ONNX engine and onnxruntime-genai read."""
    file = Path(path) / GENAI_CONFIG
    if not file.is_file():
        raise UserError(f"{path} has no {GENAI_CONFIG}: it is not an ONNX export (run `sc2quant export onnx`)")
    data = read_json(file, "re-export the model")
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict) or "decoder" not in data["model"]:
        raise UserError(f"{file} does not describe a decoder: re-export the model")
    return data
