"""The benchmark's models: the embedded model (trained: drift is meaningful) and a randomly
initialised ~300M StarCoder2 with real proportions (speed and memory only), made deterministically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sc2quant.core.console import console
from sc2quant.core.source import resolve_source

# Real StarCoder2 proportions at about 300M parameters (head dim 64, 4:1 grouped KV heads, 4x MLP).
SHAPE_300M = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=4,
                  intermediate_size=4096, vocab_size=49152, max_position_embeddings=4096, sliding_window=4096)


def embedded() -> Path:
    return resolve_source(None).path


def random_300m(workdir: Path, seed: int = 0) -> Path:
    """Build (once) a bf16 safetensors checkpoint from seed `seed`, with the embedded model's tokenizer.

    The tokenizer has 8,192 tokens and the vocabulary 49,152 rows, as in the real models' lm_head;
    the extra rows are never produced by the tokenizer but cost what they cost at every step.
    """
    out = workdir / f"starcoder2-300m-random-seed{seed}"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    src = embedded()
    base = json.loads((src / "config.json").read_text())
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with console.status(f"building a random 300M StarCoder2 (seed {seed})"):
        torch.manual_seed(seed)
        config = Starcoder2Config(**SHAPE_300M, bos_token_id=base.get("bos_token_id"), eos_token_id=base.get("eos_token_id"),
                                  tie_word_embeddings=True, torch_dtype="bfloat16")
        model = Starcoder2ForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(tmp, safe_serialization=True)
        for f in src.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy2(f, tmp / f.name)
    tmp.rename(out)
    return out


def n_params(model_dir: Path) -> int:
    """Parameters from the model's shape, as `sc2quant inspect` counts them."""
    from sc2quant.core.hf import read_config
    from sc2quant.footprint import counts, shape_from_config

    return counts(shape_from_config(read_config(model_dir))).p
