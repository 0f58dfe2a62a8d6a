"""Shared, session-scoped model builds: every test file reuses the same few models."""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("SC2QUANT_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the tests' conversions and logs go to a folder of their own, not the user's cache
_SCRATCH = tempfile.mkdtemp(prefix="sc2quant-tests-")
os.environ.setdefault("SC2QUANT_CACHE", os.path.join(_SCRATCH, "cache"))
os.environ.setdefault("SC2QUANT_LOG_DIR", os.path.join(_SCRATCH, "logs"))

REPO = Path(__file__).resolve().parents[1]
CPU_KINDS = ("avx2", "bf16")  # forced with SC2QUANT_CPU; the one this machine has runs for real


def pytest_report_header(config) -> list[str]:
    """The CPU's capability flags and the compute mode, so a failure can be traced to the machine kind."""
    from sc2quant.core.hf import compute_policy
    from sc2quant.core.system import cpu_caps

    plain = compute_policy(None, "cpu")
    nf4 = compute_policy({"quant_method": "bitsandbytes", "load_in_4bit": True}, "cpu")
    return [f"cpu: {cpu_caps().describe()}",
            f"compute mode: plain checkpoints {plain.dtype} ({plain.reason}); bnb 4-bit: {nf4.reason}"]


@pytest.fixture(params=CPU_KINDS, ids=lambda k: f"cpu-{k}")
def cpu_kind(request, monkeypatch) -> str:
    """Run the test once per CPU kind, forcing the capability switch (sc2quant.core.system)."""
    monkeypatch.setenv("SC2QUANT_CPU", request.param)
    return request.param


def logit_tolerance(logits, dtype) -> float:
    """How far two computations of the same logits may differ when only the kernels differ.

    Two steps of the compute dtype at the logits' magnitude (the last matmul rounds bf16 logits
    to bf16, so two kernels can land one step apart each way), plus accumulation-order
    differences inside the kernels, which accumulate in fp32: 64 fp32 epsilons at that magnitude
    (about 10x what full-vs-incremental decoding of the embedded model shows in fp32). An
    off-by-one position, by comparison, moves the embedded model's logits by 0.8.
    """
    import math

    import torch

    magnitude = float(abs(logits).max())  # a torch tensor or a numpy array
    step = torch.finfo(dtype).eps * 2 ** math.floor(math.log2(magnitude)) if magnitude else 0.0
    return 2 * step + 64 * torch.finfo(torch.float32).eps * magnitude


def make_tokenizer():
    """The embedded model's tokenizer (8,192-token byte-level BPE with StarCoder2's special tokens)."""
    from sc2quant.core.hf import load_tokenizer
    from sc2quant.embedded import EMBEDDED_MODEL_DIR

    return load_tokenizer(EMBEDDED_MODEL_DIR)


def make_random_model(
    path: Path,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 256,
    sliding_window: int | None = 16,
    context: int = 256,
    seed: int = 0,
    tokenizer=None,
) -> Path:
    """A randomly initialised StarCoder2 (bf16 safetensors + tokenizer) in `path`."""
    import torch
    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    tokenizer = tokenizer or make_tokenizer()
    torch.manual_seed(seed)
    config = Starcoder2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=context,
        sliding_window=sliding_window,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    model = Starcoder2ForCausalLM(config)
    with torch.no_grad():  # default init is tiny; larger weights make quantization error visible
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    model.to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """2 layers, hidden 64, 4 heads / 2 KV heads, window 16, context 256."""
    return make_random_model(tmp_path_factory.mktemp("tiny") / "model", tokenizer=tokenizer)


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    from sc2quant.embedded import EMBEDDED_MODEL_DIR

    if not (EMBEDDED_MODEL_DIR / "config.json").is_file():
        pytest.fail("the embedded model is missing: run `make embedded-model`")
    return EMBEDDED_MODEL_DIR


def quantize_to(out: Path, **options) -> Path:
    from sc2quant.quant import QuantizeOptions, quantize

    return quantize(QuantizeOptions(out=str(out), **options))


@pytest.fixture(scope="session")
def artifacts_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def bnb_artifacts(embedded_model_dir, artifacts_dir) -> dict[str, Path]:
    """int8, nf4, nf4 + double quant and fp4 artifacts of the embedded model."""
    return {
        "int8": quantize_to(artifacts_dir / "bnb-int8", method="bnb", bits=8),
        "nf4": quantize_to(artifacts_dir / "bnb-nf4", method="bnb", bits=4, quant_type="nf4"),
        "nf4-dq": quantize_to(artifacts_dir / "bnb-nf4-dq", method="bnb", bits=4, quant_type="nf4", double_quant=True),
        "fp4": quantize_to(artifacts_dir / "bnb-fp4", method="bnb", bits=4, quant_type="fp4"),
    }


# Small enough for CI, large enough for a well-conditioned Hessian (hidden 256).
GPTQ_TEST_CALIB = dict(calib_samples=64, calib_seqlen=256)


@pytest.fixture(scope="session")
def gptq_artifact(embedded_model_dir, artifacts_dir) -> Path:
    return quantize_to(artifacts_dir / "gptq-int4-g128", method="gptq", bits=4, group_size=128, **GPTQ_TEST_CALIB)


@pytest.fixture(scope="session")
def rtn_artifact(embedded_model_dir, artifacts_dir) -> Path:
    return quantize_to(artifacts_dir / "rtn-int4-g128", method="rtn", bits=4, group_size=128)


@pytest.fixture(scope="session")
def tiny_gptq_artifact(tiny_model_dir, artifacts_dir) -> Path:
    """int4 g32 round-to-nearest of the tiny model, in GPTQ's format (converted to ONNX on the CPU): seconds."""
    return quantize_to(artifacts_dir / "tiny-rtn-int4-g32", model=str(tiny_model_dir), method="rtn", bits=4,
                       group_size=32)


@pytest.fixture(scope="session")
def tiny_onnx_artifact(tiny_model_dir, artifacts_dir) -> Path:
    """An fp32 ONNX export of the tiny model: seconds."""
    from sc2quant.export.onnx import export_onnx

    return export_onnx(tiny_model_dir, artifacts_dir / "tiny-onnx-fp32", dtype="fp32", weights="fp")


@pytest.fixture(scope="session")
def eval_sets_small(embedded_model_dir):
    """A few windows of every evaluation source of calib_data (the same for every test)."""
    from sc2quant.core.data import eval_documents
    from sc2quant.core.hf import load_tokenizer
    from sc2quant.evaluate.metrics import eval_sets

    return eval_sets(load_tokenizer(embedded_model_dir), eval_documents(), seqlen=256, max_windows=4)


@pytest.fixture(scope="session")
def baseline_logits_fn(embedded_model_dir):
    """bf16 embedded model logits, memoised per window batch."""
    from sc2quant.runtime import load

    model = load(embedded_model_dir)
    memo: dict[bytes, object] = {}

    def fn(ids):
        key = ids.numpy().tobytes()
        if key not in memo:
            memo[key] = model.logits(ids)
        return memo[key]

    return fn


@pytest.fixture(scope="session")
def onnx_fp32_artifact(embedded_model_dir, artifacts_dir) -> Path:
    from sc2quant.export.onnx import export_onnx

    return export_onnx(None, artifacts_dir / "onnx-fp32", dtype="fp32", weights="fp")


@pytest.fixture(scope="session")
def onnx_int4_artifact(embedded_model_dir, artifacts_dir) -> Path:
    """The default int4 export, as users get it (`export onnx --weights int4`: GPTQ on the shipped calibration
    text, block 128, lm_head int8): the runtime, server, prefix, lookup, prepacked, /infill and base-install
    tests run the graph users run."""
    from sc2quant.export.onnx import export_onnx

    return export_onnx(None, artifacts_dir / "onnx-int4", dtype="fp32", weights="int4")


DEFAULT_INT4_BLOCK = 128  # the export's default block (also the activations' int8 block in MatMulNBits)


@pytest.fixture(scope="session")
def onnx_int4_rtn_artifact(embedded_model_dir, artifacts_dir) -> Path:
    """int4 everywhere, lm_head included, by round-to-nearest at block 32: the smallest export, to compare
    the int8 lm_head against."""
    from sc2quant.export.onnx import export_onnx

    return export_onnx(None, artifacts_dir / "onnx-int4-rtn-b32-lm4", dtype="fp32", weights="int4", block_size=32,
                       lm_head="int4", int4_method="rtn")


def ort_int8_kernel() -> str:
    """Which of ONNX Runtime's int8-activation (accuracy level 4) MatMulNBits kernels this CPU runs.
    ORT has no AMX kernel for MatMulNBits: AMX machines run the AVX512-VNNI one (named here so a
    failure says which path ran)."""
    from sc2quant.core.system import cpu_flags

    flags = cpu_flags()
    if "avx512_vnni" in flags:
        return "avx512-vnni" + ("-amx-cpu" if "amx_int8" in flags else "")
    return "avx2-vnni" if "avx_vnni" in flags else "avx2"


# One value rounded to int8 with its block's absmax scale: the step is max|x|/127 and the rounding error
# uniform within half a step, an RMS of step/sqrt(12): relative to the block's RMS, crest/(127 sqrt 12).
INT8_ROUNDING = 1 / (127 * 12**0.5)


@functools.cache
def activation_crest(block: int) -> float:
    """The RMS over blocks of `block` values of crest factor (max|x| / RMS) of the embedded model's
    activations at the input of every linear layer (fp32, on 512 tokens of the evaluation text): what
    ONNX Runtime's int8 quantization of activations (one scale per block) sees. Measured 2.8 at 32 and
    4.0 at 128: a block 4x as long holds larger extremes."""
    import torch
    from transformers import AutoModelForCausalLM

    from sc2quant.core.data import eval_documents
    from sc2quant.embedded import EMBEDDED_MODEL_DIR

    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL_DIR, dtype=torch.float32).eval()
    ids = make_tokenizer()("\n".join(d.text for d in eval_documents())[:20000], return_tensors="pt").input_ids[:, :512]
    crests: list = []

    def hook(_module, args) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1])
        if x.shape[-1] % block == 0:
            b = x.reshape(-1, block)
            crests.append(b.abs().amax(-1) / b.pow(2).mean(-1).sqrt().clamp_min(1e-12))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return float(torch.cat(crests).pow(2).mean().sqrt())


