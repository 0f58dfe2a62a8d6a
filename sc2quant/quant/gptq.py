"""GPTQ with GPTQModel (AutoGPTQ's maintained successor), saved as a standard GPTQ v1 checkpoint.

GPTQModel processes one decoder layer at a time. The checkpoint is what transformers, optimum,
vLLM and ONNX export read (artifact kind "gptq", loaded back by the runtime's torch engine).
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sc2quant.core.console import progress, status
from sc2quant.core.errors import UserError
from sc2quant.core.hf import load_tokenizer
from sc2quant.core.source import ModelSource
from sc2quant.core.system import peak_rss_self
from sc2quant.formats import Method
from sc2quant.formats.gptq import GPTQ_BITS, gptqmodel_imported
from sc2quant.quant.base import QuantizeOptions, Quantizer, check_group_size


class GptqQuantizer(Quantizer):
    name = "gptq"
    options = ("bits", "group_size", "act_order", "sym", "damp", "calib", "calib_samples", "calib_seqlen", "seed")

    def validate(self, opts: QuantizeOptions, config: dict[str, Any]) -> None:
        if opts.bits not in GPTQ_BITS:
            raise UserError(f"GPTQ supports {', '.join(map(str, GPTQ_BITS))} bits, not {opts.bits}: "
                            "use --bits 4 (or 8)")
        check_group_size(opts.group_size, config)
        if not (isinstance(opts.damp, (int, float)) and math.isfinite(opts.damp) and 0 < opts.damp < 1):
            raise UserError(f"--damp {opts.damp} is not a dampening fraction: use a number between 0 and 1 "
                            "(0.01 is the usual value)")
        if opts.calib_seqlen > config["max_position_embeddings"]:
            raise UserError(f"calibration sequence length {opts.calib_seqlen} exceeds the model's context "
                            f"{config['max_position_embeddings']}: lower --calib-seqlen")

    def method(self, opts: QuantizeOptions) -> Method:
        return Method("gptq", opts.bits, opts.group_size, sym=opts.sym)

    def prepare(self, opts: QuantizeOptions, source: ModelSource, config: dict[str, Any]) -> tuple[Any, dict | None]:
        from sc2quant.core.data import calibration_samples

        return calibration_samples(load_tokenizer(source.path), opts.calib, opts.calib_samples, opts.calib_seqlen,
                                   opts.seed)

    def run(self, opts: QuantizeOptions, source: ModelSource, tmp: Path, prepared: Any, device: str) -> dict[str, Any]:
        """Calibrate and quantize layer by layer; save the GPTQ v1 checkpoint into `tmp`."""
        from sc2quant.core.hf import read_config

        layers = int(read_config(source.path)["num_hidden_layers"])
        with gptqmodel_imported():
            from gptqmodel import GPTQModel, QuantizeConfig

            # GPTQModel's default group-aware activation ordering needs groups: off for one group per row
            aware = {"act_group_aware": False} if opts.group_size == -1 else {}
            qcfg = QuantizeConfig(bits=opts.bits, group_size=opts.group_size, desc_act=opts.act_order, sym=opts.sym,
                                  damp_percent=opts.damp, **aware)
            with status(f"loading {source.path.name} into GPTQModel"):
                model = GPTQModel.load(str(source.path), qcfg, device=device, trust_remote_code=False)
            calib = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in prepared]
            target = tmp.resolve()  # before chdir: `tmp` may be relative to the user's folder
            # GPTQModel writes logs/ into the working directory: keep it out of the user's folder
            with tempfile.TemporaryDirectory(prefix="sc2quant-gptq-") as scratch, contextlib.chdir(scratch):
                with progress() as bar, _layer_progress(model, bar, layers, len(calib)):
                    log = model.quantize(calib, batch_size=8)
                with status("saving the GPTQ checkpoint"):
                    model.save(str(target))
        (tmp / "quant_log.csv").unlink(missing_ok=True)  # GPTQModel's side file; the manifest keeps the losses
        config = json.loads((tmp / "config.json").read_text())
        return {"layer_errors": _layer_errors(log), "peak_rss_bytes": peak_rss_self(),
                "quantization_config": config.get("quantization_config", {})}


@contextlib.contextmanager
def _layer_progress(model: Any, bar: Any, layers: int, samples: int) -> Iterator[None]:
    """GPTQModel's per-layer progress (its layer callback) and each module's loss (the rows its
    processors log), shown in sc2quant's own display."""
    from gptqmodel.looper.loop_processor import LoopProcessor

    task = bar.add_task(f"GPTQ on {samples} samples", total=layers)
    losses: list[float] = []
    log_new_row = LoopProcessor.log_new_row

    def row(processor: Any, stat: dict[str, Any]) -> Any:
        with contextlib.suppress(TypeError, ValueError, KeyError):
            losses.append(float(stat["loss"]))
        return log_new_row(processor, stat)

    def layer_done(layer_idx: int, submodule_finalized: bool) -> None:
        if submodule_finalized and layer_idx < layers:
            loss = f", last loss {losses[-1]:.3g}" if losses else ""
            bar.update(task, completed=layer_idx + 1, description=f"GPTQ layer {layer_idx + 1}/{layers}{loss}")

    model.layer_callback = layer_done
    LoopProcessor.log_new_row = row  # GPTQModel has no loss callback; restored right after
    try:
        yield
    finally:
        LoopProcessor.log_new_row = log_new_row
        model.layer_callback = None


def _layer_errors(log: Any) -> list[dict[str, Any]]:
    """GPTQModel's per-module log (layer, module, loss) in a stable, JSON-friendly form."""
    groups = log.values() if isinstance(log, dict) else [log or []]
    rows = []
    for group in groups:
        for entry in group or []:
            if isinstance(entry, dict) and "module" in entry:
                rows.append({k: entry[k] for k in ("layer", "module", "loss", "samples", "damp") if k in entry})
    return rows
