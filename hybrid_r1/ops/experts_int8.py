"""Routed experts of one MoE layer as INT8 on a GPU, computed by the fused MoE kernel
(kernels/fused_moe.py): all selected experts in one launch per projection, no host sync, so a
decode step keeps them inside its CUDA graph.

Weights: the checkpoint's INT8 experts as stored (Meituan's releases quantize the experts too), or
any other source quantized while loading with the converter's formulas (BF16/FP8, or a GGUF's
experts dequantized then requantized: the fidelity of a GGML type plus INT8's). The layer's experts
are stacked on the device one expert at a time: W13 [E, 2I, H] = cat(gate, up), W2 [E, H, I], with
block (128x128) or channel scales in the kernel's layout.

Tensor parallelism (hybrid_r1/parallel.py) splits every expert's intermediate dimension: a rank
holds rows [lo, hi) of each gate and up and the same columns of down, for all experts, and returns
its partial sum (the MoE block's all-reduce adds the ranks'). Each rank then reads 1/N of every
chosen expert whatever the routing, where expert parallelism would leave the rank that owns the
step's most-used experts as the slowest (benchmarks/bench_fused_moe.py --tp measures both).

On the CPU the same function runs in torch (activations quantized as the kernel does, dequantized
weights): slow, for the CPU (gloo) tensor-parallel mode and the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..formats.source import WeightSource
from ..quant import scheme_of
from .base import OpArgs, Operator, Shard
from .linear_int8 import int8_weight, quant_dequant_activation, slice_int8


@dataclass(frozen=True)
class Int8ExpertsArgs(OpArgs):
    scheme: Literal["block", "channel"] = "block"
    rounding: Literal["nearest_even", "trunc"] = "nearest_even"  # of the activation quantization


class Int8GPUExperts(Operator):
    """Same call as the model's Experts: (x [T, hidden], idx [T, k], w [T, k]) -> [T, hidden]."""

    name = "experts.int8_gpu"
    replaces = "Experts"
    Args = Int8ExpertsArgs
    devices = ("cuda", "cpu")
    shardable = True  # Shard(dim=0): this rank's part of every expert's intermediate dimension

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int, device="cuda",
                 scheme: str = "block", rounding: str = "nearest_even", expert_ids: tuple[int, ...] | None = None):
        super().__init__()
        self.n_experts, self.hidden_size, self.intermediate_size = n_experts, hidden_size, intermediate_size
        # which of the checkpoint's experts these are, in order (all of them by default; a subset for
        # the GPU-resident experts of a CPU layer, experts_resident.py)
        self.expert_ids = tuple(range(n_experts)) if expert_ids is None else tuple(expert_ids)
        if len(self.expert_ids) != n_experts:
            raise ValueError(f"expert_ids names {len(self.expert_ids)} experts, not {n_experts}")
        self.device, self.scheme, self.rounding = torch.device(device), scheme, rounding
        self.w13 = self.w13_s = self.w2 = self.w2_s = None
        self._cpu_dense: tuple[torch.Tensor, torch.Tensor] | None = None  # fp32 W13, W2 (CPU path)
        self.partial = False

    @classmethod
    def from_module(cls, module, device, dtype, args: Int8ExpertsArgs | None = None) -> "Int8GPUExperts":
        args = args or Int8ExpertsArgs()
        shape = module[0].gate_proj
        return cls(len(module), shape.in_features, shape.out_features, device, args.scheme, args.rounding)

    def _scale_shape(self, n: int, k: int) -> tuple[int, int]:
        """One expert projection's scales for an [n, k] weight (the scheme table's layout)."""
        return scheme_of(self.scheme).scale_shape(n, k)

    def load_weights(self, source: WeightSource, prefix: str, shard: Shard | None = None) -> None:
        if shard is not None and shard.dim != 0:
            raise ValueError("experts.int8_gpu splits the intermediate dimension only: Shard(dim=0)")
        E, H = self.n_experts, self.hidden_size
        inter = self.intermediate_size  # the checkpoint's; the rank's part below
        local = inter // shard.world if shard is not None else inter
        dev = self.device
        half, h_cols = self._scale_shape(local, H)
        self.w13 = torch.empty((E, 2 * local, H), dtype=torch.int8, device=dev)
        self.w2 = torch.empty((E, H, local), dtype=torch.int8, device=dev)
        self.w13_s = torch.empty((E, 2 * half, h_cols), dtype=torch.float32, device=dev)  # each half its own grid
        self.w2_s = torch.empty((E, *self._scale_shape(H, local)), dtype=torch.float32, device=dev)
        down_shard = Shard(shard.rank, shard.world, 1) if shard is not None else None
        for e, src in enumerate(self.expert_ids):
            p = f"{prefix}.{src}."
            gq, gs = int8_weight(source, p + "gate_proj.weight", (inter, H), self.scheme)
            uq, us = int8_weight(source, p + "up_proj.weight", (inter, H), self.scheme)
            dq, ds = int8_weight(source, p + "down_proj.weight", (H, inter), self.scheme)
            if shard is not None:  # quantized whole, then sliced: bit-identical to one GPU's part
                gq, gs = slice_int8(gq, gs, self.scheme, shard, p + "gate_proj.weight")
                uq, us = slice_int8(uq, us, self.scheme, shard, p + "up_proj.weight")
                dq, ds = slice_int8(dq, ds, self.scheme, down_shard, p + "down_proj.weight")
            self.w13[e, :local].copy_(gq)
            self.w13[e, local:].copy_(uq)
            self.w13_s[e, :half].copy_(gs.reshape(half, -1))
            self.w13_s[e, half:].copy_(us.reshape(half, -1))
            self.w2[e].copy_(dq)
            self.w2_s[e].copy_(ds.reshape(self.w2_s.shape[1:]))
        self.intermediate_size = local
        self.partial = shard is not None  # a partial sum: kept in fp32 for the ranks' all-reduce
        self._cpu_dense = None

    def planned_bytes(self, source, prefix: str, config) -> int:
        E, H, inter = self.n_experts, self.hidden_size, self.intermediate_size
        (r13, c13), (r2, c2) = self._scale_shape(inter, H), self._scale_shape(H, inter)
        return E * (3 * inter * H + 4 * (2 * r13 * c13 + r2 * c2))

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda":
            return self._cpu_forward(x, topk_idx, topk_w)
        from hybrid_r1_kernels.fused_moe import fused_moe

        return fused_moe(x, self.w13, self.w13_s, self.w2, self.w2_s, topk_w.float(), topk_idx,
                         scheme=self.scheme, rounding=self.rounding,
                         out_dtype=torch.float32 if self.partial else None)

    def _cpu_forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """fused_moe's function in fp32 torch: x and the intermediate quantized as the kernel
        quantizes them, then matmuls with the dequantized experts (kept after the first call)."""
        from ..model import group_by_expert
        from ..quant import BLOCK, SCALE_SUFFIX, dequant_int8

        wide = torch.float64 if x.dtype == torch.float64 else torch.float32  # the sums' dtype
        if self._cpu_dense is None or self._cpu_dense[0].dtype != wide:
            scale = SCALE_SUFFIX[self.scheme]
            w13 = torch.stack([torch.cat([dequant_int8(self.w13[e, :self.intermediate_size],
                                                       {scale: self.w13_s[e, :self.w13_s.shape[1] // 2]}),
                                          dequant_int8(self.w13[e, self.intermediate_size:],
                                                       {scale: self.w13_s[e, self.w13_s.shape[1] // 2:]})])
                               for e in range(self.n_experts)])
            w2 = torch.stack([dequant_int8(self.w2[e], {scale: self.w2_s[e]}) for e in range(self.n_experts)])
            self._cpu_dense = (w13.to(wide), w2.to(wide))
        w13, w2 = self._cpu_dense
        group = BLOCK if self.scheme == "block" else None

        def dequant_act(t: torch.Tensor) -> torch.Tensor:
            return quant_dequant_activation(t, group, self.rounding, wide)

        xd = dequant_act(x)
        out = torch.zeros(x.shape, dtype=wide)
        order, token, counts = group_by_expert(idx, self.n_experts)
        pos = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                sel, tok = order[pos:pos + n], token[pos:pos + n]
                gate, up = (xd[tok] @ w13[e].T).chunk(2, -1)
                h = dequant_act(torch.nn.functional.silu(gate) * up)
                out.index_add_(0, tok, (h @ w2[e].T) * w.flatten()[sel, None].to(wide))
                pos += n
        return out if self.partial else out.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"n_experts={self.n_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
                f"{self.scheme}, {self.device}")
