"""`sc2quant export onnx`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from sc2quant.cli.common import (
    JsonOpt,
    ModelArg,
    RecipeOpt,
    ThreadsOpt,
    VerboseOpt,
    app,
    command,
    print_json,
    resolve,
)

export_app = typer.Typer(help="Export a model to another runtime's format.", no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command("onnx")
@command("export onnx")
def export_onnx_cmd(
    ctx: typer.Context,
    model: ModelArg = None,
    dtype: Annotated[str, typer.Option(help="Activations, KV cache and logits: fp32 (CPU) or fp16 (CUDA).")] = "fp32",
    weights: Annotated[str, typer.Option(help="fp (the --dtype) or int4 (MatMulNBits).")] = "fp",
    block_size: Annotated[int, typer.Option(help="int4: block size, 32, 64 or 128 (default: fastest on every CPU "
                                                 "kind measured; GPTQ keeps its KL at half llama.cpp Q4_K_M's).")] = 128,
    symmetric: Annotated[bool, typer.Option("--symmetric/--asymmetric", help="int4: grid without or with zero points.")]
    = True,
    lm_head: Annotated[Optional[str], typer.Option(
        help="int4: lm_head int8 (default; a tied embedding shares it), int4, or float")] = None,
    int4_method: Annotated[Optional[str], typer.Option(
        help="int4 of a float model: gptq (default: GPTQ on the shipped calibration text, 0.25x the KL of "
             "rtn, minutes) or rtn (round-to-nearest, no data, seconds)")] = None,
    device: Annotated[str, typer.Option(help="Execution provider the graph is built for: cpu or cuda.")] = "cpu",
    threads: ThreadsOpt = None,
    out: Annotated[Optional[str], typer.Option(help="Output directory [default: out/<model>-onnx-<dtype|int4>]")]
    = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a previous export or an empty directory.")] = False,
    recipe: RecipeOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Export to ONNX Runtime: fused GroupQueryAttention with the sliding window, KV cache, fp32/fp16 or int4.

    The output runs in onnxruntime and onnxruntime-genai. A GPTQ artifact keeps its int4 weights.

    int4 defaults, one choice on every CPU kind measured (AVX512 EPYC, AMX Xeon; bench/results):
    GPTQ on 4,096 tokens of the shipped calibration text (9 minutes at 3B; KL a quarter of
    round-to-nearest's), block 128 (decode 1.35x / prefill 1.20x llama.cpp Q4_0 against 0.96x / 0.96x
    at block 32), symmetric (ONNX Runtime's asymmetric int8 kernels are reported wrong on AVX2 at
    batch 1), lm_head int8 (a quarter of an int4 head's KL), int8 activations in the int4 kernels.

    \b
    Examples:
      sc2quant export onnx                   # the embedded model, fp32 for the CPU
      sc2quant export onnx ./starcoder2-3b --weights int4
      sc2quant export onnx out/embedded-gptq-int4-g128 --lm-head int8
      sc2quant export onnx --recipe onnx-int4-cpu
    """
    from sc2quant.core.artifact import read_manifest
    from sc2quant.core.system import set_threads
    from sc2quant.export import export_onnx

    values, given = resolve(ctx, recipe)
    set_threads(values.pop("threads"))
    path = export_onnx(**values, given=given)
    if as_json:
        print_json({"artifact": str(path), **read_manifest(path).__dict__})
