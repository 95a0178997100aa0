"""llama.cpp GGUF files of architecture `deepseek2` (DeepSeek-V3/R1), single or split, old or new layout.

    ckpt = GGUFCheckpoint("DeepSeek-R1-Q4_K_M-00001-of-00009.gguf")   # any shard of a split set
    ckpt.config                                   # ModelConfig from the metadata (fallbacks below)
    ckpt.tensor("model.layers.0.self_attn.kv_b_proj.weight", torch.bfloat16)   # HF name, dequantized
    ckpt.ggml_experts(3)["gate"].expert(5)        # raw ggml blocks of one expert, a view of the mmap

Every shard is memory-mapped copy-on-write by gguf-py's reader; its tensor table is checked before
any view is made (type known, offset aligned, data inside the file), so a bad file fails on open
with a CheckpointError naming the shard and the tensor, not later with a bare ValueError.

How the metadata becomes a ModelConfig (and what stands in for keys older files lack):
gguf_metadata.py.
"""

from __future__ import annotations

import logging
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT, GGUFValueType

from ..errors import CheckpointError
from . import names as N
from .ggml_tensor import GGMLTensor
from .gguf_metadata import ARCH, config_from_metadata, detect_layout, tokenizer_from_metadata

log = logging.getLogger(__name__)

SPLIT_NAME = re.compile(r"(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf\Z")
HEADER_BYTES = 24  # magic, version, tensor count, metadata count
# types gguf-py hands out as typed numpy arrays (all others as uint8 blocks, BF16 included)
PLAIN_TYPES = {QT.F32: torch.float32, QT.F16: torch.float16, QT.F64: torch.float64, QT.I8: torch.int8,
               QT.I16: torch.int16, QT.I32: torch.int32, QT.I64: torch.int64}
KV_B = "kv_b"  # an HF index entry rebuilt from attn_k_b + attn_v_b


class _Shard(gguf.GGUFReader):
    """gguf-py's reader, made to check the tensor table before it builds views (it would raise a bare
    ValueError without the tensor's name, or spin on a corrupt array length), and to read metadata
    arrays fast: gguf-py makes numpy views per element, ~10 s for DeepSeek's 129k-token vocabulary."""

    def __init__(self, path: Path):
        self.path = path
        self.size = path.stat().st_size
        super().__init__(path, mode="c")  # copy-on-write: torch may view it, the file never changes

    def _get_field_parts(self, orig_offs, raw_type):
        if int(raw_type) != GGUFValueType.ARRAY or self.byte_order != "I" or sys.byteorder != "little":
            return super()._get_field_parts(orig_offs, raw_type)
        head = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
        sub, n = GGUFValueType(int(head[0][0])), int(head[1][0])
        if n > self.size - orig_offs:  # every element takes >= 1 byte
            raise ValueError(f"metadata array of {n} elements at offset {orig_offs} exceeds the file")
        start = orig_offs + 12
        if sub == GGUFValueType.STRING:  # same parts as gguf-py: [type, count, (length, bytes) * n]
            base = self.data.view(np.ndarray)
            parts, idx, o = [head[0], head[1]], [], start
            for _ in range(n):
                (length,) = struct.unpack_from("<Q", base, o)
                if o + 8 + length > self.size:
                    raise ValueError(f"metadata string at offset {o} runs past the end of the file")
                parts += [base[o:o + 8].view(np.uint64), base[o + 8:o + 8 + length]]
                idx.append(len(parts) - 1)
                o += 8 + length
            return o - orig_offs, parts, idx, [GGUFValueType.ARRAY, sub]
        if sub in self.gguf_scalar_to_np:  # one view for the whole array; contents() flattens it alike
            arr = self._get(start, self.gguf_scalar_to_np[sub], n)
            if len(arr) != n:
                raise ValueError(f"metadata array at offset {orig_offs} runs past the end of the file")
            return 12 + arr.nbytes, [head[0], head[1], arr], [2], [GGUFValueType.ARRAY, sub]
        return super()._get_field_parts(orig_offs, raw_type)

    def _build_tensors(self, start_offs, fields):
        spans = {}
        for f in fields:
            name, begin, nbytes, what = self._check_tensor(start_offs, f)
            if name in spans:
                raise CheckpointError("tensor listed twice in the header", file=str(self.path), tensor=name)
            spans[name] = (begin, nbytes, what)
        self._check_layout(spans)
        super()._build_tensors(start_offs, fields)

    def _check_layout(self, spans: dict[str, tuple[int, int, str]]) -> None:
        """Tensors lie one after the other, each padded to the alignment (as llama.cpp and gguf-py
        write them): one that overlaps the next is an error, and so is a gap of a whole alignment
        unit or more, which is what a relabelled type id leaves (its bytes no longer fill the span)."""
        order = sorted(spans.items(), key=lambda kv: kv[1][0])
        for i, (name, (begin, nbytes, what)) in enumerate(order):
            end = begin + nbytes
            nxt = order[i + 1][1][0] if i + 1 < len(order) else self.size
            if nxt < end:
                raise CheckpointError(f"its data (bytes {begin}..{end}, {what}) overlaps tensor {order[i + 1][0]} "
                                      f"at byte {nxt}", file=str(self.path), tensor=name)
            if nxt - end >= self.alignment:
                until = f"tensor {order[i + 1][0]} starts" if i + 1 < len(order) else "the file ends"
                raise CheckpointError(f"{what} takes {nbytes} bytes but {until} {nxt - begin} bytes after its start: "
                                      "wrong type id or shape?", file=str(self.path), tensor=name)

    def _check_tensor(self, start: int, field) -> tuple[str, int, int, str]:
        _, name_bytes, _, dims, raw_type, offset = field.parts
        name = bytes(name_bytes).decode("utf-8", errors="replace")

        def bad(msg: str) -> CheckpointError:
            return CheckpointError(msg, file=str(self.path), tensor=name)

        try:
            qtype = QT(int(raw_type[0]))
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise bad(f"unknown ggml type id {int(raw_type[0])}") from None
        ne = [int(d) for d in dims]
        if not 1 <= len(ne) <= 4 or min(ne) < 1:
            raise bad(f"invalid shape ne={ne}")
        if ne[0] % block:
            raise bad(f"rows of {ne[0]} elements are not whole {qtype.name} blocks of {block}")
        nbytes = int(np.prod(ne, dtype=np.int64)) // block * type_size
        off = int(offset[0])
        if off % self.alignment:
            raise bad(f"data offset {off} is not aligned to {self.alignment} bytes")
        begin = start + off
        if begin >= self.size:
            raise bad(f"data offset {begin} is past the end of the file ({self.size} bytes)")
        if begin + nbytes > self.size:
            raise bad(f"data ends at byte {begin + nbytes}, past the end of the file ({self.size} bytes): truncated?")
        return name, begin, nbytes, f"{qtype.name} ne={ne}"


