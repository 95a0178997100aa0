"""Routed experts from GGML-quantized weights in plain torch: each used expert is dequantized with
gguf-py (numpy, ~0.03 GB/s) and multiplied in `compute_dtype`. The reference for GGMLExperts' tests
and a fallback for a type ggml's CPU backend lacks; never fast.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ..errors import CheckpointError
from ..formats.ggml_tensor import GGMLTensor
from ..formats.source import WeightSource
from ..model import group_by_expert
from .base import OpArgs, Operator, Shard

PARTS = ("gate", "up", "down")


def layer_of(prefix: str) -> int:
    """`model.layers.3.mlp.experts` -> 3."""
    m = re.search(r"(?:^|\.)layers\.(\d+)\.mlp\.experts$", prefix)
    if m is None:
        raise ValueError(f"not a routed-experts module name: {prefix!r} (want model.layers.N.mlp.experts)")
    return int(m.group(1))


def expert_tensors(source: WeightSource, prefix: str, n_experts: int, hidden: int,
                   intermediate: int) -> dict[str, GGMLTensor]:
    """{"gate", "up", "down"} -> GGMLTensor of the layer named by `prefix`, checked against the model's
    shape (ggml order: gate/up [hidden, intermediate, n_experts], down [intermediate, hidden, n_experts]).
    The bytes per row are the operator's to check: it knows the types it runs."""
    experts = source.ggml_experts(layer_of(prefix))
    if experts is None:
        raise CheckpointError("holds no GGML-quantized routed experts (a GGUF checkpoint is needed)",
                              file=source.path, tensor=prefix)
    missing = [p for p in PARTS if p not in experts]
    if missing:
        raise CheckpointError(f"routed experts without {', '.join(missing)}", file=source.path, tensor=prefix)
    want = {"gate": (hidden, intermediate), "up": (hidden, intermediate), "down": (intermediate, hidden)}
    for part in PARTS:
        t = experts[part]
        ne = (*want[part], n_experts)
        if tuple(t.ne) != ne:
            raise CheckpointError(f"ne {list(t.ne)} does not match the model's {list(ne)}", file=t.file, tensor=t.name)
        if t.data.dtype != np.uint8 or t.data.ndim != 3 or t.data.shape[:2] != (n_experts, ne[1]):
            raise CheckpointError(f"data {t.data.dtype} {list(t.data.shape)} is not (experts, rows, bytes) uint8 "
                                  f"for ne {list(ne)}", file=t.file, tensor=t.name)
    return experts


@dataclass(frozen=True)
class DequantArgs(OpArgs):
    compute_dtype: Literal["float32", "float64", "bfloat16"] = "float32"


