"""PyTorch engine for every transformers-loadable artifact: plain bf16/fp32 checkpoints,
bitsandbytes (int8, nf4/fp4) and GPTQ (transformers' GPTQ kernels: torch's int4 CPU kernel).
Loaded through the one loader (`sc2quant.core.hf.load_model`) under its compute policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sc2quant.core.errors import UserError
from sc2quant.core.hf import load_model
from sc2quant.runtime.engines.base import EngineOptions


class TorchEngine:
    name = "torch"

    def __init__(self, path: Path, options: EngineOptions, kind: str = "hf") -> None:
        loaded = load_model(path, dtype=options.dtype, device=options.device)
        self.kind = kind
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.config = loaded.config
        self.policy = loaded.policy
        self.device = str(self.model.device.type)
        self.context = int(self.config.get("max_position_embeddings", 2048))
        self.threads = options.threads

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

    def weight_bytes(self) -> int:
        seen, total = set(), 0
        for t in self.model.state_dict().values():
            if not isinstance(t, torch.Tensor):
                continue
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
        return total

    def describe(self) -> dict[str, Any]:
        dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        return {"engine": self.name, "kind": self.kind, "device": self.device, "dtype": dtype,
                "threads": torch.get_num_threads(), "policy": self.policy.reason,
                "bnb_repack": self.policy.bnb_repack}

    def end_profiling(self) -> Path | None:
        return None
