"""The GPTQ v1 checkpoint format, in one place (as gguf-py does for GGUF).

Per quantized Linear (in_features K, out_features N, group size g, G = K/g groups):
  qweight int32 [K*bits/32, N]   values packed along K, lowest bits first
  qzeros  int32 [G, N*bits/32]   zero point minus one (the v1 convention), packed along N
  scales  fp16  [G, N]
  g_idx   int32 [K]              group of each input channel
  bias    fp16  [N]
Dequantized weight W[n, k] = scales[g_idx[k], n] * (q[k, n] - (qzeros[g_idx[k], n] + 1)).
"""

from __future__ import annotations

import torch

QUANTIZED_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj")


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack int values [R, C] (0 <= v < 2**bits) along dim 0 into int32 [R*bits/32, C]."""
    per = 32 // bits
    q = q.to(torch.int64).reshape(q.shape[0] // per, per, q.shape[1])
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
    packed = (q << shifts).sum(dim=1)
    return _to_int32(packed)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per = 32 // bits
    p = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
    q = (p.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return q.reshape(packed.shape[0] * per, packed.shape[1])


def pack_cols(q: torch.Tensor, bits: int) -> torch.Tensor:
    return pack_rows(q.t().contiguous(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_rows(packed.t().contiguous(), bits).t().contiguous()


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    x = x & 0xFFFFFFFF
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
               bits: int) -> torch.Tensor:
    """Back to a float weight [N, K] (nn.Linear layout)."""
    q = unpack_rows(qweight, bits).float()  # [K, N]
    z = unpack_cols(qzeros, bits).float() + 1  # [G, N]
    g = g_idx.long()
    return (scales.float()[g] * (q - z[g])).t().contiguous()


def grid(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's grid for groups along the last dim of `w` ([..., g]): scale (already rounded to its
    stored fp16 value) and zero point per group. Shared by RTN and the export's GPTQ."""
    maxq = 2**bits - 1
    wmin = w.amin(dim=-1).clamp(max=0)
    wmax = w.amax(dim=-1).clamp(min=0)
    if sym:
        wmax = torch.maximum(wmin.abs(), wmax)
        wmin = -wmax
    scale = (wmax - wmin) / maxq
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.full_like(scale, (maxq + 1) // 2) if sym else torch.round(-wmin / scale)
    return scale.half().float(), zero  # stored in fp16: quantize against the stored value


def pack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, g: int) -> dict[str, torch.Tensor]:
    """Integers q [N, K], scale and zero [N, G] as GPTQ v1 tensors."""
    k = q.shape[1]
    return {
        "qweight": pack_rows(q.t().contiguous().to(torch.int32), bits),
        "qzeros": pack_cols((zero.t() - 1).to(torch.int32), bits),  # v1 stores zero - 1
        "scales": scale.t().contiguous().half(),
        "g_idx": (torch.arange(k, dtype=torch.int32) // g),
    }


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int, sym: bool = True) -> dict[str, torch.Tensor]:
    """Round-to-nearest per group, on the same grid GPTQ uses (so the two compare fairly)."""
    n, k = weight.shape
    g = k if group_size == -1 else group_size
    w = weight.float().reshape(n, k // g, g)
    scale, zero = grid(w, bits, sym)
    q = torch.clamp(torch.round(w / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, 2**bits - 1)
    return pack(q.reshape(n, k), scale, zero, bits, g)


def quantization_config(bits: int, group_size: int, sym: bool, desc_act: bool, method: str, **extra) -> dict:
    """The `quantization_config` block transformers/optimum/vLLM read for GPTQ v1 checkpoints."""
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "true_sequential": True,
        "checkpoint_format": "gptq",
        "meta": {"quantizer": [f"sc2quant:{method}"]},
        **extra,
    }


def quantize_rtn_rows(weight: torch.Tensor, bits: int, group_size: int, sym: bool = True,
                      rows: int = 1024) -> dict[str, torch.Tensor]:
    """`quantize_rtn` over blocks of output rows: the same tensors, with the float and int64
    temporaries of one block instead of the whole matrix (a 7B MLP matrix is 340 MB in fp32)."""
    per = 32 // bits
    rows = max(per, rows // per * per)  # qzeros pack `per` output rows into one int32 word
    if weight.shape[0] <= rows:
        return quantize_rtn(weight, bits, group_size, sym)
    parts = [quantize_rtn(weight[i:i + rows], bits, group_size, sym) for i in range(0, weight.shape[0], rows)]
    return {"qweight": torch.cat([p["qweight"] for p in parts], dim=1), "qzeros": torch.cat([p["qzeros"] for p in parts], dim=1),
            "scales": torch.cat([p["scales"] for p in parts], dim=1), "g_idx": parts[0]["g_idx"]}
