"""The format registry: a new artifact kind is one `Format` subclass, and every verb finds it.

The toy format below is registered by the test alone (no module of the package is edited) and
is then listed by the CLI, loaded by `load()`, routed by `choose_engine` and counted by
`footprint`.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sc2quant.core.errors import UserError


@pytest.fixture
def toy_format():
    """A toy kind: a plain bf16 checkpoint under kind "toy", whose load hook records each model it saw."""
    from sc2quant.formats import FORMATS, Format, Method

    seen: list[str] = []

    class ToyFormat(Format, kind="toy"):
        description = "a toy kind registered by a test"
        families = ("toy",)
        patterns = ((re.compile(r"^toy-bf16$"), lambda m: Method("toy", 16)),)

        def method_name(self, m):
            return "toy-bf16"

        def footprint_methods(self):
            return [Method("toy", 16)]

        def footprint(self, shape, m):
            from sc2quant.footprint.predict import float_row

            return dataclasses.replace(float_row(shape, "bf16"), method=m.name)

        def after_load(self, model, policy):
            seen.append(type(model).__name__)

    try:
        yield seen
    finally:
        FORMATS.pop("toy", None)


def _toy_artifact(src: Path, out: Path) -> Path:
    from sc2quant.core import artifact

    with artifact.staging(out, False, "quantize", [src]) as tmp:
        for f in src.iterdir():
            if f.is_file() and f.name != artifact.MANIFEST_NAME:
                shutil.copy2(f, tmp / f.name)
        manifest = artifact.Manifest(kind="toy", method="toy", verb="quantize",
                                     source=artifact.source_identity("embedded", "embedded", src))
        artifact.commit(tmp, out, manifest, False)
    return out


def test_a_registered_format_is_listed_loaded_routed_and_counted(toy_format, embedded_model_dir, tmp_path):
    from sc2quant.cli import app
    from sc2quant.footprint import method_names, predict_method, resolve_shape
    from sc2quant.runtime import load
    from sc2quant.runtime.engines import choose_engine

    listed = CliRunner().invoke(app, ["formats"])
    assert listed.exit_code == 0 and re.search(r"^\s*toy\s+a toy kind", listed.stdout, re.M), listed.stdout
    footprint = CliRunner().invoke(app, ["footprint", "--shape", "3b"])
    assert footprint.exit_code == 0 and "toy-bf16" in footprint.stdout
    assert "toy-bf16" in method_names()
    shape = resolve_shape("3b")
    assert predict_method(shape, "toy-bf16").saved_bytes == predict_method(shape, "bf16").saved_bytes

    assert choose_engine("toy", "cpu") == "torch"
    with pytest.raises(UserError, match="does not run in the onnx engine"):
        choose_engine("toy", "cpu", "onnx")
    toy = load(_toy_artifact(embedded_model_dir, tmp_path / "toy"))
    assert toy.kind == "toy" and toy.engine.name == "torch" and toy_format == ["Starcoder2ForCausalLM"]
    prompt = "def add(a, b):"
    assert toy.generate(prompt, max_new_tokens=8) == load(embedded_model_dir).generate(prompt, max_new_tokens=8)


def test_every_kind_has_one_home():
    """Kinds, engines and methods are each written once: the tables agree with each other."""
    from sc2quant.formats import FORMATS, family_format, parse_method
    from sc2quant.runtime.engines import ENGINE_CHOICES, ENGINES

    assert list(FORMATS) == ["hf", "bnb", "gptq", "onnx"]
    assert ENGINE_CHOICES == ("auto", *ENGINES)
    for fmt in FORMATS.values():
        assert set(fmt.engines("cpu")) <= set(ENGINES) and set(fmt.engines("cuda")) <= set(ENGINES)
        for m in fmt.footprint_methods():
            assert parse_method(m.name) == m and family_format(m.family) is fmt and m.kind == fmt.kind


def test_unknown_kinds_and_methods_get_one_clear_line():
    from sc2quant.formats import format_of_config, get_format, parse_method

    with pytest.raises(UserError, match="unknown artifact kind 'gguf'"):
        get_format("gguf")
    with pytest.raises(UserError, match="'awq' checkpoints are not supported"):
        format_of_config({"quantization_config": {"quant_method": "awq"}})
    with pytest.raises(UserError, match="unknown method 'gptq-int5-g128'"):
        parse_method("gptq-int5-g128")
    assert format_of_config({}).kind == "hf"
    assert format_of_config({"quantization_config": {"quant_method": "gptq"}}).kind == "gptq"


def test_the_int4_export_name_says_its_lm_head():
    from sc2quant.formats import parse_method

    assert parse_method("onnx-int4-b32-sym-lm8").lm_head == "int8"
    assert parse_method("onnx-int4-b32-sym").lm_head == "int4"
    assert parse_method("onnx-int4-b128-lmf").name == "onnx-int4-b128-lmf"
