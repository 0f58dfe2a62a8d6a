"""Run by the base install's interpreter (`.venv-base`: no torch, no transformers) on an ONNX export:
what an app embedding sc2quant does, printed as JSON for tests/install/test_base_install.py to
compare with the full install's answers. Not a test module: it must import nothing from tests."""

from __future__ import annotations

import json
import sys


def main(artifact: str, text: str) -> None:
    import sc2quant
    import sc2quant.core.source
    from sc2quant.core.data import eval_documents

    model = sc2quant.load(artifact, threads=1)
    out = {
        "greedy": model.generate("def fibonacci(n):\n", max_new_tokens=24),
        "infill": model.infill("def add(a, b):\n    ", "\n\nprint(add(1, 2))\n", max_new_tokens=16),
        "stopped": "".join(model.stream("class Stack:\n    def ", max_new_tokens=32, stop=["(", "\n"])),
        "sampled": model.generate("import ", max_new_tokens=16, temperature=0.8, top_p=0.9, seed=7),
        "ids": model.encode(text),
        "eval_ids": model.tokenizer("\n".join(d.text for d in eval_documents()[:20]))["input_ids"],
        "decoded": model.tokenizer.decode(model.encode(text)),
        "heavy_modules": sorted(m for m in ("torch", "transformers", "accelerate", "gptqmodel", "optimum")
                                if m in sys.modules),
    }
    try:  # a plain checkpoint needs the torch engine: the API names the extra, as the CLI does
        sc2quant.load(sc2quant.core.source.EMBEDDED_MODEL_DIR)
        out["api_error"] = None
    except sc2quant.UserError as exc:
        out["api_error"] = str(exc)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
