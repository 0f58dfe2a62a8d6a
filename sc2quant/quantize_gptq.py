"""GPTQ with GPTQModel (AutoGPTQ's maintained successor), saved as a standard GPTQ v1 checkpoint.

GPTQModel processes one decoder layer at a time, so peak memory stays near one copy of
the model plus one layer's working set; we record the measured peak RSS in the manifest.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sc2quant.errors import UserError

GPTQ_BITS = (2, 3, 4, 8)


@contextlib.contextmanager
def contained_gptqmodel_import() -> Iterator[None]:
    """Import GPTQModel without its side effects on the user's environment.

    tokenicer (imported by GPTQModel) points HF_HOME at /tmp when unset, and GPTQModel's
    default CPU worker count (1 on a 2-core machine) stalls quantization.
    """
    saved = {k: os.environ.get(k) for k in ("HF_HOME",)}
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, min(4, os.cpu_count() or 2))))
    try:
        import gptqmodel  # noqa: F401

        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def validate(bits: int, group_size: int, hidden: int, intermediate: int, seqlen: int, context: int) -> None:
    if bits not in GPTQ_BITS:
        raise UserError(f"GPTQ supports {', '.join(map(str, GPTQ_BITS))} bits, not {bits}: use --bits 4 (or 8)")
    if group_size != -1 and (group_size <= 0 or hidden % group_size or intermediate % group_size):
        raise UserError(f"group size {group_size} does not divide the input features ({hidden} and {intermediate}): "
                        "use a divisor such as 32, 64 or 128, or -1 for one group per row")
    if seqlen > context:
        raise UserError(f"calibration sequence length {seqlen} exceeds the model's context {context}: lower --calib-seqlen")


def quantize_gptq_model(source_path: Path, tmp: Path, samples: list[list[int]], bits: int, group_size: int,
                        act_order: bool, sym: bool, damp: float, device: str) -> dict[str, Any]:
    """Calibrate and quantize layer by layer; save the GPTQ v1 checkpoint into `tmp`."""
    with contained_gptqmodel_import():
        from gptqmodel import GPTQModel, QuantizeConfig

        qcfg = QuantizeConfig(bits=bits, group_size=group_size, desc_act=act_order, sym=sym, damp_percent=damp)
        model = GPTQModel.load(str(source_path), qcfg, device=device, trust_remote_code=False)
        calib = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in samples]
        target = tmp.resolve()  # before chdir: `tmp` may be relative to the user's folder
        # GPTQModel writes logs/ into the working directory: keep it out of the user's folder
        with tempfile.TemporaryDirectory(prefix="sc2quant-gptq-") as scratch, contextlib.chdir(scratch):
            log = model.quantize(calib, batch_size=8)
            model.save(str(target))
    layer_errors = _layer_errors(log)
    _drop_unused_files(tmp)
    config = json.loads((tmp / "config.json").read_text())
    return {"layer_errors": layer_errors, "peak_rss_bytes": peak_rss_bytes(),
            "quantization_config": config.get("quantization_config", {})}


def _layer_errors(log: Any) -> list[dict[str, Any]]:
    """GPTQModel's per-module log (layer, module, loss) in a stable, JSON-friendly form."""
    groups = log.values() if isinstance(log, dict) else [log or []]
    rows = []
    for group in groups:
        for entry in group or []:
            if isinstance(entry, dict) and "module" in entry:
                rows.append({k: entry[k] for k in ("layer", "module", "loss", "samples", "damp") if k in entry})
    return rows


def _drop_unused_files(tmp: Path) -> None:
    """GPTQModel writes a quant_log.csv and similar side files; keep the checkpoint standard and small."""
    for name in ("quant_log.csv",):
        (tmp / name).unlink(missing_ok=True)
