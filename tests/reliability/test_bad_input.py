"""Bad input across the CLI: one clear line, exit status 2, no traceback, nothing written.

(The Python API raises `UserError` for the same cases; the server's 4xx cases are in
tests/runtime/test_server.py; simulated read-only and full-disk locations in tests/core/test_artifact.py.)
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sc2quant.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def bad_models(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    out = {}
    for name in ("llama", "truncated", "garbage", "pickle", "notok", "files-list", "files-null", "files-nobytes"):
        out[name] = root / name
        shutil.copytree(tiny_model_dir, out[name])
    cfg = json.loads((out["llama"] / "config.json").read_text())
    (out["llama"] / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    w = out["truncated"] / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-1000])
    (out["garbage"] / "model.safetensors").write_bytes(b"\x13\x00" * 50)
    (out["pickle"] / "model.safetensors").unlink()
    (out["pickle"] / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    for f in out["notok"].iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            f.unlink()
    for name, files in (("files-list", []), ("files-null", None), ("files-nobytes", {"model.safetensors": {"sha256": ""}})):
        (out[name] / "sc2quant.json").write_text(json.dumps({"format": "sc2quant-artifact", "kind": "hf", "method": "bf16",
                                                             "files": files}))
    (root / "recipe-damp.yaml").write_text("method: gptq\ndamp: .nan\n")
    (root / "afile").write_text("x")
    (root / "empty.txt").write_text("")
    (root / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (root / "latin1.py").write_bytes("café = 1\n".encode("latin-1") * 100)
    (root / "recipe-unknown.yaml").write_text("method: bnb\nbitz: 8\n")
    (root / "recipe-type.yaml").write_text("method: bnb\nbits: eight\n")
    out["root"] = root
    return out


def _cases(m: dict[str, Path], tiny: Path) -> list[tuple[str, list[str], str]]:
    r, t = m["root"], str(tiny)
    q = ["quantize"]
    return [
        ("missing model path", ["inspect", str(r / "nope")], "not found"),
        ("model path is a file", ["inspect", str(r / "afile")], "is a file"),
        ("not StarCoder2", q + [str(m["llama"]), "--method", "bnb"], "not StarCoder2"),
        ("truncated safetensors", ["inspect", str(m["truncated"])], "weight file model.safetensors"),
        ("corrupt safetensors", ["inspect", str(m["garbage"])], "corrupt"),
        ("pickle checkpoint", q + [str(m["pickle"]), "--method", "bnb"], "pickle"),
        ("unknown method", q + [t, "--method", "awq"], "unknown method"),
        ("bnb bits", q + [t, "--method", "bnb", "--bits", "3"], "8 or 4 bits"),
        ("gptq bits", q + [t, "--bits", "5"], "GPTQ supports"),
        ("group size", q + [t, "--group-size", "48"], "does not divide"),
        ("quant type", q + [t, "--method", "bnb", "--quant-type", "nf5"], "quant type"),
        ("compute dtype", q + [t, "--method", "bnb", "--compute-dtype", "int2"], "compute dtype"),
        ("unknown device", q + [t, "--method", "bnb", "--device", "tpu"], "unknown device"),
        ("recipe unknown key", q + [t, "--recipe", str(r / "recipe-unknown.yaml")], "unknown key 'bitz'"),
        ("recipe wrong type", q + [t, "--recipe", str(r / "recipe-type.yaml")], "'bits' has a str"),
        ("recipe missing", q + [t, "--recipe", "no-such-recipe"], "not found"),
        ("empty calibration", q + [t, "--group-size", "32", "--calib-seqlen", "64", "--calib", str(r / "empty.txt")],
         "has 0 tokens"),
        ("binary calibration", q + [t, "--group-size", "32", "--calib-seqlen", "64", "--calib", str(r / "binary.bin")],
         "binary file"),
        ("non-UTF-8 calibration", q + [t, "--group-size", "32", "--calib-seqlen", "64", "--calib", str(r / "latin1.py")],
         "not UTF-8"),
        ("calibration longer than context", q + [t, "--group-size", "32", "--calib-seqlen", "100000"], "context"),
        ("output path is a file", q + [t, "--method", "bnb", "--bits", "8", "--out", str(r / "afile")], "is a file"),
        ("existing output", q + [t, "--method", "bnb", "--bits", "8", "--out", str(r)], "--force"),
        ("prompt longer than context", ["run", t, "--prompt", "x = 1\n" * 400], "context"),
        ("negative max_new_tokens", ["run", t, "--prompt", "def", "--max-new-tokens", "-5"], "max_new_tokens"),
        ("absurd max_new_tokens", ["run", t, "--prompt", "def", "--max-new-tokens", "100000000"], "max_new_tokens"),
        ("run without prompt", ["run", t], "--prompt"),
        ("bad temperature", ["run", t, "--prompt", "def", "--temperature", "-1"], "temperature"),
        ("temperature the sampler cannot take", ["run", t, "--prompt", "def", "--temperature", "1e-39"],
         "temperature must be 0 (greedy) or between 0.001"),
        ("top_p the sampler cannot take", ["run", t, "--prompt", "def", "--temperature", "1", "--top-p", "1e-46"],
         "top_p must be between"),
        ("report bad eval file", ["report", t, "--baseline", t, "--eval", str(r / "binary.bin"), "--seqlen", "64",
                                  "--no-speed"],
         "binary file"),
        ("serve bad port", ["serve", t, "--port", "70000"], "out of range"),
        ("negative damp", q + [t, "--group-size", "32", "--damp", "-0.1"], "--damp"),
        ("damp above 1", q + [t, "--group-size", "32", "--damp", "1.5"], "--damp"),
        ("NaN damp", q + [t, "--group-size", "32", "--damp", "nan"], "--damp"),
        ("NaN damp in a recipe", q + [t, "--group-size", "32", "--recipe", str(r / "recipe-damp.yaml")], "--damp"),
        ("rtn 3 bits", q + [t, "--method", "rtn", "--bits", "3"], "round-to-nearest writes"),
        ("non-UTF-8 prompt", ["run", t, "--prompt", "def \udcff():"], "not valid UTF-8"),
        ("manifest files is a list", ["run", str(m["files-list"]), "--prompt", "x"], "malformed 'files'"),
        ("manifest files is null", ["run", str(m["files-null"]), "--prompt", "x"], "malformed 'files'"),
        ("manifest entry without bytes", ["run", str(m["files-nobytes"]), "--prompt", "x"], "malformed 'files'"),
        ("output under /dev/null", q + [t, "--method", "bnb", "--out", "/dev/null/x"], "not a directory"),
        ("export without a tokenizer", ["export", "onnx", str(m["notok"]), "--out", str(r / "o")], "no tokenizer"),
        ("rtn without a tokenizer", q + [str(m["notok"]), "--method", "rtn", "--out", str(r / "o")], "no tokenizer"),
        ("run without a tokenizer", ["run", str(m["notok"]), "--prompt", "x"], "no tokenizer"),
        ("report window above the context", ["report", t, "--baseline", t, "--seqlen", "100000", "--no-speed"],
         "longer than the models' context"),
        ("empty --out", q + [t, "--method", "bnb", "--out", ""], "--out is empty"),
    ]


@pytest.mark.slow
def test_every_case_is_one_clear_line_exit_2_nothing_written(bad_models, tiny_model_dir, tmp_path, monkeypatch):
    """Nothing written: not beside the inputs, and not in the working directory, where a verb run without
    --out writes (out/<model>-<method>): each case runs in an empty one that must stay empty."""
    failures, cases = [], _cases(bad_models, tiny_model_dir)
    assert len({name for name, _, _ in cases}) == len(cases)  # each case named once: a failure names its case
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    for name, args, message in cases:
        before = sorted(p.name for p in bad_models["root"].iterdir())
        result = runner.invoke(app, args)
        lines = result.output.strip().splitlines()
        after = sorted(p.name for p in bad_models["root"].iterdir())
        written = sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*"))
        ok = (result.exit_code == 2 and message in result.output and len(lines) == 1
              and lines[0].startswith("error:") and "Traceback" not in result.output and before == after
              and not written)
        if not ok:
            failures.append(f"{name}: exit {result.exit_code}, {result.output.strip()[:300]!r}"
                            + (f", wrote {written[:5]} in the working directory" if written else ""))
        for p in cwd.iterdir():  # the next case starts from an empty working directory again
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    assert not failures, "\n".join(failures)


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_force_never_destroys_what_the_user_owns(tiny_model_dir, tmp_path, monkeypatch):
    """Each of these deleted the source model, the working directory or the artifact being measured."""
    model = tmp_path / "work" / "model"
    shutil.copytree(tiny_model_dir, model)
    monkeypatch.chdir(model.parent)
    (model.parent / "notes.txt").write_text("mine")
    before = _tree(model.parent)
    cases = [
        (["quantize", str(model), "--method", "bnb", "--out", str(model), "--force"], "an input of this command"),
        (["export", "onnx", str(model), "--out", str(model), "--force"], "an input of this command"),
        (["quantize", str(model), "--method", "bnb", "--out", str(model.parent), "--force"], "working directory"),
        (["quantize", str(model), "--method", "rtn", "--group-size", "32", "--out", ".", "--force"], "working directory"),
        (["export", "onnx", str(model), "--out", "..", "--force"], "working directory"),
        (["report", str(model), "--baseline", str(model), "--out", str(model), "--force", "--no-speed"],
         "an input of this command"),
        (["quantize", str(model), "--method", "bnb", "--out", str(tmp_path), "--force"], "working directory"),
    ]
    for args, message in cases:
        t0 = time.monotonic()
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1 and time.monotonic() - t0 < 30
    assert _tree(model.parent) == before


def _verb_cases(model: Path) -> list[tuple[str, list[str]]]:
    """Every verb that writes a directory, as the cheapest run on the tiny model (`--out` appended)."""
    return [
        ("quantize rtn", ["quantize", str(model), "--method", "rtn", "--group-size", "32"]),
        ("export onnx", ["export", "onnx", str(model)]),
        ("report", ["report", str(model), "--baseline", str(model), "--seqlen", "64", "--max-windows", "1", "--no-speed"]),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("verb", ["quantize rtn", "export onnx", "report"])
def test_force_never_replaces_a_previous_output_holding_the_users_files(tiny_model_dir, tmp_path, verb):
    """--force replaced a previous output whole, with the notes and data the user had put inside it since."""
    args = dict(_verb_cases(tiny_model_dir))[verb]
    out = tmp_path / "out"
    first = runner.invoke(app, [*args, "--out", str(out)])
    assert first.exit_code == 0, first.output
    ours = _tree(out)
    (out / "notes.txt").write_text("my notes")
    (out / "mydata").mkdir()
    (out / "mydata" / "rows.csv").write_bytes(b"a,b\n1,2\n")
    mine = _tree(out)
    result = runner.invoke(app, [*args, "--out", str(out), "--force"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert "mydata/rows.csv" in lines[0] and "notes.txt" in lines[0] and "move those files out" in lines[0]
    assert _tree(out) == mine and [p.name for p in tmp_path.iterdir()] == ["out"]
    (out / "notes.txt").unlink()
    shutil.rmtree(out / "mydata")
    edited = next(name for name in sorted(ours) if name != "sc2quant.json")
    (out / edited).write_bytes(b"edited by hand")
    result = runner.invoke(app, [*args, "--out", str(out), "--force"])
    assert result.exit_code == 2 and f"{edited} (changed)" in result.output, result.output
    assert (out / edited).read_bytes() == b"edited by hand"
    (out / edited).write_bytes(ours[edited])
    again = runner.invoke(app, [*args, "--out", str(out), "--force"])  # exactly what it wrote: replaced
    assert again.exit_code == 0, again.output
