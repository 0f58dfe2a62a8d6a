"""GPTQ artifacts on the CPU run through ONNX Runtime's `MatMulNBits`: converted once, losslessly.

The same integers, scales and zero points (tested bit for bit in the export tests), the lm_head
kept in float as GPTQ keeps it: the conversion changes the kernel, not the model. ONNX Runtime's
int4 kernels decode 2-4x faster on CPUs than torch's (bench/results). The converted artifact is
an ordinary `sc2quant export onnx` output with its own manifest and checksums, kept in the
user cache under a key made of the GPTQ artifact's checksums, so a changed artifact is
converted again. Its manifest's `source` also records the GPTQ artifact's checksums (`FROM`), and
every use checks both against what is being loaded: the conversion verifies (its files through the
unchanged-file records, `files.known_sha256`) and was made from this artifact's manifest (a folder
swapped or renamed into place keeps every identity stamp, and verifies on its own). One that does
not, or that others could write (`cache.shared`), is converted again, said in one line; a cache
root or folder of conversions that others can write is not used (runtime/cache.py: a private
temporary folder, or a refusal naming SC2QUANT_CACHE). The conversion runs in a child process
(`python -m sc2quant.runtime.convert`), so the memory it needs is returned before the model is
loaded: a load's peak is the larger of the two, not their sum (3B: 5.9 GB in one process).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from sc2quant.core import artifact
from sc2quant.core.errors import UserError
from sc2quant.runtime.cache import cache_root, entry_lock, note, remove_entry, shared, writable_cache_root

CONVERSION = {"weights": "int4", "dtype": "fp32", "lm_head": "float"}  # what GPTQ itself keeps
KIND = "converted"  # the cache's folder of conversions (runtime/cache.py)
FROM = "converted_from"  # in a conversion's manifest `source`: the GPTQ artifact's path and checksums


def _checksums(manifest: artifact.Manifest) -> dict[str, str]:
    """An artifact's checksums (name -> sha256), as its manifest lists them: what its conversion records."""
    return {name: entry["sha256"] for name, entry in manifest.files.items()}


def _ready(out: Path, made_from: dict[str, str]) -> tuple[bool, bool]:
    """Whether cache entry `out` can be used (`_mismatch`), and whether it was there and could not: then
    removed (our own entry, in a folder of conversions checked private) and said in one line."""
    if not out.is_dir():
        return False, False
    problem = _mismatch(out, made_from)
    if problem is None:
        return True, False
    note(f"the ONNX conversion in {out} {problem}: converting again")
    remove_entry(out)
    return False, True


def _mismatch(out: Path, made_from: dict[str, str]) -> str | None:
    """What is wrong with the conversion in `out` (None: nothing) for the artifact whose checksums are
    `made_from`: a folder others can write, files that do not verify, or a record of another artifact."""
    if (problem := shared(out)) is not None:
        return f"is in a folder others can write ({problem})"
    try:
        converted = artifact.verify(out)
    except UserError:
        return "does not match its checksums (changed, or incomplete)"
    stamp = converted.source.get(FROM)
    if not isinstance(stamp, dict) or stamp.get("files") != made_from:
        return "was made from another artifact"
    return None


def converted_onnx(path: Path, manifest: artifact.Manifest) -> Path:
    """The ONNX form of GPTQ artifact `path`, converting it on first use.

    Safe under concurrent first use: the conversion runs under a lock file beside the cache entry;
    other processes wait for it and use its result."""
    from sc2quant.core.console import console
    from sc2quant.core.version import __version__

    key = hashlib.sha256(json.dumps([manifest.files, CONVERSION, __version__], sort_keys=True).encode()).hexdigest()
    made_from = _checksums(manifest)
    root = cache_root(KIND)
    out = root / f"{path.name}-{key[:16]}"
    ready, said = (False, False) if shared(root.parent, root) is not None else _ready(out, made_from)
    if ready:
        return out
    root = writable_cache_root(KIND)  # not one others can write: a private one, or a refusal
    out = root / f"{path.name}-{key[:16]}"
    with entry_lock(out, f"another sc2quant process converting {path.name} to ONNX"):
        ready, again = _ready(out, made_from)
        if ready:  # converted by the process we waited for
            return out
        if not (said or again):
            note(f"converting {path.name} to ONNX Runtime's int4 kernels once (cached in {out})")
        try:
            terminal = console.file.fileno()  # the terminal, also while fd 2 goes to a log file
        except (AttributeError, OSError, ValueError):
            terminal = None
        child = subprocess.Popen([sys.executable, "-m", "sc2quant.runtime.convert", str(path), str(out), str(os.getpid())],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=terminal)
        try:
            returncode = child.wait()
        except BaseException:  # Ctrl-C, SIGTERM turned into an exception, a server stopping: the child goes too
            _end(child)
            raise
        if returncode != 0 or not out.is_dir():
            raise UserError(f"converting {path.name} to ONNX failed (exit status {returncode}, reason above): "
                            "run it with --engine torch, or export it yourself with `sc2quant export onnx`")
    return out


def _end(child: subprocess.Popen) -> None:
    """Terminate the conversion child (it removes its staging directory on SIGTERM), then kill it."""
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel sends this child SIGTERM when the process that started it dies (SIGKILL,
    or SIGTERM's default action, which runs no Python code), so no conversion outlives its user."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _convert(src: Path, out: Path) -> None:
    """Export GPTQ artifact `src` in a marked staging folder beside `out` (a killed child's is swept by
    the next), record `src`'s checksums in its manifest, then rename it to `out`: a conversion appears
    whole and stamped, or not at all."""
    import signal

    from sc2quant.export import export_onnx

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)  # the parent ended (`_die_with_parent`): the staging goes too
    made_from = _checksums(artifact.read_manifest(src))
    artifact.clean_stale_tmp(out.parent)
    work = Path(tempfile.mkdtemp(prefix=artifact.TMP_PREFIX + out.name + "-", dir=out.parent))
    try:
        (work / artifact.PID_FILE).write_text(str(os.getpid()))
        export_onnx(src, work / "onnx", **CONVERSION)
        converted = artifact.read_manifest(work / "onnx")
        converted.source[FROM] = {"path": str(src.resolve()), "files": made_from}
        (work / "onnx" / artifact.MANIFEST_NAME).write_text(converted.to_json())
        os.rename(work / "onnx", out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """The child: SRC OUT. Third-party output goes to a log file, as in every verb."""
    from sc2quant.core.console import console, library_output

    args = argv or sys.argv[1:]
    src, out = args[:2]
    if len(args) > 2:
        _die_with_parent(int(args[2]))
    try:
        with library_output("convert"):
            _convert(Path(src), Path(out))
    except UserError as exc:
        console.print(f"error: {exc}", highlight=False, markup=False, soft_wrap=True)
        return 2
    except OSError as exc:  # the cache filled up or went away under the conversion
        console.print(f"error: cannot write {out} ({exc.strerror or exc})", highlight=False, markup=False,
                      soft_wrap=True)
        return 2
    except KeyboardInterrupt:  # SIGTERM (the parent ended) or Ctrl-C: staging removed what was written
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
