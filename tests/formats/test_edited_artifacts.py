"""Artifacts edited by hand after they were written: whatever was changed, one clear line (a
`UserError`), never a library's traceback, and never a silently wrong engine. Where the edit
re-signs the manifest (checksums recomputed), the format's own checks catch it."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from sc2quant.core import artifact
from sc2quant.core.errors import UserError
from sc2quant.runtime import load


def _edited(src: Path, dst: Path, kind: str | None = None, quant: dict | None = None) -> Path:
    """A copy with sc2quant.json's kind and/or config.json's quantization_config changed, re-signed."""
    shutil.copytree(src, dst)
    if quant is not None:
        config = json.loads((dst / "config.json").read_text())
        config["quantization_config"].update(quant)
        (dst / "config.json").write_text(json.dumps(config))
    manifest = json.loads((dst / artifact.MANIFEST_NAME).read_text())
    manifest["files"] = artifact.file_table(dst)
    if kind is not None:
        manifest["kind"] = kind
    (dst / artifact.MANIFEST_NAME).write_text(json.dumps(manifest))
    artifact.verify(dst)  # the checksums hold: only the formats' checks can tell
    return dst


@pytest.mark.parametrize("quant,message", [({"bits": 5}, "bits 5"), ({"group_size": 0}, "group_size 0"),
                                           ({"quant_method": "awq"}, "'awq'")])
def test_an_edited_quantization_config_is_one_line(gptq_artifact, tmp_path, quant, message):
    path = _edited(gptq_artifact, tmp_path / "gptq", quant=quant)
    for engine in ("auto", "torch"):
        with pytest.raises(UserError, match=message):
            load(path, engine=engine)


@pytest.mark.parametrize("kind", ["gptq", "hf", "onnx"])
def test_a_kind_its_config_contradicts_is_refused(bnb_artifacts, tmp_path, kind):
    path = _edited(bnb_artifacts["nf4"], tmp_path / "nf4", kind=kind)
    error = f"says a '{kind}' artifact" if kind != "onnx" else "genai_config.json"
    with pytest.raises(UserError, match=error):
        load(path)


def test_an_unknown_kind_is_refused_by_every_verb(gptq_artifact, tmp_path):
    from sc2quant.export import export_onnx
    from sc2quant.inspect import inspect_model

    path = _edited(gptq_artifact, tmp_path / "awq", kind="awq")
    for call in (lambda: load(path), lambda: inspect_model(path), lambda: export_onnx(path, tmp_path / "out")):
        with pytest.raises(UserError, match="unknown artifact kind 'awq'"):
            call()
    assert not (tmp_path / "out").exists()


def test_a_damaged_onnx_export_loaded_unverified_is_one_line(onnx_int4_artifact, tmp_path):
    path = shutil.copytree(onnx_int4_artifact, tmp_path / "onnx")
    (path / "model.onnx.data").unlink()
    with pytest.raises(UserError, match="ONNX Runtime cannot load"):
        load(path, verify=False)


def test_fallbacks_and_refusals_say_what_really_happens(gptq_artifact, tmp_path, capsys):
    plain = tmp_path / "no-manifest"
    shutil.copytree(gptq_artifact, plain)
    (plain / artifact.MANIFEST_NAME).unlink()
    assert load(plain).engine.name == "torch"
    assert "no sc2quant.json" in capsys.readouterr().err  # not a --no-verify the user never gave
    model = load(gptq_artifact, dtype="bf16")  # the conversion computes in fp32: torch, said once
    assert model.engine.name == "torch" and "--dtype bf16" in capsys.readouterr().err
    eight = _edited(gptq_artifact, tmp_path / "gptq8", quant={"bits": 8})
    with pytest.raises(UserError, match=r"8-bit weights .*\(it then runs in torch\)"):
        load(eight, engine="onnx")


def test_the_libraries_loggers_are_left_as_the_caller_set_them(onnx_int4_artifact, monkeypatch):
    monkeypatch.setenv("SC2QUANT_LIBRARY_OUTPUT", "stderr")
    logger = logging.getLogger("transformers")
    before = (logger.level, logger.handlers[:], logger.propagate)
    logger.setLevel(logging.ERROR)
    try:
        load(onnx_int4_artifact)
        assert (logger.level, logger.handlers, logger.propagate) == (logging.ERROR, before[1], before[2])
    finally:
        logger.setLevel(before[0])
