"""The runtime: generate / stream / infill / logits over every artifact kind, checksums verified."""

from __future__ import annotations

import shutil

import pytest
import torch

from sc2quant.core.errors import IntegrityError, UserError
from sc2quant.runtime import load
from tests.conftest import int8_activation_tolerance, logit_tolerance, ort_int8_kernel


@pytest.fixture(scope="module")
def model(embedded_model_dir):
    return load(embedded_model_dir)


PROMPT = "def fibonacci(n):\n"


def test_greedy_is_deterministic_and_batches_agree(model):
    single = model.generate(PROMPT, max_new_tokens=16)
    other = "import os\nimport sys\n\n\ndef main(argv):\n    "
    batch = model.generate([PROMPT, other], max_new_tokens=16)
    assert batch[0] == single == model.generate(PROMPT, max_new_tokens=16)
    assert batch[1] == model.generate(other, max_new_tokens=16)


def test_stream_concatenates_to_generate(model):
    pieces = list(model.stream(PROMPT, max_new_tokens=20))
    assert "".join(pieces) == model.generate(PROMPT, max_new_tokens=20) and len(pieces) > 1


def test_stop_strings_cut_the_text(model):
    text = model.generate(PROMPT, max_new_tokens=40)
    assert len(text) > 3
    stop = text[2:4]
    cut = model.generate(PROMPT, max_new_tokens=40, stop=[stop])
    assert cut == text[: text.find(stop)]


def test_sampling_is_seeded(model):
    a = model.generate(PROMPT, max_new_tokens=12, temperature=0.8, top_p=0.95, seed=3)
    b = model.generate(PROMPT, max_new_tokens=12, temperature=0.8, top_p=0.95, seed=3)
    assert a == b


def test_infill_returns_the_middle(model):
    """StarCoder2's PSM prompt, written out by hand here: the middle is what the model writes after it."""
    prefix, suffix = "def add(a, b):\n    ", "\n    return c\n"
    middle = model.infill(prefix, suffix, max_new_tokens=16)
    assert middle == model.generate(f"<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>", max_new_tokens=16)
    assert middle != model.generate(prefix, max_new_tokens=16)  # the suffix was seen


def test_logits_match_incremental_decoding(embedded_model_dir, cpu_kind):
    """Prefill + one-token steps give the full forward's logits, within the compute dtype's tolerance,
    on both CPU kinds (bf16 compute where the CPU has it, fp32 where it does not)."""
    m = load(embedded_model_dir)
    dtype = next(m.engine.model.parameters()).dtype
    assert dtype == (torch.bfloat16 if cpu_kind == "bf16" else torch.float32)
    ids = m.encode("class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n")
    full = m.logits(ids)[0]
    state, last = m.engine.start([ids[:10]])
    errors = [(torch.as_tensor(last[0]) - full[9]).abs().max().item()]
    for i in range(10, len(ids)):
        errors.append((torch.as_tensor(m.engine.step(state, [ids[i]])[0]) - full[i]).abs().max().item())
    assert max(errors) <= logit_tolerance(full, dtype), (max(errors), logit_tolerance(full, dtype))


def test_an_off_by_one_position_exceeds_the_tolerance(embedded_model_dir, cpu_kind):
    """The tolerance above is tight enough to catch a real decoding bug."""
    m = load(embedded_model_dir)
    ids = m.encode("class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n")
    full = m.logits(ids)[0]
    state, _ = m.engine.start([ids[:10]])
    state["next_pos"] = state["next_pos"] + 1
    errors = [(torch.as_tensor(m.engine.step(state, [ids[i]])[0]) - full[i]).abs().max().item() for i in range(10, len(ids))]
    assert max(errors) > 4 * logit_tolerance(full, next(m.engine.model.parameters()).dtype)  # 2x what any test accepts


