"""The export's GPTQ (sc2quant.quant.gptq_lite): what it computes, and the checkpoint it writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sc2quant.quant import gptq_format, gptq_lite


def _problem(n: int = 48, k: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and the Hessian of correlated inputs with a few outlier channels (as activations have)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = torch.randn(2048, k, generator=g) @ mix
    x[:, :4] *= 20
    return w, x.t() @ x / x.shape[0]


def _output_error(w: torch.Tensor, dq: torch.Tensor, h: torch.Tensor) -> float:
    d = w - dq
    return float(torch.einsum("nk,kl,nl->", d, h, d))


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_beats_round_to_nearest_on_the_layer_output(act_order, sym):
    w, h = _problem()
    q, scales, zeros = gptq_lite.gptq_matrix(w, h, 4, 32, sym, act_order=act_order)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and scales.shape == zeros.shape == (48, 8)
    dq = gptq_lite.dequantize(q, scales, zeros, 32)
    rtn = gptq_format.quantize_rtn(w, 4, 32, sym)
    rtn_dq = gptq_format.dequantize(rtn["qweight"], rtn["qzeros"], rtn["scales"], rtn["g_idx"], 4)
    assert _output_error(w, dq, h) < 0.6 * _output_error(w, rtn_dq, h)


def test_static_groups_keep_round_to_nearest_grid_and_stored_scales():
    """With activation order each group's grid is fixed from the float weights: RTN's scales and zeros,
    already rounded to the fp16 they are stored in (so the integers mean the same after saving)."""
    w, h = _problem(seed=1)
    _, scales, zeros = gptq_lite.gptq_matrix(w, h, 4, 64, True, act_order=True)
    rtn = gptq_format.quantize_rtn(w, 4, 64, True)
    assert torch.equal(scales, rtn["scales"].float().t())
    assert torch.equal(scales.half().float(), scales) and torch.all(zeros == 8)


def test_a_dead_input_channel_and_a_singular_hessian_give_finite_integers():
    w, h = _problem(n=16, k=64)
    h[5, :] = 0
    h[:, 5] = 0
    low_rank = torch.randn(8, 64)
    for hessian in (h, low_rank.t() @ low_rank):  # fewer calibration tokens than inputs: dampening holds
        q, scales, zeros = gptq_lite.gptq_matrix(w, hessian, 4, 32, True)
        assert torch.isfinite(gptq_lite.dequantize(q, scales, zeros, 32)).all()


def _layer(model_dir, index: int):
    from transformers import AutoConfig
    from transformers.models.starcoder2.modeling_starcoder2 import Starcoder2DecoderLayer

    from sc2quant.core.tensorfile import TensorReader

    config = AutoConfig.from_pretrained(model_dir)
    reader = TensorReader.of(model_dir)
    prefix = f"model.layers.{index}."
    layer = Starcoder2DecoderLayer(config, index)
    layer.load_state_dict({n[len(prefix):]: reader.get(n) for n in reader.names() if n.startswith(prefix)})
    return config, reader, layer


def test_a_layer_is_quantized_whole_and_packed_as_matmul_nbits_reads_it(embedded_model_dir, tokenizer):
    from sc2quant.core.data import calibration_samples

    config, reader, layer = _layer(embedded_model_dir, 0)
    samples, _ = calibration_samples(tokenizer, "calib_data", 4, 128, seed=0)
    calib = gptq_lite.Calibrator(config, reader.get("model.embed_tokens.weight"), samples, 4, 64, True)
    before = calib.x.clone()
    weights = {n: m.weight.detach().float().clone() for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    out = calib.layer(layer, 0)
    assert set(out) == {*weights, "qkv"}
    for name, weight in weights.items():
        found = out[name]
        dq = gptq_lite.dequantize(found.q, found.scales, found.zeros, 64)
        assert dq.shape == weight.shape and 0 < float((dq - weight).norm() / weight.norm()) < 0.3, name
        packed = found.matmul_nbits(True, np.float32)
        assert packed["qzeros"] is None and packed["qweight"].shape == (weight.shape[0], weight.shape[1] // 64, 32)
        nibbles = np.stack([packed["qweight"] & 15, packed["qweight"] >> 4], axis=-1).reshape(weight.shape)
        assert np.array_equal(nibbles, found.q.numpy())  # low nibble first, as ONNX Runtime reads it
    assert torch.equal(out["qkv"].q, torch.cat([out[f"self_attn.{p}_proj"].q for p in "qkv"]))
    assert calib.x.shape == before.shape and not torch.equal(calib.x, before)  # the next layer's input
    assert calib.describe()["samples"] == 4 and calib.describe()["median_relative_error"] > 0


def test_asymmetric_zero_points_are_packed_in_pairs_low_nibble_first():
    q = torch.randint(0, 16, (3, 96), dtype=torch.uint8)
    zeros = torch.tensor([[1.0, 2.0, 3.0]] * 3)
    packed = gptq_lite.Quantized(q, torch.ones(3, 3), zeros, 32).matmul_nbits(False, np.float16)
    assert packed["scales"].dtype == np.float16
    assert packed["qzeros"].tolist() == [[1 | 2 << 4, 3]] * 3  # three groups: the last byte's high nibble is padding


def test_calibration_windows_longer_than_the_sliding_window_are_refused(embedded_model_dir):
    config, reader, _ = _layer(embedded_model_dir, 0)
    with pytest.raises(ValueError, match="sliding window"):
        gptq_lite.Calibrator(config, reader.get("model.embed_tokens.weight"), [[1] * 300], 4, 64, True)
