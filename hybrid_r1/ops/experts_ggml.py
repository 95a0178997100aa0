"""Routed experts of one MoE layer computed by ggml's CPU kernels on the GGUF bytes in place.

The graph is llama.cpp's: `ggml_mul_mat_id` for gate and up (activations converted once to the
weights' dot-product type, Q8_K for K-quants, then integer dot products), SwiGLU, the routing
weights, `ggml_mul_mat_id` for down, the sum over the chosen experts. Weight tensors point into the
memory-mapped file: no copy, no dequantization. Every layer with the same thread count shares one
ggml thread pool, activation arena and graph cache (ggml_lib.Executor); the GIL is released while
ggml computes, so the GPU side of the step can run meanwhile.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .. import checks, ggml_lib
from ..errors import CheckpointError
from ..formats.ggml_tensor import GGMLTensor
from ..formats.source import WeightSource
from ..threads import check_threads
from .experts_gpu_prefill import GPUExpertPrefill, supported
from .experts_reference import check_call, check_cpu, expert_tensors

log = logging.getLogger(__name__)


class GGMLExperts(nn.Module):
    """Same call as the model's Experts: (x [T, hidden], idx [T, k], w [T, k]) -> [T, hidden], on x's
    device and dtype. `threads`: ggml threads (default: the physical cores this process may use).
    `chunk_tokens`: prefill runs in chunks of at most this many tokens (activation memory is about
    320 KB per token at 671B width). `poll`: how long idle ggml workers spin before sleeping
    (ggml_lib.Executor; 0 frees the cores between layers). `prefill_device` (e.g. "cuda:0"): calls
    of at least `prefill_min_tokens` tokens stream the used experts to that GPU and run there
    (experts_gpu_prefill.py); types it cannot expand stay on the CPU, with a warning."""

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int, threads: int | None = None,
                 chunk_tokens: int = 1024, poll: int = 0, prefill_device: str | None = None,
                 prefill_min_tokens: int = 256):
        super().__init__()
        if threads is not None:
            check_threads(threads)  # bounded by the usable CPUs: ggml crashes on absurd counts
        checks.integer("chunk_tokens", chunk_tokens, 1)
        checks.integer("poll", poll, 0, 100)
        self.n_experts, self.hidden_size, self.intermediate_size = n_experts, hidden_size, intermediate_size
        self.threads = threads or ggml_lib.physical_cores()
        checks.integer("prefill_min_tokens", prefill_min_tokens, 1)
        if prefill_device is not None and (not isinstance(prefill_device, (str, torch.device))
                                           or torch.device(prefill_device).type != "cuda"):
            raise ValueError(f"prefill_device must be a CUDA device, got {prefill_device!r}")
        self.chunk_tokens, self.poll = chunk_tokens, poll
        self.prefill_device, self.prefill_min_tokens = prefill_device, prefill_min_tokens
        self.prefill: GPUExpertPrefill | None = None
        self._pinned_key, self._pinned_bufs = None, ()  # host staging of decode calls from a GPU
        self.tensors: dict[str, GGMLTensor] | None = None  # keeps the mapped bytes alive
        self.weights: ggml_lib.ExpertWeights | None = None

    @classmethod
    def from_module(cls, module: nn.Module, device=None, dtype=None, **args) -> "GGMLExperts":
        check_cpu(cls, device)
        return cls(len(module), module[0].gate_proj.in_features, module[0].gate_proj.out_features, **args)

    def load_weights(self, source: WeightSource, prefix: str) -> None:
        tensors = expert_tensors(source, prefix, self.n_experts, self.hidden_size, self.intermediate_size)
        weights = ggml_lib.ExpertWeights(
            tensors["gate"].data, tensors["up"].data, tensors["down"].data,
            tuple(tensors[p].ggml_type for p in ("gate", "up", "down")), self.hidden_size, self.intermediate_size)
        for part, why in weights.problems().items():
            t = tensors[part]
            raise CheckpointError(f"{why} (experts.dequant computes any type)", file=t.file, tensor=t.name)
        self.tensors, self.weights = tensors, weights
        if self.prefill_device is not None:
            if supported(tensors):
                self.prefill = GPUExpertPrefill(tensors, self.prefill_device)
            else:
                log.warning("%s: no GPU expander for %s; prefill stays on the CPU", prefix,
                            "/".join(ggml_lib.type_name(t.ggml_type) for t in tensors.values()))

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        if self.weights is None:
            raise RuntimeError("GGMLExperts: load_weights first")
        n = x.shape[0]
        on_gpu = self.prefill is not None and n >= self.prefill_min_tokens
        if x.is_cuda and n <= self.chunk_tokens and not on_gpu:
            return self._from_gpu(x, topk_idx, topk_w)
        idx = topk_idx.cpu()
        check_call(x, idx, topk_w, self.n_experts, self.hidden_size)
        if on_gpu:
            return self.prefill(x, idx, topk_w).to(x.device, x.dtype)
        ex = ggml_lib.executor(self.threads, self.poll)
        if n <= self.chunk_tokens:  # decode and short prefill: one graph, no intermediate copies
            with ex.lock:
                return self._run(ex, x, idx, topk_w).to(x.device, x.dtype, copy=True)
        out = torch.empty((n, self.hidden_size), dtype=torch.float32)
        for s in range(0, n, self.chunk_tokens):
            e = min(n, s + self.chunk_tokens)
            with ex.lock:
                out[s:e] = self._run(ex, x[s:e], idx[s:e], topk_w[s:e])
        return out.to(x.device, x.dtype)

    def _from_gpu(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        """A decode step from the GPU: the three inputs come over in one wait (pinned buffers,
        asynchronous copies, one stream sync instead of one per tensor), and the result goes back
        asynchronously; the next call's sync orders it before the pinned output is written again."""
        hx, hi, hw, hy = self._pinned(x, topk_idx, topk_w)
        hx.copy_(x, non_blocking=True)
        hi.copy_(topk_idx, non_blocking=True)
        hw.copy_(topk_w, non_blocking=True)
        torch.cuda.current_stream(x.device).synchronize()
        check_call(hx, hi, hw, self.n_experts, self.hidden_size)
        ex = ggml_lib.executor(self.threads, self.poll)
        with ex.lock:
            hy.copy_(self._run(ex, hx, hi, hw))
        return hy.to(x.device, non_blocking=True)

    def _pinned(self, x, idx, w) -> tuple[torch.Tensor, ...]:
        key = (tuple(x.shape), x.dtype, tuple(idx.shape), idx.dtype, w.dtype)
        if self._pinned_key != key:
            self._pinned_key = key
            self._pinned_bufs = (torch.empty(x.shape, dtype=x.dtype, pin_memory=True),
                                 torch.empty(idx.shape, dtype=idx.dtype, pin_memory=True),
                                 torch.empty(w.shape, dtype=w.dtype, pin_memory=True),
                                 torch.empty(x.shape, dtype=x.dtype, pin_memory=True))
        return self._pinned_bufs

    def _run(self, ex: ggml_lib.Executor, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """One graph over these tokens; returns a view of the executor's arena (caller holds ex.lock)."""
        g = ex.moe_graph(self.weights, idx.shape[0], idx.shape[1])
        g.tensors["x"].copy_(x)  # to float32 on the CPU, int64 ids to int32, in one pass each
        g.tensors["ids"].copy_(idx)
        g.tensors["w"].copy_(w)
        ex.compute(g)
        return g.tensors["out"]

    def extra_repr(self) -> str:
        types = "not loaded" if self.weights is None else "/".join(ggml_lib.type_name(t) for t in self.weights.types)
        return (f"n_experts={self.n_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
                f"threads={self.threads}, poll={self.poll}, {types}"
                + (f", prefill on {self.prefill_device} from {self.prefill_min_tokens} tokens" if self.prefill else ""))
