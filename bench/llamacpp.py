"""llama.cpp, the CPU peer: fetched as the llama-cpp-python sdist (its vendored llama.cpp), built
once into bench/.cache, then used for GGUF conversion, quantization, llama-bench and logits.

The PyPI wheel of llama-cpp-python ships no command-line tools, so the tools are built from the
same sources with CMake; the Python bindings of that sdist are pointed at the freshly built
shared library (LLAMA_CPP_LIB_PATH) for logits on exact token windows.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sc2quant.core.console import console
from sc2quant.core.errors import UserError

VERSION = "0.3.36"  # llama-cpp-python release whose vendored llama.cpp is the peer
CACHE = Path(__file__).parent / ".cache"
SDIST = CACHE / f"llama_cpp_python-{VERSION}"
SOURCE = SDIST / "vendor" / "llama.cpp"
BUILD = SOURCE / "build"
TOOLS = ("llama-quantize", "llama-bench", "llama-imatrix", "llama-server", "llama-completion")  # editor.py, embed.py
# "+imatrix": quantized with an importance matrix computed by llama-imatrix on the same
# calibration tokens GPTQ sees (llama.cpp's strongest 4-bit settings; its KL scoreboard puts
# Q4_K_M+imatrix at about 0.4x Q4_0's KL)
QUANTS = ("Q8_0", "Q4_0", "Q4_K_M", "Q4_K_M+imatrix", "IQ4_XS+imatrix")


def tool(name: str) -> Path:
    return BUILD / "bin" / name


def ensure_built() -> None:
    """Download the sdist (pip) and build the tools and libllama (CMake, native CPU flags)."""
    marker, options = BUILD / "sc2quant-cpu-options", cpu_options()  # a build with other CPU options is made again
    if (all(tool(t).exists() for t in TOOLS) and any((BUILD / "bin").glob("libllama.so*")) and marker.exists()
            and marker.read_text() == " ".join(options)):
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    if not SOURCE.exists():
        with console.status(f"downloading llama-cpp-python {VERSION} (sources)"):
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                  f"llama-cpp-python=={VERSION}", "-d", str(CACHE)])
        with tarfile.open(CACHE / f"llama_cpp_python-{VERSION}.tar.gz") as tar:
            tar.extractall(CACHE, filter="data")
    console.print("building llama.cpp (about 7 minutes on 2 cores, once)")
    _run(["cmake", "-B", str(BUILD), "-S", str(SOURCE), *options, "-DLLAMA_CURL=OFF",
          "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=ON",
          "-DCMAKE_BUILD_TYPE=Release"])
    _run(["cmake", "--build", str(BUILD), "-j", str(os.cpu_count() or 2), "--target", *TOOLS, "llama"])
    marker.write_text(" ".join(options))


# /proc/cpuinfo flag -> ggml's CMake switch, for builds that cannot use GGML_NATIVE (below)
_GGML_SWITCHES = {"avx": "GGML_AVX", "avx2": "GGML_AVX2", "fma": "GGML_FMA", "f16c": "GGML_F16C", "bmi2": "GGML_BMI2",
                  "avx_vnni": "GGML_AVX_VNNI", "avx512f": "GGML_AVX512", "avx512vbmi": "GGML_AVX512_VBMI",
                  "avx512_vnni": "GGML_AVX512_VNNI", "avx512_bf16": "GGML_AVX512_BF16"}


def cpu_options(flags: set[str] | None = None) -> list[str]:
    """The CPU flags llama.cpp is built with: native, except AMX.

    llama.cpp's AMX backend segfaults in worker threads on AMX machines whose kernel disables the
    tile state per thread (XFD; ggml-org/llama.cpp#20824, fix proposed in PR #26954, not in this
    release): on those machines every other native instruction set is switched on by name and
    AMX is left off, so llama.cpp runs its AVX512 kernels (with its repacked Q4_0/IQ4 layouts).
    """
    if flags is None:  # this machine's
        from sc2quant.core.system import cpu_flags

        flags = cpu_flags()
    if not any(f.startswith("amx") for f in flags):
        return ["-DGGML_NATIVE=ON"]
    return ["-DGGML_NATIVE=OFF", *(f"-D{v}={'ON' if k in flags else 'OFF'}" for k, v in _GGML_SWITCHES.items())]


def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise UserError(f"{' '.join(map(str, cmd[:3]))} failed: " + " | ".join(tail))
    return done


def convert(model_dir: Path, out: Path) -> Path:
    """HF directory -> F16 GGUF with llama.cpp's own converter (see gguf_convert.py for the one patch)."""
    if not out.exists():
        with console.status(f"converting {model_dir.name} to GGUF F16"):
            _run([sys.executable, str(Path(__file__).parent / "gguf_convert.py"), str(SOURCE), str(model_dir),
                  "--outtype", "f16", "--outfile", str(out)])
    return out