def int8_activation_tolerance(block: int = DEFAULT_INT4_BLOCK) -> float:
    """Relative logit error between fp32 activations and ONNX Runtime's int8-quantized activations
    (MatMulNBits accuracy level 4, one scale per block of `block` values) on the same int4 weights.

    Each value's rounding error relative to its block's RMS is INT8_ROUNDING times the block's crest
    factor, so a matmul's output carries INT8_ROUNDING x (the RMS crest over blocks, measured on the model's
    own activations at this block size: `activation_crest`). The residual stream carries that relative
    error through the layers without compounding it (each layer adds its own branch's error to a larger
    stream), so the logits' relative error is of the order of one matmul's; two int8 computations (two
    kernel shapes) differ by at most twice that. Measured against fp32: 1.9e-3 (AVX512-VNNI with AMX),
    2.25e-3 (without AMX) at block 32, where this gives 6.4e-3. A wrong scale, zero point or group order
    gives errors of 0.1 and more."""
    return INT8_ROUNDING * activation_crest(block)


def fp32_tolerance() -> float:
    """Relative logit difference between two fp32 kernels of the same computation: two rounding steps of
    the logits plus 64 epsilons of accumulation order (about 10x what full-vs-incremental decoding of the
    embedded model shows)."""
    import numpy as np

    return float(66 * np.finfo(np.float32).eps)


def bf16_tolerance() -> float:
    """The same for bf16 compute: the logits are rounded to bf16 (two of its steps), accumulation in fp32."""
    import numpy as np

    return float(2 * 2.0**-7 + 64 * np.finfo(np.float32).eps)
