"""The engines that extend a cached sequence, for the prefix-cache and lookup tests: ONNX int4 (the default
export) and fp32 exports, torch's dynamic cache in fp32 and in its automatic dtype (bf16 where the CPU has
native bf16). Name -> (the fixture giving the model, the dtype to load it with).

The tie bounds are derived here from each engine's numerics (tests/conftest.py), never read from the
engine: a one-token and a many-token forward of the same computation differ by the compute dtype's
rounding (fp32, bf16) or by ONNX Runtime's int8 rounding of activations (int4 MatMulNBits at accuracy
level 4, blocks of 128). Only those two kinds of rounding can turn a near tie: fp32 engines must give
identical greedy text."""

import numpy as np

from tests.conftest import bf16_tolerance, fp32_tolerance, int8_activation_tolerance

ENGINES = {"onnx-int4": ("onnx_int4_artifact", "auto"), "onnx-fp32": ("onnx_fp32_artifact", "auto"),
           "torch-fp32": ("embedded_model_dir", "fp32"), "torch-auto": ("embedded_model_dir", "auto")}


def tolerance(plain) -> float:
    """The relative logit difference two kernel shapes of `plain`'s engine may show (see the module doc)."""
    from sc2quant.core import artifact

    d = plain.engine.describe()
    if d["engine"] == "onnx" and artifact.read_manifest(plain.path).bits == 4:
        return 2 * int8_activation_tolerance()  # both paths round activations to int8, independently
    return bf16_tolerance() if d["dtype"] in ("bfloat16", "bf16") else fp32_tolerance()


def ties_possible(plain) -> bool:
    """Whether rounding may break a greedy tie differently between kernel shapes on this engine (bf16 logits,
    int8 activations); fp32 engines agree to far below any margin greedy decoding meets here."""
    return tolerance(plain) > 10 * fp32_tolerance()


def greedy_margins(plain, prompt: str, steps: int) -> tuple[list[int], list[float]]:
    """Plain greedy decoding one token per forward, with each step's top-two margin relative to twice the
    engine's derived tolerance (below 1: a tie that rounding may break either way)."""
    engine, tol = plain.engine, tolerance(plain)
    state, logits = engine.start([plain.encode(prompt)])
    ids, margins = [], []
    for _ in range(steps):
        row = np.array(logits[0])
        top = np.sort(row)[-2:]
        margins.append(float(top[1] - top[0]) / (2 * tol * float(np.abs(row).max())))
        ids.append(int(row.argmax()))
        if len(ids) < steps:
            logits = engine.step(state, np.array(ids[-1:]))
    return ids, margins


def check_greedy(plain, prompt: str, text: str, steps: int) -> bool:
    """`text` is plain greedy decoding's, or leaves it only where greedy decoding met a tie within the
    derived rounding bound, on an engine where such ties exist. True when identical; a departure anywhere
    else fails here. The reference is taken two ways (`generate`, and one token per forward here); both may
    break the same tie differently, so each text is checked against the one-per-forward ids at its first
    departure."""
    expected = plain.generate(prompt, max_new_tokens=steps)
    if text == expected:
        return True
    assert ties_possible(plain), ("fp32 engines give identical greedy text", text, expected)
    ids, margins = greedy_margins(plain, prompt, steps)
    departed = False
    for seen in (text, expected):
        first = next((i for i in range(steps) if not seen.startswith(plain.tokenizer.decode(ids[: i + 1]))), None)
        if first is not None:
            departed = True
            assert margins[first] <= 1, (first, margins[first], text, expected)
    assert departed, (text, expected)
    return False
