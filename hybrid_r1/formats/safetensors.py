"""Hugging Face safetensors checkpoints: sharded with `model.safetensors.index.json` or single-file.

Each shard is memory-mapped once (copy-on-write, so torch may view it without ever writing the
file) and tensors are handed out one at a time as views; only a dtype conversion copies. The
headers of every shard are checked when the checkpoint opens, so a truncated or inconsistent file
fails before any weight is loaded.
"""

from __future__ import annotations

import json
import math
import os
import mmap
import struct
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import CheckpointError
from ..quant import BLOCK, QUANT_METHODS, SCALE_SUFFIXES, dequant_block, dequant_int8
from .ggml_tensor import GGMLTensor

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_UNKNOWN = object()  # quantization() not computed yet
MAX_HEADER = 100 << 20  # the safetensors library refuses longer headers too (its JSON is read whole)


def _entry(e, data_size: int, file: str, name: str) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """One header entry, checked: dtype known, shape a list of non-negative ints, data_offsets
    [begin, end] inside the data section (which starts after the header) and sized shape x itemsize."""
    def bad(msg: str) -> CheckpointError:
        return CheckpointError(msg, file=file, tensor=name)

    if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
        raise bad(f"header entry must be an object with dtype, shape and data_offsets, got {str(e)[:80]}")
    if not isinstance(e["dtype"], str) or e["dtype"] not in DTYPES:
        raise bad(f"unsupported dtype {e['dtype']!r}")
    dtype, shape, offsets = DTYPES[e["dtype"]], e["shape"], e["data_offsets"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad(f"shape must be a list of non-negative integers, got {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise bad(f"data_offsets must be [begin, end] integers, got {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise bad(f"data_offsets {offsets} must satisfy 0 <= begin <= end (offsets count from the end of the header)")
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes:
        raise bad(f"data size {end - begin} B does not match shape {shape} of {e['dtype']} ({nbytes} B)")
    if end > data_size:
        raise bad(f"data runs past the end of the file (byte {end} of a {data_size}-byte data section): truncated?")
    return dtype, tuple(shape), begin, end


def _check_layout(entries: dict[str, tuple], data_size: int, file: str) -> None:
    """The tensors tile the data section: no two share bytes (a crafted header could alias one
    tensor's bytes as another's) and no byte belongs to none (the safetensors format forbids holes,
    so that a file cannot hide other contents). Alignment is not required by the format."""
    spans = sorted((b, e, name) for name, (_, _, b, e) in entries.items() if e > b)
    at, prev = 0, None
    for b, e, name in spans:
        if b < at:
            raise CheckpointError(f"data bytes {b}..{e} overlap tensor {prev} (..{at})", file=file, tensor=name)
        if b > at:
            raise CheckpointError(f"bytes {at}..{b} of the data section belong to no tensor (a hole before this one)",
                                  file=file, tensor=name)
        at, prev = e, name
    if at != data_size:
        raise CheckpointError(f"the data section has {data_size} bytes but its tensors end at byte {at}", file=file)


def read_header(path: Path) -> tuple[dict, int, int]:
    """(header JSON object, its length, the file's size) of a safetensors file, checked as far as
    the header itself goes; a CheckpointError naming the file otherwise."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise CheckpointError("shard file is missing", file=str(path)) from None
    with f:
        size = path.stat().st_size
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError("not a safetensors file (shorter than its 8-byte header length)", file=str(path))
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            raise CheckpointError(f"header length {n} is over {MAX_HEADER} bytes (the safetensors limit): "
                                  "not a safetensors file?", file=str(path))
        if n > size - 8:
            raise CheckpointError(f"header length {n} runs past the end of the file ({size} bytes)", file=str(path))
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"header is not valid JSON: {e}", file=str(path)) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"header is JSON but not an object of tensors (a {type(header).__name__})", file=str(path))
    return header, n, size


class _Shard:
    def __init__(self, path: Path):
        self.path = path
        header, n, size = read_header(path)
        with open(path, "rb") as f:
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 0 else None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict):
            raise CheckpointError("__metadata__ is not an object of strings", file=str(path))
        self.data_start = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {
            name: _entry(e, size - self.data_start, str(path), name) for name, e in header.items()}
        _check_layout(self.entries, size - self.data_start, str(path))

    def view(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[name]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        t = torch.frombuffer(self.mm, dtype=torch.uint8, count=end - begin, offset=self.data_start + begin)
        return t.view(dtype).view(shape)

    def release(self, name: str) -> None:
        """Drop `name`'s pages from this process's memory once a converted copy exists: the mapping
        is private and never written, so a later read faults them in again from the file. Without
        this a load in another dtype holds the converted model and the mapped file both."""
        _, _, begin, end = self.entries[name]
        page = mmap.PAGESIZE
        lo = (self.data_start + begin) // page * page
        if end > begin and self.mm is not None:
            self.mm.madvise(mmap.MADV_DONTNEED, lo, self.data_start + end - lo)


class SafetensorsCheckpoint:
    """A checkpoint folder: config.json plus safetensors shards. Implements WeightSource."""

    def __init__(self, path: str | Path, config_file: str | Path | None = None):
        self.root = Path(path)
        self.path = str(path)
        if not self.root.is_dir():
            raise CheckpointError("checkpoint folder not found", file=self.path)
        self.config_file = Path(config_file) if config_file is not None else self.root / "config.json"
        self.config = ModelConfig.from_file(self.config_file)
        self._quantization = _UNKNOWN
        index = self.root / "model.safetensors.index.json"
        self._where: dict[str, _Shard] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"index is not a valid safetensors index ({e!r})", file=str(index)) from None
            if not isinstance(weight_map, dict):
                raise CheckpointError("index weight_map must be an object of tensor: shard file", file=str(index))
            shards: dict[str, _Shard] = {}
            for name, fname in weight_map.items():
                if not isinstance(fname, str) or not fname:
                    raise CheckpointError(f"index entry must name a shard file, got {fname!r}", file=str(index), tensor=name)
                # Judged by the name, not by resolving links: a Hugging Face cache snapshot's shards
                # are links into its blobs folder, which is outside the snapshot and fine.
                rel = os.path.normpath(fname)
                if fname not in shards and (os.path.isabs(rel) or rel.split(os.sep)[0] == os.pardir):
                    raise CheckpointError(f"index entry {fname!r} points outside the checkpoint folder",
                                          file=str(index), tensor=name)
                if fname not in shards:
                    if not (self.root / fname).is_file():
                        raise CheckpointError(f"shard {fname} listed in the index is missing", file=str(self.root / fname), tensor=name)
                    shards[fname] = _Shard(self.root / fname)
                shard = shards[fname]
                if name not in shard.entries:
                    raise CheckpointError(f"the index places this tensor in {fname}, which lacks it", file=str(shard.path), tensor=name)
                self._where[name] = shard
        else:
            files = sorted(self.root.glob("*.safetensors"))
            if not files:
                raise CheckpointError("no model.safetensors.index.json and no .safetensors files", file=self.path)
            for f in files:
                shard = _Shard(f)
                for name in shard.entries:
                    if name in self._where:
                        raise CheckpointError(f"tensor is in two files ({self._where[name].path.name})", file=str(f), tensor=name)
                    self._where[name] = shard
        self.metadata: dict[str, str] = {}  # the shards' __metadata__, merged
        for shard in dict.fromkeys(self._where.values()):
            self.metadata.update(shard.metadata)

    # ---- WeightSource -----------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> str:
        return str(self._shard(name).path)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shard(name).entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._shard(name).entries[name][0]

    def shard_metadata(self) -> dict[str, dict[str, str]]:
        """Each shard's own `__metadata__`, by file (`metadata` merges them: keys may repeat)."""
        return {str(s.path): s.metadata for s in dict.fromkeys(self._where.values())}

    def source_files(self) -> list[tuple[str, int]]:
        """(file, header bytes) of every shard: what a copy tool fingerprints."""
        return [(str(s.path), s.data_start) for s in dict.fromkeys(self._where.values())]

    def byte_range(self, name: str) -> tuple[str, int, int]:
        """(file, offset, size) of `name`'s stored bytes: for tools that copy them unchanged."""
        shard = self._shard(name)
        _, _, begin, end = shard.entries[name]
        return str(shard.path), shard.data_start + begin, end - begin

    def raw(self, name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        shard = self._shard(name)
        extra = {}
        if name.endswith(".weight"):
            for suffix in SCALE_SUFFIXES:
                companion = name[: -len("weight")] + suffix
                if companion in self._where:
                    extra[suffix] = self._where[companion].view(companion)
        return shard.view(name), extra

    def tensor(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """`name` in `dtype`: a view of the mapped file when stored so, else a converted copy (and
        then the mapped pages it was read from are released)."""
        t, extra = self.raw(name)
        file = self.file_of(name)
        if t.dtype == torch.float8_e4m3fn:
            scale = extra.get("weight_scale_inv")
            if scale is None:
                raise CheckpointError("float8 weight without its weight_scale_inv", file=file, tensor=name)
            out = dequant_block(t, scale, name=name, file=file).to(dtype)
        elif t.dtype == torch.int8 and extra:
            out = dequant_int8(t, extra, name=name, file=file).to(dtype)
        elif t.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"unexpected dtype {t.dtype} for a floating-point tensor", file=file, tensor=name)
        elif t.dtype == dtype:
            return t
        else:
            out = t.to(dtype)
        self._shard(name).release(name)
        return out

    def ggml_experts(self, layer: int) -> dict[str, GGMLTensor] | None:
        return None

    def quantization(self) -> str | None:
        """How the linears are stored: see detect_quantization (computed once)."""
        if self._quantization is _UNKNOWN:
            self._quantization = detect_quantization(self)
        return self._quantization

    def tokenizer(self):
        if not (self.root / "tokenizer.json").is_file():
            return None
        from ..tokenizer import Tokenizer

        return Tokenizer.from_dir(self.root)


    def _shard(self, name: str) -> _Shard:
        try:
            return self._where[name]
        except KeyError:
            raise CheckpointError("tensor not found in the checkpoint", file=self.path, tensor=name) from None


def detect_quantization(ckpt: SafetensorsCheckpoint) -> str | None:
    """How the linear weights are stored: "fp8" (DeepSeek release), "int8_block", "int8_channel"
    (Meituan releases) or None (unquantized).

    Read from the tensors (a float8 or int8 `.weight` and its scale companion), checked against
    config.json's quantization_config when there is one: Meituan's Channel-INT8 config.json has
    none, so the tensors are the only evidence there."""
    kinds: dict[str, str] = {}  # kind -> first weight seen with it
    for name in ckpt.names():
        if not name.endswith(".weight"):
            continue
        dtype = ckpt.dtype(name)
        if dtype not in (torch.float8_e4m3fn, torch.int8):
            continue
        stem, rows = name[: -len("weight")], ckpt.shape(name)[0]
        if dtype == torch.float8_e4m3fn:
            kind = "fp8" if ckpt.has(stem + "weight_scale_inv") else None
        elif ckpt.has(stem + "weight_scale_inv"):
            kind = "int8_block"
        elif ckpt.has(stem + "weight_scale") and ckpt.shape(stem + "weight_scale") in ((rows, 1), (rows,)):
            kind = "int8_channel"
        else:
            kind = None
        if kind is None:
            raise CheckpointError(f"{dtype} weight without a weight_scale_inv or a [N, 1] weight_scale",
                                  file=ckpt.file_of(name), tensor=name)
        kinds.setdefault(kind, name)
    if len(kinds) > 1:
        found = ", ".join(f"{k} ({n})" for k, n in kinds.items())
        raise CheckpointError(f"the checkpoint mixes quantization formats: {found}", file=ckpt.path)
    from_tensors = next(iter(kinds), None)
    qc = ckpt.config.quantization_config
    if not qc:
        return from_tensors
    config_file = str(ckpt.root / "config.json")
    method = qc.get("quant_method")
    if method not in QUANT_METHODS:
        raise CheckpointError(f"quantization_config.quant_method {method!r} is not supported "
                              f"(known: {', '.join(QUANT_METHODS)})", file=config_file)
    from_config = QUANT_METHODS[method]
    block = list(qc.get("weight_block_size", [BLOCK, BLOCK]))
    if from_config in ("fp8", "int8_block") and block != [BLOCK, BLOCK]:
        raise CheckpointError(f"weight_block_size {qc['weight_block_size']} is not supported (only [128, 128])",
                              file=config_file)
    if from_tensors != from_config:
        seen = f"{from_tensors} weights (e.g. {kinds[from_tensors]})" if from_tensors else "no quantized weight"
        raise CheckpointError(f"quantization_config says {method!r} but the tensors hold {seen}", file=config_file)
    return from_config
