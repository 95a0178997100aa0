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
from dataclasses import dataclass
from typing import Literal

import torch

from .. import ggml_lib
from ..errors import CheckpointError, InputError
from ..formats.ggml_tensor import GGMLTensor
from ..formats.source import WeightSource
from ..threads import check_threads
from . import prefill_cost
from .base import OpArgs, OpArgsError, Operator, Shard
from .experts_gpu_prefill import PINNINGS, GPUExpertPrefill, supported
from .experts_reference import check_call, expert_tensors, ggml_expert_bytes, layer_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GGMLArgs(OpArgs):
    threads: int | None = None  # ggml threads (default: the physical cores this process may use)
    chunk_tokens: int = 1024  # prefill runs in chunks of at most this many tokens
    poll: int = 0  # how long idle ggml workers spin before sleeping (0..100)
    prefill_device: str | None = None  # a CUDA device: long calls stream the experts there
    prefill_min_tokens: int | None = None  # calls of this many tokens run there; None: the cost model decides
    prefill_profile: str | None = None  # the cost model's machine profile (JSON); None: prefill_cost's defaults
    prefill_pinning: Literal["register", "bounce"] = "register"  # how the stream reads host memory

    def check(self) -> None:
        if self.threads is not None:
            try:
                check_threads(self.threads)  # bounded by the usable CPUs: ggml crashes on absurd counts
            except InputError as e:
                raise OpArgsError(None, str(e)) from None
        if self.chunk_tokens < 1:
            raise OpArgsError("chunk_tokens", f"must be >= 1, got {self.chunk_tokens}")
        if not 0 <= self.poll <= 100:
            raise OpArgsError("poll", f"must be in 0..100, got {self.poll}")
        if self.prefill_min_tokens is not None and self.prefill_min_tokens < 1:
            raise OpArgsError("prefill_min_tokens", f"must be >= 1, got {self.prefill_min_tokens}")
        if self.prefill_device is not None:
            try:
                ok = torch.device(self.prefill_device).type == "cuda"
            except (RuntimeError, TypeError):
                ok = False
            if not ok:
                raise OpArgsError("prefill_device", f"must be a CUDA device, got {self.prefill_device!r}")
        if self.prefill_pinning not in PINNINGS:
            raise OpArgsError("prefill_pinning", f"must be one of {', '.join(PINNINGS)}, got {self.prefill_pinning!r}")
        if self.prefill_profile is not None:
            try:
                prefill_cost.load_profile(self.prefill_profile)
            except prefill_cost.ProfileError as e:
                raise OpArgsError("prefill_profile", str(e)) from None


class GGMLExperts(Operator):
    """Same call as the model's Experts: (x [T, hidden], idx [T, k], w [T, k]) -> [T, hidden], on x's
    device and dtype. Arguments: GGMLArgs. Activation memory is about 320 KB per token at 671B
    width (hence `chunk_tokens`); `poll` 0 frees the cores between layers (ggml_lib.Executor);
    with `prefill_device`, calls the cost model (prefill_cost.py, or a fixed `prefill_min_tokens`)
    finds faster there stream the used experts to that GPU and run there (experts_gpu_prefill.py);
    types it cannot expand stay on the CPU, with a warning. Runs on the host: a decode graph breaks around it."""

    name = "experts.ggml_cpu"
    replaces = "Experts"
    Args = GGMLArgs
    devices = ("cpu",)
    graph_safe = False
    host_sync = True
    moves_inputs = True  # GPU inputs come over in one sync through pinned buffers (_from_gpu)

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int, **args):
        super().__init__()
        a = GGMLArgs(**args)
        a.check()
        self.n_experts, self.hidden_size, self.intermediate_size = n_experts, hidden_size, intermediate_size
        self.threads = a.threads or ggml_lib.physical_cores()
        self.chunk_tokens, self.poll = a.chunk_tokens, a.poll
        self.prefill_device, self.prefill_min_tokens = a.prefill_device, a.prefill_min_tokens
        self.prefill_pinning = a.prefill_pinning
        self.profile = (prefill_cost.load_profile(a.prefill_profile) if a.prefill_profile
                        else prefill_cost.PrefillProfile())
        self.prefill: GPUExpertPrefill | None = None
        self._pinned_key, self._pinned_bufs = None, ()  # host staging of decode calls from a GPU
        self.tensors: dict[str, GGMLTensor] | None = None  # keeps the mapped bytes alive
        self.weights: ggml_lib.ExpertWeights | None = None

    @classmethod
    def from_module(cls, module, device=None, dtype=None, args: GGMLArgs | None = None) -> "GGMLExperts":
        shape = module[0].gate_proj
        return cls(len(module), shape.in_features, shape.out_features, **vars(args or GGMLArgs()))

    @classmethod
    def source_problem(cls, source: WeightSource, prefix: str) -> str | None:
        try:
            found = source.ggml_experts(layer_of(prefix))
        except CheckpointError as e:
            return str(e)
        if found is None:
            return ("the checkpoint holds no GGML-quantized routed experts: load a GGUF, a merged folder "
                    "(merge_tools merge), or the safetensors folder with --gguf")
        return None

    def planned_bytes(self, source, prefix: str, config) -> int:
        return ggml_expert_bytes(source, prefix, config, self.n_experts, self.hidden_size, self.intermediate_size)

    def load_weights(self, source: WeightSource, prefix: str, shard: Shard | None = None) -> None:
        assert shard is None, "experts.ggml_cpu does not shard"  # declared: shardable = False
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
                self.prefill = GPUExpertPrefill(tensors, self.prefill_device, self.prefill_pinning,
                                                layer=layer_of(prefix))
            else:
                log.warning("%s: no GPU expander for %s; prefill stays on the CPU", prefix,
                            "/".join(ggml_lib.type_name(t.ggml_type) for t in tensors.values()))

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        if self.weights is None:
            raise RuntimeError("GGMLExperts: load_weights first")
        n = x.shape[0]
        on_gpu = self.prefill is not None and self.use_gpu(n, topk_idx.shape[1])
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

    def use_gpu(self, tokens: int, top_k: int) -> bool:
        """Whether a call of `tokens` tokens streams to prefill_device: the fixed threshold if one is
        set, else the cost model (prefill_cost.py) against this op's CPU engine."""
        if self.prefill_min_tokens is not None:
            return tokens >= self.prefill_min_tokens
        return prefill_cost.use_gpu(self.profile, "ggml", tokens, self.n_experts, top_k, self.prefill.per_expert)

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
                + (f", prefill on {self.prefill_device} "
                   + (f"from {self.prefill_min_tokens} tokens" if self.prefill_min_tokens else "by cost")
                   if self.prefill else ""))
