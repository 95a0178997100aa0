"""Routed experts of one MoE layer as INT8 on a GPU, computed by the fused MoE kernel
(kernels/fused_moe.py): all selected experts in one launch per projection, no host sync, so a
decode step keeps them inside its CUDA graph.

Weights: the checkpoint's INT8 experts as stored (Meituan's releases quantize the experts too), or
any other source quantized while loading with the converter's formulas (BF16/FP8, or a GGUF's
experts dequantized then requantized: the fidelity of a GGML type plus INT8's). The layer's experts
are stacked on the device one expert at a time: W13 [E, 2I, H] = cat(gate, up), W2 [E, H, I], with
block (128x128) or channel scales in the kernel's layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..formats.source import WeightSource
from ..quant import scheme_of
from .base import OpArgs, Operator, Shard
from .linear_int8 import int8_weight


@dataclass(frozen=True)
class Int8ExpertsArgs(OpArgs):
    scheme: Literal["block", "channel"] = "block"
    rounding: Literal["nearest_even", "trunc"] = "nearest_even"  # of the activation quantization


class Int8GPUExperts(Operator):
    """Same call as the model's Experts: (x [T, hidden], idx [T, k], w [T, k]) -> [T, hidden]."""

    name = "experts.int8_gpu"
    replaces = "Experts"
    Args = Int8ExpertsArgs
    devices = ("cuda",)

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int, device="cuda",
                 scheme: str = "block", rounding: str = "nearest_even"):
        super().__init__()
        self.n_experts, self.hidden_size, self.intermediate_size = n_experts, hidden_size, intermediate_size
        self.device, self.scheme, self.rounding = torch.device(device), scheme, rounding
        self.w13 = self.w13_s = self.w2 = self.w2_s = None

    @classmethod
    def from_module(cls, module, device, dtype, args: Int8ExpertsArgs | None = None) -> "Int8GPUExperts":
        args = args or Int8ExpertsArgs()
        shape = module[0].gate_proj
        return cls(len(module), shape.in_features, shape.out_features, device, args.scheme, args.rounding)

    def _scale_shape(self, n: int, k: int) -> tuple[int, int]:
        """One expert projection's scales for an [n, k] weight (the scheme table's layout)."""
        return scheme_of(self.scheme).scale_shape(n, k)

    def load_weights(self, source: WeightSource, prefix: str, shard: Shard | None = None) -> None:
        assert shard is None, "experts.int8_gpu does not shard"  # declared: shardable = False
        E, H, inter = self.n_experts, self.hidden_size, self.intermediate_size
        dev = self.device
        half, h_cols = self._scale_shape(inter, H)
        self.w13 = torch.empty((E, 2 * inter, H), dtype=torch.int8, device=dev)
        self.w2 = torch.empty((E, H, inter), dtype=torch.int8, device=dev)
        self.w13_s = torch.empty((E, 2 * half, h_cols), dtype=torch.float32, device=dev)  # each half its own grid
        self.w2_s = torch.empty((E, *self._scale_shape(H, inter)), dtype=torch.float32, device=dev)
        for e in range(E):
            p = f"{prefix}.{e}."
            gq, gs = int8_weight(source, p + "gate_proj.weight", (inter, H), self.scheme)
            uq, us = int8_weight(source, p + "up_proj.weight", (inter, H), self.scheme)
            dq, ds = int8_weight(source, p + "down_proj.weight", (H, inter), self.scheme)
            self.w13[e, :inter].copy_(gq)
            self.w13[e, inter:].copy_(uq)
            self.w13_s[e, :half].copy_(gs.view(half, -1))
            self.w13_s[e, half:].copy_(us.view(half, -1))
            self.w2[e].copy_(dq)
            self.w2_s[e].copy_(ds.view(self.w2_s.shape[1:]))

    def planned_bytes(self, source, prefix: str, config) -> int:
        E, H, inter = self.n_experts, self.hidden_size, self.intermediate_size
        (r13, c13), (r2, c2) = self._scale_shape(inter, H), self._scale_shape(H, inter)
        return E * (3 * inter * H + 4 * (2 * r13 * c13 + r2 * c2))

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        from hybrid_r1_kernels.fused_moe import fused_moe

        return fused_moe(x, self.w13, self.w13_s, self.w2, self.w2_s, topk_w.float(), topk_idx,
                         scheme=self.scheme, rounding=self.rounding)

    def extra_repr(self) -> str:
        return (f"n_experts={self.n_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
                f"{self.scheme}, {self.device}")
