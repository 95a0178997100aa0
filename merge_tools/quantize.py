"""FP8 release or BF16 checkpoint -> INT8 checkpoint in Meituan's published formats.

`quantize_checkpoint` reproduces Meituan's converters bit for bit: FP8 -> BF16 exactly as DeepSeek's
`fp8_cast_bf16` (fp32 `w_fp8 * s`, rounded to bf16 to nearest even), then BF16 -> INT8:

- block (DeepSeek-R1-Block-INT8): per 128x128 tile, in fp32 as their Triton kernel runs it:
  `s = amax / 127`, `q = int8(x / s)` (the cast truncates toward zero). Triton lowers an fp32 `/` to
  PTX `div.full.f32`, i.e. `a * rcp.approx(b)` rounded once; for every bf16 `amax` that gives
  `s = fl(amax * fl(1/127))`, and for every element but the tile's own +-amax the truncated quotient
  equals that of an exact division. For the +-amax elements the hardware reciprocal decides between
  126 and 127; `_AMAX_TRUNCATES_TO_126` lists the 16 bf16 mantissas where it gives 126. Checked
  against a Triton kernel written like theirs on an H100 (Triton 3.6): 0 differing bits over 13,504
  tiles / 219M elements, every bf16 mantissa as a tile maximum at exponents -40..12 among them (a
  tile maximum below ~2^-119 would make s subnormal: not covered). An all-zero tile stores s = 0
  and q = 0, what their kernel writes (0/0 is NaN, cast to 0); it dequantizes to exactly 0.
- channel (DeepSeek-R1-Channel-INT8): per output row, in bf16 as their PyTorch code runs it on a
  bf16 tensor: `s = bf16(amax / 127)`, `q = clamp(round_half_even(bf16(x / s)), -127, 127)`, scale
  stored as fp32 `[N, 1]` (`weight_scale`). A zero row stores s = 0, q = 0 (no NaN).

Tensors that were FP8 become INT8 (for BF16 input: the linears the FP8 release quantizes, by name);
every other tensor is copied byte for byte. The output keeps the input's shard layout and names,
and is written shard by shard with one tensor (in row chunks) in memory at a time.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from hybrid_r1.errors import CheckpointError
from hybrid_r1.formats.safetensors import DTYPES, SafetensorsCheckpoint, dequant_block, detect_quantization
from hybrid_r1.synth import publish_permissions

BLOCK = 128
ROWS_PER_CHUNK = 8 * BLOCK  # bounds the fp32 temporaries of one tensor to 1024 rows
SCHEMES = ("block", "channel")
QUANT_CONFIGS = {
    "block": {"quant_method": "blockwise_int8", "weight_block_size": [BLOCK, BLOCK], "activation_scheme": "dynamic"},
    # SGLang's W8A8Int8Config reads nothing else from here (per-token dynamic activations are implied).
    "channel": {"quant_method": "w8a8_int8", "activation_scheme": "dynamic"},
}
SCALE_NAME = {"block": "weight_scale_inv", "channel": "weight_scale"}
# For BF16 input: the projections DeepSeek's FP8 release stores in FP8 (q_proj: models without q LoRA).
LINEAR_PROJECTIONS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                      "gate_proj", "up_proj", "down_proj")
INDEX = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# bf16 mantissas (7 bits) of a tile's amax for which Triton's fp32 `amax / (amax / 127)` truncates
# to 126 rather than 127 (MUFU reciprocal rounding, measured on H100, sm_90, Triton 3.6).
_AMAX_TRUNCATES_TO_126 = (3, 18, 19, 22, 23, 24, 33, 48, 49, 81, 85, 87, 95, 112, 113, 116)
_ST_DTYPE = {dtype: name for name, dtype in DTYPES.items()}


# ---- the two weight formulas ---------------------------------------------------------------------
def quantize_block(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 [N, K] -> (int8 [N, K], fp32 [ceil(N/128), ceil(K/128)]) as Meituan's Triton converter."""
    n, k = w.shape
    nb, kb = -(-n // BLOCK), -(-k // BLOCK)
    x = torch.zeros(nb * BLOCK, kb * BLOCK, dtype=torch.float32)  # tail tiles zero-padded, as masked loads read them
    x[:n, :k] = w.to(torch.bfloat16)
    tiles = x.view(nb, BLOCK, kb, BLOCK)
    amax = tiles.abs().amax(dim=(1, 3), keepdim=True)  # [nb, 1, kb, 1], bf16 values held exactly in fp32
    s = amax * torch.tensor(1 / 127, dtype=torch.float32)  # == div.full.f32(amax, 127) for every bf16 amax
    q = tiles.div(torch.where(s > 0, s, 1.0)).trunc_()  # a zero tile divides 0 by 1: q = 0, s = 0
    qmax = torch.full((128,), 127.0)
    qmax[list(_AMAX_TRUNCATES_TO_126)] = 126.0
    top = qmax[amax.to(torch.bfloat16).view(torch.int16).long() & 0x7F]  # by amax's 7-bit bf16 mantissa
    q = torch.where(tiles.abs() == amax, tiles.sign() * top, q)
    return q.view(nb * BLOCK, kb * BLOCK)[:n, :k].to(torch.int8), s.view(nb, kb)


def quantize_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 [N, K] -> (int8 [N, K], fp32 [N, 1]) as Meituan's converter computes it on bf16 tensors."""
    x = w.to(torch.bfloat16)
    s = (x.abs().amax(dim=1, keepdim=True).float() / 127).to(torch.bfloat16)  # the bf16 op rounds its fp32 result
    y = x.float().div(torch.where(s > 0, s, 1).float()).to(torch.bfloat16)  # likewise bf16(x / s); zero row: 0 / 1
    return y.float().round().clamp(-127, 127).to(torch.int8), s.float()  # torch.round: half to even


def quantize_weight(w: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One weight [N, K] (taken as bf16, as the converter sees it) -> (int8, fp32 scale) of `scheme`,
    bit for bit what `quantize_checkpoint` writes. Used to quantize while loading."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    quantize = quantize_block if scheme == "block" else quantize_channel
    parts = [quantize(w[r0 : r0 + ROWS_PER_CHUNK]) for r0 in range(0, max(w.shape[0], 1), ROWS_PER_CHUNK)]
    return torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts])


