"""OnnxEngine: runs an `sc2quant export onnx` directory in plain onnxruntime (CPU or CUDA EP).

The graph's GroupQueryAttention shares its past and present KV buffers: each layer's cache
is one buffer of the model's context length, allocated once per batch and bound as both input
and output through IO binding; the op writes the new token's keys/values into it in place and
attends to the last `sliding_window` positions only. Nothing is copied between steps except
the new token ids, the attention mask and the logits (into a reused buffer).

Batches are right-padded: row b's tokens sit at positions 0..len_b-1, and the attention mask
only tells the graph each row's length (GQA's seqlens_k = mask.sum - 1).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sc2quant.core.artifact import GENAI_CONFIG, read_genai_config
from sc2quant.core.console import quiet_onnxruntime
from sc2quant.core.errors import UserError
from sc2quant.core.files import read_json
from sc2quant.core.hf import check_genai_sizes
from sc2quant.core.names import ONNX_WEIGHT_SUFFIXES
from sc2quant.core.system import env_switch
from sc2quant.core.tokenizer import Tokenizer
from sc2quant.runtime import prepacked
from sc2quant.runtime.engines.base import EngineOptions
from sc2quant.runtime.lookup import INT8_ACTIVATIONS

quiet_onnxruntime()  # before any `import onnxruntime` below: ONNX Runtime starts its telemetry when imported


@dataclass
class OnnxState:
    """A batch being decoded: tokens seen per row, the per-layer cache buffers, the IO binding."""

    lengths: list[int]
    buffers: dict[str, Any]  # past name -> OrtValue (also bound as the matching present output)
    binding: Any
    logits: dict[tuple[int, int], Any] = field(default_factory=dict)  # preallocated logits by (B, S)
    arrays: dict[str, np.ndarray] | None = None  # on the CPU: the numpy arrays the cache buffers are made from


@dataclass
class RowPool:
    """Rows sharing one cache buffer per layer (`OnnxEngine.pool`): a batch-1 state per row, and the
    states spanning several rows that batched decode steps run on (made once per span)."""

    arrays: dict[str, np.ndarray]  # past name -> [rows, kv_heads, context, head]
    states: list[OnnxState]
    spans: dict[tuple[int, int], OnnxState] = field(default_factory=dict)

    def span(self, engine: OnnxEngine, lo: int, hi: int) -> OnnxState:
        if (lo, hi) not in self.spans:
            self.spans[(lo, hi)] = engine._new_state([0] * (hi - lo + 1),
                                                     {n: a[lo: hi + 1] for n, a in self.arrays.items()})
        return self.spans[(lo, hi)]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def _pages(shape: list[int], dtype: Any) -> np.ndarray:
    """A zeroed array in pages of its own (an anonymous mapping, resident only where written): returned to
    the system when the last reference goes, where the heap would keep it. glibc serves blocks of a few
    MiB from its heap once its mmap threshold has risen, and a stream of kept and evicted prompt caches
    then fragments it: measured 2.5x --prompt-cache-mb of RSS under a flood of distinct prompts, flat at
    the cache's bytes with mappings."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=np.uint8)[:nbytes].view(dtype).reshape(shape)


