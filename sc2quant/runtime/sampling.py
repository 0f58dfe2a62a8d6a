"""Sampling and the text of one row: what every decoding loop shares (`Model.stream_generate`'s own loop
and the slots' batched one, runtime/slots.py)."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np

from sc2quant.core.errors import UserError
from sc2quant.runtime.stops import StopFilter

MAX_NEW_TOKENS_LIMIT = 8192
MAX_SEED = 2**63 - 1
MAX_STOP_STRINGS = 16  # OpenAI's API takes 4; more is allowed here, never an unbounded list
MAX_STOP_CHARS = 1000  # per stop string
# Sampling divides the logits by the temperature: at 1e-3 a logit would have to exceed 3.4e35 to
# overflow fp32/bf16 (real logits stay below 1e4); below it, 1e-39 made every logit inf and the sampler NaN.
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 2.0  # OpenAI's range; the server, the CLI and the API check the same one
# top_p is compared with fp32/bf16 probabilities: 1e-46 rounds to 0 there and kept no token at all.
MIN_TOP_P = 1e-6


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
        if not (math.isfinite(self.temperature)
                and (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE)):
            raise UserError(f"temperature must be 0 (greedy) or between {MIN_TEMPERATURE:g} and {MAX_TEMPERATURE:g}, "
                            f"got {self.temperature}")
        if not (math.isfinite(self.top_p) and MIN_TOP_P <= self.top_p <= 1):
            raise UserError(f"top_p must be between {MIN_TOP_P:g} and 1, got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise UserError(f"seed must be between 0 and {MAX_SEED}, got {self.seed}")
        self.validate_stop()

    def validate_stop(self) -> None:
        if any(not isinstance(s, str) for s in self.stop):
            raise UserError("stop sequences must be strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise UserError(f"at most {MAX_STOP_STRINGS} stop sequences are allowed, got {len(self.stop)}: drop some")
        longest = max((len(s) for s in self.stop), default=0)
        if longest > MAX_STOP_CHARS:
            raise UserError(f"a stop sequence may be at most {MAX_STOP_CHARS:,} characters, got one of {longest:,}: "
                            "shorten it")

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
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    draft_tokens: int = 0  # lookup decoding so far: tokens drafted, and of them kept (runtime/lookup.py)
    draft_accepted: int = 0
    stop_word: str = ""  # in the last chunk: the stop string that ended the row ("" for any other end)


def sample(logits: np.ndarray, s: Sampling, gen: np.random.Generator) -> np.ndarray:
        """One token id per row of logits [B, V]: the largest (greedy), or drawn from the softmax at the
        temperature within the top_p nucleus (float64: no underflow to an empty nucleus)."""
        if s.temperature == 0:
            return logits.argmax(-1)
        z = logits.astype(np.float64) / s.temperature
        probs = np.exp(z - z.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        if s.top_p < 1:
            order = np.argsort(-probs, axis=-1, kind="stable")
            sorted_p = np.take_along_axis(probs, order, -1)
            keep = np.cumsum(sorted_p, -1) - sorted_p < s.top_p
            keep[:, 0] = True  # the top token, whatever top_p rounds to
            probs = np.zeros_like(probs)
            np.put_along_axis(probs, order, sorted_p * keep, -1)
        cdf = np.cumsum(probs, -1)
        draws = gen.random(len(cdf)) * cdf[:, -1]
        return np.array([min(int(np.searchsorted(c, u, side="right")), len(c) - 1) for c, u in zip(cdf, draws)])


class RowText:
    """One row's completion: its tokens, its text so far and its stop filter."""

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
