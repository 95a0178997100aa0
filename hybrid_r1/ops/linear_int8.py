"""W8A8 INT8 linears (Meituan layout): Triton kernels on CUDA, the torch reference on the CPU.

Weights load as stored in an INT8 checkpoint (block: `weight_scale_inv` [ceil(N/128), ceil(K/128)];
channel: `weight_scale` [N, 1]) or are quantized while loading from a BF16/FP8 checkpoint with the
same formulas the converter uses. Activations are quantized per call (per token per 128-group, or
per token), rounding to nearest even unless the rule says `rounding: trunc`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..formats.source import WeightSource, check_tensor
from .base import LinearOperator, OpArgs, Shard

from ..quant import BLOCK
from ..quant import SCALE_SUFFIX as SCHEMES  # scheme -> scale tensor suffix

ROUNDINGS = ("nearest_even", "trunc")


@dataclass(frozen=True)
class Int8Args(OpArgs):
    rounding: Literal["nearest_even", "trunc"] = "nearest_even"  # of the activation quantization


def int8_weight(source: WeightSource, name: str, shape: tuple[int, int], scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, fp32 scales) of `name` in `scheme`: stored INT8 comes with its scale tensor as
    it is; anything else (BF16, FP8, GGML blocks) is quantized from its dequantized values, exactly
    as the converter would (a GGUF's experts: dequantize, then requantize)."""
    check_tensor(source, name, shape)
    prefix = name[: -len(".weight")]
    has_scale = any(source.has(f"{prefix}.{suffix}") for suffix in SCHEMES.values())
    stored, extra = source.raw(name) if has_scale else (None, {})
    if stored is not None and stored.dtype == torch.int8:
        scale = extra.get(SCHEMES[scheme])
        if scale is None:
            found = ", ".join(extra) or "no scale"
            raise CheckpointError(f"an int8 {scheme} weight needs {SCHEMES[scheme]}, found {found}: "
                                  f"the checkpoint is quantized with another scheme", file=source.path, tensor=name)
        return stored, scale.float()
    from ..quant import quantize_weight

    return quantize_weight(source.tensor(name, torch.bfloat16), scheme)


def quant_dequant_activation(x: torch.Tensor, group: int | None, rounding: str, dtype: torch.dtype) -> torch.Tensor:
    """x as the INT8 kernels see it: quantized per token per `group` channels (None: per token), in
    fp32 as they do, then dequantized in `dtype` (the CPU paths' reference for W8A8)."""
    from hybrid_r1_kernels.reference import act_quant_ref

    q, s = act_quant_ref(x, group, rounding)
    g = group or x.shape[-1]
    if x.shape[-1] % g:  # a partial last group: expand the scales instead of reshaping
        return q.to(dtype) * s.to(dtype).repeat_interleave(g, -1)[..., : x.shape[-1]]
    return (q.to(dtype).unflatten(-1, (-1, g)) * s.to(dtype)[..., None]).flatten(-2)


