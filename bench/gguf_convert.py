"""Run llama.cpp's convert_hf_to_gguf.py with one patch: `python gguf_convert.py LLAMA_CPP_DIR MODEL_DIR [args]`.

The converter recognises a BPE pre-tokenizer by hashing its output on a fixed text and refuses
unknown ones. The embedded model's tokenizer is newly trained with StarCoder's pre-tokenizer
rules, so it is declared "starcoder" (llama.cpp then tokenizes exactly like the HF tokenizer;
the benchmark feeds token ids anyway). Run as its own process: the converter owns sys.argv.
"""

import sys
from pathlib import Path

source = Path(sys.argv[1])
sys.path[:0] = [str(source), str(source / "gguf-py")]  # the vendored gguf-py: PyPI's gguf lags the converter

import convert_hf_to_gguf  # noqa: E402
from conversion.base import TextModel  # noqa: E402

TextModel.get_vocab_base_pre = lambda self, tokenizer: "starcoder"
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
convert_hf_to_gguf.main()
