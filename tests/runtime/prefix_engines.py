"""The engines that extend a cached sequence, for the prefix-cache and lookup tests: ONNX int4 and
fp32 exports, torch's dynamic cache in fp32 and in its automatic dtype (bf16 where the CPU has
native bf16). Name -> (the fixture giving the model, the dtype to load it with)."""

ENGINES = {"onnx-int4": ("onnx_int4_artifact", "auto"), "onnx-fp32": ("onnx_fp32_artifact", "auto"),
           "torch-fp32": ("embedded_model_dir", "fp32"), "torch-auto": ("embedded_model_dir", "auto")}
