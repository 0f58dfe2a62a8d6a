"""The runtime's public API: `load` any artifact sc2quant produced (or a plain StarCoder2
directory) and generate code. Sampling, stop strings, streaming and fill-in-the-middle are
written once here, in `Model.stream_generate`; engines only compute logits (see
`sc2quant.runtime.engines.base`). `generate`, `stream`, `infill` and the server all use
`stream_generate`, so streamed and non-streamed text are the same by construction.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sc2quant.core import artifact
from sc2quant.core.errors import UserError
from sc2quant.core.tokens import STOP_TOKENS, fim_prompt
from sc2quant.runtime.engines import Engine, EngineOptions, open_engine

MAX_NEW_TOKENS_LIMIT = 8192
MAX_SEED = 2**63 - 1


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None  # None: a fresh random seed when sampling (reported in each Chunk)

    def validate(self) -> None:
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise UserError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS_LIMIT}, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= 10):
            raise UserError(f"temperature must be between 0 and 10, got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise UserError(f"seed must be between 0 and {MAX_SEED}, got {self.seed}")
        if any(not isinstance(s, str) for s in self.stop):
            raise UserError("stop sequences must be strings")

    def resolved_seed(self) -> int:
        """The seed this generation uses: the given one, else 0 for greedy, else a fresh random one."""
        if self.seed is not None:
            return self.seed
        return 0 if self.temperature == 0 else secrets.randbits(63)


@dataclass(frozen=True)
class Chunk:
    """A piece of one row's completion. The last chunk of a row has its `finish_reason`."""

    row: int
    text: str  # new text since this row's previous chunk (may be empty in the last chunk)
    finish_reason: str | None  # None while generating, then "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    seed: int


