"""Helpers the ONNX export tests share (fixtures live in tests/export/conftest.py)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
FP32_TOL = 1e-4


def perturb_vectors(path: Path, seed: int = 1) -> Path:
    """Non-zero biases and LayerNorm parameters: the random init leaves them 0 and 1, which
    would let an exporter that drops them pass."""
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(seed)
    file = path / "model.safetensors"
    weights = load_file(file)
    for name, value in weights.items():
        if value.dim() == 1:
            weights[name] = (value.float() + 0.1 * torch.randn(value.shape, generator=gen)).to(value.dtype)
    save_file(weights, file, metadata={"format": "pt"})
    return path



def code_tokens(tokenizer, n: int, offset: int = 0) -> list[int]:
    """Real code (this repository) as token ids, repeated if needed."""
    text = "\n".join(p.read_text() for p in sorted((REPO / "sc2quant").rglob("*.py")))
    ids = tokenizer(text, verbose=False).input_ids[offset:]
    return (ids * (n // max(len(ids), 1) + 1))[:n]


@torch.inference_mode()
def torch_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].float()


def window(model) -> int:
    return int(model.config.sliding_window)


def max_err(a: Any, b: Any) -> float:
    """Largest absolute difference of two logit arrays (torch tensors or numpy arrays)."""
    return (torch.as_tensor(a).float() - torch.as_tensor(b).float()).abs().max().item()


def load_proto(path: Path):
    import onnx

    return onnx.load(str(path / "model.onnx"), load_external_data=False)


def attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def ops(proto) -> dict[str, int]:
    from collections import Counter

    return Counter(n.op_type for n in proto.graph.node)



@contextlib.contextmanager
def gptqmodel_env(workdir: Path):
    """Importing gptqmodel points HF_HOME at /tmp (via tokenicer), it needs 2 CPU workers here,
    and it writes logs/ into the working directory: keep all three away from the user's."""
    saved, cwd = os.environ.get("HF_HOME"), Path.cwd()
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    os.chdir(workdir)
    try:
        import gptqmodel  # noqa: F401

        yield
    finally:
        os.chdir(cwd)
        if saved is None:
            os.environ.pop("HF_HOME", None)
        else:
            os.environ["HF_HOME"] = saved



def nibbles(packed: np.ndarray) -> np.ndarray:
    """uint8 bytes -> 4-bit values, low nibble first (MatMulNBits' order)."""
    packed = packed.astype(np.uint8)
    return np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)



def relative_error(path: Path, torch_model_dir: Path, ids: list[int]) -> float:
    from transformers import AutoModelForCausalLM

    from sc2quant.runtime.engines import EngineOptions
    from sc2quant.runtime.engines.onnx_engine import OnnxEngine

    ref = torch_logits(AutoModelForCausalLM.from_pretrained(str(torch_model_dir), dtype=torch.float32).eval(), ids)
    got = OnnxEngine(path, EngineOptions()).logits(torch.tensor([ids]))[0]
    return ((got - ref).norm() / ref.norm()).item()



def edit_config(src: Path, dst: Path, **quant) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"].update(quant)
    (dst / "config.json").write_text(json.dumps(config))
    return dst



def assert_nothing_written(parent: Path) -> None:
    assert [p.name for p in parent.iterdir()] == [] if parent.exists() else True

