"""bitsandbytes int8 (LLM.int8) and int4 (nf4/fp4, optional double quant).

The checkpoint is exactly what transformers writes (`save_pretrained` of a model quantized
while loading; tested tensor for tensor) and transformers loads it back (the runtime's torch
engine, artifact kind "bnb"). It is written tensor by tensor (`sc2quant.quant.stream`): each
decoder Linear goes through bitsandbytes' own `Linear4bit`/`Linear8bitLt` exactly as
transformers' integration builds them, so memory never holds the model. Quantizing while
transformers loads would hold all of it (8.7 GB for the 3B shape). Nothing here runs a
forward: on AVX512-BF16 CPUs bitsandbytes repacks 4-bit weights on the first forward, and its
inverse is lossy (`sc2quant.formats.bnb.assert_savable` refuses to save such a model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from sc2quant.core.errors import UserError
from sc2quant.core.source import ModelSource
from sc2quant.formats import Method
from sc2quant.formats.bnb import BNB_4BIT_TYPES, assert_savable
from sc2quant.quant.base import QuantizeOptions, Quantizer
from sc2quant.quant.stream import rewrite

BNB_BITS = (4, 8)
COMPUTE_DTYPES = ("bf16", "fp32", "fp16")


def bnb_config(bits: int, quant_type: str, double_quant: bool, compute_dtype: str) -> Any:
    """transformers' BitsAndBytesConfig for these options (each checked with a clear error)."""
    from transformers import BitsAndBytesConfig

    from sc2quant.core.hf import torch_dtype

    if bits not in BNB_BITS:
        raise UserError(f"bitsandbytes quantizes to 8 or 4 bits, not {bits}: "
                        "use --bits 8 or --bits 4 (or --method gptq for other widths)")
    if quant_type not in BNB_4BIT_TYPES:
        raise UserError(f"unknown 4-bit quant type '{quant_type}': choose nf4 or fp4")
    if compute_dtype not in COMPUTE_DTYPES:
        raise UserError(f"unknown compute dtype '{compute_dtype}': choose one of {', '.join(COMPUTE_DTYPES)}")
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch_dtype(compute_dtype))


class BnbQuantizer(Quantizer):
    name = "bnb"
    options = ("bits", "quant_type", "double_quant", "compute_dtype")

    def applicable(self, opts: QuantizeOptions) -> tuple[str, ...]:
        return ("bits",) if opts.bits == 8 else self.options  # the 4-bit options mean nothing to LLM.int8

    def validate(self, opts: QuantizeOptions, config: dict[str, Any]) -> None:
        bnb_config(opts.bits, opts.quant_type, opts.double_quant, opts.compute_dtype)

    def method(self, opts: QuantizeOptions) -> Method:
        return Method("bnb", opts.bits, quant_type=opts.quant_type, double_quant=opts.double_quant)

    def params(self, opts: QuantizeOptions) -> dict[str, Any]:
        return {"llm_int8_threshold": 6.0} if opts.bits == 8 else super().params(opts)

    def run(self, opts: QuantizeOptions, source: ModelSource, tmp: Path, prepared: Any, device: str) -> dict[str, Any]:
        """Quantize each decoder Linear with bitsandbytes' own modules, write them as they come."""
        config = bnb_config(opts.bits, opts.quant_type, opts.double_quant, opts.compute_dtype)
        done = rewrite(source.path, tmp, lambda _, weight, bias: linear_state(config, weight, bias, device),
                       f"bitsandbytes {self.method(opts).name}")
        hf_config = AutoConfig.from_pretrained(str(source.path), trust_remote_code=False)
        hf_config.quantization_config = config
        hf_config.dtype = torch.bfloat16
        hf_config.save_pretrained(str(tmp))
        return done.describe()


def linear_state(config: Any, weight: torch.Tensor, bias: torch.Tensor | None, device: str) -> dict[str, torch.Tensor]:
    """What transformers stores for one Linear quantized by `config`: the module's state dict
    after bitsandbytes quantized its weight (transformers.integrations.bitsandbytes does the same)."""
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    weight = weight.to(torch.bfloat16)
    if config.load_in_8bit:
        module = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias is not None, device="meta",
                                     has_fp16_weights=config.llm_int8_has_fp16_weight,
                                     threshold=config.llm_int8_threshold)
        kwargs = {k: v for k, v in module.weight.__dict__.items() if k != "SCB"}
        module.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, **kwargs).to(device)
    else:
        module = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, device="meta",
                                   compute_dtype=config.bnb_4bit_compute_dtype,
                                   compress_statistics=config.bnb_4bit_use_double_quant,
                                   quant_type=config.bnb_4bit_quant_type, quant_storage=config.bnb_4bit_quant_storage)
        module.weight = bnb.nn.Params4bit(weight, requires_grad=False, **module.weight.__dict__).to(device)
    if bias is not None:
        module.bias = torch.nn.Parameter(bias.to(torch.bfloat16).to(device), requires_grad=False)
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def save_bnb(model: Any, out: Path) -> None:
    """Re-save a loaded bitsandbytes model (transformers 5.24's save_pretrained raises
    NotImplementedError for a pre-quantized bnb model it loaded). The state dict already holds
    the packed weights and SCB/absmax/quant_state exactly as stored, so we write it as is."""
    from safetensors.torch import save_file

    assert_savable(model)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: the embedding is the one copy
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.to_json_file(str(out / "config.json"))
