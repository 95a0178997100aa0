"""Write safetensors files as a stream: the header first (every name, dtype and shape is known
before any data), then each tensor's bytes in header order, in as many chunks as the caller likes.
Memory is one chunk, whatever the file's size. Files are what the `safetensors` package writes:
8-byte little-endian header length, JSON header (with `__metadata__`, string values only) padded
with spaces to keep the data 8-byte aligned, tensors packed in order.

For checkpoints: `plan_shards` groups tensors into shards of a target size (a weight and its scale
stay together), `shard_name` names them as the DeepSeek release does, and `write_index` writes
`model.safetensors.index.json`. Write into a staging folder (hybrid_r1.staging).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .safetensors import DTYPES

INDEX = "model.safetensors.index.json"
_ST_DTYPE = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """What the header says of one tensor."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def header_bytes(specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length and the padded JSON header for `specs`, packed in order."""
    header: dict = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError(f"safetensors __metadata__ maps strings to strings, got {metadata!r}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for s in specs:
        if s.dtype not in _ST_DTYPE:
            raise ValueError(f"dtype {s.dtype} of {s.name} has no safetensors name")
        header[s.name] = {"dtype": _ST_DTYPE[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    if len(header) - bool(metadata) != len(specs):
        raise ValueError("a tensor name appears twice in one safetensors file")
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # keeps the data 8-byte aligned, as safetensors' own writer does
    return len(head).to_bytes(8, "little") + head


class SafetensorsWriter:
    """One safetensors file written in header order: `write(name, chunk)` appends bytes of tensor
    `name` (the current one, or the next); `close()` checks every declared byte was written.

        with SafetensorsWriter(path, specs, {"format": "pt"}) as w:
            for rows in chunks_of_a:   # any split along the first dim, or the whole tensor
                w.write("a", rows)
    """

    def __init__(self, path: str | Path, specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None,
                 hasher=None):
        self.path = Path(path)
        self.specs = list(specs)
        self.hasher = hasher  # e.g. hashlib.sha256(): fed every byte written, so nothing is read back
        head = header_bytes(self.specs, metadata)
        self._f = open(self.path, "wb")
        self._emit(head)
        self._i = 0  # the tensor being written
        self._done = 0  # its bytes written so far

    def write(self, name: str, chunk: torch.Tensor) -> None:
        """Append `chunk` (of the declared dtype) to tensor `name`."""
        spec = self._advance(name)
        if chunk.dtype != spec.dtype:
            raise ValueError(f"{self.path}: {name} is declared {spec.dtype}, got a {chunk.dtype} chunk")
        self._append(spec, memoryview(chunk.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))

    def write_bytes(self, name: str, data) -> None:
        """Append raw bytes (a bytes-like object) to tensor `name`: for copies of stored bytes."""
        self._append(self._advance(name), memoryview(data).cast("B"))

    def _advance(self, name: str) -> TensorSpec:
        if self._i < len(self.specs) and self._done == self.specs[self._i].nbytes and self.specs[self._i].name != name:
            self._i, self._done = self._i + 1, 0  # the previous tensor is complete: on to the next
        if self._i >= len(self.specs) or self.specs[self._i].name != name:
            expected = self.specs[self._i].name if self._i < len(self.specs) else "nothing more"
            raise ValueError(f"{self.path}: wrote {name!r} where the header expects {expected!r}")
        return self.specs[self._i]

    def _append(self, spec: TensorSpec, data: memoryview) -> None:
        if self._done + data.nbytes > spec.nbytes:
            raise ValueError(f"{self.path}: {spec.name} is declared {spec.nbytes} bytes, got more")
        self._emit(data)
        self._done += data.nbytes

    def _emit(self, data) -> None:
        self._f.write(data)
        if self.hasher is not None:
            self.hasher.update(data)

    def close(self) -> None:
        if self._f.closed:
            return
        try:
            missing = [s.name for s in self.specs[self._i + 1:]] if self._i < len(self.specs) else []
            if self._i < len(self.specs) and self._done != self.specs[self._i].nbytes:
                missing.insert(0, self.specs[self._i].name)
            if missing:
                raise ValueError(f"{self.path}: closed before {', '.join(missing[:3])} was written in full")
            self._f.flush()
            os.fsync(self._f.fileno())
        finally:
            self._f.close()

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.close()
        else:
            self._f.close()  # an error while writing: the caller's staging folder goes away anyway


def write_file(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Small files: every tensor given whole. Returns the data bytes written."""
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    with SafetensorsWriter(path, specs, metadata) as w:
        for n, t in tensors.items():
            w.write(n, t)
    return sum(s.nbytes for s in specs)


def plan_shards(groups: Iterable[Sequence[TensorSpec]], shard_bytes: int) -> list[list[TensorSpec]]:
    """Tensors in order, into shards: a shard ends after the group (a weight and its scale) that
    brings it to `shard_bytes` or more. shard_bytes 0: one group per shard."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for group in groups:
        shards[-1].extend(group)
        size += sum(s.nbytes for s in group)
        if size >= shard_bytes:
            shards.append([])
            size = 0
    return [s for s in shards if s]


def shard_name(i: int, n: int) -> str:
    """The release's names: model-00001-of-000163.safetensors (i counts from 0)."""
    return f"model-{i + 1:05d}-of-{n:06d}.safetensors"


def write_index(folder: str | Path, weight_map: dict[str, str], total_size: int) -> Path:
    path = Path(folder) / INDEX
    path.write_text(json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2) + "\n")
    return path
