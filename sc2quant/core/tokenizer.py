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

    def __call__(self, text: str | list[str], add_special_tokens: bool = True, split_special_tokens: bool = False,
                 **_: Any) -> Encoding:
        """transformers' call: {"input_ids": ...} (also as an attribute), one list per text of a list;
        split_special_tokens: special-token strings in the text are plain text (as transformers');
        its other options (verbose, ...) change no ids here."""
        backend = literal_backend(self) if split_special_tokens else self.backend
        if isinstance(text, str):
            return Encoding(input_ids=backend.encode(text, add_special_tokens=add_special_tokens).ids)
        return Encoding(input_ids=[e.ids for e in backend.encode_batch(text, add_special_tokens=add_special_tokens)])

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)


def check_utf8(texts: Any, what: str = "the prompt") -> None:
    """Refuse text that cannot be encoded as UTF-8 (a lone surrogate from a JSON escape or a
    command line), in one line naming `what` and where."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise UserError(f"{what} is not valid UTF-8 text (position {exc.start}): send UTF-8") from None


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` read as plain text: special-token strings in it are not special tokens
    (code being completed may contain `<fim_middle>` or `<|endoftext|>`). Either tokenizer: this
    module's or transformers' (whose `split_special_tokens=True` switches a setting of the shared
    backend object, a race between threads; both get a private copy with the setting on)."""
    return literal_backend(tokenizer).encode(text, add_special_tokens=False).ids if text else []


def literal_backend(tokenizer: Any) -> Any:
    """A `tokenizers.Tokenizer` copy of `tokenizer` (this module's or transformers') that reads
    special-token strings as text, made once and kept on it (`encode_special_tokens` is a setting of
    the object, not of a call: a copy, so concurrent callers never see it switched)."""
    copy = getattr(tokenizer, "_sc2quant_literal", None)
    if copy is None:
        from tokenizers import Tokenizer as Backend

        backend = tokenizer.backend if isinstance(tokenizer, Tokenizer) else tokenizer.backend_tokenizer
        copy = Backend.from_str(backend.to_str())
        copy.encode_special_tokens = True
        tokenizer._sc2quant_literal = copy
    return copy


def encode_pieces(tokenizer: Any, pieces: list[tuple[str, bool]]) -> list[int]:
    """Token ids of (text, special) pieces (`sc2quant.core.tokens.fim_pieces`): a special piece is its
    one token, the others plain text."""
    ids: list[int] = []
    for text, special in pieces:
        if special:
            token = tokenizer.convert_tokens_to_ids(text)
            if token is None or token == tokenizer.unk_token_id:
                raise UserError(f"the tokenizer has no {text} token: it is not StarCoder2's; copy the original model's "
                                "tokenizer files")
            ids.append(int(token))
        else:
            ids += encode_text(tokenizer, text)
    return ids