def _open(path: Path) -> _Shard:
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise CheckpointError("file not found", file=str(path)) from None
    if head[:4] != b"GGUF":
        raise CheckpointError(f"not a GGUF file (starts with {head[:4]!r}, expected b'GGUF')", file=str(path))
    if len(head) < HEADER_BYTES:
        raise CheckpointError("truncated GGUF header", file=str(path))
    try:
        return _Shard(path)
    except CheckpointError:
        raise
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt or truncated GGUF header ({type(e).__name__}: {e})", file=str(path)) from None


def _value(field) -> Any:
    v = field.contents()
    if field.types == [GGUFValueType.FLOAT32]:  # back to the decimal that was written: 1e-06, not 9.99e-07
        v = float(str(np.float32(v)))
    return v


@dataclass(frozen=True)
class _Entry:
    """Where an HF tensor lives: one GGUF tensor (or one expert of it), or attn_k_b + attn_v_b."""

    kind: str  # N.SAME, N.EXPERTS or KV_B
    parts: tuple[str, ...]
    shape: tuple[int, ...]  # HF orientation
    expert: int | None = None


class GGUFCheckpoint:
    """A deepseek2 GGUF file or split set. Implements WeightSource (HF names, see names.py).

    raw(name) hands out float tensors (F32/F16/BF16) as stored; for ggml-quantized ones it raises:
    their bytes are ggml blocks, reachable with ggml_tensor(gguf_name) / ggml_experts(layer)."""

    def __init__(self, path: str | Path, *, config_json: str | Path | dict | None = None):
        self.path = str(path)
        first = Path(path)
        if not first.is_file():
            raise CheckpointError("file not found", file=self.path)
        m = SPLIT_NAME.match(first.name)
        if m and int(m["no"]) != 1:  # any shard names the set; metadata lives in the first
            first = first.with_name(f"{m['prefix']}-00001-of-{m['count']}.gguf")
        shards = [_open(first)]
        self.metadata: dict[str, Any] = _metadata(shards[0])
        shards += [_open(p) for p in self._other_shards(first, m)]
        self.shards = shards
        self.files = [str(s.path) for s in shards]
        self._tensors = self._merge(shards)
        arch = self.metadata.get("general.architecture")
        if arch != ARCH:
            raise CheckpointError(f"architecture {arch!r} is not supported (only {ARCH})", file=self.files[0])
        ne = {name: tuple(int(x) for x in t.shape) for name, (_, t) in self._tensors.items()}
        self.layout = detect_layout(ne, self.metadata)
        self.config = config_from_metadata(self.metadata, ne, source=self.files[0], config_json=config_json)
        self._check_expected(ne)
        self._hf = self._index(ne)

    # ---- opening ---------------------------------------------------------------------------
    def _other_shards(self, first: Path, m: re.Match | None) -> list[Path]:
        count = int(self.metadata.get("split.count", 1))
        named = int(m["count"]) if m else 1
        if count != named:
            raise CheckpointError(f"split.count is {count} but the file name is not NAME-00001-of-{count:05d}.gguf"
                                  if not m else f"split.count is {count} but the file name says {named} shard(s)",
                                  file=str(first))
        paths = [first.with_name(f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(2, count + 1)] if m else []
        for i, p in enumerate(paths, start=2):
            if not p.is_file():
                raise CheckpointError(f"shard {i} of {count} is missing", file=str(p))
        return paths

    def _merge(self, shards: list[_Shard]) -> dict[str, tuple[_Shard, Any]]:
        tensors: dict[str, tuple[_Shard, Any]] = {}
        count = len(shards)
        for i, s in enumerate(shards):
            if count > 1:
                no, cnt = _field(s, "split.no"), _field(s, "split.count")
                if no != i or cnt != count:
                    raise CheckpointError(f"split.no/split.count are {no}/{cnt}, expected {i}/{count}", file=str(s.path))
            for t in s.tensors:
                if t.name in tensors:
                    other, o = tensors[t.name]
                    what = ("shape/type mismatch between shards: "
                            f"{o.tensor_type.name} ne={list(map(int, o.shape))} in {other.path.name}, "
                            f"{t.tensor_type.name} ne={list(map(int, t.shape))} here"
                            if (o.tensor_type, list(o.shape)) != (t.tensor_type, list(t.shape))
                            else f"tensor is also in {other.path.name}")
                    raise CheckpointError(what, file=str(s.path), tensor=t.name)
                tensors[t.name] = (s, t)
        want = self.metadata.get("split.tensors.count")
        if want is not None and want != len(tensors):
            raise CheckpointError(f"the shards hold {len(tensors)} tensors but split.tensors.count is {want}: "
                                  "a shard is incomplete", file=str(shards[0].path))
        return tensors

    def _check_expected(self, ne: dict[str, tuple[int, ...]]) -> None:
        bias = any(n.endswith(".exp_probs_b.bias") for n in ne)
        for name, want in N.expected_tensors(self.config, self.layout, router_bias=bias):
            if name not in ne:
                raise CheckpointError("tensor missing from the file(s)", file=", ".join(self.files), tensor=name)
            if ne[name] != want:
                raise CheckpointError(f"ne={list(ne[name])} does not match the metadata (expected {list(want)})",
                                      file=self._file(name), tensor=name)

    def _index(self, ne: dict[str, tuple[int, ...]]) -> dict[str, _Entry]:
        hf: dict[str, _Entry] = {}
        for name, shape in ne.items():
            m = N.match_gguf(name)
            if m is None:
                log.debug("%s: tensor %s is outside the deepseek2 name table", self.path, name)
            elif m.kind == N.SAME:  # attn_kv_b included: a new-layout file has none
                hf[m.hf()] = _Entry(N.SAME, (name,), shape[::-1])
            elif m.kind == N.EXPERTS:
                for e in range(shape[2]):
                    hf[m.hf(e)] = _Entry(N.EXPERTS, (name,), shape[1::-1], e)
            elif m.kind == N.K_B and self.layout == N.NEW and (v_name := name.replace("attn_k_b", "attn_v_b")) in ne:
                nope, kvr, heads = shape
                hf[m.hf()] = _Entry(KV_B, (name, v_name), (heads * (nope + ne[v_name][1]), kvr))
        return hf

    # ---- WeightSource ----------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._hf)

    def has(self, name: str) -> bool:
        return name in self._hf

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def file_of(self, name: str) -> str:
        return self._file(self._entry(name).parts[0])

    def tensor(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        e = self._entry(name)
        if e.kind == KV_B:
            t = self._kv_b(e)
        else:
            t = self._numeric(e.parts[0], e.expert)
        return t if t.dtype == dtype else t.to(dtype)

    def raw(self, name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        e = self._entry(name)
        if e.kind == KV_B:
            raise CheckpointError("stored split per head as attn_k_b / attn_v_b (new GGUF layout): use tensor()",
                                  file=self.file_of(name), tensor=name)
        qtype = self._tensors[e.parts[0]][1].tensor_type
        if qtype not in PLAIN_TYPES and qtype != QT.BF16:
            raise CheckpointError(f"stored as ggml {qtype.name} blocks: use tensor() to dequantize or "
                                  f"ggml_tensor({e.parts[0]!r}) for the blocks", file=self.file_of(name), tensor=name)
        return self._numeric(e.parts[0], e.expert), {}

    def ggml_experts(self, layer: int) -> dict[str, GGMLTensor]:
        out = {}
        for role, template in N.EXPERT_ROLES.items():
            name = template.replace("{L}", str(layer))
            if name not in self._tensors:
                raise CheckpointError(f"layer {layer} has no routed experts", file=", ".join(self.files), tensor=name)
            out[role] = self.ggml_tensor(name)
        return out

    # ---- GGUF-side access ------------------------------------------------------------------
    def gguf_names(self) -> list[str]:
        return list(self._tensors)

    def ggml_tensor(self, gguf_name: str) -> GGMLTensor:
        """Any tensor's stored bytes as a read-only view of the mmap: uint8 (*reversed(ne[1:]), row_bytes)."""
        shard, t = self._gguf(gguf_name)
        data = t.data if t.data.dtype == np.uint8 else t.data.view(np.uint8)
        view = data.view()
        view.flags.writeable = False  # operators read ggml blocks in place; nothing may write them
        return GGMLTensor(gguf_name, str(shard.path), int(t.tensor_type), tuple(int(x) for x in t.shape), view)

    def source_files(self) -> list[tuple[str, int]]:
        """(file, bytes before its first tensor's data) of every shard: what a copy tool fingerprints."""
        out = []
        for s in self.shards:
            starts = [int(t.data_offset) for t in s.tensors]
            out.append((str(s.path), min(starts) if starts else s.path.stat().st_size))
        return out

    def byte_range(self, gguf_name: str) -> tuple[str, int, int]:
        """(file, offset, size) of a GGUF tensor's stored bytes: for tools that copy them unchanged."""
        shard, t = self._gguf(gguf_name)
        return str(shard.path), int(t.data_offset), int(t.n_bytes)

    def tokenizer_metadata(self) -> dict[str, Any]:
        """The `tokenizer.*` metadata: ggml.model/pre/tokens/merges/token_type, special ids, chat_template."""
        return {k: v for k, v in self.metadata.items() if k.startswith("tokenizer.")}

    def tokenizer(self):
        """tokenizer.json beside the file if there is one, else the one the metadata carries, else None."""
        folder = Path(self.files[0]).parent
        if (folder / "tokenizer.json").is_file():
            from ..tokenizer import Tokenizer

            return Tokenizer.from_dir(folder)
        if self.metadata.get("tokenizer.ggml.tokens") is None:
            return None
        return tokenizer_from_metadata(self.metadata, source=self.files[0])

    def quantization(self) -> None:
        return None  # linears are floats or GGML blocks, dequantized for the torch modules

    # ---- helpers ---------------------------------------------------------------------------
    def _entry(self, name: str) -> _Entry:
        try:
            return self._hf[name]
        except KeyError:
            raise CheckpointError("tensor not found in the GGUF file(s)", file=self.path, tensor=name) from None

    def _gguf(self, gguf_name: str):
        try:
            return self._tensors[gguf_name]
        except KeyError:
            raise CheckpointError("tensor not found in the GGUF file(s)", file=self.path, tensor=gguf_name) from None

    def _file(self, gguf_name: str) -> str:
        return str(self._gguf(gguf_name)[0].path)

    def _numeric(self, gguf_name: str, expert: int | None = None) -> torch.Tensor:
        """Values in HF orientation: a view for F32/F16/BF16 and integer types, dequantized otherwise."""
        shard, t = self._gguf(gguf_name)
        data = t.data if expert is None else t.data[expert]
        if t.tensor_type in PLAIN_TYPES:
            return torch.from_numpy(data)
        if t.tensor_type == QT.BF16:  # gguf-py hands BF16 out as bytes (…, 2*ne0)
            return torch.from_numpy(data.view(np.int16)).view(torch.bfloat16)
        try:
            return torch.from_numpy(gguf.quants.dequantize(data, t.tensor_type))
        except NotImplementedError:
            raise CheckpointError(f"gguf-py cannot dequantize ggml type {t.tensor_type.name}",
                                  file=str(shard.path), tensor=gguf_name) from None

    def _kv_b(self, e: _Entry) -> torch.Tensor:
        k_b = self._numeric(e.parts[0]).float()  # [H, kv_lora, nope] = W_UK^T per head
        v_b = self._numeric(e.parts[1]).float()  # [H, v, kv_lora]
        return torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(e.shape)


def _metadata(shard: _Shard) -> dict[str, Any]:
    try:
        return {k: _value(f) for k, f in shard.fields.items() if not k.startswith("GGUF.")}
    except (UnicodeDecodeError, ValueError, IndexError) as e:
        raise CheckpointError(f"unreadable metadata ({type(e).__name__}: {e})", file=str(shard.path)) from None


def _field(shard: _Shard, key: str) -> Any:
    f = shard.fields.get(key)
    return None if f is None else _value(f)
