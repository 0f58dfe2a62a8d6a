"""bitsandbytes int8 / nf4 / fp4 artifacts: round trips, drift ordering, the CPU repack trap, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from sc2quant.cli import app
from sc2quant.core.artifact import read_manifest
from sc2quant.core.errors import UserError
from sc2quant.evaluate.metrics import compare
from sc2quant.runtime import load

PROBE = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"


def _probe_ids(model):
    return torch.tensor([model.encode(PROBE)])


def _plain_transformers(path, repack: bool):
    """The checkpoint as plain transformers loads it on a CPU of this kind (bitsandbytes repacks
    4-bit weights exactly where its AVX512-BF16 kernel exists)."""
    from transformers import AutoModelForCausalLM

    from sc2quant.formats.bnb import set_bnb_repack

    model = AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu", trust_remote_code=False)
    set_bnb_repack(model, repack)
    return model


def _saved_tensors_equal(a, b) -> bool:
    from safetensors.torch import load_file

    first, second = load_file(a), load_file(b)
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["int8", "nf4", "nf4-dq", "fp4"])
def test_loads_the_same_through_sc2quant_and_plain_transformers(bnb_artifacts, name, cpu_kind, tmp_path):
    """Same kernel choice as transformers on each CPU kind, so the same logits bit for bit."""
    from sc2quant.core.system import cpu_caps
    from sc2quant.quant.bnb import save_bnb

    path = bnb_artifacts[name]
    ours = load(path)
    ids = _probe_ids(ours)
    mine = ours.logits(ids)
    assert ours.engine.policy.bnb_repack == (cpu_caps().bnb_repack and name != "int8")
    plain = _plain_transformers(path, cpu_caps().bnb_repack)
    save_bnb(plain, tmp_path / "again")  # before any forward: the stored tensors, untouched
    assert _saved_tensors_equal(path / "model.safetensors", tmp_path / "again" / "model.safetensors")
    with torch.no_grad():
        assert torch.equal(plain(ids).logits.float(), mine)
        again = _plain_transformers(tmp_path / "again", cpu_caps().bnb_repack)
        assert torch.equal(again(ids).logits.float(), mine)


def test_manifest_records_what_was_done(bnb_artifacts):
    m = read_manifest(bnb_artifacts["nf4-dq"])
    assert (m.kind, m.method, m.bits) == ("bnb", "bnb-nf4", 4)
    assert m.params["quant_type"] == "nf4" and m.params["double_quant"] is True
    assert m.params["compute_dtype"] == "bf16"
    assert len(m.params["quantized_modules"]) == 6 * 6  # q, k, v, o, c_fc, c_proj in 6 layers
    assert "model.embed_tokens.weight" in m.params["kept_tensors"]
    assert any(k.endswith("input_layernorm.weight") for k in m.params["kept_tensors"])
    # true bytes include absmax/quant_state (which get_memory_footprint() leaves out): what footprint predicts
    from sc2quant import footprint as fp
    from sc2quant.core.hf import read_config

    predicted = fp.predict_method(fp.shape_from_config(read_config(bnb_artifacts["nf4-dq"])), "bnb-nf4-dq")
    assert m.params["total_weight_bytes"] > predicted.weight_bytes
    assert abs(m.params["total_weight_bytes"] - predicted.saved_bytes) <= 8 * len(m.params["quantized_modules"])
    int8 = read_manifest(bnb_artifacts["int8"])
    assert int8.params["quantized_weight_bytes"] > m.params["quantized_weight_bytes"]
    assert m.source["id"] and m.source["weights_sha256"]


@pytest.mark.slow
def test_kl_ordering_int8_nf4_fp4(bnb_artifacts, eval_sets_small, baseline_logits_fn):
    drift = {name: compare(eval_sets_small, load(bnb_artifacts[name]).logits, baseline_logits_fn)["all"]
             for name in ("int8", "nf4", "fp4")}
    print({k: round(v["kl_mean"], 6) for k, v in drift.items()})
    assert drift["int8"]["kl_mean"] < drift["nf4"]["kl_mean"] < drift["fp4"]["kl_mean"]
    assert drift["int8"]["top1_agreement"] > drift["fp4"]["top1_agreement"]


@pytest.mark.slow
def test_run_then_save_cannot_corrupt(bnb_artifacts, cpu_kind, tmp_path):
    """Load, run, save: the checkpoint written is the stored one bit for bit, or (after bitsandbytes
    repacked the weights for its AVX512-BF16 kernel) saving is refused and nothing is written."""
    from sc2quant.core.system import cpu_caps
    from sc2quant.quant.bnb import save_bnb

    model = load(bnb_artifacts["nf4"])
    ids = _probe_ids(model)
    before = model.logits(ids)
    if cpu_caps().bnb_repack:  # this machine has the kernel and the kind is not forced to avx2
        with pytest.raises(UserError, match="repacked"):
            save_bnb(model.engine.model, tmp_path / "after-run")
        assert not (tmp_path / "after-run").exists()
    else:
        save_bnb(model.engine.model, tmp_path / "after-run")
        assert _saved_tensors_equal(bnb_artifacts["nf4"] / "model.safetensors", tmp_path / "after-run" / "model.safetensors")
    assert torch.equal(model.logits(ids), before)  # the live model is untouched either way


def test_a_repacked_model_is_refused(bnb_artifacts):
    """Simulate the in-place repack that AVX512-BF16 CPUs do: saving must be refused."""
    import bitsandbytes as bnb

    from sc2quant.formats.bnb import assert_savable

    model = load(bnb_artifacts["nf4"]).engine.model
    layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    layer.weight.quant_state.packing_format_for_cpu = True
    with pytest.raises(UserError, match="repacked"):
        assert_savable(model)


runner = CliRunner()


@pytest.mark.parametrize("args,message", [
    (["--method", "bnb", "--bits", "3"], "8 or 4 bits"),
    (["--method", "bnb", "--bits", "4", "--quant-type", "nf5"], "unknown 4-bit quant type"),
    (["--method", "bnb", "--bits", "4", "--compute-dtype", "int8"], "unknown compute dtype"),
    (["--method", "awq"], "unknown method"),
])
def test_bad_options_exit_2_and_write_nothing(tiny_model_dir, tmp_path, args, message):
    out = tmp_path / "out"
    result = runner.invoke(app, ["quantize", str(tiny_model_dir), *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_non_starcoder2_model(tiny_model_dir, tmp_path):
    import shutil

    bad = tmp_path / "llama"
    shutil.copytree(tiny_model_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    result = runner.invoke(app, ["quantize", str(bad), "--method", "bnb", "--bits", "8", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "'llama' model, not StarCoder2" in result.output
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_force_and_force_replaces_only_our_output(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["quantize", str(tiny_model_dir), "--method", "bnb", "--bits", "8", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--force" in result.output
    result = runner.invoke(app, [*args, "--force"])
    assert result.exit_code == 2 and "no sc2quant.json" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0  # an empty directory
    assert runner.invoke(app, [*args, "--quant-type", "fp4", "--bits", "4", "--force"]).exit_code == 0  # our own output
    assert read_manifest(out).method == "bnb-fp4"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_gpu(tiny_model_dir, tmp_path):
    result = runner.invoke(app, ["quantize", str(tiny_model_dir), "--method", "bnb", "--bits", "8", "--device", "cuda",
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "no CUDA GPU" in result.output
    assert not (tmp_path / "o").exists()


def test_recipe_and_flag_override(tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    result = runner.invoke(app, ["quantize", str(tiny_model_dir), "--recipe", "bnb-nf4", "--quant-type", "fp4",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    m = read_manifest(out)
    assert m.method == "bnb-fp4" and m.bits == 4  # bits from the recipe, quant type from the flag


@pytest.mark.slow
@pytest.mark.parametrize("options", [dict(bits=8), dict(bits=4, quant_type="nf4"),
                                     dict(bits=4, quant_type="nf4", double_quant=True), dict(bits=4, quant_type="fp4")],
                         ids=["int8", "nf4", "nf4-dq", "fp4"])
def test_streamed_checkpoint_is_what_transformers_writes(tiny_model_dir, tmp_path, options):
    """The tensor-by-tensor writer and transformers' quantize-while-loading + save_pretrained agree."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from sc2quant.quant import QuantizeOptions, quantize
    from sc2quant.quant.bnb import bnb_config

    ours = quantize(QuantizeOptions(model=str(tiny_model_dir), out=str(tmp_path / "ours"), method="bnb", **options))
    config = bnb_config(options["bits"], options.get("quant_type", "nf4"), options.get("double_quant", False), "bf16")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), quantization_config=config, dtype=torch.bfloat16,
                                                 device_map="cpu", trust_remote_code=False)
    model.save_pretrained(str(tmp_path / "theirs"))
    mine, theirs = load_file(ours / "model.safetensors"), load_file(tmp_path / "theirs" / "model.safetensors")
    assert mine.keys() == theirs.keys()
    assert all(mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k]) for k in mine)
    a = json.loads((ours / "config.json").read_text())
    b = json.loads((tmp_path / "theirs" / "config.json").read_text())
    assert a["quantization_config"] == b["quantization_config"] and a["dtype"] == b["dtype"]
