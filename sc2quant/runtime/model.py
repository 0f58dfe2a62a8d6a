"""The runtime's public API: `load` any artifact sc2quant produced (or a plain StarCoder2
directory) and generate code. Sampling, stop strings, streaming and fill-in-the-middle are
written once here, in `Model.stream_generate`; engines only compute logits (see
`sc2quant.runtime.engines.base`). `generate`, `stream`, `infill` and the server all use
`stream_generate`, so streamed and non-streamed text are the same by construction.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sc2quant.core import artifact
from sc2quant.core.console import api_output
from sc2quant.core.errors import UserError
from sc2quant.core.tokenizer import check_utf8, encode_pieces
from sc2quant.core.tokens import STOP_TOKENS, fim_pieces
from sc2quant.runtime.engines import Engine, EngineOptions, open_engine
from sc2quant.runtime.lookup import Drafter, inexact, trusted, verify
from sc2quant.runtime.prefix import DEFAULT_CACHE_BYTES, DEFAULT_CHUNK, PrefixCache, extendable, prefill
from sc2quant.runtime.sampling import Chunk, RowText, Sampling, sample

DEFAULT_LOOKUP = 0  # draft tokens per lookup (0: off); see bench/editor.py
MAX_LOOKUP = 32
MAX_PARALLEL = 64
DEFAULT_PARALLEL = 4  # serve's rows: 8 was no faster for four editors on 2 cores (bench/results/*-editor-4session.md)


@api_output("load")
def load(path: str | os.PathLike | None = None, device: str = "cpu", verify: bool = True, threads: int | None = None,
         dtype: str = "auto", profile_dir: Path | None = None, engine: str = "auto",
         static_cache: bool | None = None, prefix_cache_bytes: int | None = None,
         prefill_chunk: int = DEFAULT_CHUNK, lookup_tokens: int = DEFAULT_LOOKUP, parallel: int | None = 1) -> Model:
    """Open an artifact (manifest checked, checksums verified unless verify=False: a file unchanged since it
    was last verified is not hashed again, `sc2quant.core.files.known_sha256`) or a model directory.

    threads: CPU threads for every engine. dtype: compute dtype where the artifact leaves a choice
    ("auto": the compute policy of `sc2quant.core.hf`). profile_dir: ONNX Runtime's operator profile.
    engine: "auto" (the fastest engine the artifact's format can run it in on this device: a GPTQ
    artifact on the CPU runs in ONNX Runtime, converted once, unless it is of a kind ONNX Runtime
    cannot take or verify=False, and then in torch, said once on stderr), "torch" or "onnx".
    static_cache: the torch engine's static KV cache and captured decode graphs (None: on CUDA
    only; see runtime/engines/torch_engine.py). prefix_cache_bytes: KV kept between requests for
    prompt reuse (0: none; None: 1 GiB, or one prompt's KV where that is more, as at 7B),
    prefill_chunk: tokens per prefill call, lookup_tokens: draft tokens per
    step of lookup decoding (greedy, one prompt; 0: off), on engines that extend a cached sequence
    (ONNX, torch's dynamic cache; see runtime/prefix.py and runtime/lookup.py). parallel: rows
    generated together (continuous batching, runtime/slots.py; the ONNX engine on the CPU; 1: one
    request at a time, the caller's thread computes; None: DEFAULT_PARALLEL where the engine batches
    rows and lookup decoding is off, else 1, as `serve` chooses).
    """
    from sc2quant.core.console import console
    from sc2quant.core.hf import COMPUTE_DTYPES, read_config, resolve_device
    from sc2quant.core.source import resolve_source
    from sc2quant.core.system import check_threads
    from sc2quant.formats import format_of_config, get_format
    from sc2quant.runtime.engines import choose_engine
    from sc2quant.runtime.engines.onnx_engine import check_switches

    if dtype not in COMPUTE_DTYPES:
        raise UserError(f"unknown dtype '{dtype}': choose one of {', '.join(COMPUTE_DTYPES)}")
    check_reuse(prefix_cache_bytes, prefill_chunk, lookup_tokens)
    check_switches()
    source = resolve_source(path)
    manifest = None
    if artifact.is_artifact(source.path):
        manifest = artifact.verify(source.path) if verify else artifact.read_manifest(source.path)
    config = read_config(source.path)
    fmt = get_format(manifest.kind) if manifest else format_of_config(config)
    fmt.check(config, source.path.name)
    notes: list[str] = []
    chosen = choose_engine(fmt.kind, resolve_device(device), engine, source.path, config,
                           verified=verify and manifest is not None, notes=notes, dtype=dtype)
    for note in notes:  # the fastest engine could not take it: said once, on stderr
        console.print(f"{source.path.name}: {note}", highlight=False, markup=False)
    run_path, kind = source.path, fmt.kind
    if chosen in fmt.converted_for and manifest is not None:
        from sc2quant.runtime.convert import converted_onnx

        run_path, kind = converted_onnx(source.path, manifest), "onnx"
    if lookup_tokens:  # refused before a conversion or a first load's packing where the engine says why already
        check_lookup({"engine": chosen}, manifest)
    check_threads(threads)  # the engine applies them (torch's for the process, ONNX Runtime's per session)
    opened = open_engine(chosen, kind, run_path, EngineOptions(device=device, threads=threads, dtype=dtype,
                                                               profile_dir=profile_dir, static_cache=static_cache))
    return Model(opened, source.path, manifest, prefix_cache_bytes=prefix_cache_bytes, prefill_chunk=prefill_chunk,
                 lookup_tokens=lookup_tokens, parallel=parallel)


KV_SHARE = 0.8  # of the memory available, what the batched rows' keys and values may take


def _kv_room(engine: Any) -> tuple[bool, int | None, int | None]:
    """Whether `engine` batches rows (the ONNX engine on the CPU), how many rows' keys and values (each the
    whole context) fit in KV_SHARE of the memory available, and that memory (None: unknown)."""
    from sc2quant.core.system import available_memory

    if not hasattr(engine, "pool") or engine.device != "cpu":
        return False, None, None
    free = available_memory()
    return True, None if free is None else int(KV_SHARE * free // max(engine.min_state_bytes(), 1)), free


def auto_rows(engine: Any) -> int:
    """DEFAULT_PARALLEL rows where the engine batches them, fewer where their keys and values would not fit,
    at least 1."""
    batches, fits, _ = _kv_room(engine)
    return max(1, min(DEFAULT_PARALLEL, DEFAULT_PARALLEL if fits is None else fits)) if batches else 1


def open_slots(model: Model, rows: int) -> Any:
    """The rows of continuous batching (runtime/slots.py): the ONNX engine on the CPU, its KV for `rows`
    whole contexts held at once, refused in one line where that cannot fit in the memory available."""
    from sc2quant.runtime.slots import Slots

    engine: Any = model.engine
    batches, fits, free = _kv_room(engine)
    if not batches:
        raise UserError(f"--parallel {rows} batches requests on the ONNX engine on the CPU; this model runs in "
                        f"{engine.name} on {engine.device}: give --parallel 1 (one request at a time)")
    if fits is not None and free is not None and rows > fits:
        raise UserError(f"--parallel {rows} needs {rows * engine.min_state_bytes() / 2**30:.2f} GiB of keys and "
                        f"values ({rows} rows x the whole {engine.context:,}-token context x {engine.num_layers} "
                        f"layers) but only {free / 2**30:.2f} GiB of memory is available (they may take "
                        f"{KV_SHARE:.0%}): give a smaller --parallel")
    return Slots(engine, rows, model.tokenizer, model.stop_ids, model.prefix_cache, model.prefill_chunk)


def check_lookup(engine: dict[str, Any], manifest: artifact.Manifest | None) -> None:
    """Lookup decoding only where it keeps plain greedy text (runtime/lookup.py `inexact`)."""
    why = inexact(engine, manifest.bits if manifest else None)
    if why:
        raise UserError(f"lookup decoding would change greedy text on this model: {why}, so a forward of several "
                        "tokens does not round like one-token steps; give --lookup-tokens 0 (lookup_tokens=0), "
                        "or use an fp32 export or --dtype fp32")


def check_reuse(prefix_cache_bytes: int | None = None, prefill_chunk: int = DEFAULT_CHUNK,
                lookup_tokens: int = DEFAULT_LOOKUP, parallel: int | None = 1) -> None:
    """The prompt-reuse options of `load` (the server checks them before it binds)."""
    if parallel is None:
        return
    if not 1 <= parallel <= MAX_PARALLEL:
        raise UserError(f"parallel rows must be 1 to {MAX_PARALLEL}, got {parallel}")
    if parallel > 1 and lookup_tokens:
        raise UserError("lookup decoding drafts for one request at a time: give --lookup-tokens 0 with --parallel "
                        f"{parallel}, or --parallel 1 (on a model computing in fp32)")
    if prefix_cache_bytes is not None and prefix_cache_bytes < 0:
        raise UserError(f"the prompt cache must be 0 (no prompt reuse) or more, got {prefix_cache_bytes} bytes")
    if prefill_chunk < 1:
        raise UserError(f"the prefill chunk must be at least 1 token, got {prefill_chunk}")
    if not 0 <= lookup_tokens <= MAX_LOOKUP:
        raise UserError(f"lookup tokens must be 0 (off) to {MAX_LOOKUP}, got {lookup_tokens}")


def encode_prompt(tokenizer: Any, prompt: str | Sequence[int], suffix: str | None = None) -> list[int]:
    """A prompt's token ids, refusing what is not a prompt: not text or token ids, not UTF-8, no tokens,
    ids outside the vocabulary. Text: special-token strings written in it are recognised (FIM markers);
    with `suffix`: StarCoder2's fill-in-the-middle prompt of the code before and after the gap, the
    code read as plain text. Every runtime behind the server checks this way."""
    if not isinstance(prompt, str):
        if suffix is not None:
            raise UserError("a suffix needs the prompt as text, not token ids")
        return _check_ids(tokenizer, prompt)
    if not isinstance(suffix or "", str):
        raise UserError(f"prompts must be strings, got {type(suffix).__name__}")
    check_utf8((prompt, suffix or ""))
    if suffix is not None:
        return encode_pieces(tokenizer, fim_pieces(prompt, suffix))
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UserError("the prompt is empty: give at least one character of code")
    return ids


def _check_ids(tokenizer: Any, ids: Any) -> list[int]:
    try:
        out = [int(i) for i in ids if not isinstance(i, bool | float | str)]
    except (TypeError, ValueError, OverflowError):
        out = []
    if not out or len(out) != len(ids):
        raise UserError("a prompt is text or a non-empty list of token ids (integers)")
    vocab = len(tokenizer)
    if not all(0 <= i < vocab for i in out):
        raise UserError(f"token ids must be 0 to {vocab - 1} (the tokenizer's vocabulary)")
    return out


Prompt = str | Sequence[int]  # text, or token ids
Prompts = Prompt | Sequence[Prompt]  # one prompt or several


def _single(prompt: Any) -> bool:
    """Whether `prompt` is one prompt: text, or a non-empty list of token ids."""
    return isinstance(prompt, str) or hasattr(prompt, "__len__") and len(prompt) > 0 and all(
        isinstance(x, int | np.integer) and not isinstance(x, bool) for x in prompt)


def _prompts(prompt: Any) -> list[Any]:
    """One prompt (text, or token ids) or several, as a list of prompts."""
    return [prompt if isinstance(prompt, str) else list(prompt)] if _single(prompt) else list(prompt)


class Model:
    """A loaded model: `stream_generate` (and `generate`, `stream`, `infill`, `logits`) over any engine."""

    def __init__(self, engine: Engine, path: Path, manifest: artifact.Manifest | None = None,
                 prefix_cache_bytes: int | None = None, prefill_chunk: int = DEFAULT_CHUNK,
                 lookup_tokens: int = DEFAULT_LOOKUP, parallel: int | None = 1) -> None:
        check_reuse(prefix_cache_bytes, prefill_chunk, lookup_tokens, parallel)
        if parallel is None:  # rows where the engine batches them (the ONNX engine on the CPU), else one at a time
            parallel = auto_rows(engine) if not lookup_tokens else 1
        self.engine = engine
        # prompt reuse and chunked prefill where the engine can extend a cached sequence (runtime/prefix.py)
        slot = engine.min_state_bytes() if extendable(engine) else 0  # type: ignore[attr-defined]
        if prefix_cache_bytes is None:  # the default holds one prompt at least, whatever the model
            prefix_cache_bytes = max(DEFAULT_CACHE_BYTES, slot)
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if extendable(engine) and prefix_cache_bytes else None
        if self.prefix_cache is not None and prefix_cache_bytes < slot:
            from sc2quant.core.console import console

            console.print(f"the prompt cache ({prefix_cache_bytes / 2**20:.1f} MiB) cannot hold one prompt of this model "
                          f"({slot / 2**20:.1f} MiB: keys and values for its whole {engine.context:,}-token context), so "
                          f"no prompt will be reused: give --prompt-cache-mb {-(-slot // 2**20)} or more (0: off)",
                          highlight=False, markup=False)
        self.prefill_chunk = prefill_chunk
        self.lookup_tokens = lookup_tokens if extendable(engine) else 0  # runtime/lookup.py
        if self.lookup_tokens:
            check_lookup(engine.describe(), manifest)
        self.path = path
        self.manifest = manifest
        self.tokenizer = engine.tokenizer
        self.context = engine.context
        self.stop_ids = {self.tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS} - {None}
        self.slots = open_slots(self, parallel) if parallel > 1 else None

    @property
    def kind(self) -> str:
        return self.engine.kind

    def logits(self, token_ids: Any) -> Any:
        """Every position's float32 logits as a torch tensor [B, T, V] (evaluation: needs torch)."""
        import torch

        ids = torch.as_tensor(token_ids, dtype=torch.long)
        return self.engine.logits(ids.view(1, -1) if ids.dim() == 1 else ids)

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt; special tokens written in the text (FIM markers) are recognised."""
        return encode_prompt(self.tokenizer, text)

    def stream_generate(self, prompt: Prompts, max_new_tokens: int = 64, temperature: float = 0.0,
                        top_p: float = 1.0, stop: Sequence[str] = (), seed: int | None = None,
                        suffix: str | None = None, background: bool = False) -> Iterator[Chunk]:
        """Generate for one prompt or several (of any lengths), yielding `Chunk`s as text is decoded.

        A prompt is text (special-token strings in it are recognised) or a list of token ids.
        suffix: fill-in-the-middle; every prompt is the code before the gap, `suffix` the code after
        (both read as plain text). background: with `parallel` rows, admitted after interactive requests
        (an editor's cache warm-up).
        With `parallel` rows, every prompt of every caller is decoded together with the others at each
        step (several threads may call at once); a chunk with empty text and no finish reason may come
        while a prompt waits for a row.
        Every check (sampling values, empty, non-UTF-8 or too long prompts) happens before the
        first chunk, so a caller can refuse a request before it starts streaming anything.
        """
        prompts = _prompts(prompt)
        if not prompts:
            raise UserError("give at least one prompt")
        sampling = Sampling(max_new_tokens, temperature, top_p, tuple(stop), seed)
        sampling.validate()
        ids = [encode_prompt(self.tokenizer, p, suffix) for p in prompts]
        longest = max(len(p) for p in ids)
        if longest >= self.context:
            raise UserError(f"the prompt has {longest} tokens but the model's context is {self.context}: shorten it")
        if self.slots is not None:
            return self.slots.submit(ids, sampling, sampling.max_new_tokens, background)
        return self._decode(ids, sampling)

    def generate(self, prompt: Prompts, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, stop: Sequence[str] = (), seed: int | None = None,
                 suffix: str | None = None) -> str | list[str]:
        """Complete one prompt (returns str) or several (returns a list)."""
        chunks = self.stream_generate(prompt, max_new_tokens, temperature, top_p, stop, seed, suffix)
        texts = [""] * len(_prompts(prompt))
        for chunk in chunks:
            texts[chunk.row] += chunk.text
        return texts[0] if _single(prompt) else texts

    def stream(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
               stop: Sequence[str] = (), seed: int | None = None) -> Iterator[str]:
        """Yield the completion of one prompt piece by piece as tokens are decoded."""
        for chunk in self.stream_generate(prompt, max_new_tokens, temperature, top_p, stop, seed):
            if chunk.text:
                yield chunk.text

    def infill(self, prefix: str, suffix: str, max_new_tokens: int = 64, temperature: float = 0.0,
               top_p: float = 1.0, stop: Sequence[str] = (), seed: int | None = None) -> str:
        """Fill-in-the-middle in StarCoder2's PSM format; returns the middle only."""
        return self.generate(prefix, max_new_tokens, temperature, top_p, stop, seed, suffix=suffix)  # type: ignore[return-value]

    # --- the decoding loop -----------------------------------------------------------------

    def _decode(self, prompts: list[list[int]], s: Sampling) -> Iterator[Chunk]:
        """The loop every entry point shares: prefill, then one token per row per step."""
        seed = s.resolved_seed()
        gen = np.random.default_rng(seed)
        budget = min(s.max_new_tokens, self.context - max(len(p) for p in prompts))
        rows = [RowText(len(p), s.stop) for p in prompts]
        kv_ids, cached = None, 0  # one prompt on an Extendable engine: the token ids its KV holds
        drafter = None  # lookup decoding: greedy, one prompt, an Extendable engine
        if len(prompts) == 1 and extendable(self.engine):
            for state, logits, cached in prefill(self.engine, prompts[0], self.prefix_cache, self.prefill_chunk):  # noqa: B007
                if logits is None:  # between prefill chunks: a place to stop a cancelled stream
                    yield Chunk(0, "", None, rows[0].prompt_tokens, 0, seed, cached)
            kv_ids = list(prompts[0])
            if self.lookup_tokens and s.temperature == 0:
                drafter = Drafter(prompts[0], len(prompts[0]) + budget)
        else:
            state, logits = self.engine.start(prompts)

        def drafted() -> tuple[int, int]:
            return (drafter.proposed, drafter.accepted) if drafter is not None else (0, 0)

        completed = False
        pending: list[int] = []  # draft tokens verified as greedy's picks: already in the KV, not yet shown
        try:
            for n in range(budget):
                drafted_token = bool(pending)  # its keys and values are in the state, and the logits after it
                tokens = np.array([pending.pop(0)]) if pending else sample(logits, s, gen)
                for i, (row, tok) in enumerate(zip(rows, tokens.tolist())):
                    if row.finish is None:
                        piece = row.add(tok, tok in self.stop_ids, self.tokenizer)
                        if piece or row.finish:
                            yield Chunk(i, piece, row.finish, row.prompt_tokens, len(row.ids), seed, cached,
                                        *drafted(), row.filter.word)
                if all(r.finish for r in rows):
                    completed = True
                    return
                if drafter is not None:
                    drafter.add(int(tokens[0]))
                if drafted_token or n == budget - 1:  # already computed, or the last token: nothing to run
                    continue
                draft = drafter.draft(min(self.lookup_tokens, budget - n - 2)) if drafter is not None else []
                if draft:
                    pending, logits = self._speculate(state, int(tokens[0]), draft, drafter)  # type: ignore[arg-type]
                else:
                    logits = self.engine.step(state, tokens)
                if kv_ids is not None:
                    kv_ids += [int(tokens[0]), *pending]
            for i, row in enumerate(rows):
                if row.finish is None:
                    yield Chunk(i, row.flush(self.tokenizer), "length", row.prompt_tokens, len(row.ids), seed, cached,
                                *drafted())
            completed = True
        except GeneratorExit:  # the caller stopped reading (a cancelled stream): the state is whole
            completed = True
            raise
        finally:
            if completed and kv_ids is not None and self.prefix_cache is not None:
                self.engine.park(state)  # type: ignore[attr-defined]
                self.prefix_cache.put(kv_ids, state, self.engine.state_bytes(state))  # type: ignore[attr-defined]

    def _speculate(self, state: Any, token: int, draft: list[int], drafter: Drafter) -> tuple[list[int], np.ndarray]:
        """Run `token` and a lookup draft in one forward; the draft tokens greedy decoding picks
        (kept in the KV, the rest cut off) and the logits after the last of them."""
        engine: Any = self.engine
        before = drafter.length - 1  # positions in the KV before `token`
        logits = engine.extend(state, [token, *draft], all_positions=True)
        kept = verify(draft, logits, engine.kernel_tolerance)
        drafter.count(len(draft), kept)
        following = logits[kept: kept + 1]  # the logits after the last token kept
        if not trusted(following, engine.kernel_tolerance)[0]:  # a near tie: run that position as plain decoding does
            engine.truncate(state, before + kept)
            return draft[:kept], engine.step(state, np.array([[token, *draft][kept]]))
        if kept < len(draft):
            engine.truncate(state, before + 1 + kept)
        return draft[:kept], following
