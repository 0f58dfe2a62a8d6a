"""Measuring what quantization lost and what it bought: drift metrics, speed and memory,
HumanEval in a sandbox, and the `sc2quant report` verb that puts them side by side."""
