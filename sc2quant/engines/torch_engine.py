"""PyTorch engine for every transformers-loadable artifact: bf16/fp32 checkpoints,
bitsandbytes (int8, nf4/fp4) and GPTQ (GPTQModel kernels, torch's int4 CPU kernel)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from sc2quant.errors import UserError
from sc2quant.loader import load_tokenizer, read_config, resolve_device, torch_dtype, weight_files


def compute_dtype(device: str) -> str:
    """bf16 where the hardware computes it natively, else fp32.

    CPUs without AVX512-BF16/AMX emulate bf16 matmuls about 100x slower than fp32 for
    decoding; bf16 weights are exact in fp32, so widening loses nothing.
    """
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


class TorchEngine:
    def __init__(self, path: Path, device: str = "cpu", dtype: str = "auto", kind: str = "hf") -> None:
        from transformers import AutoModelForCausalLM

        from sc2quant.console import console, quiet_libraries

        quiet_libraries()
        self.kind = kind
        self.device = resolve_device(device)
        self.config = read_config(path)
        weight_files(path)
        self.tokenizer = load_tokenizer(path)
        quant = (self.config.get("quantization_config") or {}).get("quant_method")
        with console.status(f"loading {path.name} ({quant or dtype}) on {self.device}"):
            if quant:
                # quantized checkpoints load exactly as plain transformers loads them (same logits)
                from sc2quant.quantize_gptq import contained_gptqmodel_import

                with contained_gptqmodel_import() if quant == "gptq" else contextlib.nullcontext():
                    self.model = AutoModelForCausalLM.from_pretrained(str(path), device_map=self.device,
                                                                      trust_remote_code=False)
            else:
                self.dtype = compute_dtype(self.device) if dtype == "auto" else dtype
                self.model = AutoModelForCausalLM.from_pretrained(
                    str(path), dtype=torch_dtype(self.dtype), device_map=self.device, trust_remote_code=False)
        if quant == "bitsandbytes":
            from sc2quant.quantize_bnb import guard_cpu_repack

            guard_cpu_repack(self.model)
        self.model.eval()

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        ids = input_ids.to(self.device)
        mask = None if attention_mask is None else attention_mask.to(self.device)
        return self.model(input_ids=ids, attention_mask=mask).logits.float().cpu()

    @torch.inference_mode()
    def start(self, prompts: list[list[int]]) -> tuple[Any, torch.Tensor]:
        """Left-pad (transformers' convention) with explicit positions so padding changes nothing."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise UserError("every prompt needs at least one token")
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        state = {"cache": out.cache, "mask": mask, "next_pos": positions[:, -1] + 1}
        return state, out.logits[:, -1].float().cpu()

    @torch.inference_mode()
    def step(self, state: Any, tokens: torch.Tensor) -> torch.Tensor:
        state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(len(tokens), 1)], dim=1)
        out = self.model(input_ids=tokens.view(-1, 1).to(self.device), attention_mask=state["mask"],
                         position_ids=state["next_pos"].view(-1, 1), cache=state["cache"], use_cache=True)
        state["cache"] = out.cache
        state["next_pos"] = state["next_pos"] + 1
        return out.logits[:, -1].float().cpu()
