"""The `Format` every artifact kind subclasses, the one table of formats, and method names.

An artifact kind (what `sc2quant.json`'s "kind" says) is one `Format` subclass, registered by
subclassing as gguf-py registers its quant types: `class GptqFormat(Format, kind="gptq")`.
The format owns everything that differs between kinds:

- its method names: the full name that says everything that changes the bytes
  (`gptq-int4-g128`, `bnb-nf4-dq`, `onnx-int4-b32-sym-lm8`), the short label manifests and
  reports use (`gptq`, `bnb-nf4`, `onnx-int4`), and parsing a full name back (`patterns`);
- how the one loader (`sc2quant.core.hf.load_model`) loads it into torch (its `LoadHooks`);
- where it runs: the engines it prefers on each device, and `runs_in` saying why an engine
  cannot take a given artifact, so `choose_engine` falls back instead of failing;
- whether vLLM can serve it;
- its bytes for `sc2quant footprint` (`footprint_methods`, `footprint`).

Everything else looks formats up here: `get_format(kind)`, `format_of_config(config)` for a
plain directory, `parse_method(name)`, `method_names()`. A new kind is one module holding one
subclass; nothing else is edited.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from sc2quant.core.errors import UserError

if TYPE_CHECKING:
    from sc2quant.footprint.predict import Row
    from sc2quant.footprint.shapes import Shape


@dataclass(frozen=True)
class Method:
    """Everything that decides a method's bytes. `family` names the format that owns it
    (fp32/bf16/fp16, bnb, gptq, rtn, onnx, or a new format's own)."""

    family: str
    bits: int | None = None
    group: int | None = None  # GPTQ/RTN group size, MatMulNBits block size
    quant_type: str | None = None  # bnb 4-bit: nf4 or fp4
    double_quant: bool = False
    sym: bool = True
    dtype: str | None = None  # ONNX activations: fp32 or fp16
    lm_head: str | None = None  # ONNX int4: int4, int8 or float

    @property
    def format(self) -> Format:
        return family_format(self.family)

    @property
    def name(self) -> str:
        """The full name (`bnb-nf4-dq`, `gptq-int4-g128`, `onnx-int4-b32-sym-lm8`, `onnx-fp32`)."""
        return self.format.method_name(self)

    @property
    def label(self) -> str:
        """The short label manifests and reports use (`bnb-nf4`, `gptq`, `rtn`, `onnx-int4`)."""
        return self.format.method_label(self)

    @property
    def kind(self) -> str:
        """The artifact kind this method writes."""
        return self.format.kind


FORMATS: dict[str, Format] = {}  # artifact kind -> its format, in registration order


class Format:
    """One artifact kind. Subclass with `kind=...` to register it (see the module docstring)."""

    kind: ClassVar[str]
    description: ClassVar[str]
    families: ClassVar[tuple[str, ...]]  # Method families this format writes
    quant_method: ClassVar[str | None] = None  # config.json's quantization_config.quant_method, if any
    # (pattern, Method factory) pairs: parse_method tries every format's patterns
    patterns: ClassVar[tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], Method]], ...]] = ()
    # engines that reach this format through a cached conversion (`sc2quant export onnx` of it)
    converted_for: ClassVar[tuple[str, ...]] = ()
    vllm_refusal: ClassVar[str | None] = None  # None: vLLM serves it; else why not and what to do

    def __init_subclass__(cls, kind: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if kind is None:
            return
        cls.kind = kind
        FORMATS[kind] = cls()

    # --- names --------------------------------------------------------------------------------

    def method_name(self, m: Method) -> str:
        return m.family

    def method_label(self, m: Method) -> str:
        return m.family

    # --- loading into torch (`sc2quant.core.hf.LoadHooks`; the defaults load a plain checkpoint) ---

    def load_context(self, quant: dict[str, Any] | None) -> Any:
        """A context manager around `from_pretrained` (an import guard)."""
        return contextlib.nullcontext()

    def load_attempts(self, quant: dict[str, Any] | None, device: str) -> list[dict[str, Any]]:
        """Extra `from_pretrained` arguments to try in turn (a kernel that cannot run here: the next)."""
        return [{}]

    def after_load(self, model: Any, policy: Any) -> None:
        """Adjust the loaded model to the compute policy (bitsandbytes' kernel choice)."""

    # --- checks before anything is loaded ---

    def check(self, config: dict[str, Any], where: str) -> None:
        """Refuse a checkpoint this format cannot load (an edited quantization_config) in one line;
        `where` names it. The kind a manifest names must be the one its config.json describes."""
        method = (config.get("quantization_config") or {}).get("quant_method")
        if method != self.quant_method:
            raise UserError(f"{where}: sc2quant.json says a '{self.kind}' artifact but its config.json describes "
                            f"{f'a {method!r}' if method else 'an unquantized'} checkpoint: the artifact was edited; "
                            "re-create it")

    # --- where it runs --------------------------------------------------------------------------

    def engines(self, device: str) -> tuple[str, ...]:
        """The engines that may run this kind on `device`, the fastest first."""
        return ("torch",)

    def runs_in(self, engine: str, device: str, path: Path, config: dict[str, Any], verified: bool,
                dtype: str = "auto") -> str | None:
        """None if `engine` runs this artifact; else why not (one sentence, no fix: the caller adds it).
        verified: its checksums were checked in this load; dtype: the compute dtype asked for."""
        if engine in self.engines(device):
            return None
        return f"a '{self.kind}' artifact does not run in the {engine} engine"

    # --- bytes ------------------------------------------------------------------------------------

    def footprint_methods(self) -> list[Method]:
        """The methods `sc2quant footprint` lists for this format."""
        return []

    def footprint(self, shape: Shape, m: Method) -> Row:
        raise UserError(f"sc2quant footprint does not predict '{m.name}'")

    def describe(self) -> dict[str, Any]:
        """What `sc2quant formats` lists."""
        return {"kind": self.kind, "description": self.description, "engines_cpu": list(self.engines("cpu")),
                "engines_cuda": list(self.engines("cuda")), "vllm": self.vllm_refusal is None,
                "methods": [m.name for m in self.footprint_methods()]}


def get_format(kind: str) -> Format:
    """The format of an artifact kind; a clear error for an unknown one."""
    if kind not in FORMATS:
        raise UserError(f"unknown artifact kind '{kind}' (known: {', '.join(FORMATS)}): the artifact was written by "
                        "another sc2quant version or edited; re-create it")
    return FORMATS[kind]


def format_of_config(config: dict[str, Any]) -> Format:
    """The format of a model directory without a manifest, from its config's quantization_config."""
    method = (config.get("quantization_config") or {}).get("quant_method")
    for fmt in FORMATS.values():
        if fmt.quant_method == method and (method is not None or fmt.kind == "hf"):
            return fmt
    raise UserError(f"'{method}' checkpoints are not supported: sc2quant runs plain, bitsandbytes and GPTQ "
                    "checkpoints and ONNX exports")


def family_format(family: str) -> Format:
    for fmt in FORMATS.values():
        if family in fmt.families:
            return fmt
    raise UserError(f"unknown method family '{family}'")


def parse_method(name: str) -> Method:
    """A full method name back into its fields; a clear error for anything else."""
    for fmt in FORMATS.values():
        for pattern, make in fmt.patterns:
            if m := pattern.match(name):
                return make(m)
    raise UserError(f"unknown method '{name}': use one that `sc2quant footprint` lists, e.g. bf16, bnb-nf4-dq, "
                    "gptq-int4-g128 (bits 2/3/4/8, group N or -1), onnx-fp32 or onnx-int4-b32-sym-lm8")


def method_names() -> list[str]:
    """Every method `sc2quant footprint` predicts, in display order (full names)."""
    return [m.name for fmt in FORMATS.values() for m in fmt.footprint_methods()]
