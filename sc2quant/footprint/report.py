"""What `sc2quant footprint` shows: every method's bytes, the KV cache, and the 7B model card's
figures explained. Data first (`report`, also the `--json` output), then terminal tables (`tables`)."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from sc2quant.core.errors import UserError
from sc2quant.core.tables import Table
from sc2quant.footprint.predict import kv_rows, predict, predict_method
from sc2quant.footprint.shapes import CARD_7B_MB, GB, MB, PRESETS, Shape, counts, resolve_shape, rotary_buffer_bytes


@dataclass(frozen=True)
class CardRow:
    """One model-card figure: transformers 4.39's count, today's count and the true resident bytes."""

    method: str
    card_era_bytes: int
    today_bytes: int
    resident_bytes: int
    card_mb: float | None = None


# ---------------------------------------------------------------- the model card


def legacy_card(shape: Shape | str | Path) -> list[CardRow]:
    """The StarCoder2 model card's four figures, as transformers 4.39 counted them, next to today's.

    The card used `get_memory_footprint()` = parameters + buffers, in MB of 10**6 bytes. In
    transformers 4.39 every attention layer owned a rotary module with `cos_cached` and
    `sin_cached` buffers of [max_position_embeddings, head_dim] in the model dtype (fp16 for the
    bnb loads) plus an fp32 `inv_freq` [head_dim/2]: 2*32*16384*128 elements for 7B, 268.44 MB
    in 16 bits and 536.87 MB in fp32. Current transformers computes cos/sin on the fly and keeps
    only two fp32 `inv_freq` vectors for the whole model, so it reports 7402.08 / 3929.20 MB for
    int8 / int4. Neither count includes bnb's `SCB` or `absmax`, which `resident_bytes` adds.
    """
    shape = resolve_shape(shape)
    card = CARD_7B_MB if shape == PRESETS["7b"] else {}
    rows = []
    for label, method, cache_bytes in (("fp32", "fp32", 4), ("bf16", "bf16", 2), ("int8", "bnb-int8", 2),
                                       ("int4", "bnb-nf4", 2)):
        now = predict_method(shape, method)
        old_buffers = shape.layers * (2 * shape.context * shape.hd * cache_bytes + 4 * shape.rotary_half)
        old = now.weight_bytes + old_buffers
        rows.append(CardRow(label, old, now.weight_bytes + rotary_buffer_bytes(shape), now.resident_bytes,
                            card.get(label)))
    return rows


def legacy_explanation(shape: Shape | str | Path) -> list[str]:
    """Why the card's figures differ from what transformers reports today, in numbers."""
    shape = resolve_shape(shape)
    elements = shape.layers * 2 * shape.context * shape.hd
    rows = {r.method: r for r in legacy_card(shape)}
    return [
        f"transformers 4.39 (the card's era) counted per-layer rotary caches: {shape.layers} layers x cos+sin x "
        f"[{shape.context}, {shape.hd}] = {elements:,} elements = {2 * elements / MB:.2f} MB in 16 bits, "
        f"{4 * elements / MB:.2f} MB in fp32 (plus a {4 * shape.rotary_half}-byte fp32 inv_freq per layer).",
        f"Today's transformers computes cos/sin on the fly and keeps two fp32 inv_freq vectors "
        f"({rotary_buffer_bytes(shape)} bytes for the whole model).",
        f"Neither count includes bnb's quantization state: SCB adds "
        f"{(rows['int8'].resident_bytes - rows['int8'].today_bytes) / MB:.2f} MB to int8, absmax and quant_map "
        f"{(rows['int4'].resident_bytes - rows['int4'].today_bytes) / MB:.2f} MB to nf4 (see 'resident').",
    ]


# ---------------------------------------------------------------- one report for the CLI and JSON


