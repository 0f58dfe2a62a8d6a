"""Safetensors read and written one tensor at a time, so memory never grows with the model.

`TensorReader` reads each tensor with plain positioned reads. safetensors' own reader maps the
files: every page it touches counts in the process's resident memory until the mapping goes,
so reading a 6 GB checkpoint through it peaks at 6 GB whatever is freed. Here a tensor costs
its own bytes, once.

`ShardedWriter` writes shards as tensors arrive. The format puts a JSON header (names, dtypes,
shapes, offsets) before the data; the writer reserves room for it, appends tensor data, and
writes the header last, padded with spaces (which the format allows). Shards roll over at a
size limit and are named as the hub names them (`model-00001-of-00002.safetensors` with
`model.safetensors.index.json`, or one `model.safetensors`). Hand-written because neither
safetensors nor huggingface_hub has a streaming writer: both build a shard in memory first.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sc2quant.core.errors import UserError
from sc2quant.core.files import safetensors_header

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
CODES = {v: k for k, v in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SHARD_BYTES = 2 * 10**9  # the hub's StarCoder2 checkpoints use shards of about this size


@dataclass(frozen=True)
class Entry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offset of the data
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class TensorReader:
    """The tensors of a model directory's safetensors files, read one at a time on request."""

    def __init__(self, files: list[Path]) -> None:
        self.entries: dict[str, Entry] = {}
        for file in files:
            header_len, header = safetensors_header(file)
            base = 8 + header_len
            for name, info in header.items():
                begin, end = info["data_offsets"]
                self.entries[name] = Entry(file, info["dtype"], tuple(info["shape"]), base + begin, base + end)

    @classmethod
    def of(cls, model_dir: Path) -> TensorReader:
        return cls(sorted(Path(model_dir).glob("*.safetensors")))

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        """Every tensor, in file and offset order (sequential reads)."""
        return sorted(self.entries, key=lambda n: (str(self.entries[n].file), self.entries[n].start))

    def get(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        if entry.dtype not in DTYPES:
            raise UserError(f"{entry.file.name}: tensor {name} has dtype {entry.dtype}, which sc2quant does not read")
        buffer = bytearray(entry.nbytes)
        with open(entry.file, "rb", buffering=0) as fh:
            view, done = memoryview(buffer), 0
            while done < entry.nbytes:
                n = os.preadv(fh.fileno(), [view[done:]], entry.start + done)
                if n == 0:
                    raise UserError(f"weight file {entry.file.name} is truncated: re-download or re-export the model")
                done += n
        if not buffer:
            return torch.empty(entry.shape, dtype=DTYPES[entry.dtype])
        return torch.frombuffer(buffer, dtype=DTYPES[entry.dtype]).reshape(entry.shape)


class ShardedWriter:
    """Write tensors into safetensors shards as they come (see the module docstring).

    max_tensors and max_name bound the header each shard reserves; `close()` names the shards
    and writes the index. Nothing is held in memory but the tensor being written.
    """

    def __init__(self, out_dir: Path, max_tensors: int, max_name: int = 128, shard_bytes: int = SHARD_BYTES,
                 metadata: dict[str, str] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.shard_bytes = shard_bytes
        self.metadata = metadata or {"format": "pt"}
        reserve = 256 + len(json.dumps(self.metadata)) + max_tensors * (max_name + 160)
        self.reserve = (reserve + 7) // 8 * 8  # data starts 8-byte aligned
        self.shards: list[tuple[Path, dict[str, Any]]] = []
        self._file: Any = None
        self._header: dict[str, Any] = {}
        self._size = 0
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        data = tensor.detach().contiguous().cpu()
        if data.dtype not in CODES:
            raise ValueError(f"cannot write {name}: dtype {data.dtype}")
        nbytes = data.numel() * data.element_size()
        if self._file is None or (self._size and self._size + nbytes > self.shard_bytes):
            self._finish_shard()
            path = self.out_dir / f".shard-{len(self.shards):05d}.safetensors.partial"
            self._file = open(path, "wb")  # noqa: SIM115 - closed in _finish_shard
            self._file.write(b"\0" * (8 + self.reserve))
            self.shards.append((path, {}))
            self._header, self._size = self.shards[-1][1], 0
        self._header[name] = {"dtype": CODES[data.dtype], "shape": list(data.shape),
                              "data_offsets": [self._size, self._size + nbytes]}
        if nbytes:
            self._file.write(memoryview(data.view(torch.uint8).reshape(-1).numpy()))
        self._size += nbytes
        self.total_bytes += nbytes

    def _finish_shard(self) -> None:
        if self._file is None:
            return
        header = json.dumps({"__metadata__": self.metadata, **self._header}, separators=(",", ":")).encode()
        if len(header) > self.reserve:
            raise ValueError(f"safetensors header of {len(header)} bytes exceeds the {self.reserve} reserved")
        self._file.seek(0)
        self._file.write(struct.pack("<Q", self.reserve) + header + b" " * (self.reserve - len(header)))
        self._file.close()
        self._file = None

    def close(self) -> list[Path]:
        """Finish the last shard, give every shard its final name, write the index when sharded."""
        self._finish_shard()
        count = len(self.shards)
        names = ["model.safetensors"] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors"
                                                          for i in range(count)]
        weight_map: dict[str, str] = {}
        for (partial, header), name in zip(self.shards, names):
            partial.rename(self.out_dir / name)
            weight_map.update({tensor: name for tensor in header})
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return [self.out_dir / n for n in names]
