"""The runtime: `load` an artifact and generate (`Model.stream_generate`, `generate`, `stream`,
`infill`), engines registered per artifact kind, and the OpenAI-compatible server built on the
public API only. Nothing here imports the quantization or export code."""

from sc2quant.runtime.model import Chunk, Model, Sampling, StopFilter, encode_prompt, load

__all__ = ["Chunk", "Model", "Sampling", "StopFilter", "encode_prompt", "load"]
