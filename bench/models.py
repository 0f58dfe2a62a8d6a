"""The benchmark's models: the embedded model (trained: drift is meaningful), a randomly
initialised ~300M StarCoder2 with real proportions (speed and memory only), and random models
with the real 3B/7B/15B shapes written shard by shard as the hub ships them (`write_random_sharded`,
also used by the memory tests). All made deterministically."""

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


def random_300m(workdir: Path, seed: int = 0, decodable: bool = False) -> Path:
    """Build (once) a bf16 safetensors checkpoint from seed `seed`, with the embedded model's tokenizer.

    The tokenizer has 8,192 tokens and the vocabulary 49,152 rows, as in the real models' lm_head;
    the extra rows are never produced by the tokenizer but cost what they cost at every step.
    decodable: those rows of the (tied) embedding are zero, so their logits are 0 and the largest of
    8,192 random logits always beats them: greedy output is text the tokenizer can decode (streamed
    text arrives token by token, as from a real model), at the same cost per step.
    """
    out = workdir / f"starcoder2-300m-random-seed{seed}{'-decodable' if decodable else ''}"
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
        if decodable:
            with torch.no_grad():
                model.get_input_embeddings().weight[len_tokenizer(src):] = 0
        model.save_pretrained(tmp, safe_serialization=True)
        for f in src.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy2(f, tmp / f.name)
    tmp.rename(out)
    return out


def len_tokenizer(model_dir: Path) -> int:
    from sc2quant.core.hf import load_tokenizer

    return len(load_tokenizer(model_dir))


def n_params(model_dir: Path) -> int:
    """Parameters from the model's shape, as `sc2quant inspect` counts them."""
    from sc2quant.core.hf import read_config
    from sc2quant.footprint import counts, shape_from_config

    return counts(shape_from_config(read_config(model_dir))).p


# The real StarCoder2 shapes (config.json of bigcode/starcoder2-{3b,7b,15b}).
REAL_SHAPES = {
    "3b": dict(hidden_size=3072, num_hidden_layers=30, num_attention_heads=24, num_key_value_heads=2,
               intermediate_size=12288, tie_word_embeddings=True),
    "7b": dict(hidden_size=4608, num_hidden_layers=32, num_attention_heads=36, num_key_value_heads=4,
               intermediate_size=18432, tie_word_embeddings=True),
    "15b": dict(hidden_size=6144, num_hidden_layers=40, num_attention_heads=48, num_key_value_heads=4,
                intermediate_size=24576, tie_word_embeddings=False),
}


def write_random_sharded(path: Path, tokenizer_dir: Path | None = None, seed: int = 0, **shape) -> Path:
    """Random bf16 weights of a StarCoder2 shape (3B's unless `shape` says otherwise), written one
    decoder layer per shard with the hub's index, so the whole model is never in memory."""
    import torch
    from safetensors.torch import save_file
    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    shape = {**REAL_SHAPES["3b"], "vocab_size": 49152, "sliding_window": 4096, "max_position_embeddings": 16384,
             **shape}
    config = Starcoder2Config(**shape, bos_token_id=0, eos_token_id=0, pad_token_id=0, dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Starcoder2ForCausalLM(config).state_dict().items()
                  if not (k == "lm_head.weight" and config.tie_word_embeddings)}
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    groups = sorted({".".join(k.split(".")[:3]) if ".layers." in k else "rest" for k in shapes})
    index = {}
    for i, group in enumerate(groups):
        names = [k for k in shapes if (".".join(k.split(".")[:3]) if ".layers." in k else "rest") == group]
        shard = {k: (torch.randn(shapes[k], generator=gen) * 0.02).to(torch.bfloat16) for k in names}
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(shard, partial / file, metadata={"format": "pt"})
        index.update({k: file for k in names})
        del shard
    (partial / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    config.save_pretrained(partial)
    for f in (tokenizer_dir or embedded()).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, partial / f.name)
    partial.rename(path)
    return path