def test_static_cache_decodes_as_the_dynamic_one(embedded_model_dir, cpu_kind):
    """The static KV cache (CUDA's decode path, forced here on the CPU): per-step logits within the
    compute dtype's tolerance of the dynamic cache's, across bucket moves (256 -> 512 -> 1024 tokens)
    and far past the 256-token sliding window."""
    dynamic, static = load(embedded_model_dir, static_cache=False), load(embedded_model_dir, static_cache=True)
    ids = (dynamic.encode("class Stack:\n    def __init__(self):\n        self.items = []\n") * 40)[:200]
    sd, ld = dynamic.engine.start([ids])
    ss, ls = static.engine.start([ids])
    assert ss["bucket"] == 256
    tolerance, worst, buckets = logit_tolerance(ld, next(static.engine.model.parameters()).dtype), 0.0, set()
    for _ in range(320):
        worst = max(worst, float(abs(ld - ls).max()))
        token = ld.argmax(-1)
        ld, ls = dynamic.engine.step(sd, token), static.engine.step(ss, token)
        buckets.add(ss["bucket"])
    assert buckets == {256, 512, 1024}
    # measured: 1.0x the tolerance in bf16 (one rounding step apart), 0.08x in fp32; an off-by-one
    # position is 6x (bf16) and 8,600x (fp32) of it (next test)
    assert worst <= 2 * tolerance, (worst, tolerance)
    ss, _ = static.engine.start([(ids * 6)[: static.context - 4]])
    with pytest.raises(UserError, match="context"):
        for _ in range(8):
            static.engine.step(ss, token)


def test_prompt_longer_than_context(model):
    with pytest.raises(UserError, match="context is 1024"):
        model.generate("x = 1\n" * 1000, max_new_tokens=4)


@pytest.mark.parametrize("kwargs,message", [({"max_new_tokens": 0}, "max_new_tokens"),
                                            ({"max_new_tokens": 10**6}, "max_new_tokens"),
                                            ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                                            ({"temperature": 1e-39}, "temperature must be 0 .greedy. or between 0.001"),
                                            ({"temperature": 1e-4}, "temperature"), ({"top_p": 1e-46}, "top_p must be between"),
                                            ({"top_p": 1e-7}, "top_p"), ({"stop": ["x"] * 17}, "at most 16 stop"),
                                            ({"stop": ["x" * 1001]}, "at most 1,000 characters")])
def test_bad_sampling_arguments(model, kwargs, message):
    with pytest.raises(UserError, match=message):
        model.generate(PROMPT, **kwargs)


@pytest.mark.parametrize("temperature,top_p", [(1e-3, 1.0), (1.0, 1e-6), (1e-3, 1e-6), (2.0, 1.0)])
def test_extreme_sampling_values_that_pass_validation_generate(model, temperature, top_p):
    """The bounds are what the sampler handles: at them it samples (1e-39 and 1e-46 crashed it)."""
    text = model.generate(PROMPT, max_new_tokens=8, temperature=temperature, top_p=top_p, seed=1)
    assert isinstance(text, str) and text


def test_stop_at_the_size_limits_is_accepted(model):
    text = model.generate(PROMPT, max_new_tokens=24)
    stops = ["\x00" * 1000] * 15 + [text[3:6]]
    assert model.generate(PROMPT, max_new_tokens=24, stop=stops) == text[: text.find(text[3:6])]


def _reference_feed(stop: tuple[str, ...], sent: list[int], text: str) -> tuple[str, bool]:
    """The stop filter as first written (whole-text search, every prefix compared): the behaviour to keep."""
    cut = min((i for i in (text.find(x) for x in stop) if i >= 0), default=-1)
    safe = text[:cut] if cut >= 0 else text.rstrip("\ufffd")
    if cut < 0:
        hold = max((n for x in stop for n in range(1, len(x)) if safe.endswith(x[:n])), default=0)
        safe = safe[: len(safe) - hold]
    piece = safe[sent[0]:]
    sent[0] = max(sent[0], len(safe))
    return piece, cut >= 0


