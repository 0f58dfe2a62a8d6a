"""`sc2quant footprint`: the memory of every method for a StarCoder2 shape, predicted without a model.

`shapes` (presets and parameter counts), `predict` (bytes per method and KV cache, with the
layouts they assume) and `report` (the verb's data and tables). Public names are re-exported here.
"""

from sc2quant.footprint.predict import (
    BNB_BLOCK,
    KvRow,
    Row,
    bnb_4bit_layer_bytes,
    bnb_quant_state_json,
    gptq_layer_bytes,
    kv_cache_bytes,
    kv_rows,
    matmul_nbits_bytes,
    predict,
    predict_method,
)
from sc2quant.footprint.report import CardRow, legacy_card, legacy_explanation, report, tables
from sc2quant.footprint.shapes import (
    CARD_7B_MB,
    CONFIG_DEFAULTS,
    GB,
    MB,
    PRESETS,
    Counts,
    Shape,
    counts,
    resolve_shape,
    rotary_buffer_bytes,
    shape_from_config,
)
from sc2quant.formats import method_names

__all__ = [
    "BNB_BLOCK", "CARD_7B_MB", "CONFIG_DEFAULTS", "GB", "MB", "PRESETS", "CardRow", "Counts",
    "KvRow", "Row", "Shape", "bnb_4bit_layer_bytes", "bnb_quant_state_json", "counts", "gptq_layer_bytes",
    "kv_cache_bytes", "kv_rows", "legacy_card", "legacy_explanation", "matmul_nbits_bytes", "method_names", "predict",
    "predict_method", "report", "resolve_shape", "rotary_buffer_bytes", "shape_from_config", "tables",
]
