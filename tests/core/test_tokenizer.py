"""The runtime's tokenizer (`tokenizers` alone, for the base install) against transformers' on the
same files: token ids and text equal, special tokens' roles the same, bad files refused in one line."""

from __future__ import annotations

import json
import shutil

import pytest

from sc2quant.core.data import eval_documents
from sc2quant.core.errors import UserError
from sc2quant.core.hf import load_tokenizer
from sc2quant.core.tokenizer import Tokenizer, encode_pieces, encode_text
from sc2quant.core.tokens import SPECIAL_TOKENS, fim_pieces, fim_prompt


@pytest.fixture(scope="module")
def pair(embedded_model_dir):
    return Tokenizer(embedded_model_dir), load_tokenizer(embedded_model_dir)


def test_ids_and_text_equal_transformers_on_the_evaluation_text(pair):
    ours, hf = pair
    texts = [d.text for d in eval_documents()]
    assert ours(texts)["input_ids"] == hf(texts, add_special_tokens=False)["input_ids"]
    joined = "\n".join(texts)
    ids = ours.encode(joined)
    assert ids == hf(joined, add_special_tokens=False)["input_ids"]
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False) == joined


@pytest.mark.parametrize("text", [
    fim_prompt("def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"),
    fim_prompt("x = 1\n", "", files=[("a.py", "import os\n")], repo="me/repo"),
    "".join(SPECIAL_TOKENS) + " between <fim_prefix>and<fim_suffix> text <|endoftext|>",
    "tabs\tand  spaces   \n\n\r\n unicode: Σ→∞ 🙂 é",
])
def test_special_and_fim_tokens_are_the_same_tokens(pair, text):
    ours, hf = pair
    ids = ours.encode(text)
    assert ids == hf(text, add_special_tokens=False)["input_ids"]
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False)
    assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", [
    "".join(SPECIAL_TOKENS) + " between <fim_prefix>and<fim_suffix> text <|endoftext|>",
    'SEP = "<file_sep>"  # <fim_middle>\n',
])
def test_special_token_strings_read_as_text_the_same_way(pair, text):
    """`/infill` and FIM read code as text (`encode_text`): both tokenizers, none of the ids special."""
    ours, hf = pair
    ids = encode_text(ours, text)
    assert ids == encode_text(hf, text) == hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    specials = {ours.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert not specials & set(ids) and ours.decode(ids) == text
    assert specials & set(ours.encode(text))  # read as a prompt, the same strings are special tokens
    pieces = fim_pieces("a = '<fim_middle>'\n", "<|endoftext|>", files=(("b.py", "<fim_suffix>"),))
    assert encode_pieces(ours, pieces) == encode_pieces(hf, pieces)
    assert sum(i in specials for i in encode_pieces(ours, pieces)) == 6  # repo, 2 file_sep, prefix, suffix, middle


def test_roles_and_sizes_match(pair):
    ours, hf = pair
    assert (ours.eos_token_id, ours.bos_token_id, ours.pad_token_id) == (hf.eos_token_id, hf.bos_token_id,
                                                                          hf.pad_token_id)
    assert len(ours) == len(hf) and ours.get_vocab() == hf.get_vocab()
    for token in SPECIAL_TOKENS:
        assert ours.convert_tokens_to_ids(token) == hf.convert_tokens_to_ids(token)


def test_bad_tokenizer_files_are_refused_in_one_line(embedded_model_dir, tmp_path):
    def copy(name: str):
        d = tmp_path / name
        shutil.copytree(embedded_model_dir, d, ignore=shutil.ignore_patterns("*.safetensors"))
        return d

    missing = copy("missing")
    (missing / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="no tokenizer"):
        Tokenizer(missing)
    broken = copy("broken")
    (broken / "tokenizer.json").write_text('{"model": {"type": "BPE"')
    with pytest.raises(UserError, match="cannot load the tokenizer"):
        Tokenizer(broken)
    wordpiece = copy("wordpiece")
    spec = json.loads((wordpiece / "tokenizer.json").read_text())
    spec["model"] = {"type": "WordPiece", "vocab": {"[UNK]": 0, "a": 1}, "unk_token": "[UNK]",
                     "continuing_subword_prefix": "##", "max_input_chars_per_word": 100}
    spec["decoder"] = None
    (wordpiece / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match="not a BPE tokenizer"):
        Tokenizer(wordpiece)
    small = copy("small-vocab")
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "vocab_size": 100}))
    with pytest.raises(UserError, match="not this model's tokenizer"):
        Tokenizer(small)
