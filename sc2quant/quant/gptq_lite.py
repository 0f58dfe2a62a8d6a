"""GPTQ one decoder layer at a time, as the ONNX export builds it: the int4 grid of `export onnx --weights int4`.

A float checkpoint exported to int4 is quantized here with GPTQ's error feedback (Frantar et al.,
2022) on a few thousand tokens of the calibration text shipped with the package; the builder
writes the integers straight into MatMulNBits (`sc2quant.export.onnx_builder`). Round-to-nearest
at the same block leaves 4x the KL of this on the embedded model (bench/results).

Hand-written rather than GPTQModel on purpose: GPTQModel's CPU loop took 72 minutes for the 3B
shape (bench/results/2026-11-30-scale.md), while the export must stay within minutes. The cost
here is what the algorithm needs: one forward pass of each layer on the calibration tokens, one
Hessian per distinct input (q/k/v share theirs, and are solved as one matrix; inputs wider than
HESSIAN_BLOCK in diagonal blocks), and GPTQ's blocked column sweep. Memory: one decoder layer in
fp32, its Hessians, the calibration activations and the output being written; never the model.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from sc2quant.quant.gptq_format import grid

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


@dataclass
class Quantized:
    """One matrix [N, K] on its grid: integers [N, K] (uint8), scale and zero point [N, K/group]."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group: int

    def rows(self, start: int, stop: int) -> Quantized:
        return Quantized(self.q[start:stop], self.scales[start:stop], self.zeros[start:stop], self.group)

    def matmul_nbits(self, sym: bool, dtype: Any) -> dict[str, Any]:
        """ONNX Runtime's MatMulNBits tensors (4 bits): packed [N, K/group, group/2] (low nibble
        first), scales [N, K/group] in `dtype`, zero points [N, ceil(groups/2)] unless symmetric
        (the 8 MatMulNBits implies without them)."""
        n, k = self.q.shape
        g = k // self.group
        q = self.q.reshape(n, g, self.group)
        packed = (q[..., 0::2] | (q[..., 1::2] << 4)).numpy()
        zeros = None
        if not sym:
            z = self.zeros.to(torch.uint8)
            z = torch.nn.functional.pad(z, (0, g % 2))
            zeros = (z[:, 0::2] | (z[:, 1::2] << 4)).numpy()
        return {"qweight": packed, "scales": self.scales.numpy().astype(dtype), "qzeros": zeros}


class Calibrator:
    """GPTQ for one decoder layer at a time, as a model is built layer by layer (the ONNX builder).

    Holds the calibration activations entering the next layer ([samples, seqlen, hidden], fp32),
    the rotary tables and the grid settings. `layer(module)` runs the float layer once over the
    activations (collecting each distinct input's Hessian and the next layer's input) and returns
    every Linear of it quantized, under its name ("self_attn.q_proj", ...) and "qkv" for q/k/v stacked.
    """

    def __init__(self, config: Any, embedding: torch.Tensor, samples: list[list[int]], bits: int, group: int,
                 sym: bool, damp: float = 0.01, act_order: bool = True, batch: int = 4) -> None:
        from transformers.models.starcoder2.modeling_starcoder2 import Starcoder2RotaryEmbedding

        window = getattr(config, "sliding_window", None)
        if window is not None and any(len(s) > window for s in samples):
            raise ValueError(f"calibration windows longer than the sliding window ({window})")
        self.bits, self.group, self.sym, self.damp, self.act_order, self.batch = bits, group, sym, damp, act_order, batch
        ids = torch.tensor(samples, dtype=torch.long)
        self.x = torch.nn.functional.embedding(ids, embedding.float())
        with torch.no_grad():
            self.rope = Starcoder2RotaryEmbedding(config)(self.x[:1], torch.arange(ids.shape[1]).unsqueeze(0))
        self.errors: list[dict[str, Any]] = []
        self.started = time.monotonic()

    def layer(self, layer: torch.nn.Module, index: int) -> dict[str, Quantized]:
        layer.float().eval()
        for module in layer.modules():  # causal attention without a mask: windows fit in the sliding window
            if hasattr(module, "config"):
                module.config._attn_implementation = "sdpa"
        hooks = {}
        for key, members in GROUPS.items():
            first = layer.get_submodule(members[0])
            hooks[key] = _Hessian(first, hessian_block(first.in_features, self.group))
        # One pass: the Hessians, and the float layer's output as the next layer's input. Running the
        # quantized layer again for that input (GPTQ's reference) cost 4.5 s a layer at 3B and
        # gained 1 % of KL on the embedded model.
        with torch.inference_mode():
            self.x = torch.cat([layer(self.x[b:b + self.batch], position_embeddings=self.rope, attention_mask=None)
                                for b in range(0, self.x.shape[0], self.batch)])
        out: dict[str, Quantized] = {}
        jobs = {}
        # Every (matrix, Hessian block) is independent: solved two at a time. GPTQ's column sweep is
        # a chain of small vector operations that one core runs; two sweeps keep both cores busy.
        with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
            for key, members in GROUPS.items():
                hess = hooks.pop(key)
                hess.handle.remove()
                stacked = torch.cat([layer.get_submodule(m).weight.detach() for m in members])
                hess.h /= hess.rows
                jobs[key] = (stacked, [pool.submit(gptq_matrix, stacked[:, j * hess.block:(j + 1) * hess.block], h,
                                                   self.bits, self.group, self.sym, self.damp, self.act_order)
                                       for j, h in enumerate(hess.h)])
        for key, members in GROUPS.items():
            modules = [layer.get_submodule(m) for m in members]
            stacked, futures = jobs.pop(key)
            parts = [f.result() for f in futures]
            whole = Quantized(*(torch.cat(t, dim=1) for t in zip(*parts)), group=self.group)
            dq = dequantize(whole.q, whole.scales, whole.zeros, self.group)
            self.errors.append({"layer": index, "modules": key,
                                "relative_error": float((stacked - dq).norm() / stacked.norm())})
            start = 0
            for name, module in zip(members, modules):
                out[name] = whole.rows(start, start + module.out_features)
                start += module.out_features
            if len(members) > 1:
                out["qkv"] = whole
        return out

    def describe(self) -> dict[str, Any]:
        errors = sorted(e["relative_error"] for e in self.errors)
        return {"seconds": round(time.monotonic() - self.started, 1), "samples": int(self.x.shape[0]),
                "seqlen": int(self.x.shape[1]), "damp": self.damp, "act_order": self.act_order,
                "median_relative_error": errors[len(errors) // 2] if errors else None}