class OnnxEngine:
    name = "onnx"

    def __init__(self, path: str | Path, options: EngineOptions, kind: str = "onnx") -> None:
        self.kind = kind
        self.path = Path(path)
        genai = read_genai_config(self.path)
        decoder = genai["model"]["decoder"]
        self.device = _resolve_device(options.device)
        self.config = read_json(self.path / "config.json", "re-export the model")
        check_genai_sizes(self.path, genai, self.config)  # before anything is allocated from them
        self.context_length = self.context = int(genai["model"]["context_length"])
        self.num_layers = int(decoder["num_hidden_layers"])
        self.kv_heads = int(decoder["num_key_value_heads"])
        self.head_size = int(decoder["head_size"])
        self.vocab_size = int(genai["model"]["vocab_size"])
        if decoder.get("sliding_window"):
            # A window-sized cache (the builder's default) cannot prefill a right-padded batch
            # of different lengths in ORT 1.32; `sc2quant export onnx` writes full-length caches.
            raise UserError(f"{path} was exported with a window-sized KV cache, which OnnxEngine does not run: "
                            "re-export it with `sc2quant export onnx`")
        try:
            # int4 weights prepacked for this CPU once, mapped from the user cache on later loads
            # (checked against genai_config before a prepacked copy is kept)
            self.session = prepacked.session(self.path / decoder["filename"],
                                             lambda: _session_options(options.threads, options.profile_dir),
                                             _providers(self.device), self.device, self._check_graph)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - ORT raises its own types for missing or damaged files
            reason = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
            raise UserError(f"ONNX Runtime cannot load {self.path.name} ({reason}): its files are damaged or "
                            "missing; load it with its checksums verified, or export it again") from exc
        types = {i.name: i.type for i in self.session.get_inputs()}
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        self.cache_dtype = np.float16 if types[self.past_names[0]] == "tensor(float16)" else np.float32
        out_types = {o.name: o.type for o in self.session.get_outputs()}
        self.logits_dtype = np.float16 if out_types["logits"] == "tensor(float16)" else np.float32
        self._ort_device = self.device
        self.dtype = "fp16" if self.cache_dtype == np.float16 else "fp32"
        if options.dtype not in ("auto", self.dtype):
            again = f", or export again with `sc2quant export onnx --dtype {options.dtype}`" if options.dtype == "fp16" else ""
            raise UserError(f"{self.path.name} is an ONNX graph computing in {self.dtype}, fixed when it was exported: "
                            f"drop --dtype{again}")
        self.tokenizer = Tokenizer(self.path)  # tokenizers alone: no transformers in the base install
        self._ones = np.ones((1, self.context_length), dtype=np.int64)  # batch 1's mask: a slice of it

    # --- Engine protocol -------------------------------------------------------------------

    def logits(self, input_ids: Any, attention_mask: Any = None) -> Any:
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        lengths = [int(n) for n in mask.sum(axis=1)]
        if not np.array_equal(mask, np.arange(ids.shape[1])[None, :] < np.array(lengths)[:, None]):
            raise UserError("the ONNX engine needs right-padded batches (attention_mask 1...1 0...0 per row)")
        state = self._new_state(lengths)
        import torch  # evaluation only: generation needs no torch

        return torch.from_numpy(self._run(state, ids, lengths).astype(np.float32))

    def start(self, prompts: list[list[int]]) -> tuple[OnnxState, np.ndarray]:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise UserError("every prompt needs at least one token")
        lengths = [len(p) for p in prompts]
        ids = np.zeros((len(prompts), max(lengths)), dtype=np.int64)  # right-padded, as GQA requires
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = prompt
        state = self._new_state(lengths)
        logits = self._run(state, ids, lengths)
        last = logits[np.arange(len(prompts)), np.array(lengths) - 1]
        return state, last.astype(np.float32)  # a copy: the output buffer is reused

    def step(self, state: OnnxState, tokens: Any) -> np.ndarray:
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)
        if ids.shape[0] != len(state.lengths):
            raise UserError(f"step got {ids.shape[0]} tokens for a batch of {len(state.lengths)}")
        state.lengths = [n + 1 for n in state.lengths]
        logits = self._run(state, ids, state.lengths)
        return logits[:, -1].astype(np.float32)  # a copy: the output buffer is reused

    can_extend = True
    # its int4/int8 MatMulNBits quantize activations to int8 (the bound holds a fortiori for float graphs)
    kernel_tolerance = INT8_ACTIVATIONS

    def extend(self, state: OnnxState, ids: list[int], all_positions: bool = False) -> np.ndarray:
        """Prefill more tokens into a batch-1 state: GroupQueryAttention with past reads the cached
        positions and writes the new ones in place (chunked prefill, prompt reuse, lookup decoding).
        Float32 logits of the last token [1, V] (all_positions: of each, [n, V])."""
        if len(state.lengths) != 1 or not ids:
            raise UserError("extend takes one row and at least one token")
        state.lengths = [state.lengths[0] + len(ids)]
        logits = self._run(state, np.asarray([ids], dtype=np.int64), state.lengths)
        return (logits[0] if all_positions else logits[:, -1]).astype(np.float32)

    def truncate(self, state: OnnxState, length: int) -> None:
        """Forget positions from `length` on (the buffers keep them until overwritten; GQA reads
        only up to each row's length)."""
        state.lengths = [min(n, length) for n in state.lengths]

    def state_bytes(self, state: OnnxState) -> int:
        """Every buffer the state holds: its keys and values, and any logits output buffer still bound."""
        kv = sum(int(np.prod(b.shape())) * np.dtype(self.cache_dtype).itemsize for b in state.buffers.values())
        return kv + sum(int(np.prod(b.shape())) * np.dtype(self.logits_dtype).itemsize for b in state.logits.values())

    def park(self, state: OnnxState) -> None:
        """Drop what a state kept for later does not need: its logits buffer ([1, chunk, vocab] after a
        prefill chunk: more than the keys and values of a small model), allocated again when it runs."""
        state.logits.clear()

    def min_state_bytes(self) -> int:
        """Every state holds keys and values for the whole context (GQA's shared buffers)."""
        return 2 * self.num_layers * self.kv_heads * self.context_length * self.head_size * np.dtype(self.cache_dtype).itemsize

    def weight_bytes(self) -> int:
        """ONNX Runtime owns its initializers; their bytes are those of the graph's files."""
        return sum(p.stat().st_size for p in self.path.iterdir() if p.suffix in ONNX_WEIGHT_SUFFIXES)

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "kind": self.kind, "device": self.device,
                "dtype": self.dtype,
                "threads": self.session.get_session_options().intra_op_num_threads or None,
                "thread_spinning": self.session.get_session_options().get_session_config_entry(
                    "session.intra_op.allow_spinning") == "1",
                "providers": self.session.get_providers()}

    def end_profiling(self) -> Path | None:
        if not self.session.get_session_options().enable_profiling:
            return None
        return Path(self.session.end_profiling())

    # --- internals ---------------------------------------------------------------------------

    def _check_graph(self, session: Any) -> None:
        """The graph has the layers genai_config.json says (a hand-edited config is refused)."""
        pasts = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values.")]
        if len(pasts) != 2 * self.num_layers:
            raise UserError(f"{GENAI_CONFIG} in {self.path} says {self.num_layers} layers but the graph has "
                            f"{len(pasts) // 2}: re-export the model")

    def _new_state(self, lengths: list[int], arrays: dict[str, np.ndarray] | None = None) -> OnnxState:
        """A state over new cache buffers, or over `arrays` (rows of a pool's buffers: shared memory)."""
        import onnxruntime as ort

        shape = [len(lengths), self.kv_heads, self.context_length, self.head_size]
        if arrays is None and self._ort_device == "cpu":
            arrays = {name: _pages(shape, self.cache_dtype) for name in self.past_names}
        if arrays is not None:
            buffers = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in arrays.items()}
        else:
            buffers = {name: ort.OrtValue.ortvalue_from_shape_and_type(shape, self.cache_dtype, self._ort_device, 0)
                       for name in self.past_names}
        binding = self.session.io_binding()
        for name, buf in buffers.items():  # past and present are one buffer: updated in place
            binding.bind_ortvalue_input(name, buf)
            binding.bind_ortvalue_output(name.replace("past_key_values", "present"), buf)
        return OnnxState(lengths=list(lengths), buffers=buffers, binding=binding, arrays=arrays)

    # --- rows sharing one set of cache buffers (runtime/slots.py) --------------------------------

    def pool(self, rows: int) -> RowPool:
        """`rows` batch-1 states whose caches are the rows of one [rows, kv_heads, context, head] buffer per
        layer: each row prefills (extend) on its own, in place; `step_rows` decodes several in one forward.
        CPU only (the buffers are numpy arrays in pages of their own)."""
        if self._ort_device != "cpu":
            raise UserError("several rows in one batch (--parallel) run on the CPU only: use --parallel 1 on CUDA")
        shape = [rows, self.kv_heads, self.context_length, self.head_size]
        arrays = {name: _pages(shape, self.cache_dtype) for name in self.past_names}
        states = [self._new_state([0], {n: a[r: r + 1] for n, a in arrays.items()}) for r in range(rows)]
        return RowPool(arrays, states)

    def step_rows(self, pool: RowPool, rows: list[int], tokens: list[int]) -> np.ndarray:
        """One decode step for `rows` (one token each) in one forward: float32 logits [len(rows), V].

        GroupQueryAttention takes a batch of rows that each decode one token, over one contiguous buffer,
        so the forward spans rows min..max; a row in that span that is not decoding runs a padding token
        written after its cached positions (its length is left as it was: nothing it keeps is touched).
        MatMulNBits reads the weights once for all the rows."""
        lo, hi = min(rows), max(rows)
        span = pool.span(self, lo, hi)
        lengths, ids = [], np.zeros((hi - lo + 1, 1), dtype=np.int64)
        for r in range(lo, hi + 1):
            length = pool.states[r].lengths[0]
            if length >= self.context_length:
                raise UserError(f"row {r} holds the whole context: it cannot take a padding token")
            lengths.append(length + 1)
        for r, tok in zip(rows, tokens):
            ids[r - lo, 0] = tok
            pool.states[r].lengths = [pool.states[r].lengths[0] + 1]
        logits = self._run(span, ids, lengths)
        return logits[[r - lo for r in rows], -1].astype(np.float32)

    def copy_positions(self, src: OnnxState, dst: OnnxState, length: int) -> None:
        """Copy the first `length` positions of a batch-1 state's keys and values into another's (a row
        given up kept in the prompt cache, or an entry of the cache loaded into a row)."""
        if src.arrays is None or dst.arrays is None:
            raise UserError("copying cached positions between states runs on the CPU only")
        for name in self.past_names:
            dst.arrays[name][:, :, :length] = src.arrays[name][:, :, :length]
        dst.lengths = [length]

    def new_state(self) -> OnnxState:
        """An empty batch-1 state with buffers of its own."""
        return self._new_state([0])

    def _run(self, state: OnnxState, ids: np.ndarray, lengths: list[int]) -> np.ndarray:
        """One forward of `ids` [B, S]; each row's total length (cache + new) is `lengths`."""
        total = max(lengths)
        if total > self.context_length:
            raise UserError(f"sequence of {total} tokens exceeds the model's context length "
                            f"({self.context_length}): shorten the prompt or generate fewer tokens")
        if len(lengths) == 1:  # one row: a slice of a mask of ones (no allocation per step)
            mask = self._ones[:, :total]
        else:
            mask = (np.arange(total)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
        binding = state.binding
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids))
        binding.bind_cpu_input("attention_mask", mask)
        logits = self._logits_buffer(state, ids.shape)
        binding.bind_ortvalue_output("logits", logits)
        self.session.run_with_iobinding(binding)
        return logits.numpy()

    def _logits_buffer(self, state: OnnxState, shape: tuple[int, ...]) -> Any:
        """Decode steps reuse one [B, 1, V] output buffer instead of allocating each step."""
        import onnxruntime as ort

        key = (int(shape[0]), int(shape[1]))
        if key not in state.logits:
            state.logits = {key: self._buffer(ort, [*key, self.vocab_size], self.logits_dtype)}
        return state.logits[key]

    def _buffer(self, ort: Any, shape: list[int], dtype: Any) -> Any:
        """An output buffer: on the CPU in pages of its own (`_pages`)."""
        if self._ort_device != "cpu":
            return ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, self._ort_device, 0)
        return ort.OrtValue.ortvalue_from_numpy(_pages(shape, dtype))  # keeps the array alive


def _resolve_device(device: str) -> str:
    import onnxruntime as ort

    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "auto":
        return "cuda" if has_cuda else "cpu"
    if device not in ("cpu", "cuda"):
        raise UserError(f"unknown device '{device}' for the ONNX engine: choose cpu, cuda or auto")
    if device == "cuda" and not has_cuda:
        raise UserError("device cuda was asked for but this onnxruntime has no CUDA execution provider: "
                        "install onnxruntime-gpu (make install-gpu) or use device cpu")
    return device


def _providers(device: str) -> list[str]:
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]


SPIN = True  # the default of session.intra_op.allow_spinning (SC2QUANT_ORT_SPIN overrides it)


def check_switches() -> None:
    """The environment switches ONNX sessions read, checked before any work (a bad value: one line)."""
    env_switch("SC2QUANT_ORT_SPIN", SPIN)
    prepacked.enabled()


def _session_options(threads: int | None, profile_dir: Path | None = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # warnings about unused initializers etc. are noise for users
    # ORT's intra-op threads spin between ops unless told not to (bench/results: busy machine)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if env_switch("SC2QUANT_ORT_SPIN", SPIN) else "0")
    if profile_dir is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(profile_dir) / "ort")
    return opts