def test_stop_filter_releases_what_the_whole_text_search_released():
    """Random texts, stop strings (overlapping ones, one inside another) and token boundaries, an
    incomplete UTF-8 sequence at some ends: every piece equals the original algorithm's."""
    import random

    from sc2quant.runtime import StopFilter

    rng = random.Random(0)
    for _ in range(3000):
        stop = tuple("".join(rng.choice("ab\n") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(0, 3)))
        text = "".join(rng.choice("ab\nc") for _ in range(rng.randint(1, 40)))
        stop_filter, sent = StopFilter(stop), [0]
        ends = sorted(rng.sample(range(1, len(text) + 1), k=min(8, len(text))))
        for end in ends:
            fed = text[:end] + ("\ufffd" if rng.random() < 0.2 and end < len(text) else "")
            expected, stopped = _reference_feed(stop, sent, fed)
            assert stop_filter.feed(fed) == expected, (stop, text, end)
            assert stop_filter.stopped == stopped
            if stopped:
                break
        if not stop_filter.stopped:
            assert stop_filter.flush(text) == text[sent[0]:]


def _feed_seconds(stop: list[str], pieces: list[str]) -> float:
    import time

    from sc2quant.runtime import StopFilter

    best = float("inf")
    for _ in range(3):
        stop_filter, text = StopFilter(stop), ""
        t0 = time.perf_counter()
        for piece in pieces:
            text += piece
            stop_filter.feed(text)
        best = min(best, time.perf_counter() - t0)
    return best


def test_stop_filter_cost_per_token_does_not_grow_with_the_stop_strings_length():
    """A 20,000-character stop string (a 1 MB one took seconds a token) costs what a short one does."""
    pieces = ["ab" * 20 + "\n"] * 100  # 100 tokens of 41 characters, every one a partial match of the long stops
    short = _feed_seconds(["ab" * 3 + "c"], pieces)
    long = _feed_seconds(["ab" * 10_000 + "c", "a" * 20_000], pieces)
    assert long < 5 * short + 0.01, (long, short)


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["bnb_artifacts", "gptq_artifact", "rtn_artifact"])
def test_every_torch_artifact_kind_loads_and_generates(request, fixture):
    value = request.getfixturevalue(fixture)
    for path in value.values() if isinstance(value, dict) else [value]:
        m = load(path)
        text = m.generate(PROMPT, max_new_tokens=8)
        assert isinstance(text, str) and len(text) > 0