# ---- conversion of a checkpoint ------------------------------------------------------------------
@dataclass
class ShardReport:
    """One output shard written (for progress lines)."""

    number: int
    total: int
    file: str
    quantized: int
    copied: int
    bytes_in: int
    bytes_out: int
    seconds: float


@dataclass
class QuantizeReport:
    output: Path
    scheme: str
    source: str  # "fp8" or "bf16"
    shards: int
    quantized: int
    copied: int
    bytes_out: int
    seconds: float
    copied_files: list[str]


def quantize_checkpoint(input_dir: str | Path, output_dir: str | Path, scheme: str, *, force: bool = False,
                        progress: Callable[[ShardReport], None] | None = None) -> QuantizeReport:
    """Convert the checkpoint folder `input_dir` (FP8 release or BF16) to INT8 `scheme` at `output_dir`.

    Written to a temporary folder next to the output and renamed at the end; nothing is left behind
    on failure. The input is only read."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    src, out = Path(input_dir), Path(output_dir)
    _check_paths(src, out, force)
    ckpt = SafetensorsCheckpoint(src)
    kind = detect_quantization(ckpt)
    if kind not in ("fp8", None):
        raise CheckpointError(f"the input is already quantized ({kind}); give the FP8 release or a BF16 checkpoint",
                              file=str(src))
    source = "fp8" if kind == "fp8" else "bf16"
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        plans, order = _plan(ckpt, source, scheme)
        weight_map: dict[str, str] = {}
        quantized = copied = total = 0
        for i, (fname, entries) in enumerate(plans.items()):
            ts = time.perf_counter()
            nbytes = _write_shard(tmp / fname, entries, ckpt, source, scheme)
            nq = sum(e.kind == "quantize" for e in entries)
            nc = sum(e.kind == "copy" for e in entries)
            quantized, copied, total = quantized + nq, copied + nc, total + nbytes
            weight_map.update({e.name: fname for e in entries})
            if progress:
                progress(ShardReport(i + 1, len(plans), fname, nq, nc, sum(e.bytes_in for e in entries), nbytes,
                                     time.perf_counter() - ts))
        if (src / INDEX).is_file():
            index = {"metadata": {"total_size": total}, "weight_map": {n: weight_map[n] for n in order}}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        config = json.loads((src / "config.json").read_text())
        config["quantization_config"] = dict(QUANT_CONFIGS[scheme])
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copied_files = _copy_small_files(src, tmp, set(plans))
        publish_permissions(tmp)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return QuantizeReport(out, scheme, source, len(plans), quantized, copied, total, time.perf_counter() - t0,
                          copied_files)


def _check_paths(src: Path, out: Path, force: bool) -> None:
    if not src.is_dir():
        raise CheckpointError("input folder not found", file=str(src))
    if not (src / "config.json").is_file():
        raise CheckpointError("not a checkpoint: no config.json in the input folder", file=str(src))
    s, o = src.resolve(), out.resolve()
    if o == s or s in o.parents:
        raise CheckpointError(f"the output {out} is inside the input folder; choose a folder outside it", file=str(src))
    if o in s.parents:
        raise CheckpointError(f"the output {out} contains the input folder; --force would delete it", file=str(src))
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")


@dataclass
class _Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    kind: str  # "copy", "quantize" (the int8 weight) or "scale" (its scale, written right after it)
    bytes_in: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _plan(ckpt: SafetensorsCheckpoint, source: str, scheme: str) -> tuple[dict[str, list[_Entry]], list[str]]:
    """Per output shard (named as the input's), the tensors to write in order; and every output
    name in the input's order (for the index)."""
    plans: dict[str, list[_Entry]] = {}
    order: list[str] = []
    names = set(ckpt.names())
    for name in ckpt.names():
        file = ckpt.file_of(name)
        shard = plans.setdefault(Path(file).name, [])
        dtype, shape = ckpt.dtype(name), ckpt.shape(name)
        size = math.prod(shape) * dtype.itemsize
        if name.endswith(".weight_scale_inv") and _quantizes(ckpt, name[: -len("_scale_inv")], source):
            continue  # an FP8 scale: consumed with its weight
        if not _quantizes(ckpt, name, source):
            shard.append(_Entry(name, dtype, shape, "copy", size))
            order.append(name)
            continue
        if len(shape) != 2:
            raise CheckpointError(f"a linear weight must be 2-D, got shape {list(shape)}", file=file, tensor=name)
        n, k = shape
        blocks = (-(-n // BLOCK), -(-k // BLOCK))
        if source == "fp8":
            fp8_scale = ckpt.raw(name)[1].get("weight_scale_inv")
            if fp8_scale is None:
                raise CheckpointError("FP8 weight without its weight_scale_inv", file=file, tensor=name)
            if tuple(fp8_scale.shape) != blocks:
                raise CheckpointError(f"weight_scale_inv has shape {list(fp8_scale.shape)}, expected {list(blocks)}",
                                      file=file, tensor=name)
        stem = name[: -len("weight")]
        if source == "bf16" and any(stem + suffix in names for suffix in SCALE_NAME.values()):
            raise CheckpointError("a BF16 weight that already has a scale tensor", file=file, tensor=name)
        scale = stem + SCALE_NAME[scheme]
        shard.append(_Entry(name, torch.int8, shape, "quantize", size))
        shard.append(_Entry(scale, torch.float32, blocks if scheme == "block" else (n, 1), "scale"))
        order += [name, scale]
    return {f: plans[f] for f in sorted(plans)}, order


def _quantizes(ckpt: SafetensorsCheckpoint, name: str, source: str) -> bool:
    if not ckpt.has(name):
        return False
    dtype = ckpt.dtype(name)
    if source == "fp8":
        return dtype == torch.float8_e4m3fn
    if not name.endswith(".weight") or name.split(".")[-2] not in LINEAR_PROJECTIONS:
        return False
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise CheckpointError(f"unexpected dtype {dtype} for a linear weight of a BF16 checkpoint",
                              file=ckpt.file_of(name), tensor=name)
    return True


def _write_shard(path: Path, entries: list[_Entry], ckpt: SafetensorsCheckpoint, source: str, scheme: str) -> int:
    """Stream one safetensors file: the header (every shape is known up front), then each tensor."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": _ST_DTYPE[e.dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # keeps the data 8-byte aligned, as safetensors' own writer does
    scales: list[torch.Tensor] = []
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for e in entries:
            if e.kind == "copy":
                chunks: Iterator[torch.Tensor] | list[torch.Tensor] = [ckpt.raw(e.name)[0]]
            elif e.kind == "quantize":
                scales = []
                chunks = _quantized_rows(ckpt, e.name, source, scheme, scales)
            else:  # the scale of the weight just written
                chunks = [torch.cat(scales)]
            written = sum(f.write(_bytes(t)) for t in chunks)
            assert written == e.nbytes, (e.name, written, e.nbytes)
    return offset


def _quantized_rows(ckpt: SafetensorsCheckpoint, name: str, source: str, scheme: str,
                    scales: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    """int8 rows of `name`, ROWS_PER_CHUNK at a time (tiles and rows are independent); appends each
    chunk's scale rows to `scales`."""
    w, extra = ckpt.raw(name)
    quantize = quantize_block if scheme == "block" else quantize_channel
    for r0 in range(0, w.shape[0], ROWS_PER_CHUNK):
        rows = w[r0 : r0 + ROWS_PER_CHUNK]
        if source == "fp8":  # DeepSeek's fp8_cast_bf16: fp32 product, rounded to bf16 below
            s = extra["weight_scale_inv"][r0 // BLOCK : -(-(r0 + rows.shape[0]) // BLOCK)]
            rows = dequant_block(rows, s, name=name, file=ckpt.file_of(name))
        q, s = quantize(rows.to(torch.bfloat16))
        scales.append(s)
        yield q


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _copy_small_files(src: Path, dst: Path, shards: set[str]) -> list[str]:
    """Tokenizer, generation config, model code...: every top-level file that is not a weight file."""
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name not in shards and f.name not in ("config.json", INDEX) \
                and not f.name.endswith(WEIGHT_SUFFIXES):
            shutil.copyfile(f, dst / f.name)
            copied.append(f.name)
    return copied


def _replace(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place; an existing output (--force) is moved aside first."""
    if not out.exists():
        tmp.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    out.rename(old / out.name)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
