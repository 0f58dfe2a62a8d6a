"""The runtime: load any artifact sc2quant produced (or a plain StarCoder2 directory) and
generate code. Sampling, stop strings, streaming and fill-in-the-middle are written once
here; engines only compute logits (see sc2quant.engines.base)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sc2quant import artifact
from sc2quant.errors import UserError
from sc2quant.tokens import EOS, FILE_SEP, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX

MAX_NEW_TOKENS_LIMIT = 8192


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0

    def validate(self) -> None:
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise UserError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS_LIMIT}, got {self.max_new_tokens}")
        if not 0 <= self.temperature <= 10:
            raise UserError(f"temperature must be between 0 and 10, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")


def load(path: str | os.PathLike | None = None, device: str = "cpu", verify: bool = True, threads: int | None = None,
         dtype: str = "auto") -> Model:
    """Open an artifact (manifest checked, checksums verified unless verify=False) or a model directory.

    threads: CPU threads (ONNX Runtime's per session; torch's setting is process-wide).
    dtype: compute dtype of a plain checkpoint ("auto": bf16 where the hardware has it, else fp32).
    """
    from sc2quant.loader import resolve_source

    source = resolve_source(path)
    kind = "hf"
    if artifact.is_artifact(source.path):
        manifest = artifact.verify(source.path) if verify else artifact.read_manifest(source.path)
        kind = manifest.kind
    if kind == "onnx":
        from sc2quant.engines.onnx import OnnxEngine

        engine: Any = OnnxEngine(source.path, device=device, threads=threads)
    else:
        from sc2quant.engines.torch_engine import TorchEngine

        if threads:
            torch.set_num_threads(threads)
        engine = TorchEngine(source.path, device=device, dtype=dtype, kind=kind)
    return Model(engine, source.path)


def fim_prompt(prefix: str, suffix: str) -> str:
    """StarCoder2's fill-in-the-middle prompt (PSM order)."""
    return f"{FIM_PREFIX}{prefix}{FIM_SUFFIX}{suffix}{FIM_MIDDLE}"


class Model:
    """A loaded model: `generate`, `stream`, `infill` and `logits` over any engine."""

    def __init__(self, engine: Any, path: Path) -> None:
        self.engine = engine
        self.path = path
        self.tokenizer = engine.tokenizer
        self.context = int(engine.config.get("max_position_embeddings", 2048))
        self.stop_ids = {self.tokenizer.convert_tokens_to_ids(t) for t in (EOS, FILE_SEP)} - {None}

    @property
    def kind(self) -> str:
        return self.engine.kind

    def logits(self, token_ids: torch.Tensor | list[list[int]] | list[int]) -> torch.Tensor:
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        return self.engine.logits(ids.view(1, -1) if ids.dim() == 1 else ids)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise UserError(f"prompts must be strings, got {type(text).__name__}")
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, prompt: str | list[str], max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 stop: list[str] | tuple[str, ...] = (), seed: int = 0) -> str | list[str]:
        """Complete one prompt (returns str) or several of different lengths (returns list)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        sampling = Sampling(max_new_tokens, temperature, top_p, tuple(stop), seed)
        texts = [""] * len(prompts)
        for row, text in self._run([self.encode(p) for p in prompts], sampling):
            texts[row] = text
        return texts[0] if isinstance(prompt, str) else texts

    def stream(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
               stop: list[str] | tuple[str, ...] = (), seed: int = 0) -> Iterator[str]:
        """Yield the completion piece by piece as tokens are decoded."""
        sampling = Sampling(max_new_tokens, temperature, top_p, tuple(stop), seed)
        sent = ""
        for _, text in self._run([self.encode(prompt)], sampling, partial=True):
            if len(text) > len(sent):
                yield text[len(sent):]
                sent = text

    def infill(self, prefix: str, suffix: str, max_new_tokens: int = 64, temperature: float = 0.0,
               top_p: float = 1.0, seed: int = 0) -> str:
        """Fill-in-the-middle in StarCoder2's PSM format; returns the middle only."""
        ids = self.tokenizer(fim_prompt(prefix, suffix), add_special_tokens=False)["input_ids"]
        sampling = Sampling(max_new_tokens, temperature, top_p, (), seed)
        return next(text for _, text in reversed(list(self._run([ids], sampling))))

    def complete(self, prompts: list[str], sampling: Sampling, suffix: str | None = None) -> list[dict[str, Any]]:
        """Completions with OpenAI-style bookkeeping (finish reason, token counts), for the server."""
        if suffix is not None:
            prompts = [fim_prompt(p, suffix) for p in prompts]
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        info: dict[str, Any] = {}
        texts = [""] * len(ids)
        for row, text in self._run(ids, sampling, info=info):
            texts[row] = text
        return [{"text": t, "finish_reason": info["finish"][i], "prompt_tokens": len(ids[i]),
                 "completion_tokens": info["generated"][i]} for i, t in enumerate(texts)]

    def _run(self, prompts: list[list[int]], s: Sampling, partial: bool = False,
             info: dict[str, Any] | None = None) -> Iterator[tuple[int, str]]:
        """The decoding loop shared by every entry point. Yields (row, text so far)."""
        s.validate()
        longest = max(len(p) for p in prompts)
        if longest >= self.context:
            raise UserError(f"the prompt has {longest} tokens but the model's context is {self.context}: shorten it")
        budget = min(s.max_new_tokens, self.context - longest)
        gen = torch.Generator().manual_seed(s.seed)
        state, logits = self.engine.start(prompts)
        out: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        for _ in range(budget):
            tokens = self._sample(logits, s, gen)
            for row, tok in enumerate(tokens.tolist()):
                if done[row]:
                    continue
                if tok in self.stop_ids:
                    done[row] = True
                    continue
                out[row].append(tok)
                text, stopped = self._text(out[row], s.stop)
                done[row] = stopped
                if partial or stopped:
                    yield row, text
            if all(done):
                break
            logits = self.engine.step(state, tokens)
        if info is not None:
            info["finish"] = ["stop" if d else "length" for d in done]
            info["generated"] = [len(o) for o in out]
        for row in range(len(prompts)):
            yield row, self._text(out[row], s.stop)[0]

    def _text(self, ids: list[int], stop: tuple[str, ...]) -> tuple[str, bool]:
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        cut = min((i for i in (text.find(x) for x in stop if x) if i >= 0), default=-1)
        if cut >= 0:
            return text[:cut], True
        return text.rstrip("\ufffd"), False  # hold back an incomplete UTF-8 sequence

    @staticmethod
    def _sample(logits: torch.Tensor, s: Sampling, gen: torch.Generator) -> torch.Tensor:
        if s.temperature == 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits / s.temperature, dim=-1)
        if s.top_p < 1:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < s.top_p  # always keeps the top token
            sorted_p = sorted_p * keep
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=gen).view(-1)
