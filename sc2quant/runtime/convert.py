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

CONVERSION = {"weights": "int4", "dtype": "fp32", "lm_head": "float"}  # what GPTQ itself keeps


def cache_root() -> Path:
    base = os.environ.get("SC2QUANT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sc2quant"
    return Path(base) / "converted"


def converted_onnx(path: Path, manifest: artifact.Manifest) -> Path:
    """The ONNX form of GPTQ artifact `path`, converting it on first use."""
    from sc2quant import __version__
    from sc2quant.core.console import console

    key = hashlib.sha256(json.dumps([manifest.files, CONVERSION, __version__], sort_keys=True).encode()).hexdigest()
    out = cache_root() / f"{path.name}-{key[:16]}"
    if out.is_dir():
        try:
            artifact.verify(out)
            return out
        except IntegrityError:
            shutil.rmtree(out)  # our own cache entry, damaged: build it again
    console.print(f"converting {path.name} to ONNX Runtime's int4 kernels once (cached in {out})", highlight=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        terminal = console.file.fileno()  # the terminal, also while fd 2 goes to a log file
    except (AttributeError, OSError, ValueError):
        terminal = None
    done = subprocess.run([sys.executable, "-m", "sc2quant.runtime.convert", str(path), str(out)],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=terminal)
    if done.returncode != 0 or not out.is_dir():
        raise UserError(f"converting {path.name} to ONNX failed (exit status {done.returncode}, reason above): "
                        "run it with --engine torch, or export it yourself with `sc2quant export onnx`")
    return out


def main(argv: list[str] | None = None) -> int:
    """The child: SRC OUT. Third-party output goes to a log file, as in every verb."""
    from sc2quant.core.console import console, library_output
    from sc2quant.export import export_onnx

    src, out = argv or sys.argv[1:]
    try:
        with library_output("convert"):
            export_onnx(Path(src), Path(out), **CONVERSION)
    except UserError as exc:
        console.print(f"error: {exc}", highlight=False, markup=False)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