@pytest.mark.slow
def test_flipped_byte_is_refused(gptq_artifact, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(gptq_artifact, bad)
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match its checksum"):
        load(bad)
    unverified = load(bad, verify=False)  # the user's escape hatch: no conversion cached from unverified files
    assert unverified.engine.name == "torch"
    *_, last = unverified.stream_generate(PROMPT, max_new_tokens=2)
    assert last.finish_reason in ("length", "stop") and 1 <= last.completion_tokens <= 2
    with pytest.raises(UserError, match="checksums"):
        load(bad, verify=False, engine="onnx")


@pytest.mark.slow
def test_onnx_fp32_generates_the_same_tokens_as_pytorch(model, onnx_fp32_artifact):
    onnx = load(onnx_fp32_artifact)
    assert onnx.kind == "onnx"
    prompts = [PROMPT, "import json\n\n\ndef load(path):\n    with open(path) as f:\n"]
    assert onnx.generate(prompts, max_new_tokens=24) == model.generate(prompts, max_new_tokens=24)
    assert "".join(onnx.stream(PROMPT, max_new_tokens=12)) == model.generate(PROMPT, max_new_tokens=12)
    fim = ("def add(a, b):\n    ", "\n    return c\n")
    assert onnx.infill(*fim, max_new_tokens=8) == model.infill(*fim, max_new_tokens=8)


@pytest.mark.slow
def test_onnx_int4_loads_and_generates(onnx_int4_artifact):
    assert len(load(onnx_int4_artifact).generate(PROMPT, max_new_tokens=8)) > 0


def test_dtype_override_and_refusals(embedded_model_dir, bnb_artifacts, onnx_fp32_artifact):
    assert next(load(embedded_model_dir, dtype="fp32").engine.model.parameters()).dtype == torch.float32
    assert load(embedded_model_dir, dtype="bf16").engine.describe()["dtype"] == "bfloat16"
    with pytest.raises(UserError, match="compute in bf16"):
        load(bnb_artifacts["nf4"], dtype="fp32")
    with pytest.raises(UserError, match="fixed when it was exported"):
        load(onnx_fp32_artifact, dtype="fp16")
    assert load(onnx_fp32_artifact, dtype="fp32").engine.describe()["dtype"] == "fp32"
    with pytest.raises(UserError, match="unknown dtype"):
        load(embedded_model_dir, dtype="float8")


@pytest.mark.slow
@pytest.mark.parametrize("kernel", [ort_int8_kernel()])  # the id names the int8 kernel path this CPU ran
def test_gptq_on_the_cpu_runs_in_onnx_runtime_converted_once(gptq_artifact, monkeypatch, tmp_path, kernel):
    from sc2quant.runtime import convert

    monkeypatch.setenv("SC2QUANT_CACHE", str(tmp_path))
    fast = load(gptq_artifact)
    assert fast.engine.name == "onnx" and fast.kind == "onnx" and fast.path == gptq_artifact
    [converted] = list(convert.cache_root().iterdir())
    from sc2quant.core import artifact

    assert artifact.verify(converted).params["from_gptq"]["bits"] == 4
    torch_fp32 = load(gptq_artifact, engine="torch", dtype="fp32")
    ids = torch.tensor([fast.encode("def add(a, b):\n    return a + b\n\nclass Stack:\n    def push(self, x):")])
    a, b = fast.logits(ids), torch_fp32.logits(ids)
    error = ((a - b).norm() / b.norm()).item()  # the same integers; activations int8 in ORT, fp32 in torch
    assert error < int8_activation_tolerance(), (kernel, error)
    stamp = converted.stat().st_mtime_ns
    assert load(gptq_artifact).engine.name == "onnx" and converted.stat().st_mtime_ns == stamp  # reused
    damaged = converted / "model.onnx.data"
    damaged.unlink()  # a new file, not an overwrite: the sessions above still map the old one
    damaged.write_bytes(b"damaged")
    rebuilt = load(gptq_artifact)  # rebuilt, not trusted: the same integers, the same text
    assert rebuilt.generate(PROMPT, max_new_tokens=4) == fast.generate(PROMPT, max_new_tokens=4)
    assert artifact.verify(converted)


def test_engine_choices_are_checked(embedded_model_dir, bnb_artifacts, onnx_fp32_artifact, gptq_artifact):
    from sc2quant.core.hf import read_config
    from sc2quant.runtime.engines import choose_engine

    config = read_config(gptq_artifact)
    notes: list[str] = []
    assert choose_engine("gptq", "cpu", "auto", gptq_artifact, config, notes=notes) == "onnx" and notes == []
    assert choose_engine("gptq", "cuda", "auto", gptq_artifact, config) == "torch"
    assert choose_engine("gptq", "cpu", "torch", gptq_artifact, config) == "torch"
    assert choose_engine("hf", "cpu") == "torch"
    unverified: list[str] = []
    assert choose_engine("gptq", "cpu", "auto", gptq_artifact, config, verified=False, notes=unverified) == "torch"
    assert len(unverified) == 1 and "checksums" in unverified[0]
    with pytest.raises(UserError, match="cannot run in the onnx engine: ONNX Runtime has no kernels for bitsandbytes"):
        load(bnb_artifacts["nf4"], engine="onnx")
    with pytest.raises(UserError, match="ONNX Runtime only"):
        load(onnx_fp32_artifact, engine="torch")
    with pytest.raises(UserError, match="unknown engine"):
        load(embedded_model_dir, engine="tensorrt")