def ggml_expert_bytes(source, prefix: str, config, n_experts: int, hidden: int, intermediate: int) -> int:
    """The layer's GGML blocks as stored in `source`; without a source, what a Q4_K_M file holds
    (Q4_K gate/up, Q6_K or Q4_K down by llama.cpp's layer rule), as `hybrid-r1 plan` assumes for
    the 671B config."""
    if source is not None:
        found = source.ggml_experts(layer_of(prefix))
        if found is not None:
            return sum(t.data.nbytes for t in found.values())
    from gguf.constants import GGML_QUANT_SIZES

    from ..formats.gguf_writer import tensor_type  # llama.cpp's Q4_K_M choice per tensor

    layer, total = layer_of(prefix), 0
    n_layers = config.num_hidden_layers
    for part, ne in (("gate", (hidden, intermediate)), ("up", (hidden, intermediate)), ("down", (intermediate, hidden))):
        t = tensor_type(f"blk.{layer}.ffn_{part}_exps.weight", (*ne, n_experts), "Q4_K_M", n_layers)
        block, size = GGML_QUANT_SIZES[t]
        total += n_experts * ne[1] * (ne[0] // block) * size
    return total


class DequantExperts(Operator):
    """Same call as the model's Experts: (x [T, hidden], idx [T, k], w [T, k]) -> [T, hidden]."""

    name = "experts.dequant"
    replaces = "Experts"
    Args = DequantArgs
    devices = ("cpu",)
    graph_safe = False
    host_sync = True
    moves_inputs = True  # copies its inputs to the CPU and the result back itself

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.n_experts, self.hidden_size, self.intermediate_size = n_experts, hidden_size, intermediate_size
        self.compute_dtype = compute_dtype
        self.tensors: dict[str, GGMLTensor] | None = None

    @classmethod
    def from_module(cls, module, device=None, dtype=None, args: DequantArgs | None = None) -> "DequantExperts":
        shape = module[0].gate_proj
        dtype = getattr(torch, (args or DequantArgs()).compute_dtype)
        return cls(len(module), shape.in_features, shape.out_features, dtype)

    def planned_bytes(self, source, prefix: str, config) -> int:
        return ggml_expert_bytes(source, prefix, config, self.n_experts, self.hidden_size, self.intermediate_size)

    def load_weights(self, source: WeightSource, prefix: str, shard: Shard | None = None) -> None:
        assert shard is None, "experts.dequant does not shard"  # declared: shardable = False
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        tensors = expert_tensors(source, prefix, self.n_experts, self.hidden_size, self.intermediate_size)
        for t in tensors.values():
            try:
                qtype = GGMLQuantizationType(t.ggml_type)
                block, nbytes = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise CheckpointError(f"gguf-py does not know ggml type {t.ggml_type}",
                                      file=t.file, tensor=t.name) from None
            if t.ne[0] % block or t.data.shape[2] != t.ne[0] // block * nbytes:
                raise CheckpointError(f"rows of {t.data.shape[2]} bytes do not hold {t.ne[0]} {qtype.name} values",
                                      file=t.file, tensor=t.name)
        self.tensors = tensors

    def expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert `e` dequantized: gate [I, H], up [I, H], down [H, I] in compute_dtype."""
        from gguf.quants import dequantize

        if self.tensors is None:
            raise RuntimeError("DequantExperts: load_weights first")
        return tuple(torch.from_numpy(dequantize(self.tensors[p].expert(e), self.tensors[p].ggml_type))
                     .to(self.compute_dtype) for p in PARTS)

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        idx = topk_idx.cpu()
        check_call(x, idx, topk_w, self.n_experts, self.hidden_size)
        xc, w = x.detach().to("cpu", self.compute_dtype), topk_w.to("cpu", self.compute_dtype)
        out = torch.zeros_like(xc)
        order, token, counts = group_by_expert(idx, self.n_experts)
        flat_w = w.flatten()
        starts = [0, *counts.cumsum(0).tolist()]
        for e in counts.nonzero().flatten().tolist():
            sel = order[starts[e]:starts[e + 1]]
            tok = token[starts[e]:starts[e + 1]]
            gate, up, down = self.expert(e)
            xe = xc[tok]
            h = torch.nn.functional.silu(xe @ gate.T) * (xe @ up.T)
            out.index_add_(0, tok, (h @ down.T) * flat_w[sel, None])
        return out.to(x.device, x.dtype)


def check_call(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, n_experts: int, hidden: int,
               ids: bool = True) -> None:
    """Shapes, and (ids) expert ids in range (`idx` on the CPU: ggml would write out of bounds; a
    caller whose engine refuses bad ids itself skips that look, a decode step's few microseconds)."""
    if x.dim() != 2 or x.shape[1] != hidden:
        raise ValueError(f"x must be [tokens, {hidden}], got {list(x.shape)}")
    shape = idx.shape
    if len(shape) != 2 or shape[0] != x.shape[0] or shape[1] < 1 or w.shape != shape:
        raise ValueError(f"topk_idx and topk_w must both be [{x.shape[0]}, k], got {list(shape)} and {list(w.shape)}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"topk_idx must be int64 or int32, got {idx.dtype}")
    if shape[0] and ids:
        lo, hi = (v.item() for v in torch.aminmax(idx))
        if lo < 0 or hi >= n_experts:
            raise ValueError(f"expert ids must lie in [0, {n_experts}), got {lo}..{hi}")
