"""llama.cpp server's `/infill` for `sc2quant serve`: the request editor plugins send (llama.vscode,
llama.vim: `input_prefix`, `input_suffix`, `input_extra`, `prompt`, `n_predict`, `stream`,
`t_max_predict_ms`, ...) and llama-server's answer (`content`, `stop`, `tokens_predicted`,
`tokens_evaluated`, `tokens_cached`, `timings`). The generation itself is the OpenAI route's
(`sc2quant.runtime.server`): the same checks, limits, queue and prompt reuse.

The prompt is built as llama-server builds it, in tokens: the code pieces are tokenized as plain
text (a `<fim_middle>` in the user's code is code), the other files, then `<fim_prefix>` + the
prefix + `prompt` + `<fim_suffix>` + the suffix + `<fim_middle>`; and trimmed as llama-server trims
it rather than refused: with B = min(2048, context / 2) (llama-server's default batch; half the
context where it is smaller than 4,096, so the other files keep room there too), the last 3B/4
tokens of the prefix, the first B/4 - 2 - len(prompt) tokens of the suffix, the last
context - B - 2 n_predict tokens of the other files (n_predict -1: B/4 new tokens; fewer if the
rest would not leave room for the new tokens). The other files' share does not depend on the prefix's length, so the start of the
prompt, and its cached keys and values, stay put as the user types. `truncated` in the answer says
whether anything was cut.

Fields llama-server takes that have no meaning here (`cache_prompt`: prompts are always reused;
`top_k`, `samplers`, `n_indent`, `id_slot`, `t_max_prompt_ms`, ...) are accepted and ignored, as
llama-server ignores what it does not know. Greedy decoding is the default (editors want the
same suggestion for the same code); `temperature` switches to sampling.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from pydantic import Field, StrictBool

from sc2quant.core.errors import UserError
from sc2quant.core.tokenizer import check_utf8, encode_pieces, encode_text
from sc2quant.core.tokens import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, repo_pieces
from sc2quant.runtime import MAX_TEMPERATURE, Chunk
from sc2quant.runtime.backends import add_chunk, new_row
from sc2quant.runtime.http_guard import ApiBody

MAX_EXTRA_FILES = 64
BATCH = 2048  # llama-server's default batch: the budget of the prefix (3/4) and the suffix (1/4)


class ExtraFile(ApiBody):
    filename: str = ""
    text: str = ""


class InfillRequest(ApiBody):
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[ExtraFile] = Field(default_factory=list, max_length=MAX_EXTRA_FILES)
    prompt: str = ""  # the text of the cursor's line before the cursor: it continues input_prefix
    n_predict: int = Field(-1, ge=-1, le=8192)  # -1: until the context or the server's limit; 0: fill the cache
    temperature: float = Field(0.0, ge=0, le=MAX_TEMPERATURE)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: StrictBool = False
    t_max_predict_ms: int = Field(0, ge=0)  # 0: no limit; else stop generating this long after the first token


def infill_ids(tokenizer: Any, context: int, req: InfillRequest) -> tuple[list[int], bool]:
    """The request's prompt as token ids, trimmed to the context as llama-server trims it (see the
    module's docstring), and whether anything was cut."""
    files = tuple((f.filename, f.text) for f in req.input_extra)
    check_utf8((req.input_prefix, req.input_suffix, req.prompt, *(t for f in files for t in f)), "the request")
    prefix, prompt, suffix = (encode_text(tokenizer, t) for t in (req.input_prefix, req.prompt, req.input_suffix))
    extra = encode_pieces(tokenizer, repo_pieces(files))
    pre, suf, mid = encode_pieces(tokenizer, [(FIM_PREFIX, True), (FIM_SUFFIX, True), (FIM_MIDDLE, True)])
    batch = min(BATCH, context // 2)
    n_prefix = min(len(prefix), 3 * (batch // 4))
    n_suffix = min(len(suffix), max(0, batch // 4 - (2 + len(prompt))))
    body = [pre, *prefix[len(prefix) - n_prefix:], *prompt, suf, *suffix[:n_suffix], mid]
    predict = req.n_predict if req.n_predict >= 0 else batch // 4  # -1 (until the end): room for a function's worth
    room = context - len(body) - max(predict, 1)  # the new tokens fit
    if context - 1 - len(body) < 0:
        raise UserError(f"the prompt (the cursor's line) has {len(prompt)} tokens, too many for the model's context "
                        f"of {context}: send less of it in `prompt` (input_prefix is trimmed, prompt is not)")
    n_extra = min(len(extra), max(0, context - batch - 2 * predict), max(room, 0))
    ids = extra[len(extra) - n_extra:] + body
    return ids, (n_prefix, n_suffix, n_extra) != (len(prefix), len(suffix), len(extra))


class InfillTimer:
    """Timings and the `t_max_predict_ms` limit of one /infill request, and its answers."""

    def __init__(self, t_max_predict_ms: int, keep: bool = True, truncated: bool = False) -> None:
        self.limit_s = t_max_predict_ms / 1000 if t_max_predict_ms else None
        self.truncated = truncated  # the prompt was trimmed to the context (`infill_ids`)
        self.keep = keep  # n_predict 0: the prompt is prefilled (and cached), no text is returned
        self.start = time.monotonic()
        self.first: float | None = None
        self.limited = False

    async def limit(self, chunks: AsyncIterator[Chunk], job: Any) -> AsyncIterator[Chunk]:
        """The chunks until the generation ends or runs past the time limit (then cancelled)."""
        async for chunk in chunks:
            if chunk.completion_tokens and self.first is None:
                self.first = time.monotonic()
            yield chunk
            if self.limit_s is not None and self.first is not None and time.monotonic() - self.first > self.limit_s \
                    and chunk.finish_reason is None:
                self.limited = True
                job.cancel()
                return

    def answer(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        row = rows[0]
        end = time.monotonic()
        first = self.first or end  # no token: the prompt took the whole time, prediction none
        predicted = row["completion_tokens"] if self.keep else 0
        stop_type = "limit" if self.limited or row["finish_reason"] == "length" else "word" if row["stop_word"] else "eos"
        return {"content": row["text"] if self.keep else "", "stop": True, "stop_type": stop_type,
                "stopping_word": row["stop_word"], "truncated": self.truncated,
                "tokens_predicted": predicted, "tokens_evaluated": row["prompt_tokens"],
                "tokens_cached": row["cached_tokens"], "seed": row["seed"],
                "timings": {"prompt_n": row["prompt_tokens"] - row["cached_tokens"],
                            "prompt_ms": 1000 * (first - self.start), "predicted_n": predicted,
                            "predicted_ms": 1000 * (end - first), "draft_n": row["draft_tokens"],
                            "draft_n_accepted": row["draft_accepted"]}}

    async def events(self, chunks: AsyncIterator[Chunk], job: Any) -> AsyncIterator[str]:
        """llama-server's stream: `data: {"content": ..., "stop": false}` per piece, then the final answer
        with `"stop": true`; an error ends the stream as an `error` event."""
        row = new_row()
        try:
            async for c in self.limit(chunks, job):
                add_chunk(row, c, self.keep)
                if c.text and self.keep:
                    yield f"data: {json.dumps({'content': c.text, 'stop': False})}\n\n"
        except Exception as exc:  # noqa: BLE001 - after the stream started: tell the client in the stream
            yield f"data: {json.dumps({'error': {'message': str(exc), 'type': type(exc).__name__}})}\n\n"
            return
        final = self.answer([row])
        yield f"data: {json.dumps({**final, 'content': ''})}\n\n"
