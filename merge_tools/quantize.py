"""FP8 release or BF16 checkpoint -> INT8 checkpoint in Meituan's published formats.

`quantize_checkpoint` reproduces Meituan's converters bit for bit: FP8 -> BF16 exactly as DeepSeek's
`fp8_cast_bf16` (fp32 `w_fp8 * s`, rounded to bf16 to nearest even), then BF16 -> INT8 with the
formulas of hybrid_r1.quant (block: per 128x128 tile, their Triton kernel's fp32 division
reproduced; channel: per output row, in bf16), whose docstring derives them.

Tensors that were FP8 become INT8 (for BF16 input: the linears the FP8 release quantizes, by name);
every other tensor is copied byte for byte. The output keeps the input's shard layout and names,
and is written shard by shard with one tensor (in row chunks) in memory at a time, into a staging
folder published at the end (hybrid_r1.staging: what a kill leaves, --force's atomic replacement).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from hybrid_r1.errors import CheckpointError
from hybrid_r1.formats.safetensors import SafetensorsCheckpoint, detect_quantization
from hybrid_r1.formats.safetensors_writer import INDEX, SafetensorsWriter, TensorSpec, write_index
from hybrid_r1.quant import (BLOCK, FP8_SCALE_SUFFIX, ROWS_PER_CHUNK, SCALE_SUFFIX, SCHEMES, dequant_block,
                             quantize_block, quantize_channel, quantize_weight, scheme_of)
from hybrid_r1.staging import OutputExistsError, staged_output

__all__ = ["quantize_block", "quantize_channel", "quantize_weight", "quantize_checkpoint", "QUANT_CONFIGS"]
QUANT_CONFIGS = {name: s.quant_config() for name, s in SCHEMES.items()}
# For BF16 input: the projections DeepSeek's FP8 release stores in FP8 (q_proj: models without q LoRA).
LINEAR_PROJECTIONS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                      "gate_proj", "up_proj", "down_proj")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


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

    Written to a staging folder next to the output and published at the end (hybrid_r1.staging);
    nothing is left behind on failure. The input is only read."""
    scheme_of(scheme)
    src, out = Path(input_dir), Path(output_dir)
    _check_paths(src, out, force)
    ckpt = SafetensorsCheckpoint(src)
    kind = detect_quantization(ckpt)
    if kind not in ("fp8", None):
        raise CheckpointError(f"the input is already quantized ({kind}); give the FP8 release or a BF16 checkpoint",
                              file=str(src))
    source = "fp8" if kind == "fp8" else "bf16"
    t0 = time.perf_counter()
    plans, order = _plan(ckpt, source, scheme)
    needed = sum(e.nbytes for entries in plans.values() for e in entries)
    with staged_output(out, force=force, needed_bytes=needed, untouched=src) as tmp:
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
            write_index(tmp, {n: weight_map[n] for n in order}, total)
        config = json.loads((src / "config.json").read_text())
        config["quantization_config"] = dict(QUANT_CONFIGS[scheme])
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copied_files = _copy_small_files(src, tmp, set(plans))
    return QuantizeReport(out, scheme, source, len(plans), quantized, copied, total, time.perf_counter() - t0,
                          copied_files)


def _check_paths(src: Path, out: Path, force: bool) -> None:
    if not src.exists():
        raise CheckpointError("the input does not exist", file=str(src))
    if not src.is_dir():
        raise CheckpointError("the input is a file, not a checkpoint folder (quantize reads a Hugging Face "
                              "safetensors folder: config.json and .safetensors shards)", file=str(src))
    if not (src / "config.json").is_file():
        raise CheckpointError("not a checkpoint: no config.json in the input folder", file=str(src))
    s, o = src.resolve(), out.resolve()
    if o == s or s in o.parents:
        raise CheckpointError(f"the output {out} is inside the input folder; choose a folder outside it", file=str(src))
    if o in s.parents:
        raise CheckpointError(f"the output {out} contains the input folder; --force would delete it", file=str(src))
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; pass --force to replace it", out)


@dataclass(frozen=True)
class _Entry(TensorSpec):
    """One output tensor and where its bytes come from."""

    kind: str = "copy"  # "copy", "quantize" (the int8 weight) or "scale" (its scale, written right after it)
    bytes_in: int = 0


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
        if name.endswith("." + FP8_SCALE_SUFFIX) and _quantizes(ckpt, name[: -len("_scale_inv")], source):
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
            fp8_scale = ckpt.raw(name)[1].get(FP8_SCALE_SUFFIX)
            if fp8_scale is None:
                raise CheckpointError("FP8 weight without its weight_scale_inv", file=file, tensor=name)
            if tuple(fp8_scale.shape) != blocks:
                raise CheckpointError(f"weight_scale_inv has shape {list(fp8_scale.shape)}, expected {list(blocks)}",
                                      file=file, tensor=name)
        stem = name[: -len("weight")]
        if source == "bf16" and any(stem + suffix in names for suffix in SCALE_SUFFIX.values()):
            raise CheckpointError("a BF16 weight that already has a scale tensor", file=file, tensor=name)
        scale = stem + SCALE_SUFFIX[scheme]
        shard.append(_Entry(name, torch.int8, shape, "quantize", size))
        shard.append(_Entry(scale, torch.float32, SCHEMES[scheme].scale_shape(n, k), "scale"))
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
    scales: list[torch.Tensor] = []
    with SafetensorsWriter(path, entries, {"format": "pt"}) as f:
        for e in entries:
            if e.kind == "copy":
                chunks: Iterator[torch.Tensor] | list[torch.Tensor] = [ckpt.raw(e.name)[0]]
            elif e.kind == "quantize":
                scales = []
                chunks = _quantized_rows(ckpt, e.name, source, scheme, scales)
            else:  # the scale of the weight just written
                chunks = [torch.cat(scales)]
            for t in chunks:
                f.write(e.name, t)
    return sum(e.nbytes for e in entries)


def _quantized_rows(ckpt: SafetensorsCheckpoint, name: str, source: str, scheme: str,
                    scales: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    """int8 rows of `name`, ROWS_PER_CHUNK at a time (tiles and rows are independent); appends each
    chunk's scale rows to `scales`."""
    w, extra = ckpt.raw(name)
    quantize = quantize_block if scheme == "block" else quantize_channel
    for r0 in range(0, w.shape[0], ROWS_PER_CHUNK):
        rows = w[r0 : r0 + ROWS_PER_CHUNK]
        if source == "fp8":  # DeepSeek's fp8_cast_bf16: fp32 product, rounded to bf16 below
            s = extra[FP8_SCALE_SUFFIX][r0 // BLOCK : -(-(r0 + rows.shape[0]) // BLOCK)]
            rows = dequant_block(rows, s, name=name, file=ckpt.file_of(name))
        q, s = quantize(rows.to(torch.bfloat16))
        scales.append(s)
        yield q


def _copy_small_files(src: Path, dst: Path, shards: set[str]) -> list[str]:
    """Tokenizer, generation config, model code...: every top-level file that is not a weight file."""
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name not in shards and f.name not in ("config.json", INDEX) \
                and not f.name.endswith(WEIGHT_SUFFIXES):
            shutil.copyfile(f, dst / f.name)
            copied.append(f.name)
    return copied
