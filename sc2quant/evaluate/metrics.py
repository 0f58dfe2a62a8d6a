"""Accuracy drift of a model against a baseline on the same tokens.

Evaluation text is cut into windows of `seqlen` tokens with a stated `stride` (default:
non-overlapping); both models see exactly the same windows. Per token we compare the
next-token distributions: KL(baseline || model), top-1 agreement, and each model's NLL.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # ids [B, T] -> float32 logits [B, T, V]


@dataclass
class EvalSet:
    name: str
    windows: torch.Tensor  # [n, seqlen] token ids


def eval_windows(tokenizer, texts: list[str], seqlen: int = 512, stride: int | None = None,
                 max_windows: int | None = None) -> torch.Tensor:
    """Join texts with <|endoftext|> and cut windows of `seqlen` every `stride` tokens."""
    stride = stride or seqlen
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids + [tokenizer.eos_token_id])
    starts = list(range(0, max(len(stream) - seqlen, 0) + 1, stride))[: max_windows or None]
    if len(stream) < seqlen:
        return torch.tensor([stream], dtype=torch.long)
    return torch.tensor([stream[s : s + seqlen] for s in starts], dtype=torch.long)


def eval_sets(tokenizer, docs, seqlen: int = 512, stride: int | None = None,
              max_windows: int | None = 16) -> list[EvalSet]:
    """One EvalSet per document source (humaneval, python, c, ...)."""
    by_source: dict[str, list[str]] = {}
    for d in docs:
        by_source.setdefault(d.source, []).append(d.text)
    return [EvalSet(name, eval_windows(tokenizer, texts, seqlen, stride, max_windows))
            for name, texts in sorted(by_source.items())]


@dataclass
class TokenStats:
    nll: torch.Tensor  # per predicted token
    kl: torch.Tensor | None = None
    agree: torch.Tensor | None = None


def token_stats(logits: torch.Tensor, targets: torch.Tensor, base_logits: torch.Tensor | None = None) -> TokenStats:
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if base_logits is None:
        return TokenStats(nll.flatten())
    base_logp = torch.log_softmax(base_logits.float(), dim=-1)
    kl = (base_logp.exp() * (base_logp - logp)).sum(-1).clamp(min=0)
    agree = (base_logits.argmax(-1) == logits.argmax(-1)).float()
    return TokenStats(nll.flatten(), kl.flatten(), agree.flatten())


def summarize(model: TokenStats, base: TokenStats) -> dict[str, float]:
    ppl = math.exp(model.nll.mean().item())
    base_ppl = math.exp(base.nll.mean().item())
    out = {"tokens": int(model.nll.numel()), "perplexity": ppl, "baseline_perplexity": base_ppl,
           "perplexity_drift_pct": 100 * (ppl / base_ppl - 1), "bits_per_token": model.nll.mean().item() / math.log(2)}
    if model.kl is not None:
        out.update({"kl_mean": model.kl.mean().item(), "kl_p99": torch.quantile(model.kl, 0.99).item(),
                    "top1_agreement": model.agree.mean().item()})
    return out


def _stats_over(windows: torch.Tensor, fn: LogitsFn, base_fn: LogitsFn | None, batch: int,
                cache: list[torch.Tensor] | None) -> tuple[TokenStats, TokenStats]:
    parts, base_parts = [], []
    for i in range(0, len(windows), batch):
        x = windows[i : i + batch]
        logits = fn(x)[:, :-1]
        base_logits = cache[i // batch] if cache is not None else base_fn(x)[:, :-1]  # type: ignore[misc]
        parts.append(token_stats(logits, x[:, 1:], base_logits))
        base_parts.append(token_stats(base_logits, x[:, 1:]))
    cat = lambda xs, a: torch.cat([getattr(s, a) for s in xs]) if getattr(xs[0], a) is not None else None  # noqa: E731
    return (TokenStats(cat(parts, "nll"), cat(parts, "kl"), cat(parts, "agree")),
            TokenStats(cat(base_parts, "nll")))


def compare(sets: list[EvalSet], fn: LogitsFn, base_fn: LogitsFn, batch: int = 4,
            on_source: Callable[[str], None] | None = None) -> dict[str, dict[str, float]]:
    """Drift per evaluation source plus an `all` row over every token (`on_source(name)` after each)."""
    result, all_m, all_b = {}, [], []
    for s in sets:
        m, b = _stats_over(s.windows, fn, base_fn, batch, None)
        if on_source is not None:
            on_source(s.name)
        result[s.name] = summarize(m, b)
        all_m.append(m)
        all_b.append(b)
    merged = TokenStats(torch.cat([m.nll for m in all_m]), torch.cat([m.kl for m in all_m]),
                        torch.cat([m.agree for m in all_m]))
    result["all"] = summarize(merged, TokenStats(torch.cat([b.nll for b in all_b])))
    return result
