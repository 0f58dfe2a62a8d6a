"""The embedded default model: a small, really trained StarCoder2 shipped with sc2quant."""

from pathlib import Path

EMBEDDED_MODEL_DIR = Path(__file__).parent / "model"
EMBEDDED_MODEL_ID = "sc2quant/embedded-starcoder2-tiny"
