"""Every contender, built from the same bf16 weights: sc2quant's artifacts through its own API,
transformers on the plain checkpoint, and llama.cpp's GGUF quantizations."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import llamacpp
from sc2quant.core.console import console

DEFAULT_EXPORT = "sc2quant ONNX int4 default (GPTQ-lite b128, lm_head int8)"
DEFAULT_FROM_GPTQ = "sc2quant ONNX int4 from GPTQ g128 (default, lm_head int8)"
SPIN_OFF = "sc2quant ONNX int4 default, SC2QUANT_ORT_SPIN=0"
REFERENCE = {"cpu": "llama.cpp Q4_0", "cuda": "transformers bf16"}  # ratios are against this, within a round


@dataclass(frozen=True)
class Contender:
    name: str
    runtime: str  # "sc2quant" (its runtime, torch or ONNX engine), "transformers", or "llama.cpp"
    path: Path
    dtype: str = "auto"  # torch compute dtype of a plain checkpoint
    static_cache: bool | None = None  # torch engine: None is its default (static + CUDA graphs on CUDA only)
    env: tuple[tuple[str, str], ...] = ()  # set in the measuring child (an ONNX Runtime setting, for example)

    @property
    def is_gguf(self) -> bool:
        return self.runtime == "llama.cpp"


def build_all(name: str, model_dir: Path, workdir: Path, threads: int, calib: tuple[int, int] | None,
              llama: bool = True, device: str = "cpu", only: list[str] | None = None) -> list[Contender]:
    """Quantize/export/convert `model_dir` into `workdir` (reusing what a previous run built).

    calib: GPTQ's (samples, seqlen); None writes the GPTQ-format checkpoint by round-to-nearest
    (`--method rtn`): the same format and kernels, so the same speed, without the Hessian solve
    that takes over half an hour on a 300M model on 2 CPU cores and means nothing on random weights.

    On CUDA the contenders are a GPU user's: transformers bf16, bitsandbytes and GPTQ kernels.
    only: name substrings; the other contenders are neither built nor measured.
    """
    import importlib.util

    from sc2quant.export import export_onnx
    from sc2quant.quant import QuantizeOptions, quantize

    work = workdir / f"{name}-{device}"
    work.mkdir(parents=True, exist_ok=True)

    def wanted(contender: str) -> bool:
        return not only or any(x in contender for x in only)

    def q(dirname: str, **kw) -> Path:
        out = work / dirname
        if not out.exists():
            console.print(f"[bold]building[/] {work.name}: {out.name}")
            quantize(QuantizeOptions(model=str(model_dir), out=str(out), device=device, **kw))
        return out

    def onnx(dirname: str, src: Path, **kw) -> Path:
        out = work / dirname
        if not out.exists():
            console.print(f"[bold]building[/] {work.name}: {out.name}")
            export_onnx(src, out, **kw)
        return out

    # (name, runtime, how to build its path, options); built only when wanted
    plan: list[tuple[str, str, Callable[[], Path], dict]] = [
        # transformers as its users run it: eager steps on the dynamic cache
        ("transformers bf16", "transformers", lambda: model_dir, {"dtype": "bf16", "static_cache": False})]
    if device == "cpu":
        plan.append(("sc2quant torch (bf16 weights)", "sc2quant", lambda: model_dir, {}))
    else:
        plan.append(("sc2quant torch bf16 (static cache, CUDA graph)", "sc2quant", lambda: model_dir, {"dtype": "bf16"}))
    plan += [("sc2quant bnb int8", "sc2quant", lambda: q("bnb-int8", method="bnb", bits=8), {}),
             ("sc2quant bnb nf4", "sc2quant", lambda: q("bnb-nf4", method="bnb", bits=4, quant_type="nf4"), {})]

    def gptq() -> Path:
        if calib is None:
            return q("gptq-format-rtn-int4-g128", method="rtn", bits=4, group_size=128)
        return q("gptq-int4-g128", method="gptq", bits=4, group_size=128, calib_samples=calib[0],
                 calib_seqlen=calib[1])

    if device == "cuda" and importlib.util.find_spec("gptqmodel") is None:
        console.print("[yellow]gptqmodel is not installed: no GPTQ contender[/]")
    else:
        plan.append(("sc2quant GPTQ int4 g128", "sc2quant", gptq, {}))
    if device == "cpu":
        plan += [
            ("sc2quant ONNX fp32", "sc2quant", lambda: onnx("onnx-fp32", model_dir, dtype="fp32"), {}),
            # the defaults: `sc2quant export onnx MODEL --weights int4` (GPTQ on the shipped calibration
            # text, block 128, int8 lm_head shared with the embedding) and `sc2quant export onnx GPTQ-ARTIFACT`
            (DEFAULT_EXPORT, "sc2quant", lambda: onnx("onnx-int4-default", model_dir, weights="int4"), {}),
            (SPIN_OFF, "sc2quant",
             lambda: onnx("onnx-int4-default", model_dir, weights="int4"), {"env": (("SC2QUANT_ORT_SPIN", "0"),)}),
            # the choices the defaults were picked from: block size, data-free or calibrated, lm_head
            ("sc2quant ONNX int4 (RTN b128, lm_head int8)", "sc2quant",
             lambda: onnx("onnx-int4-rtn-b128", model_dir, weights="int4", int4_method="rtn"), {}),
            ("sc2quant ONNX int4 (RTN b32, lm_head int8; the defaults before)", "sc2quant",
             lambda: onnx("onnx-int4-rtn-b32", model_dir, weights="int4", int4_method="rtn", block_size=32), {}),
            ("sc2quant ONNX int4 (GPTQ-lite b64, lm_head int8)", "sc2quant",
             lambda: onnx("onnx-int4-gptq-lite-b64", model_dir, weights="int4", block_size=64), {}),
            ("sc2quant ONNX int4 (GPTQ-lite b32, lm_head int8)", "sc2quant",
             lambda: onnx("onnx-int4-gptq-lite-b32", model_dir, weights="int4", block_size=32), {}),
            ("sc2quant ONNX int4 (GPTQ-lite b128, lm_head int4)", "sc2quant",
             lambda: onnx("onnx-int4-gptq-lite-b128-lm4", model_dir, weights="int4", lm_head="int4"), {}),
            (DEFAULT_FROM_GPTQ, "sc2quant", lambda: onnx("onnx-int4-gptq-default", gptq()), {}),
        ]
    contenders = [Contender(name, runtime, build(), **kw) for name, runtime, build, kw in plan if wanted(name)]
    llama = llama and device == "cpu" and wanted("llama.cpp")
    if llama:
        llamacpp.ensure_built()
        f16 = llamacpp.convert(model_dir, work / "gguf-F16.gguf")
        # the calibration GPTQ gets here; a random model's matrix only has to exist (speed)
        samples, seqlen = calib or (8, 256)
        importance = llamacpp.imatrix(f16, model_dir, work / f"imatrix-{samples}x{seqlen}.gguf", threads, samples, seqlen)
        for quant in llamacpp.QUANTS:
            if wanted(f"llama.cpp {quant}"):
                path = llamacpp.quantize(f16, quant, work / f"gguf-{quant.replace('+', '-')}.gguf", threads, importance)
                contenders.append(Contender(f"llama.cpp {quant}", "llama.cpp", path))
    return contenders
