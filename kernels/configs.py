"""Tile configs for the INT8 GEMM and the fused MoE: tuned tables per GPU arch, looked up by shape
and M bucket; a heuristic default where no table or shape matches. Nothing is tuned at run time, so
the first call of a shape compiles one kernel instead of running an autotune sweep.

  linears    configs/int8_<scheme>_<arch>.json  key "N,K" or "glu,N,K"   (benchmarks/tune_int8.py)
  fused MoE  configs/moe_<scheme>_<arch>.json   key "E,N,K" or "glu,E,N,K", M = tokens
                                                 (benchmarks/tune_fused_moe.py; scheme bf16 too)
File format: {"meta": {...who tuned, where}, "configs": {"<key>": {"<M bucket>": {config}}}} with
N = output columns and each config the fields of GemmConfig.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).parent / "configs"
M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_extra: dict[tuple[str, str], dict] = {}  # tables registered at run time (tuner, benchmarks)


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    BLOCK_M: int = 64
    BLOCK_N: int = 128
    BLOCK_K: int = 128
    GROUP_M: int = 8
    SPLIT_K: int = 1
    num_warps: int = 4
    num_stages: int = 3
    FUSED: bool = False  # the linear wrappers quantize the activation inside the GEMM
    PAIRED: bool = False  # block scheme: two K tiles a step, dots issued before scaling

    @classmethod
    def from_dict(cls, d: dict) -> "GemmConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown GEMM config keys {sorted(unknown)}")
        return cls(**d)


def m_bucket(M: int) -> int:
    return next((b for b in M_BUCKETS if b >= M), M_BUCKETS[-1])


def shape_key(N: int, K: int, glu: bool) -> str:
    return f"glu,{N},{K}" if glu else f"{N},{K}"


def arch_of(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


@functools.lru_cache(maxsize=None)
def _file_table(stem: str, arch: str) -> dict:
    path = CONFIG_DIR / f"{stem}_{arch}.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text())["configs"]


def register_configs(scheme: str, arch: str, table: dict, family: str = "int8") -> None:
    """Use `table` ({"configs": ...} or the inner mapping) ahead of the shipped file
    configs/<family>_<scheme>_<arch>.json for this process (family "int8" or "moe")."""
    _extra[(f"{family}_{scheme}", arch)] = table.get("configs", table)
    _lookup.cache_clear()
    _moe_lookup.cache_clear()


def _from_table(stem: str, arch: str, key: str, bucket: int) -> GemmConfig | None:
    for table in (_extra.get((stem, arch), {}), _file_table(stem, arch)):
        entry = table.get(key)
        if entry:
            buckets = sorted(int(b) for b in entry)
            b = next((x for x in buckets if x >= bucket), buckets[-1])
            return GemmConfig.from_dict(entry[str(b)])
    return None


def _stages(smem: int, stage_bytes: int) -> int:
    return max(2, min(4, (smem - 8192) // stage_bytes))


@functools.lru_cache(maxsize=None)
def device_limits(device: torch.device) -> tuple[int, int]:
    if device.type != "cuda":
        return 132, 227 * 1024
    props = torch.cuda.get_device_properties(device)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 96 * 1024
    return props.multi_processor_count, smem


def default_config(scheme: str, N: int, K: int, M: int, glu: bool, device: torch.device) -> GemmConfig:
    """Heuristic where no tuned table matches: the tile shapes that won most often in the H100 tuning
    run (kernels/configs/int8_*_sm90.json), stages sized from the device's shared memory."""
    sms, smem = device_limits(device)
    block = scheme == "block"
    if M <= 16:  # decode: thin tiles, split-K below fills the SMs
        bm, bn, bk, warps = 16, 64 if block else 32, 128 if block else 256, 4
    elif M <= 64:
        bm, bn, bk, warps = 32, 64, 128, 4
    elif M <= 256 or (block and M <= 1024):
        bm, bn, bk, warps = 64, 128, 128, 4
    elif block:
        bm, bn, bk, warps = 128, 128, 128, 8  # 8 warps: with 4, acc + dot tile spill
    else:
        bm, bn, bk, warps = 128, 256, 128, 8
    stages = _stages(smem, bm * bk + bn * bk * (2 if glu else 1))
    split = 1
    tiles = -(-M // bm) * -(-N // bn)
    if tiles < sms:
        # Fill about two waves, keeping at least 4 K tiles per split so the pipeline has depth.
        split = max(1, min(-(-2 * sms // tiles), K // bk // 4, 16))
    # Fusing the activation quant re-quantizes A in every N tile: it lost almost everywhere when
    # tuned, so the default quantizes once, separately.
    return GemmConfig(bm, bn, bk, 8, split, warps, stages, False)


@functools.lru_cache(maxsize=4096)
def _lookup(scheme: str, N: int, K: int, bucket: int, glu: bool, device: torch.device) -> GemmConfig:
    found = _from_table(f"int8_{scheme}", arch_of(device), shape_key(N, K, glu), bucket)
    return found or default_config(scheme, N, K, bucket, glu, device)


def get_config(scheme: str, N: int, K: int, M: int, glu: bool, device: torch.device) -> GemmConfig:
    if scheme not in ("block", "channel"):
        raise ValueError(f"scheme must be 'block' or 'channel', got {scheme!r}")
    return _lookup(scheme, N, K, m_bucket(M), glu, device)


# ------------------------------------------------------------------------- fused MoE -----

MOE_SCHEMES = ("block", "channel", "bf16")


def moe_shape_key(E: int, N: int, K: int, glu: bool) -> str:
    return f"glu,{E},{N},{K}" if glu else f"{E},{N},{K}"


def default_moe_config(scheme: str, E: int, N: int, K: int, M: int, top_k: int, glu: bool,
                       device: torch.device) -> GemmConfig:
    """Heuristic where no tuned table matches, sized by the mean rows per expert (M * top_k / E):
    thin row tiles while most experts see a handful of tokens (decode), square tiles once each
    expert's weight tile is reused by many rows."""
    _, smem = device_limits(device)
    rows = -(-M * top_k // E)
    elt = 2 if scheme == "bf16" else 1
    if rows <= 16:
        bm, bn, warps, group = 16, 64, 4, 1
    elif rows <= 32:
        bm, bn, warps, group = 32, 64, 4, 1
    elif rows <= 64:
        bm, bn, warps, group = 64, 64, 4, 8
    else:
        bm, bn, warps, group = (64 if scheme == "block" else 128), 128, 8, 8
    bk = 128 if scheme == "block" or elt == 1 else 64
    stages = _stages(smem, (bm * bk + bn * bk * (2 if glu else 1)) * elt)
    return GemmConfig(bm, bn, bk, group, 1, warps, stages, False)


@functools.lru_cache(maxsize=4096)
def _moe_lookup(scheme, E, N, K, bucket, top_k, glu, device) -> GemmConfig:
    found = _from_table(f"moe_{scheme}", arch_of(device), moe_shape_key(E, N, K, glu), bucket)
    return found or default_moe_config(scheme, E, N, K, bucket, top_k, glu, device)


def get_moe_config(scheme: str, E: int, N: int, K: int, M: int, top_k: int, glu: bool,
                   device: torch.device) -> GemmConfig:
    """Config of one fused-MoE projection: E experts, N output columns, K inputs, M tokens."""
    if scheme not in MOE_SCHEMES:
        raise ValueError(f"scheme must be one of {MOE_SCHEMES}, got {scheme!r}")
    return _moe_lookup(scheme, E, N, K, m_bucket(M), top_k, glu, device)
