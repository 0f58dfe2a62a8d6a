"""Lookup ("prompt n-gram") speculative decoding, for greedy completion of one prompt.

Code completion often writes what the prompt already holds: a name defined above, the rest of a
line that the suffix repeats, a pattern of the lines before. After each decoded token the
drafter looks for the latest earlier place where the sequence's last n tokens (n = 3, then 2)
occurred, in the prompt (prefix and suffix) or in what was generated, and proposes the
tokens that followed there. The engine then runs the decoded token and the draft in one
forward (`Extendable.extend(..., all_positions=True)`): the logits at each position say what
greedy decoding would pick next, so the draft is kept up to its first wrong token, the state is
cut back to what was kept, and the logits after the last kept token drive the next step. On CPU
a forward of a few tokens costs little more than one token's, since reading the weights dominates.

The output is plain greedy decoding's, token for token, on engines that compute in fp32 throughout
(`inexact` refuses the others: int8 activations, bf16), although a many-token forward
does not round like a one-token one (other kernel shapes, other accumulation orders: ONNX
Runtime's int4 MatMulNBits differs by up to 2.3e-3 of the largest logit between them on the
embedded model). A row of the verifying forward is trusted only where its top two logits are
further apart than twice that difference can move them (`kernel_tolerance`, derived from the
engine's numerics): a draft token is kept only on a trusted row, and when the row that picks the
next token is not trusted, its position is run again alone, as plain decoding runs it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MAX_NGRAM = 3  # the longest suffix of the sequence looked up
MIN_NGRAM = 2  # the shortest: one shared token predicts little (measured: more drafts, fewer kept)
# Relative logit difference between two kernel shapes of the same computation (see the module docstring).
# int8 activations (ONNX Runtime's MatMulNBits at accuracy level 4, blocks of 32): the rounding step of
# a block is max/127, a uniform error of step/sqrt(12), times a crest factor of 4: the bound the ORT export
# tests use for int8 activations against fp32 (tests/conftest.py), 4x the kernel-shape difference measured.
INT8_ROUNDING = 1 / (127 * 12**0.5)  # one value's rounding error relative to its block's RMS, at crest 1
INT8_ACTIVATIONS = 4 * INT8_ROUNDING


def kernel_tolerance(eps: float) -> float:
    """A float compute dtype of machine epsilon `eps`: two of its rounding steps (the logits are
    rounded to it) plus 64 fp32 epsilons of accumulation order."""
    return 2 * eps + 64 * float(np.finfo(np.float32).eps)


def inexact(engine: dict[str, Any], bits: int | None) -> str | None:
    """Why lookup decoding cannot keep plain greedy text on this engine (None: it can). `engine` is the
    engine's describe(), `bits` the artifact's weight bits. A draft is verified by a forward of several
    tokens, whose keys and values the following steps then read: where that forward rounds differently
    from one-token steps by more than fp32 accumulation order (int8 activations, bf16/fp16 compute), a
    near tie later in the text can go the other way (measured: 12 of 90 greedy completions changed on
    int4 exports), and no check of the drafted rows alone can see it."""
    if engine.get("engine") == "onnx" and bits in (2, 3, 4, 8):
        return (f"its {bits}-bit weights run in ONNX Runtime's MatMulNBits, which rounds activations to int8 "
                "per block")
    if engine.get("dtype") in ("bfloat16", "bf16", "float16", "fp16"):
        return f"it computes in {engine['dtype']}"
    return None


class Drafter:
    """The sequence so far (prompt, then each decoded token) and its lookups."""

    def __init__(self, prompt: list[int], capacity: int) -> None:
        self.ids = np.zeros(max(capacity, len(prompt)), dtype=np.int64)
        self.ids[: len(prompt)] = prompt
        self.length = len(prompt)
        self.proposed = 0  # draft tokens proposed, and of them accepted (the acceptance rate)
        self.accepted = 0

    def add(self, token: int) -> None:
        if self.length == len(self.ids):
            self.ids = np.concatenate([self.ids, np.zeros_like(self.ids)])
        self.ids[self.length] = token
        self.length += 1

    def draft(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the last n tokens (longest n first)."""
        seq = self.ids[: self.length]
        for n in range(min(MAX_NGRAM, self.length - 1), MIN_NGRAM - 1, -1):
            tail = seq[-n:]
            starts = seq[: self.length - n] == tail[0]  # candidate starts 0..L-n-1: a token follows each
            for j in range(1, n):
                starts &= seq[j: self.length - n + j] == tail[j]
            found = np.flatnonzero(starts)
            if found.size:
                at = int(found[-1]) + n
                return seq[at: at + k].tolist()
        return []

    def count(self, proposed: int, accepted: int) -> None:
        self.proposed += proposed
        self.accepted += accepted


def trusted(logits: np.ndarray, tolerance: float) -> np.ndarray:
    """Per row of logits [n, V]: is its argmax the same under any kernel within `tolerance` (relative)?

    numpy, not torch: a torch op on a few rows of logits goes parallel, and its threads then wait on
    cores ONNX Runtime's spinning threads still hold (0.4 ms per op measured, more than a step)."""
    top = np.partition(logits, -2, axis=-1)[:, -2:]
    return top[:, 1] - top[:, 0] > 2 * tolerance * np.abs(logits).max(axis=-1)


def verify(draft: list[int], logits: np.ndarray, tolerance: float) -> int:
    """How many draft tokens greedy decoding produces: logits [1 + len(draft), V] are the forward's
    over (decoded token, *draft); row i predicts draft[i], kept while it is also a trusted row."""
    picks = logits.argmax(-1).tolist()
    sure = trusted(logits, tolerance).tolist()
    kept = 0
    while kept < len(draft) and picks[kept] == draft[kept] and sure[kept]:
        kept += 1
    return kept