def report(spec: str | Path | Shape = "7b", context: int | None = None, batch: int = 1,
           legacy: bool = False, methods: Iterable[str] | None = None) -> dict[str, Any]:
    """Everything `sc2quant footprint` shows, as plain data."""
    shape = resolve_shape(spec)
    context = shape.context if context is None else context
    for flag, value in (("--context", context), ("--batch", batch)):
        if value < 1:
            raise UserError(f"{flag} {value} is not a count of tokens or sequences: pass 1 or more")
    c = counts(shape)
    out: dict[str, Any] = {
        "shape": asdict(replace(shape, head_dim=shape.hd)),
        "parameters": {"P": c.p, "Q": c.q, "N": c.n},
        "unit": {"MB": MB, "GB": GB},
        "methods": [asdict(r) for r in predict(shape, methods)],
        "kv_cache": {"context": context, "batch": batch, "rows": [asdict(r) for r in kv_rows(shape, context, batch)]},
    }
    if legacy:
        out["legacy_card"] = {"rows": [asdict(r) for r in legacy_card(shape)], "explanation": legacy_explanation(shape)}
    return out


# ---------------------------------------------------------------- terminal tables


def tables(data: dict[str, Any]) -> list[Table | str]:
    """Tables and note lines for a `report`, in print order."""
    shape, params = data["shape"], data["parameters"]
    methods = Table(["method", "weights MB", "resident MB", "metadata + buffers MB", "saved MB"],
                    title=f"{shape['name']}: P = {params['P']:,} parameters (Q = {params['Q']:,} in decoder Linears)",
                    caption="MB = 10^6 bytes. resident = weights + scales/zeros/absmax/SCB/quant_map + buffers; "
                            "~ = within a few bytes per layer", right={1, 2, 3, 4})
    for r in data["methods"]:
        saved = f"{r['saved_bytes'] / MB:.2f}" if r["saved_exact"] else f"~{r['saved_bytes'] / MB:.2f}"
        methods.add(r["method"], f"{r['weight_bytes'] / MB:.2f}", f"{r['resident_bytes'] / MB:.2f}",
                    f"{(r['resident_bytes'] - r['weight_bytes']) / MB:.2f}", saved)
    out: list[Table | str] = [methods, *_notes(data["methods"]), _kv_table(data)]
    if "legacy_card" in data:
        out.append(_legacy_table(data["legacy_card"]["rows"]))
        out += data["legacy_card"]["explanation"]
    return out


def _notes(rows: list[dict[str, Any]]) -> list[str]:
    by_note: dict[str, list[str]] = {}
    for r in rows:
        if r["note"]:
            by_note.setdefault(r["note"], []).append(r["method"])
    every = [r["method"] for r in rows]
    return [f"{_family(methods, every)}: {note}" for note, methods in by_note.items()]


def _family(methods: list[str], every: list[str]) -> str:
    """'gptq-int*' rather than eight method names when a whole family shares a note, and no other
    method matches that pattern (else the names, in full)."""
    if len(methods) <= 2:
        return ", ".join(methods)
    prefix = os.path.commonprefix(methods)
    suffix = os.path.commonprefix([m[len(prefix):][::-1] for m in methods])[::-1]
    pattern = f"{prefix}*{suffix}"
    if any(fnmatch.fnmatchcase(m, pattern) for m in every if m not in methods):
        return ", ".join(methods)
    return pattern


def _kv_table(data: dict[str, Any]) -> Table:
    s, kv = data["shape"], data["kv_cache"]
    table = Table(["runtime", "dtype", "tokens kept", "MB", "GB", "note"], right={2, 3, 4},
                  title=f"KV cache at context {kv['context']}, batch {kv['batch']} ({s['kv_heads']} KV heads x "
                        f"{s['head_dim']} dims x {s['layers']} layers, sliding window {s['sliding_window']})")
    for r in kv["rows"]:
        table.add(r["runtime"], r["dtype"], str(r["tokens"]), f"{r['bytes'] / MB:.2f}", f"{r['bytes'] / GB:.3f}",
                  r["note"])
    return table


def _legacy_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(["method", "transformers 4.39", "model card", "today", "true resident"], right={1, 2, 3, 4},
                  title="get_memory_footprint() in MB: transformers 4.39 (the model card) vs today")
    for r in rows:
        card = f"{r['card_mb']:.2f}" if r["card_mb"] is not None else "-"
        table.add(r["method"], f"{r['card_era_bytes'] / MB:.2f}", card, f"{r['today_bytes'] / MB:.2f}",
                  f"{r['resident_bytes'] / MB:.2f}")
    return table
