"""GPTQ artifacts on the CPU run through ONNX Runtime's `MatMulNBits`: converted once, losslessly.

The same integers, scales and zero points (tested bit for bit in the export tests), the lm_head
kept in float as GPTQ keeps it: the conversion changes the kernel, not the model. ONNX Runtime's
int4 kernels decode 2-4x faster on CPUs than torch's (bench/results). The converted artifact is
an ordinary `sc2quant export onnx` output with its own manifest and checksums, kept in the
user cache under a key made of the GPTQ artifact's checksums, so a changed artifact is
converted again and a damaged conversion is rebuilt. The conversion runs in a child process
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
from pathlib import Path

from sc2quant.core import artifact
from sc2quant.core.errors import IntegrityError, UserError
from sc2quant.runtime.cache import cache_root, entry_lock, writable_cache_root

CONVERSION = {"weights": "int4", "dtype": "fp32", "lm_head": "float"}  # what GPTQ itself keeps
KIND = "converted"  # the cache's folder of conversions (runtime/cache.py)


def _ready(out: Path) -> bool:
    """Whether cache entry `out` is complete and verifies (a damaged one is removed: our own entry)."""
    if not out.is_dir():
        return False
    try:
        artifact.verify(out)
        return True
    except IntegrityError:
        shutil.rmtree(out, ignore_errors=True)  # our own cache entry, damaged: build it again
        return False


def converted_onnx(path: Path, manifest: artifact.Manifest) -> Path:
    """The ONNX form of GPTQ artifact `path`, converting it on first use.

    Safe under concurrent first use: the conversion runs under a lock file beside the cache entry;
    other processes wait for it and use its result."""
    from sc2quant.core.console import console
    from sc2quant.core.version import __version__

    key = hashlib.sha256(json.dumps([manifest.files, CONVERSION, __version__], sort_keys=True).encode()).hexdigest()
    root = cache_root(KIND)
    out = root / f"{path.name}-{key[:16]}"
    if _ready(out):
        return out
    root = writable_cache_root(KIND)
    out = root / f"{path.name}-{key[:16]}"
    with entry_lock(out, f"another sc2quant process converting {path.name} to ONNX"):
        if _ready(out):  # converted by the process we waited for
            return out
        console.print(f"converting {path.name} to ONNX Runtime's int4 kernels once (cached in {out})", highlight=False)
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


def main(argv: list[str] | None = None) -> int:
    """The child: SRC OUT. Third-party output goes to a log file, as in every verb."""
    from sc2quant.core.console import console, library_output
    from sc2quant.export import export_onnx

    args = argv or sys.argv[1:]
    src, out = args[:2]
    if len(args) > 2:
        _die_with_parent(int(args[2]))
    try:
        with library_output("convert"):
            export_onnx(Path(src), Path(out), **CONVERSION)
    except UserError as exc:
        console.print(f"error: {exc}", highlight=False, markup=False)
        return 2
    except KeyboardInterrupt:  # SIGTERM (the parent ended) or Ctrl-C: staging removed what was written
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
