"""The runtime's tokenizer: StarCoder2's `tokenizer.json` through the `tokenizers` library alone,
with the small part of transformers' tokenizer interface the runtime uses, so an ONNX export
runs in the base install (no transformers, no torch).

Token ids and text equal transformers' (tested on the evaluation text, special and FIM tokens
included): encoding is `tokenizers`' own, as transformers calls it (StarCoder2's post-processor
adds no special tokens either way);
decoding keeps special tokens and, like transformers 5 for a BPE model, cleans up no spaces.
The checks are the toolkit loader's (`sc2quant.core.hf.check_tokenizer_ids`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sc2quant.core.errors import UserError
from sc2quant.core.files import read_json


class Encoding(dict):
    """What transformers' tokenizer call returns, as far as the runtime reads it: `enc["input_ids"]`
    or `enc.input_ids`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Tokenizer:
    """`tokenizer.json` (+ `tokenizer_config.json` for the special tokens' roles)."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as Backend

        from sc2quant.core.hf import check_tokenizer, check_tokenizer_ids

        path = Path(path)
        check_tokenizer(path)
        try:
            self.backend = Backend.from_file(str(path / "tokenizer.json"))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises its own exception types
            raise UserError(f"cannot load the tokenizer from {path} ({exc}): the directory needs tokenizer.json") from exc
        if type(self.backend.model).__name__ != "BPE":
            raise UserError(f"the tokenizer in {path} is not a BPE tokenizer: it is not StarCoder2's; copy the original "
                            "model's tokenizer files")
        config_file = path / "tokenizer_config.json"
        config = read_json(config_file, "copy the original model's tokenizer files") if config_file.is_file() else {}
        roles = config if isinstance(config, dict) else {}
        self.eos_token_id = self._role(roles.get("eos_token"))
        self.bos_token_id = self._role(roles.get("bos_token"))
        self.pad_token_id = self._role(roles.get("pad_token"))
        self.unk_token_id = self._role(roles.get("unk_token"))
        check_tokenizer_ids(path, len(self), max(self.backend.get_vocab(with_added_tokens=True).values(), default=-1))

    def _role(self, token: Any) -> int | None:
        if isinstance(token, dict):  # an AddedToken written out by older transformers
            token = token.get("content")
        return self.backend.token_to_id(token) if isinstance(token, str) else None

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __call__(self, text: str | list[str], add_special_tokens: bool = True, **_: Any) -> Encoding:
        """transformers' call: {"input_ids": ...} (also as an attribute), one list per text of a list;
        its other options (verbose, ...) change no ids here."""
        if isinstance(text, str):
            return Encoding(input_ids=self.encode(text, add_special_tokens))
        return Encoding(input_ids=[e.ids for e in self.backend.encode_batch(text, add_special_tokens=add_special_tokens)])

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)
