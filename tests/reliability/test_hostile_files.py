"""Hostile files on disk (a red team's findings): every one is one clear line and exit status 2 at the CLI
(a `UserError` from the API), found before anything large is allocated or anything hangs, nothing written.

Root ignores permission bits, so unreadable files and directories are simulated with the kernel's answer.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sc2quant.cli import app
from sc2quant.core.errors import IntegrityError
from sc2quant.core.files import sha256_file

runner = CliRunner()


def invoke(args: list[str], fifo: Path | None = None, patience: float = 30):
    """The CLI in this process. A reader blocked on `fifo` (holding the GIL, so no thread here can help)
    is released after `patience` seconds by a writer in another process, and the test fails."""
    watchdog = None
    if fifo is not None:
        watchdog = subprocess.Popen(["sh", "-c", f"sleep {patience}; : > '{fifo}'"])
    t0 = time.monotonic()
    try:
        result = runner.invoke(app, args)
    finally:
        if watchdog is not None:
            watchdog.kill()
            watchdog.wait()
    assert time.monotonic() - t0 < patience, f"sc2quant {' '.join(args)} blocked reading the FIFO {fifo}"
    return result


def assert_refused(args: list[str], message: str, fifo: Path | None = None) -> None:
    result = invoke(args, fifo=fifo)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (args, result.output)
    assert message in lines[0] and "Traceback" not in result.output, (args, result.output)


def edit_json(file: Path, change) -> None:
    data = json.loads(file.read_text())
    change(data)
    file.write_text(json.dumps(data))


def relist(art: Path, name: str) -> None:
    """Record `name`'s new checksum in the artifact's manifest (a tamperer who rewrites it too)."""
    edit_json(art / "sc2quant.json", lambda m: m["files"].__setitem__(
        name, {"sha256": sha256_file(art / name), "bytes": (art / name).stat().st_size}))


@pytest.fixture
def model(tiny_model_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


@pytest.fixture
def gptq(tiny_gptq_artifact, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_gptq_artifact, tmp_path / "gptq"))


# --- 1. sizes claimed by config files, checked against the weights before anything is allocated ----------


@pytest.mark.parametrize("key,value", [("num_hidden_layers", 100000), ("hidden_size", 4096), ("vocab_size", 10**9),
                                       ("intermediate_size", 10**7), ("num_hidden_layers", "2")])
def test_config_sizes_the_weights_do_not_have(model, key, value):
    edit_json(model / "config.json", lambda c: c.__setitem__(key, value))
    for args in (["inspect", str(model)], ["run", str(model), "--prompt", "def"]):
        assert_refused(args, key)


def test_onnx_context_length_beyond_the_models(tiny_onnx_artifact, tmp_path):
    art = Path(shutil.copytree(tiny_onnx_artifact, tmp_path / "onnx"))
    edit_json(art / "genai_config.json", lambda g: g["model"].__setitem__("context_length", 2**28))
    relist(art, "genai_config.json")
    assert_refused(["run", str(art), "--prompt", "def"], "context_length 268435456 exceeds")
    assert_refused(["inspect", str(art)], "context_length 268435456 exceeds")
    for name in ("genai_config.json", "config.json"):  # both lie alike: the graph itself says
        edit_json(art / name, lambda c: (c.get("model", {}).get("decoder", c)).__setitem__("num_hidden_layers", 100000))
        relist(art, name)
    edit_json(art / "genai_config.json", lambda g: g["model"].__setitem__("context_length", 128))
    relist(art, "genai_config.json")
    assert_refused(["run", str(art), "--prompt", "def"], "says 100000 layers but the graph has 2")


def test_tokenizer_ids_beyond_the_vocabulary(model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    tok.add_tokens(["<beyond_the_vocabulary>"])
    tok.save_pretrained(str(model))
    assert_refused(["run", str(model), "--prompt", "<beyond_the_vocabulary>"], "token ids up to 8192")


# --- 2. parsing bombs -----------------------------------------------------------------------------------


def test_deeply_nested_json(model, gptq):
    (model / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert_refused(["inspect", str(model)], "nested too deeply")
    (gptq / "sc2quant.json").write_text('{"a":' * 100_000 + "1" + "}" * 100_000)
    assert_refused(["run", str(gptq), "--prompt", "def"], "nested too deeply")


# --- 3. files that are not what they seem ---------------------------------------------------------------


def test_a_fifo_named_like_weights_is_refused_not_read(model, tmp_path):
    os.mkfifo(model / "extra.safetensors")
    for args in (["inspect", str(model)], ["run", str(model), "--prompt", "def"],
                 ["quantize", str(model), "--method", "rtn", "--group-size", "32", "--out", str(tmp_path / "q")]):
        assert_refused(args, "extra.safetensors is not a regular weight file", fifo=model / "extra.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_out_is_a_dangling_link(model, tmp_path):
    (tmp_path / "out").symlink_to(tmp_path / "nowhere" / "deeper")
    for force in ([], ["--force"]):
        assert_refused(["quantize", str(model), "--method", "rtn", "--group-size", "32", "--out", str(tmp_path / "out"),
                        *force], "which does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]


def test_out_is_a_mount_point(model, tmp_path, monkeypatch):
    mount = tmp_path / "mnt"
    mount.mkdir()
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == mount or real(p))
    assert_refused(["export", "onnx", str(model), "--out", str(mount), "--force"], "is a mount point")
    assert list(mount.iterdir()) == []


def test_unreadable_model_directory(model, monkeypatch):
    iterdir = pathlib.Path.iterdir

    def denied(self):
        if Path(self) == model:
            raise PermissionError(13, "Permission denied", str(self))
        return iterdir(self)

    monkeypatch.setattr(pathlib.Path, "iterdir", denied)
    for args in (["inspect", str(model)], ["run", str(model), "--prompt", "def"]):
        assert_refused(args, "Permission denied")


def test_unreadable_config(model, monkeypatch):
    read_text = pathlib.Path.read_text

    def denied(self, *args, **kwargs):
        if Path(self) == model / "config.json":
            raise PermissionError(13, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", denied)
    for args in (["inspect", str(model)], ["run", str(model), "--prompt", "def"]):
        assert_refused(args, "cannot read")


def test_a_manifest_listing_one_file_many_times(gptq):
    from sc2quant.runtime import load

    entry = json.loads((gptq / "sc2quant.json").read_text())["files"]["model.safetensors"]
    edit_json(gptq / "sc2quant.json", lambda m: m["files"].update(
        {f"x{i}/../model.safetensors": entry for i in range(20_000)}))
    t0 = time.monotonic()
    with pytest.raises(IntegrityError, match="lists 20,0"):
        load(gptq)
    assert time.monotonic() - t0 < 10
    edit_json(gptq / "sc2quant.json", lambda m: m.__setitem__("files", {
        **{k: v for k, v in m["files"].items() if not k.startswith("x")}, "./model.safetensors": entry}))
    with pytest.raises(IntegrityError, match="not as sc2quant writes it"):
        load(gptq)


def test_unlisted_tokenizer_side_files_and_links_out_are_refused(gptq, tmp_path):
    from sc2quant.runtime import load

    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"<evil>": 5}))
    (gptq / "added_tokens.json").symlink_to(outside)
    with pytest.raises(IntegrityError, match="added_tokens.json to .*outside the artifact"):
        load(gptq)
    (gptq / "added_tokens.json").unlink()
    (gptq / "added_tokens.json").write_text(json.dumps({"<evil>": 5}))
    with pytest.raises(IntegrityError, match="added_tokens.json, which its manifest does not list"):
        load(gptq)
    result = invoke(["run", str(gptq), "--prompt", "def"])
    assert result.exit_code == 2 and "does not list" in result.output


# --- 6. an output inside an input ------------------------------------------------------------------------


def test_out_inside_an_input_artifact_is_refused(gptq):
    assert_refused(["export", "onnx", str(gptq), "--out", str(gptq / "onnx")], "inside an input")
    assert not (gptq / "onnx").exists()  # it was written, and the source then refused to load
