"""CPU capabilities, the forced switch, and the compute policy each CPU kind gets."""

from __future__ import annotations

import pytest

from sc2quant.core.errors import UserError
from sc2quant.core.hf import compute_policy
from sc2quant.core.system import cpu_caps, peak_rss_self, set_threads, vm_hwm

NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True}
INT8 = {"quant_method": "bitsandbytes", "load_in_8bit": True}
GPTQ = {"quant_method": "gptq", "bits": 4}


def test_forcing_the_cpu_kind(monkeypatch):
    real = cpu_caps()
    monkeypatch.setenv("SC2QUANT_CPU", "avx2")
    forced = cpu_caps()
    assert not forced.native_bf16 and not forced.bnb_repack and forced.forced == "avx2"
    assert forced.flags == real.flags and "forced by SC2QUANT_CPU=avx2" in forced.describe()
    monkeypatch.setenv("SC2QUANT_CPU", "bf16")
    forced = cpu_caps()
    # bf16 can be forced anywhere (torch emulates it); bitsandbytes' repacked kernel only where it exists
    assert forced.native_bf16 and forced.bnb_repack == real.bnb_repack
    monkeypatch.setenv("SC2QUANT_CPU", "avx1024")
    with pytest.raises(UserError, match="not a CPU kind"):
        cpu_caps()


@pytest.mark.parametrize("kind,plain,repack", [("avx2", "fp32", False), ("bf16", "bf16", None)])
def test_compute_policy_per_cpu_kind(monkeypatch, kind, plain, repack):
    monkeypatch.setenv("SC2QUANT_CPU", kind)
    assert compute_policy(None, "cpu").dtype == plain
    nf4 = compute_policy(NF4, "cpu")
    assert nf4.dtype is None and nf4.bnb_repack == (cpu_caps().bnb_repack if repack is None else repack)
    assert not compute_policy(INT8, "cpu").bnb_repack  # the repack is a 4-bit kernel
    assert compute_policy(GPTQ, "cpu").dtype is None  # as transformers loads it
    assert compute_policy(None, "cpu", "fp32").dtype == "fp32" and compute_policy(GPTQ, "cpu", "bf16").dtype == "bf16"


def test_policy_refusals():
    with pytest.raises(UserError, match="unknown dtype"):
        compute_policy(None, "cpu", "int3")
    with pytest.raises(UserError, match="bitsandbytes checkpoints compute in bf16"):
        compute_policy(NF4, "cpu", "fp32")


def test_threads_and_memory_readings():
    import torch

    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and set_threads(None) == 1
    finally:
        torch.set_num_threads(before)
    for bad in (0, -2, 10**6):
        with pytest.raises(UserError, match="--threads"):
            set_threads(bad)
    assert peak_rss_self() >= vm_hwm() > 50 * 2**20
