"""The engines that extend a cached sequence, for the prefix-cache and lookup tests: ONNX int4 and
fp32 exports, torch's dynamic cache in fp32 and in its automatic dtype (bf16 where the CPU has
native bf16). Name -> (the fixture giving the model, the dtype to load it with)."""

import numpy as np

ENGINES = {"onnx-int4": ("onnx_int4_artifact", "auto"), "onnx-fp32": ("onnx_fp32_artifact", "auto"),
           "torch-fp32": ("embedded_model_dir", "fp32"), "torch-auto": ("embedded_model_dir", "auto")}


def greedy_margins(plain, prompt: str, steps: int) -> tuple[list[int], list[float]]:
    """Plain greedy decoding one token per forward, with each step's top-two margin relative to
    twice the engine's kernel tolerance (below 1: a tie that rounding may break either way)."""
    engine = plain.engine
    state, logits = engine.start([plain.encode(prompt)])
    ids, margins = [], []
    for _ in range(steps):
        row = np.array(logits[0])
        top = np.sort(row)[-2:]
        margins.append(float(top[1] - top[0]) / (2 * engine.kernel_tolerance * float(np.abs(row).max())))
        ids.append(int(row.argmax()))
        if len(ids) < steps:
            logits = engine.step(state, np.array(ids[-1:]))
    return ids, margins


def check_greedy(plain, prompt: str, text: str, steps: int) -> bool:
    """`text` is plain greedy decoding's, or leaves it only where greedy decoding met a tie within the
    kernels' rounding (bf16 logits tie exactly at times). True when identical. The reference is
    taken two ways (`generate`, and one token per forward here); both may break the same tie
    differently, so each text is checked against the one-per-forward ids at its first departure."""
    expected = plain.generate(prompt, max_new_tokens=steps)
    if text == expected:
        return True
    ids, margins = greedy_margins(plain, prompt, steps)
    for seen in (text, expected):
        first = next((i for i in range(steps) if not seen.startswith(plain.tokenizer.decode(ids[: i + 1]))), None)
        if first is not None:
            assert margins[first] <= 1, (first, margins[first], text, expected)
    return False
