"""Facts about the machine and the process: CPU capabilities (with a switch tests can force),
threads, peak resident memory, library versions.

CPU kinds differ in what they compute natively: AVX512-BF16 and AMX CPUs multiply bf16 in
hardware (torch's oneDNN kernels, and bitsandbytes' repacked 4-bit kernel), AVX2-only CPUs
emulate bf16. `cpu_caps()` reads the machine; `SC2QUANT_CPU=avx2` or `SC2QUANT_CPU=bf16`
forces the answer, so the path a machine lacks can still be exercised (a forced bf16 on an
AVX2 CPU computes correctly, only slower; bitsandbytes' repacked kernel cannot run there and
stays off, see `sc2quant.core.hf.compute_policy`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import resource
from dataclasses import dataclass
from pathlib import Path

from sc2quant.core.errors import UserError

FORCE_ENV = "SC2QUANT_CPU"
FORCE_CHOICES = ("avx2", "bf16")
SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni", "asimd", "sve")
LIBRARIES = ("sc2quant", "torch", "transformers", "safetensors", "tokenizers", "bitsandbytes", "gptqmodel", "optimum",
             "onnx", "onnxruntime", "onnxruntime-genai", "numpy")


@dataclass(frozen=True)
class CpuCaps:
    """What this CPU computes natively, as sc2quant's compute policy sees it."""

    model: str
    flags: tuple[str, ...]  # the SIMD flags of SIMD_FLAGS present
    native_bf16: bool  # bf16 matmuls in hardware (oneDNN): AVX512-BF16 or AMX
    bnb_repack: bool  # bitsandbytes 4-bit uses its repacked AVX512-BF16 kernel
    forced: str | None = None  # the value of SC2QUANT_CPU when set

    @property
    def kind(self) -> str:
        return "bf16" if self.native_bf16 else "avx2" if "avx2" in self.flags else platform.machine()

    def describe(self) -> str:
        forced = f" (forced by {FORCE_ENV}={self.forced})" if self.forced else ""
        return (f"{self.model}; SIMD {' '.join(self.flags) or 'none'}; native bf16 {'yes' if self.native_bf16 else 'no'}"
                f"; bitsandbytes repacked 4-bit kernel {'yes' if self.bnb_repack else 'no'}{forced}")


def _cpuinfo() -> tuple[str, set[str]]:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), set()
    model, flags = platform.machine(), set()
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model") and model == platform.machine():
            model = value.strip()
        elif key.strip() in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, flags


def env_switch(name: str, default: bool) -> bool:
    """An on/off environment variable: 0/false/no/off or 1/true/yes/on (unset or empty: `default`);
    anything else is refused in one line."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    if value == "":
        return default
    raise UserError(f"{name}={value!r} is neither on nor off: set it to 0 (off) or 1 (on)")


def cpu_flags() -> set[str]:
    """Every flag /proc/cpuinfo lists for this CPU (empty where it cannot be read)."""
    return _cpuinfo()[1]


@functools.cache
def _hardware() -> tuple[str, tuple[str, ...], bool, bool]:
    model, flags = _cpuinfo()
    try:  # torch's own test where torch is installed; without it (the base install) the CPU's flags
        import torch

        native = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except ImportError:
        native = bool({"avx512_bf16", "amx_bf16"} & flags)
    try:
        from bitsandbytes.functional import has_avx512bf16

        bnb = bool(has_avx512bf16())
    except Exception:  # noqa: BLE001 - bitsandbytes absent or without its CPU library
        bnb = False
    return model, tuple(f for f in SIMD_FLAGS if f in flags), native, bnb


def cpu_caps() -> CpuCaps:
    """This CPU's capabilities, or what `SC2QUANT_CPU` forces them to be."""
    model, flags, native, bnb = _hardware()
    forced = os.environ.get(FORCE_ENV) or None
    if forced is None:
        return CpuCaps(model, flags, native, bnb)
    if forced not in FORCE_CHOICES:
        raise UserError(f"{FORCE_ENV}={forced} is not a CPU kind: use {' or '.join(FORCE_CHOICES)}, or unset it")
    # Forcing bf16 on a CPU without it: torch emulates bf16 (correct, slower); bitsandbytes'
    # repacked kernel is not even registered there, so it stays off.
    return CpuCaps(model, flags, forced == "bf16", bnb and forced == "bf16", forced)


def set_threads(threads: int | None) -> int:
    """Use `threads` CPU threads for torch in this process (None: torch's default); returns the count.
    Without torch (the base install: ONNX Runtime takes its count per session) only the check."""
    if threads is not None:
        check_threads(threads)
    try:
        import torch
    except ImportError:
        return threads or os.cpu_count() or 1
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def check_threads(threads: int | None) -> None:
    limit = 4 * (os.cpu_count() or 1)
    if threads is not None and not 1 <= threads <= limit:
        raise UserError(f"--threads {threads} is out of range: use 1 to {limit} (this machine has "
                        f"{os.cpu_count()} logical CPUs)")


@functools.cache
def return_freed_memory() -> bool:
    """Make glibc give large freed blocks back to the system at once (mmap them above 1 MiB).

    By default glibc raises its mmap threshold each time a large block is freed (up to 32 MiB)
    and keeps later ones in the heap: a loop that reads, converts and frees tensors one at a
    time then holds on to ~100 MB it no longer uses. The streaming verbs call this first.
    Returns False where there is no glibc (nothing to do).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        return bool(libc.mallopt(m_mmap_threshold, 1 << 20) and libc.mallopt(m_trim_threshold, 1 << 20))
    except (OSError, AttributeError):
        return False


def vm_hwm(pid: int | str = "self") -> int:
    """A process's peak resident set since its exec (VmHWM, bytes); 0 where /proc cannot say.

    Not getrusage's ru_maxrss: Linux carries that across exec, so a child started from a parent
    holding 1 GB would report at least 1 GB whatever it did itself.
    """
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass  # not Linux, or the process is exiting
    return 0


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux's MemAvailable; None where /proc is missing)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def peak_rss_self() -> int:
    """This process's peak resident bytes (ru_maxrss only where /proc is missing: the best there is)."""
    return vm_hwm() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def tool_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Python and the versions of the libraries that shape an artifact or a measurement."""
    from importlib import metadata  # here: an app that only generates never asks (cold start)

    out = {"python": platform.python_version()}
    for name in (*LIBRARIES, *extra):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def machine() -> dict[str, object]:
    """The machine in a few fields, for result files and CI logs."""
    caps = cpu_caps()
    return {"cpu": caps.model, "logical_cpus": os.cpu_count(), "simd": list(caps.flags), "native_bf16": caps.native_bf16,
            "bnb_repack": caps.bnb_repack, "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "os": platform.platform(), "python": platform.python_version()}