def load(path: str | os.PathLike | None = None, device: str = "cpu", verify: bool = True, threads: int | None = None,
         dtype: str = "auto", profile_dir: Path | None = None, engine: str = "auto",
         static_cache: bool | None = None) -> Model:
    """Open an artifact (manifest checked, checksums verified unless verify=False) or a model directory.

    threads: CPU threads for every engine. dtype: compute dtype where the artifact leaves a choice
    ("auto": the compute policy of `sc2quant.core.hf`). profile_dir: ONNX Runtime's operator profile.
    engine: "auto" (the fastest for the artifact and device: a GPTQ artifact on the CPU runs in
    ONNX Runtime, converted once; with verify=False it runs in torch), "torch" or "onnx".
    static_cache: the torch engine's static KV cache and captured decode graphs (None: on CUDA
    only; see runtime/engines/torch_engine.py).
    """
    from sc2quant.core.hf import COMPUTE_DTYPES, resolve_device
    from sc2quant.core.source import resolve_source
    from sc2quant.core.system import set_threads
    from sc2quant.runtime.engines import choose_engine

    if dtype not in COMPUTE_DTYPES:
        raise UserError(f"unknown dtype '{dtype}': choose one of {', '.join(COMPUTE_DTYPES)}")
    source = resolve_source(path)
    manifest = None
    if artifact.is_artifact(source.path):
        manifest = artifact.verify(source.path) if verify else artifact.read_manifest(source.path)
    kind = manifest.kind if manifest else "hf"
    run_path = source.path
    if choose_engine(kind, resolve_device(device), engine, verified=verify) == "onnx" and kind == "gptq" and manifest:
        from sc2quant.runtime.convert import converted_onnx

        run_path, kind = converted_onnx(source.path, manifest), "onnx"
    set_threads(threads)
    opened = open_engine(kind, run_path, EngineOptions(device=device, threads=threads, dtype=dtype,
                                                       profile_dir=profile_dir, static_cache=static_cache))
    return Model(opened, source.path, manifest)


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """A prompt's token ids (FIM markers written in the text are recognised), refusing what is not
    a prompt: not a string, not UTF-8, no tokens. Every runtime behind the server checks this way."""
    if not isinstance(text, str):
        raise UserError(f"prompts must be strings, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UserError(f"the prompt is not valid UTF-8 text (position {exc.start}): send UTF-8") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UserError("the prompt is empty: give at least one character of code")
    return ids


class Model:
    """A loaded model: `stream_generate` (and `generate`, `stream`, `infill`, `logits`) over any engine."""

    def __init__(self, engine: Engine, path: Path, manifest: artifact.Manifest | None = None) -> None:
        self.engine = engine
        self.path = path
        self.manifest = manifest
        self.tokenizer = engine.tokenizer
        self.context = engine.context
        self.stop_ids = {self.tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS} - {None}

    @property
    def kind(self) -> str:
        return self.engine.kind

    def logits(self, token_ids: torch.Tensor | list[list[int]] | list[int]) -> torch.Tensor:
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        return self.engine.logits(ids.view(1, -1) if ids.dim() == 1 else ids)

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt; special tokens written in the text (FIM markers) are recognised."""
        return encode_prompt(self.tokenizer, text)

    def stream_generate(self, prompt: str | Sequence[str], max_new_tokens: int = 64, temperature: float = 0.0,
                        top_p: float = 1.0, stop: Sequence[str] = (), seed: int | None = None,
                        suffix: str | None = None) -> Iterator[Chunk]:
        """Generate for one prompt or several (of any lengths), yielding `Chunk`s as text is decoded.

        suffix: fill-in-the-middle; every prompt is the code before the gap, `suffix` the code after.
        Every check (sampling values, empty, non-UTF-8 or too long prompts) happens before the
        first chunk, so a caller can refuse a request before it starts streaming anything.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise UserError("give at least one prompt")
        if suffix is not None:
            prompts = [fim_prompt(p, suffix) for p in prompts]
        sampling = Sampling(max_new_tokens, temperature, top_p, tuple(stop), seed)
        sampling.validate()
        ids = [self.encode(p) for p in prompts]
        longest = max(len(p) for p in ids)
        if longest >= self.context:
            raise UserError(f"the prompt has {longest} tokens but the model's context is {self.context}: shorten it")
        return self._decode(ids, sampling)

    def generate(self, prompt: str | Sequence[str], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, stop: Sequence[str] = (), seed: int | None = None,
                 suffix: str | None = None) -> str | list[str]:
        """Complete one prompt (returns str) or several (returns a list)."""
        chunks = self.stream_generate(prompt, max_new_tokens, temperature, top_p, stop, seed, suffix)
        texts = [""] * (1 if isinstance(prompt, str) else len(prompt))
        for chunk in chunks:
            texts[chunk.row] += chunk.text
        return texts[0] if isinstance(prompt, str) else texts

    def stream(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
               stop: Sequence[str] = (), seed: int | None = None) -> Iterator[str]:
        """Yield the completion of one prompt piece by piece as tokens are decoded."""
        for chunk in self.stream_generate(prompt, max_new_tokens, temperature, top_p, stop, seed):
            if chunk.text:
                yield chunk.text

    def infill(self, prefix: str, suffix: str, max_new_tokens: int = 64, temperature: float = 0.0,
               top_p: float = 1.0, stop: Sequence[str] = (), seed: int | None = None) -> str:
        """Fill-in-the-middle in StarCoder2's PSM format; returns the middle only."""
        return self.generate(prefix, max_new_tokens, temperature, top_p, stop, seed, suffix=suffix)  # type: ignore[return-value]

    # --- the decoding loop -----------------------------------------------------------------

    def _decode(self, prompts: list[list[int]], s: Sampling) -> Iterator[Chunk]:
        """The loop every entry point shares: prefill, then one token per row per step."""
        seed = s.resolved_seed()
        gen = torch.Generator().manual_seed(seed)
        budget = min(s.max_new_tokens, self.context - max(len(p) for p in prompts))
        rows = [_Row(len(p), s.stop) for p in prompts]
        state, logits = self.engine.start(prompts)
        for _ in range(budget):
            tokens = self._sample(logits, s, gen)
            for i, (row, tok) in enumerate(zip(rows, tokens.tolist())):
                if row.finish is None:
                    piece = row.add(tok, tok in self.stop_ids, self.tokenizer)
                    if piece or row.finish:
                        yield Chunk(i, piece, row.finish, row.prompt_tokens, len(row.ids), seed)
            if all(r.finish for r in rows):
                return
            logits = self.engine.step(state, tokens)
        for i, row in enumerate(rows):
            if row.finish is None:
                yield Chunk(i, row.flush(self.tokenizer), "length", row.prompt_tokens, len(row.ids), seed)

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


class StopFilter:
    """What of a growing completion may be shown yet: text is released only once it cannot be
    the start of a stop string nor an incomplete UTF-8 sequence, so a stream never shows what
    the final text will not contain (and equals the non-streamed text piece by piece)."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = tuple(x for x in stop if x)
        self.sent = 0
        self.stopped = False

    def feed(self, text: str) -> str:
        """The new piece to show, given the whole completion so far."""
        cut = min((i for i in (text.find(x) for x in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._send(text[:cut])
        safe = text.rstrip("\ufffd")  # an incomplete UTF-8 sequence is not text yet
        hold = max((n for x in self.stop for n in range(1, len(x)) if safe.endswith(x[:n])), default=0)
        return self._send(safe[: len(safe) - hold])

    def flush(self, text: str) -> str:
        """The completion ended: everything not yet shown (a held-back partial stop string too)."""
        return self._send(text.rstrip("\ufffd"))

    def _send(self, text: str) -> str:
        piece = text[self.sent:]
        self.sent = max(self.sent, len(text))
        return piece


class _Row:
    """One row's completion: its tokens and its stop filter."""

    def __init__(self, prompt_tokens: int, stop: tuple[str, ...]) -> None:
        self.prompt_tokens = prompt_tokens
        self.filter = StopFilter(stop)
        self.ids: list[int] = []
        self.finish: str | None = None

    def add(self, token: int, is_stop_token: bool, tokenizer: Any) -> str:
        if is_stop_token:
            self.finish = "stop"
            return self.flush(tokenizer)
        self.ids.append(token)
        piece = self.filter.feed(tokenizer.decode(self.ids, skip_special_tokens=False))
        if self.filter.stopped:
            self.finish = "stop"
        return piece

    def flush(self, tokenizer: Any) -> str:
        """The end of the row: everything not yet sent (a held-back partial stop string included)."""
        return self.filter.flush(tokenizer.decode(self.ids, skip_special_tokens=False))