def imatrix(f16: Path, model_dir: Path, out: Path, threads: int, samples: int, seqlen: int) -> Path:
    """llama-imatrix over GPTQ's calibration windows (`calibration_samples`, same seed), as text:
    `samples` chunks of `seqlen` tokens."""
    if out.exists():
        return out
    from sc2quant.core.data import calibration_samples
    from sc2quant.core.hf import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    windows, _ = calibration_samples(tokenizer, n_samples=samples, seqlen=seqlen)
    text = out.with_suffix(".txt")
    text.write_text("".join(tokenizer.decode(w) for w in windows))
    with console.status(f"llama-imatrix: {samples} x {seqlen} calibration tokens"):
        _run([str(tool("llama-imatrix")), "-m", str(f16), "-f", str(text), "-o", str(out), "-c", str(seqlen),
              "--chunks", str(samples), "-t", str(threads), "--no-ppl"])
    return out


def quantize(f16: Path, quant: str, out: Path, threads: int, importance: Path | None = None) -> Path:
    """llama-quantize to `quant` ("X+imatrix": X with the `importance` matrix)."""
    if quant == "F16":
        return f16
    base, _, with_imatrix = quant.partition("+")
    if not out.exists():
        extra = ["--imatrix", str(importance)] if with_imatrix and importance else []
        if with_imatrix and not importance:
            raise UserError(f"{quant} needs an importance matrix")
        with console.status(f"llama-quantize {quant}"):
            _run([str(tool("llama-quantize")), *extra, str(f16), str(out), base, str(threads)])
    return out


def bench_once(gguf: Path, threads: int, prefill: int, prompt: int, decode: int) -> dict[str, float]:
    """One llama-bench run: prefill tok/s of `prefill` tokens from empty, decode tok/s of `decode`
    tokens after a `prompt`-token context (-d), each averaged over llama-bench's own -r 1 run
    after its warm-up. Peak RSS is the child's VmHWM (bench.timing.run_child)."""
    from bench.timing import run_child

    def one(args: list[str]) -> tuple[float, int]:
        out, rss = run_child([str(tool("llama-bench")), "-m", str(gguf), "-t", str(threads), "-r", "1", "-o", "json",
                              *args])
        rows = json.loads(out)
        return float(rows[0]["avg_ts"]), rss

    pp, rss_p = one(["-p", str(prefill), "-n", "0"])
    tg, rss_g = one(["-p", "0", "-n", str(decode), "-d", str(prompt)])
    return {"prefill_tokens_per_s": pp, "decode_tokens_per_s": tg, "peak_rss_bytes": max(rss_p, rss_g)}


@contextlib.contextmanager
def gguf_logits(gguf: Path, n_ctx: int, threads: int) -> Iterator[Callable[[Any], Any]]:
    """A LogitsFn over a GGUF: every position's logits, one window at a time (llama.cpp's context
    is sequential), through llama-cpp-python's bindings on the library built above."""
    import numpy as np
    import torch

    os.environ["LLAMA_CPP_LIB_PATH"] = str(BUILD / "bin")
    if str(SDIST) not in sys.path:
        sys.path.insert(0, str(SDIST))
    from llama_cpp import Llama

    llm = Llama(str(gguf), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, n_threads=threads,
                n_threads_batch=threads, verbose=False)

    def fn(windows: torch.Tensor) -> torch.Tensor:
        out = []
        for row in windows.tolist():
            llm.reset()
            llm.eval(row)
            out.append(torch.from_numpy(np.array(llm.scores[: len(row)], dtype=np.float32)))
        return torch.stack(out)

    try:
        yield fn
    finally:
        llm.close()  # before interpreter shutdown, when the bindings' globals are gone