def slice_int8(q: torch.Tensor, s: torch.Tensor, scheme: str, shard: Shard, name: str):
    """This rank's rows (dim 0) or columns (dim 1) of an int8 [N, K] weight quantized whole, with
    the scales that go with them: block scales by 128-tiles (the split must fall on tile edges),
    channel scales by row. So a rank's slice is bit-identical to that part of one GPU's weight."""
    align = BLOCK if scheme == "block" else 1
    try:
        lo, hi = shard.bounds(q.shape[shard.dim], align)
    except ValueError as e:
        raise CheckpointError(f"cannot split for tensor parallelism: {e}", tensor=name) from None
    q = q.narrow(shard.dim, lo, hi - lo)
    if scheme == "block":
        s = s.narrow(shard.dim, lo // BLOCK, (hi - lo) // BLOCK)
    elif shard.dim == 0:
        s = s.narrow(0, lo, hi - lo)
    return q, s


class Int8Linear(LinearOperator):
    scheme = ""  # set by subclasses
    Args = Int8Args
    shardable = True

    def __init__(self, in_features: int, out_features: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.bfloat16, rounding: str = "nearest_even"):
        super().__init__()
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be nearest_even or trunc, got {rounding!r}")
        self.in_features, self.out_features = in_features, out_features
        self.device, self.dtype, self.rounding = torch.device(device), dtype, rounding
        self.weight: torch.Tensor | None = None  # int8 [N, K]
        self.weight_scale: torch.Tensor | None = None  # fp32, layout per scheme
        self._cpu_dense: torch.Tensor | None = None  # fp32 dequantized weight, CPU path only
        self.glu = False  # fused gate+up: weight = cat(gate, up), output silu(gate) * up
        # Row-parallel under tensor parallelism (Shard dim 1): the output is this rank's partial
        # sum, kept in fp32 so the ranks' total rounds once to the run dtype (parallel.py).
        self.partial = False

    @classmethod
    def from_module(cls, module: nn.Linear, device, dtype, args: Int8Args) -> "Int8Linear":
        return cls(module.in_features, module.out_features, device, dtype, args.rounding)

    def planned_bytes(self, source, prefix: str, config) -> int:
        n, k = self.out_features, self.in_features
        scales = -(-n // BLOCK) * -(-k // BLOCK) if self.scheme == "block" else n
        return n * k + 4 * scales  # int8 weight, fp32 scales

    @classmethod
    def source_problem(cls, source: WeightSource, prefix: str) -> str | None:
        """Stored INT8 of the other scheme cannot be run as this one (its scales mean something else)."""
        other = [s for k, s in SCHEMES.items() if k != cls.scheme and source.has(f"{prefix}.{s}")]
        if other and not source.has(f"{prefix}.{SCHEMES[cls.scheme]}"):
            return (f"the checkpoint stores this linear as INT8 with {other[0]} (the other scheme); "
                    f"use linear.int8_{'channel' if cls.scheme == 'block' else 'block'}")
        return None

    def load_weights(self, source: WeightSource, prefix: str, shard: Shard | None = None) -> None:
        name = prefix + ".weight"
        q, s = int8_weight(source, name, (self.out_features, self.in_features), self.scheme)
        if shard is not None:  # quantized whole first: a rank's slice is bit-identical to one GPU's
            q, s = self._slice(q, s, shard, name)
            self.partial = shard.dim == 1
        self.weight = q.to(self.device).contiguous()
        self.weight_scale = s.to(self.device).contiguous()

    def _slice(self, q: torch.Tensor, s: torch.Tensor, shard: Shard, name: str):
        q, s = slice_int8(q, s, self.scheme, shard, name)
        self.out_features, self.in_features = q.shape
        return q, s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cuda":
            from hybrid_r1_kernels import int8_linear as k

            if self.glu:
                fn = k.int8_block_gate_up if self.scheme == "block" else k.int8_channel_gate_up
            else:
                fn = k.int8_block_linear if self.scheme == "block" else k.int8_channel_linear
            return fn(x, self.weight, self.weight_scale, rounding=self.rounding,
                      out_dtype=torch.float32 if self.partial else x.dtype)
        y = self._cpu_forward(x)
        if self.glu:
            gate, up = y.chunk(2, -1)
            y = F.silu(gate) * up
        return y

    def fuse_rows(self, other: "Int8Linear", glu: bool = False) -> "Int8Linear | None":
        """One operator computing [self; other] (or silu(self) * other with glu) in one GEMM, or
        None where the layouts do not allow it (another scheme, device or rounding; block scales
        need self's rows to end on a 128-row tile)."""
        if (type(other) is not type(self) or other.device != self.device or other.rounding != self.rounding
                or other.in_features != self.in_features or self.glu or other.glu
                or (self.scheme == "block" and self.out_features % BLOCK)
                or (glu and self.out_features != other.out_features)):
            return None
        fused = type(self)(self.in_features, self.out_features + other.out_features, self.device, self.dtype,
                           self.rounding)
        fused.weight = torch.cat([self.weight, other.weight])
        fused.weight_scale = torch.cat([self.weight_scale, other.weight_scale])
        fused.glu = glu
        return fused

    def _cpu_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same W8A8 function on the CPU: quantize-dequantize the activation exactly as the
        kernels do, then one matmul with the dequantized weight (kept after the first call). Each
        int8 tile product is exact in fp32 either way; only the order of the fp32 sums differs. A
        float64 run sums in float64 (the products of int8 and fp32 scales are exact there)."""
        wide = torch.float64 if x.dtype == torch.float64 else torch.float32
        if self._cpu_dense is None or self._cpu_dense.dtype != wide:
            from ..quant import dequant_int8

            self._cpu_dense = dequant_int8(self.weight, {SCHEMES[self.scheme]: self.weight_scale}).to(wide)
        xd = quant_dequant_activation(x, BLOCK if self.scheme == "block" else None, self.rounding, wide)
        y = F.linear(xd, self._cpu_dense)
        return y if self.partial else y.to(x.dtype)

    def dense_weight(self) -> torch.Tensor:
        """Dequantized [N, K] weight in the run dtype (the absorbed attention reads kv_b_proj so)."""
        from ..quant import dequant_int8

        return dequant_int8(self.weight, {SCHEMES[self.scheme]: self.weight_scale}).to(self.dtype)

    def extra_repr(self) -> str:
        glu = ", silu(gate)*up" if self.glu else ""
        return f"{self.in_features} -> {self.out_features}{glu}, {self.scheme}, {self.device}, rounding={self.rounding}"


class Int8BlockLinear(Int8Linear):
    """Block-wise W8A8: 128x128 weight tiles, activations per token per 128 channels."""

    name = "linear.int8_block"
    scheme = "block"


class Int8ChannelLinear(Int8Linear):
    """Channel-wise W8A8: one scale per output row, one per token; int32 accumulation."""

    name = "linear.int8_channel"
    scheme = "channel"
