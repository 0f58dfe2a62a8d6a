"""GPTQ in one streaming pass over the decoder layers: the int4 grid of `export onnx --weights int4`.

A float checkpoint exported to int4 is quantized here with GPTQ's error feedback (Frantar et al.,
2022) on a few thousand tokens of the calibration text shipped with the package, then handed to
the export's GPTQ path as a standard GPTQ v1 checkpoint. Round-to-nearest and a data-free
scale search leave 2-2.5x the KL of this on the embedded model (bench/results).

Hand-written rather than GPTQModel on purpose: GPTQModel's CPU loop took 72 minutes for the 3B
shape (bench/results/2026-11-30-scale.md), while the export must stay within minutes. The cost
here is what the algorithm needs: one forward pass of each layer on the calibration tokens, one
Hessian per distinct input (q/k/v share theirs, and are solved as one matrix; inputs wider than
HESSIAN_BLOCK in diagonal blocks), and GPTQ's blocked column sweep. Memory: one decoder layer in
fp32, its Hessians, the calibration activations and the output being written; never the model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sc2quant.core.hf import read_config, weight_files
from sc2quant.core.system import return_freed_memory
from sc2quant.core.tensorfile import ShardedWriter, TensorReader
from sc2quant.quant.gptq_format import QUANTIZED_LINEARS, grid, pack, quantization_config

# Linears that read the same input share one Hessian; q/k/v are solved as one stacked matrix.
GROUPS = {"attention input": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "attention output": ("self_attn.o_proj",), "mlp input": ("mlp.c_fc",), "mlp output": ("mlp.c_proj",)}
COLUMN_BLOCK = 128  # GPTQ's lazy-update block
# Inputs wider than this (the MLP output's 12,288 at 3B) get a block-diagonal Hessian: GPTQ's error
# feedback stays within blocks of this many channels. Its Cholesky work grows with the cube of the
# width (32 s per layer at 3B for the whole 12,288, 2 s in blocks of 3,072 on 2 cores).
HESSIAN_BLOCK = 3072


def hessian_block(k: int, group: int) -> int:
    """The widest block of input channels, a multiple of `group` dividing `k`, up to HESSIAN_BLOCK."""
    if k <= HESSIAN_BLOCK:
        return k
    return max(c for c in range(group, HESSIAN_BLOCK + 1, group) if k % c == 0)


def gptq_matrix(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group: int, sym: bool,
                damp: float = 0.01, act_order: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ for one matrix [N, K] with its input Hessian [K, K], groups of `group` consecutive
    input channels: integers [N, K], scale and zero [N, K/group].

    act_order: columns are swept by decreasing Hessian diagonal (the most active inputs first, while
    the most error can still be pushed onto the rest), with each group's grid fixed beforehand from
    the float weights ("static groups"): the checkpoint keeps consecutive groups, no g_idx, so
    every runtime reads it. Without it, columns go in order and each group's grid is taken from the
    weights as the sweep reaches them."""
    n, k = weight.shape
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    maxq = 2**bits - 1
    scales = torch.empty(k // group, n)  # per group, in rows: the sweep reads one at a time
    zeros = torch.empty(k // group, n)
    wt = weight.float().t().contiguous()  # [K, N]: the sweep walks input channels, each a contiguous row
    wt[dead] = 0
    if act_order:
        s_, z_ = grid(wt.t().reshape(n, k // group, group), bits, sym)
        scales[:], zeros[:] = s_.t(), z_.t()
        perm = torch.argsort(torch.diag(h), descending=True)
        wt, h = wt[perm], h[perm][:, perm]
    else:
        perm = torch.arange(k)
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    del h
    qt = torch.empty(k, n)
    groups = (perm // group).tolist()  # the group of each swept channel
    for i1 in range(0, k, COLUMN_BLOCK):
        i2 = min(i1 + COLUMN_BLOCK, k)
        w1 = wt[i1:i2]  # a view: the block's rows are updated in place
        err = torch.empty_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = groups[col]
            if not act_order and col % group == 0:
                s_, z_ = grid(w1[i:i + group].t(), bits, sym)
                scales[g], zeros[g] = s_, z_
            scale, zero = scales[g], zeros[g]
            x = w1[i]
            qi = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
            qt[col] = qi
            e = err[i]
            torch.sub(x, scale * (qi - zero), out=e)
            e /= h1[i, i]
            if i + 1 < i2 - i1:
                w1[i + 1:].addr_(h1[i, i + 1:], e, alpha=-1)
        if i2 < k:
            wt[i2:].addmm_(hinv[i1:i2, i2:].t(), err, alpha=-1)
    q = torch.empty(k, n, dtype=torch.uint8)
    q[perm] = qt.to(torch.uint8)
    return q.t().contiguous(), scales.t().contiguous(), zeros.t().contiguous()


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int) -> torch.Tensor:
    s = scales.repeat_interleave(group, dim=1)
    z = zeros.repeat_interleave(group, dim=1)
    return s * (q.float() - z)


class _Hessian:
    """X^T X of a module's input over every calibration token, in diagonal blocks of `block`
    channels (a forward pre-hook)."""

    def __init__(self, module: torch.nn.Linear, block: int) -> None:
        k = module.in_features
        self.block = block
        self.h = torch.zeros(k // block, block, block)
        self.rows = 0
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].reshape(-1, self.h.shape[0] * self.block).float()
        for j, h in enumerate(self.h):
            part = x[:, j * self.block:(j + 1) * self.block]
            h.addmm_(part.t(), part)
        self.rows += x.shape[0]


def quantize(source: Path, out: Path, samples: list[list[int]], bits: int, group: int, sym: bool,
             damp: float = 0.01, act_order: bool = True, batch: int = 4,
             on_layer: Callable[[int, int], None] = lambda done, total: None) -> dict[str, Any]:
    """Write `source` into `out` as a GPTQ v1 checkpoint (config.json included): every decoder
    Linear by GPTQ on `samples` (token windows no longer than the sliding window; each layer sees the
    float outputs of the layers before it), every other
    tensor as it is. Returns what the manifest records (seconds, tokens, per-layer errors)."""
    from transformers import AutoConfig
    from transformers.models.starcoder2.modeling_starcoder2 import Starcoder2DecoderLayer, Starcoder2RotaryEmbedding

    started = time.monotonic()
    return_freed_memory()
    config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    config._attn_implementation = "sdpa"  # causal without a mask: windows fit in the sliding window
    window = getattr(config, "sliding_window", None)
    assert all(window is None or len(s) <= window for s in samples), "calibration windows longer than the sliding window"
    reader = TensorReader(weight_files(source))
    names = reader.names()
    layers = int(config.num_hidden_layers)
    writer = ShardedWriter(out, max_tensors=8 * len(names), max_name=max(map(len, names), default=16) + 48)
    quantized = {f"model.layers.{i}.{m}" for i in range(layers) for members in GROUPS.values() for m in members}
    assert {m.rsplit(".", 1)[1] for m in quantized} == set(QUANTIZED_LINEARS)
    for name in names:  # everything but the decoder Linears, as it is
        if name.rsplit(".", 1)[0] not in quantized and not (config.tie_word_embeddings and name == "lm_head.weight"):
            writer.add(name, reader.get(name))
    ids = torch.tensor(samples, dtype=torch.long)
    x = torch.nn.functional.embedding(ids, reader.get("model.embed_tokens.weight").float())
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    with torch.no_grad():
        rope = Starcoder2RotaryEmbedding(config)(x[:1], positions)
    errors = []
    with torch.inference_mode():
        for i in range(layers):
            prefix = f"model.layers.{i}."
            with torch.device("meta"):
                layer = Starcoder2DecoderLayer(config, i)
            layer.load_state_dict({n[len(prefix):]: reader.get(n).float() for n in names if n.startswith(prefix)},
                                  assign=True, strict=True)
            layer.eval()

            def run(inputs: torch.Tensor, layer: torch.nn.Module = layer) -> torch.Tensor:
                return torch.cat([layer(inputs[b:b + batch], position_embeddings=rope, attention_mask=None)
                                  for b in range(0, inputs.shape[0], batch)])

            hooks = {}
            for key, members in GROUPS.items():
                first = layer.get_submodule(members[0])
                hooks[key] = _Hessian(first, hessian_block(first.in_features, group))
            # One pass: the Hessians, and the float layer's output as the next layer's input. Running the
            # quantized layer again for that input (GPTQ's reference) cost 4.5 s a layer at 3B and
            # gained 1 % of KL on the embedded model.
            x = run(x)
            for key, members in GROUPS.items():
                hooks[key].handle.remove()
                modules = [layer.get_submodule(m) for m in members]
                stacked = torch.cat([m.weight for m in modules])
                hess = hooks[key]
                hess.h /= hess.rows
                parts = [gptq_matrix(stacked[:, j * hess.block:(j + 1) * hess.block], h, bits, group, sym, damp, act_order)
                         for j, h in enumerate(hess.h)]
                q, scales, zeros = (torch.cat(t, dim=1) for t in zip(*parts))
                dq = dequantize(q, scales, zeros, group)
                delta = (stacked - dq).float()
                errors.append({"layer": i, "modules": key, "relative_error": float(delta.norm() / stacked.norm())})
                start = 0
                for m, module in zip(members, modules):
                    rows = module.out_features
                    for k, v in pack(q[start:start + rows], scales[start:start + rows], zeros[start:start + rows],
                                     bits, group).items():
                        writer.add(prefix + m + "." + k, v)
                    if module.bias is not None:
                        writer.add(prefix + m + ".bias", module.bias.half())  # GPTQ v1 keeps biases in fp16
                    start += rows
                del hooks[key]
            del layer
            on_layer(i + 1, layers)
    files = writer.close()
    cfg = read_config(source)
    cfg["quantization_config"] = quantization_config(bits, group, sym, False, "gptq-lite", damp_percent=damp)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return {"seconds": round(time.monotonic() - started, 1), "samples": len(samples), "seqlen": len(samples[0]),
            "damp": damp, "act_order": act_order, "weight_files": [f.name for f in files],
            "median_relative_error": sorted(e["relative_error"] for e in errors)[len(errors) // 2]}
