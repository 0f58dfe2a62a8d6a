"""Rewrite a checkpoint tensor by tensor: read one tensor, transform it, write it, free it.

The methods that need no calibration (round-to-nearest, bitsandbytes) quantize each decoder
Linear independently, so they never need the model in memory: peak memory is the largest
tensor's working set, not the model (see `sc2quant.core.tensorfile`). Shards are written like
the hub's. GPTQ needs activations and goes through GPTQModel's layer-by-layer loop instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sc2quant.core.console import progress
from sc2quant.core.hf import read_config, weight_files
from sc2quant.core.system import return_freed_memory
from sc2quant.core.tensorfile import ShardedWriter, TensorReader
from sc2quant.quant.gptq_format import QUANTIZED_LINEARS

# (weight, bias or None) -> the tensors to store under the Linear's prefix ("weight", "SCB", "qweight", ...)
LinearTransform = Callable[[str, torch.Tensor, torch.Tensor | None], dict[str, torch.Tensor]]


@dataclass
class Rewrite:
    quantized_modules: list[str] = field(default_factory=list)
    kept_tensors: list[str] = field(default_factory=list)
    quantized_weight_bytes: int = 0  # everything stored for the quantized Linears but their biases
    kept_bytes: int = 0
    files: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"quantized_modules": self.quantized_modules, "kept_tensors": self.kept_tensors,
                "quantized_weight_bytes": self.quantized_weight_bytes, "kept_bytes": self.kept_bytes,
                "total_weight_bytes": self.quantized_weight_bytes + self.kept_bytes, "weight_files": self.files}


def rewrite(source: Path, out: Path, transform: LinearTransform, label: str,
            kept_dtype: torch.dtype = torch.bfloat16) -> Rewrite:
    """Write `source`'s weights into `out`: decoder Linears through `transform`, every other tensor
    as it is (floating ones in `kept_dtype`); a tied lm_head is not stored (it is the embedding)."""
    return_freed_memory()
    config = read_config(source)
    reader = TensorReader(weight_files(source))
    names = reader.names()
    linears = {n.rsplit(".", 1)[0] for n in names
               if n.endswith(".weight") and n.rsplit(".", 2)[-2] in QUANTIZED_LINEARS and n.startswith("model.layers.")}
    tied = config.get("tie_word_embeddings", True)
    writer = ShardedWriter(out, max_tensors=8 * len(names), max_name=max(map(len, names), default=16) + 48)
    result = Rewrite()
    with progress() as bar:
        task = bar.add_task(label, total=sum(reader.entries[n].nbytes for n in names))
        for name in names:
            module, leaf = name.rsplit(".", 1)
            if not (tied and name == "lm_head.weight") and not (module in linears and leaf == "bias"):
                if module in linears:
                    bias = f"{module}.bias"
                    stored = transform(module, reader.get(name), reader.get(bias) if bias in reader else None)
                    for key, tensor in stored.items():
                        writer.add(f"{module}.{key}", tensor)
                        if key == "bias":
                            result.kept_tensors.append(f"{module}.bias")
                            result.kept_bytes += tensor.numel() * tensor.element_size()
                        else:
                            result.quantized_weight_bytes += tensor.numel() * tensor.element_size()
                    result.quantized_modules.append(module)
                else:
                    tensor = reader.get(name)
                    tensor = tensor.to(kept_dtype) if tensor.is_floating_point() else tensor
                    writer.add(name, tensor)
                    result.kept_tensors.append(name)
                    result.kept_bytes += tensor.numel() * tensor.element_size()
            bar.advance(task, reader.entries[name].nbytes)
    result.files = [f.name for f in writer.close()]
    return result
