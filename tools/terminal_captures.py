"""What a person sees at an 80-column terminal for every verb (maintainer script).

    python tools/terminal_captures.py [--work DIR] > captures.md

Each command runs in a pseudo-terminal (tests/terminal.py, rendered by pyte), so progress bars,
colours and wrapping are what a user sees; the final screen is written as markdown. Outputs go to
a scratch directory (default: a temporary one). Takes a few minutes on 2 cores (GPTQ of the
embedded model, two exports, a short report).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.terminal import run_in_terminal  # noqa: E402

SC2 = [sys.executable, "-m", "sc2quant"]


def commands(w: Path) -> list[tuple[str, list[str]]]:
    gptq, onnx, onnx_g, bnb = w / "gptq", w / "onnx-int4", w / "onnx-from-gptq", w / "bnb-nf4"
    mine = w / "my-notes"
    mine.mkdir(exist_ok=True)
    (mine / "todo.txt").write_text("mine\n")
    return [
        ("version", ["--version"]),
        ("inspect", ["inspect"]),
        ("quantize --bits 4 (the main job)", ["quantize", "--bits", "4", "--out", str(gptq)]),
        ("quantize --method bnb", ["quantize", "--method", "bnb", "--bits", "4", "--out", str(bnb)]),
        ("export onnx --weights int4", ["export", "onnx", "--weights", "int4", "--out", str(onnx)]),
        ("export onnx from the GPTQ artifact", ["export", "onnx", str(gptq), "--out", str(onnx_g)]),
        ("footprint --shape 7b", ["footprint", "--shape", "7b"]),
        ("run", ["run", str(onnx), "--prompt", "def fibonacci(n):", "--max-new-tokens", "40"]),
        ("run (fill in the middle)", ["run", str(gptq), "--fim-prefix", "def add(a, b):\n    ",
                                      "--fim-suffix", "\n    return c\n", "--max-new-tokens", "16"]),
        ("report", ["report", str(onnx), str(gptq), "--max-windows", "2"]),
        ("serve (stopped with Ctrl-C after 20 s)", ["serve", str(onnx)]),
        ("error: an option that does not apply", ["quantize", "--method", "bnb", "--group-size", "64"]),
        ("error: the output is the user's own directory", ["export", "onnx", "--out", str(mine), "--force"]),
        ("error: a path that does not exist", ["run", str(w / "nope"), "--prompt", "x"]),
        ("error: serve without an API key on a public address", ["serve", "--host", "0.0.0.0"]),
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=None)
    a = p.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="sc2quant-captures-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"Captured {time.strftime('%Y-%m-%d')} in an 80x100 pseudo-terminal; scratch outputs under `{work}`.\n")
    for title, args in commands(work):
        t = time.monotonic()
        prefix = ["timeout", "--signal=INT", "20"] if args[0] == "serve" and len(args) == 2 else []
        screen = run_in_terminal([*prefix, *SC2, *args], columns=80, rows=100, timeout=1800,
                                 env={"SC2QUANT_LOG_DIR": str(work / "logs")})
        shown = " ".join(shlex.quote(x) for x in ["sc2quant", *args]).replace(str(work) + "/", "")
        print(f"### {title}\n\n```console\n$ {shown}")
        print("\n".join(screen.lines))
        print(f"```\nexit status {screen.returncode}, {time.monotonic() - t:.0f} s\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
