"""The runtime: `load` an artifact and generate (`Model.stream_generate`, `generate`, `stream`,
`infill`), engines registered per artifact kind, and the OpenAI-compatible server built on the
public API only. Nothing here imports the quantization or export code."""

from sc2quant.runtime.model import Model, encode_prompt, load
from sc2quant.runtime.sampling import MAX_TEMPERATURE, Chunk, Sampling
from sc2quant.runtime.stops import StopFilter

__all__ = ["MAX_TEMPERATURE", "Chunk", "Model", "Sampling", "StopFilter", "encode_prompt", "load"]
