"""`sc2quant quantize`: `quantize(QuantizeOptions)` and the registry of methods.

Adding a method is one module with a `Quantizer` subclass plus one line here. Entries are
imported on first use, so `sc2quant --help` never imports bitsandbytes or GPTQModel.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

from sc2quant.core import artifact
from sc2quant.core.console import api_output
from sc2quant.core.errors import UserError
from sc2quant.core.hf import check_tokenizer, copy_tokenizer, read_config, resolve_device, weight_files
from sc2quant.core.source import resolve_source
from sc2quant.quant.base import QuantizeOptions, Quantizer

VERB = "quantize"
QUANTIZERS: dict[str, str] = {
    "gptq": "sc2quant.quant.gptq:GptqQuantizer",
    "bnb": "sc2quant.quant.bnb:BnbQuantizer",
    "rtn": "sc2quant.quant.rtn:RtnQuantizer",
}


def get_quantizer(name: str) -> Quantizer:
    if name not in QUANTIZERS:
        raise UserError(f"unknown method '{name}': choose one of {', '.join(QUANTIZERS)}")
    module, cls = QUANTIZERS[name].split(":")
    return getattr(importlib.import_module(module), cls)()


COMMON_OPTIONS = {"model", "out", "method", "device", "force", "allow_pickle", "extra"}


@api_output("quantize")
def quantize(opts: QuantizeOptions, given: set[str] | None = None) -> Path:
    """Quantize `opts.model` with `opts.method`; returns the artifact's directory.

    given: the options the user set; one that `opts.method` does not read is refused (default:
    every option that differs from its default)."""
    quantizer = get_quantizer(opts.method)
    if given is None:
        defaults = QuantizeOptions()
        given = {f for f in QuantizeOptions.__dataclass_fields__ if getattr(opts, f) != getattr(defaults, f)}
    extra = sorted(set(given) - COMMON_OPTIONS - set(quantizer.applicable(opts)))
    if extra:
        flags = ", ".join("--" + e.replace("_", "-") for e in extra)
        raise UserError(f"{flags} {'does' if len(extra) == 1 else 'do'} not apply to --method {opts.method}: drop it "
                        "(from the command line or the recipe)")
    source = resolve_source(opts.model)
    config = read_config(source.path)
    weight_files(source.path, opts.allow_pickle)
    check_tokenizer(source.path)
    if config.get("quantization_config"):
        raise UserError(f"{source.id} is already quantized ({config['quantization_config'].get('quant_method')}): "
                        "quantize the bf16 model")
    device = resolve_device(opts.device)
    quantizer.validate(opts, config)
    method = quantizer.method(opts)
    out = artifact.output_path(opts.out, Path("out") / f"{source.short_name}-{method.name}")
    calib = [opts.calib] if isinstance(opts.calib, str) else list(opts.calib)
    inputs = [source.path, *(c for c in calib if c != "calib_data")]
    artifact.check_output_path(out, opts.force, VERB, inputs)  # before calibration: refusals cost nothing
    prepared, calibration = quantizer.prepare(opts, source, config)
    started = time.time()
    with artifact.staging(out, opts.force, VERB, inputs) as tmp:
        details = quantizer.run(opts, source, tmp, prepared, device)
        copy_tokenizer(source.path, tmp)
        params = {"method_name": method.name, **quantizer.params(opts), "device": device,
                  "seconds": round(time.time() - started, 2), **details}
        if calibration is not None:
            params["calibration"] = calibration
        manifest = artifact.Manifest(kind=method.kind, method=method.label, bits=opts.bits, group_size=method.group,
                                     params=params, source=artifact.source_identity(source.id, source.kind, source.path),
                                     verb=VERB)
        artifact.commit(tmp, out, manifest, opts.force)
    return out


__all__ = ["QUANTIZERS", "QuantizeOptions", "Quantizer", "get_quantizer", "quantize"]
