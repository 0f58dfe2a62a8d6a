"""Build `.device/`: the Python packages a lent GPU machine lacks, small enough to travel with it.

    python tools/device_bundle.py        # then run bench/device.sh there (see bench/README.md)

The GPU machine has Python 3.12, CUDA torch, triton and transformers, and no network. What
sc2quant's CUDA paths need beyond that travels here: binary wheels for CPython 3.12 where PyPI
has them, source archives otherwise (built there, GPTQModel without its CUDA extensions: the
kernels sc2quant chooses on CUDA are triton's and torch's). bitsandbytes ships a library for
every CUDA and ROCm release (125 MB unpacked); only the CPU one and the CUDA 13 ones are kept,
which brings the bundle under the 64 MiB a device call may carry. `.device/` is git-ignored.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

BINARY = ["transformers==5.24.0", "bitsandbytes==0.50.2", "torchao==0.18.0", "datasets==5.2.0", "dill==0.4.1",
          "multiprocess==0.70.19"]
SOURCE = ["gptqmodel==7.6.0", "defuser==0.0.28", "device-smi==0.5.7", "logbar==0.4.15", "tokenicer==0.0.14",
          "pypcre==0.6.4"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
KEEP_BNB = ("libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so")
LIMIT = 64 * 2**20
MARK = "sc2quant-device-bundle.txt"  # in every bundle this script writes: only such a folder is replaced


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", *args], check=True)


def download_source(spec: str, out: Path) -> None:
    """A project's source archive from PyPI's simple index, its sha256 checked. (`pip download
    --no-binary` would build every archive's metadata, GPTQModel's importing torch: minutes.)"""
    name, version = spec.split("==")
    page = urllib.request.urlopen(f"https://pypi.org/simple/{name}/", timeout=60).read().decode()
    pattern = rf'href="([^"#]*/({"[-_]".join(map(re.escape, name.split("-")))}-{re.escape(version)}\.tar\.gz))#sha256=(\w+)"'
    found = re.search(pattern, page, re.IGNORECASE)
    if not found:
        raise SystemExit(f"no source archive of {spec} on PyPI")
    url, filename, sha = found.groups()
    data = urllib.request.urlopen(url, timeout=120).read()
    if hashlib.sha256(data).hexdigest() != sha:
        raise SystemExit(f"{filename}: checksum mismatch")
    (out / filename).write_bytes(data)


def trim_bitsandbytes(wheel: Path) -> None:
    """Rewrite the wheel without the libraries of other CUDA/ROCm/XPU releases."""
    tmp = wheel.with_suffix(".partial")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            name = item.filename.rsplit("/", 1)[-1]
            if name.startswith("libbitsandbytes_") and name not in KEEP_BNB:
                continue
            dst.writestr(item, src.read(item))
    tmp.replace(wheel)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(".device"))
    a = ap.parse_args(argv)
    if a.out.exists() and not (a.out / MARK).is_file():
        raise SystemExit(f"{a.out} exists and is not a bundle this script wrote: choose another --out, "
                         "or move it away yourself")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{a.out.name}-", dir=a.out.parent))  # ours alone, renamed into place
    try:
        platforms = [x for p in PLATFORMS for x in ("--platform", p)]
        pip("download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
            *platforms, "-d", str(tmp), *BINARY)
        for spec in SOURCE:
            download_source(spec, tmp)
        for wheel in tmp.glob("bitsandbytes-*.whl"):
            trim_bitsandbytes(wheel)
        total = sum(f.stat().st_size for f in tmp.iterdir())
        (tmp / MARK).write_text("python tools/device_bundle.py\n")
        if a.out.exists():
            shutil.rmtree(a.out)  # a previous bundle (checked above)
        tmp.rename(a.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the temporary folder made above, never a user's
        raise
    print(f"{a.out}: {len(list(a.out.iterdir()))} files, {total / 2**20:.1f} MiB "
          f"(a device call carries at most {LIMIT // 2**20} MiB with the working tree)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
