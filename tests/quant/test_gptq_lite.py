"""The export's GPTQ (sc2quant.quant.gptq_lite): what it computes, and the checkpoint it writes."""

from __future__ import annotations

import json

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


def test_the_checkpoint_is_standard_gptq_v1_and_matches_its_integers(embedded_model_dir, tmp_path, tokenizer):
    from sc2quant.core.data import calibration_samples
    from sc2quant.core.tensorfile import TensorReader

    samples, _ = calibration_samples(tokenizer, "calib_data", 4, 128, seed=0)
    done = gptq_lite.quantize(embedded_model_dir, tmp_path, samples, 4, 64, True)
    config = json.loads((tmp_path / "config.json").read_text())
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == ("gptq", 4, 64, True, False)
    out, src = TensorReader.of(tmp_path), TensorReader.of(embedded_model_dir)
    for layer in range(config["num_hidden_layers"]):
        for name in gptq_format.QUANTIZED_LINEARS:
            part = "mlp" if name.startswith("c_") else "self_attn"
            prefix = f"model.layers.{layer}.{part}.{name}"
            weight = src.get(prefix + ".weight").float()
            dq = gptq_format.dequantize(out.get(prefix + ".qweight"), out.get(prefix + ".qzeros"),
                                        out.get(prefix + ".scales"), out.get(prefix + ".g_idx"), 4)
            assert dq.shape == weight.shape
            rel = float((dq - weight).norm() / weight.norm())
            assert 0 < rel < 0.3, (prefix, rel)  # quantized, and still the same matrix
            assert torch.equal(out.get(prefix + ".bias"), src.get(prefix + ".bias").half())
    for name in src.names():  # everything else, as it was
        if ".layers." not in name or "norm" in name:
            assert torch.equal(out.get(name), src.get(name)), name
    assert done["samples"] == 4 and done["seqlen"] == 128 and done["act_order"] is True


def test_calibration_windows_longer_than_the_sliding_window_are_refused(embedded_model_dir, tmp_path):
    with pytest.raises(AssertionError, match="sliding window"):
        gptq_lite.quantize(embedded_model_dir, tmp_path, [[1] * 300], 4, 64, True)
