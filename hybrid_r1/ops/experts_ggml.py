"""Routed experts of one MoE layer computed by ggml's CPU kernels on the GGUF bytes in place.

The graph is llama.cpp's: `ggml_mul_mat_id` for gate and up (activations converted once to the
weights' dot-product type, Q8_K for K-quants, then integer dot products), SwiGLU, the routing
weights, `ggml_mul_mat_id` for down, the sum over the chosen experts. Weight tensors point into the
memory-mapped file: no copy, no dequantization. Every layer with the same thread count shares one
ggml thread pool, activation arena and graph cache (ggml_lib.Executor); the GIL is released while
ggml computes, so the GPU side of the step can run meanwhile.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from .. import cpu_engines, ggml_lib, hugepages
from ..errors import CheckpointError, InputError
from ..formats.ggml_tensor import GGMLTensor
from ..formats.source import WeightSource
from ..threads import check_threads
from . import prefill_cost
from .base import OpArgs, OpArgsError, Operator, Shard
from .experts_gpu_prefill import PINNINGS, GPUExpertPrefill, supported
from .experts_reference import check_call, expert_tensors, ggml_expert_bytes, layer_of

log = logging.getLogger(__name__)


def _check_cuda_device(arg: str, value: str) -> None:
    try:
        ok = torch.device(value).type == "cuda"
    except (RuntimeError, TypeError):
        ok = False
    if not ok:
        raise OpArgsError(arg, f"must be a CUDA device, got {value!r}")


@dataclass(frozen=True)
class GGMLArgs(OpArgs):
    threads: int | None = None  # ggml threads (default: the physical cores this process may use)
    chunk_tokens: int = 1024  # prefill runs in chunks of at most this many tokens
    poll: int = 0  # how long idle ggml workers spin before sleeping (0..100)
    prefill_device: str | None = None  # a CUDA device: long calls stream the experts there
    prefill_min_tokens: int | None = None  # calls of this many tokens run there; None: the cost model decides
    prefill_profile: str | None = None  # the cost model's machine profile (JSON); None: prefill_cost's defaults
    prefill_pinning: Literal["register", "bounce"] = "register"  # how the stream reads host memory
    # decode calls from a GPU hand over inside the stream (experts_ggml_overlap.py); auto: where the
    # layer's engine is the native kernel (its C thread serves the hand-over), else serial
    overlap: bool | Literal["auto"] = False
    overlap_timeout_s: float = 60.0  # how long the stream waits for the CPU before it gives up (NaN, error)
    gpu_experts: int = 0  # this many of the layer's experts also on the GPU as INT8 (experts_resident.py)
    hot_experts: str | None = None  # routing counts (hybrid-r1 calibrate) choosing them; else the first N
    gpu_device: str = "cuda"  # where the resident experts live
    gpu_scheme: Literal["block", "channel"] = "block"  # their INT8 scheme
    engine: Literal["auto", "ggml", "ggml_numa", "kt_llamafile", "native", "native_numa"] = "auto"  # cpu_engines.py; auto: the fastest
    pin: bool = False  # ggml threads pinned, one per physical core (ggml_lib.core_cpus)
    hugepages: bool = False  # copy the experts into anonymous 2 MiB pages at load (hugepages.py: RAM cost)

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
        if not self.overlap_timeout_s > 0:
            raise OpArgsError("overlap_timeout_s", f"must be > 0, got {self.overlap_timeout_s}")
        if self.gpu_experts < 0:
            raise OpArgsError("gpu_experts", f"must be >= 0, got {self.gpu_experts}")
        if self.hot_experts is not None and not Path(self.hot_experts).is_file():
            raise OpArgsError("hot_experts", f"{self.hot_experts}: no such file (hybrid-r1 calibrate writes it)")
        _check_cuda_device("gpu_device", self.gpu_device)
        if self.prefill_device is not None:
            _check_cuda_device("prefill_device", self.prefill_device)
        try:
            cpu_engines.check_installed(self.engine)
        except cpu_engines.EngineError as e:
            raise OpArgsError("engine", str(e).removeprefix("engine ")) from None
        if self.prefill_pinning not in PINNINGS:
            raise OpArgsError("prefill_pinning", f"must be one of {', '.join(PINNINGS)}, got {self.prefill_pinning!r}")
        if self.prefill_profile is not None:
            try:
                prefill_cost.load_profile(self.prefill_profile)
            except prefill_cost.ProfileError as e:
                raise OpArgsError("prefill_profile", str(e)) from None


@functools.cache
def _host_thread() -> concurrent.futures.ThreadPoolExecutor:
    """One thread that runs CPU expert calls while the caller launches GPU work (made on first use)."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hybrid_r1-experts")


class GGMLExperts(Operator):
    """Same call as the model's Experts: (x [T, hidden], idx [T, k], w [T, k]) -> [T, hidden], on x's
    device and dtype. Arguments: GGMLArgs. Activation memory is about 320 KB per token at 671B
    width (hence `chunk_tokens`); `poll` 0 frees the cores between layers (ggml_lib.Executor);
    with `prefill_device`, calls the cost model (prefill_cost.py, or a fixed `prefill_min_tokens`)
    finds faster there stream the used experts to that GPU and run there (experts_gpu_prefill.py);
    types it cannot expand stay on the CPU, with a warning. `engine` picks the library that computes
    (cpu_engines.py: auto = the fastest installed one that runs the layer's types), `pin` pins ggml's
    threads one per physical core, `hugepages` copies the experts into anonymous huge pages at load.
    Runs on the host: a decode graph breaks around it."""

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
        self.overlap, self.overlap_timeout_s = a.overlap, a.overlap_timeout_s
        self.engine, self.pin, self.hugepages = a.engine, a.pin, a.hugepages
        self.engine_class: type[cpu_engines.CPUEngine] | None = None  # chosen at load, for these types
        self.engine_why = ""
        self._engine_key, self._engine = None, None  # the engine instance, made on first call
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
        args = args or GGMLArgs()
        if args.overlap and args.gpu_experts and cls is GGMLExperts:  # both: one graph, resident beside
            from .experts_resident import OverlappedResidentGGMLExperts as cls
        elif args.overlap and cls is GGMLExperts:  # the overlapped kind declares its own graph behaviour
            from .experts_ggml_overlap import OverlappedGGMLExperts as cls
        elif args.gpu_experts and cls is GGMLExperts:  # some experts also on the GPU, run beside
            from .experts_resident import ResidentGGMLExperts as cls
        return cls(len(module), shape.in_features, shape.out_features, **vars(args))

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
        parts = ("gate", "up", "down")
        weights = ggml_lib.ExpertWeights(
            *(tensors[p].data for p in parts), tuple(tensors[p].ggml_type for p in parts),
            self.hidden_size, self.intermediate_size)
        for part, why in weights.problems().items():
            t = tensors[part]
            raise CheckpointError(f"{why} (experts.dequant computes any type)", file=t.file, tensor=t.name)
        try:
            self.engine_class, self.engine_why = cpu_engines.choose(self.engine, weights.types)
        except cpu_engines.EngineError as e:
            runs = cpu_engines.ENGINES[self.engine].runs
            t = next(tensors[p] for p, ty in zip(parts, weights.types) if not runs((ty,) * 3))
            raise CheckpointError(str(e), file=t.file, tensor=t.name) from None
        if self.hugepages:
            weights = ggml_lib.ExpertWeights(*(hugepages.anonymous_copy(getattr(weights, p)) for p in parts),
                                             weights.types, self.hidden_size, self.intermediate_size)
        self.tensors, self.weights = tensors, weights
        self._engine_key, self._engine = None, None
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
        ex = self._executor()
        if n <= self.chunk_tokens:  # decode and short prefill: one graph, no intermediate copies
            with ex.lock:
                return self._run(ex, x, idx, topk_w).to(x.device, x.dtype, copy=True)
        out = torch.empty((n, self.hidden_size), dtype=torch.float32)
        for s in range(0, n, self.chunk_tokens):
            e = min(n, s + self.chunk_tokens)
            with ex.lock:
                out[s:e] = self._run(ex, x[s:e], idx[s:e], topk_w[s:e])
        return out.to(x.device, x.dtype)

    def share_loaded(self, other: "GGMLExperts") -> None:
        """Take `other`'s loaded experts (the same mapped bytes, engine and prefill stream) instead of
        loading: benchmarks compare two kinds of this operator on one copy of a layer."""
        self.tensors, self.weights, self.prefill = other.tensors, other.weights, other.prefill
        self.engine_class, self.engine_why = other.engine_class, other.engine_why
        self._engine_key, self._engine = None, None

    def use_gpu(self, tokens: int, top_k: int) -> bool:
        """Whether a call of `tokens` tokens streams to prefill_device: the fixed threshold if one is
        set, else the cost model (prefill_cost.py) against this op's CPU engine."""
        if self.prefill_min_tokens is not None:
            return tokens >= self.prefill_min_tokens
        # the CPU side's cost: this op's engine where the profile has its table, else ggml's
        engine = self.engine_class.name if self.engine_class and self.engine_class.name in self.profile.cpu_ms else "ggml"
        return prefill_cost.use_gpu(self.profile, engine, tokens, self.n_experts, top_k, self.prefill.per_expert)

    def _from_gpu(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor,
                  gpu_work=None) -> torch.Tensor:
        """A decode step from the GPU: the three inputs come over in one wait (pinned buffers,
        asynchronous copies, one stream sync instead of one per tensor), and the result goes back
        asynchronously; the next call's sync orders it before the pinned output is written again.
        gpu_work: GPU work (e.g. resident experts, the shared expert) whose fp32 result is added to
        the CPU's: the engine then computes on a helper thread (the GIL is released meanwhile) while
        this thread launches that work, so neither waits for the other's launch overhead."""
        hx, hi, hw, hy = self._pinned(x, topk_idx, topk_w)
        hx.copy_(x, non_blocking=True)
        hi.copy_(topk_idx, non_blocking=True)
        hw.copy_(topk_w, non_blocking=True)
        torch.cuda.current_stream(x.device).synchronize()
        if gpu_work is None:
            self._checked_run_into(hx, hi, hw, hy)
            return hy.to(x.device, non_blocking=True)
        mode = torch.is_inference_mode_enabled()  # the helper thread writes the caller's tensors

        def on_host() -> None:
            with torch.inference_mode(mode):
                self._checked_run_into(hx, hi, hw, hy)

        done = _host_thread().submit(on_host)
        try:
            beside = gpu_work()
        finally:  # the helper thread reads and writes the pinned buffers: never leave it running
            done.result()
        return (hy.to(x.device, non_blocking=True).float() + beside).to(x.dtype)

    def _checked_run_into(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
        """A call on CPU buffers (the pinned ones of a call from a GPU) into `out`, under the
        executor's lock: checked first, its ids too unless the engine refuses bad ones itself
        (ggml would write out of bounds)."""
        ex = self._executor()
        with ex.lock:  # the engine is made under the lock its calls run under
            ids = not self._engine_for(idx.shape[1]).checks_ids(idx.shape[0])
            check_call(x, idx, w, self.n_experts, self.hidden_size, ids=ids)
            self._run_into(ex, x, idx, w, out)

    def _pinned(self, x, idx, w) -> tuple[torch.Tensor, ...]:
        key = (tuple(x.shape), x.dtype, tuple(idx.shape), idx.dtype, w.dtype)
        if self._pinned_key != key:
            self._pinned_key = key
            with torch.inference_mode(False):  # kept across calls, inside inference mode or not
                self._pinned_bufs = (torch.empty(x.shape, dtype=x.dtype, pin_memory=True),
                                     torch.empty(idx.shape, dtype=idx.dtype, pin_memory=True),
                                     torch.empty(w.shape, dtype=w.dtype, pin_memory=True),
                                     torch.empty(x.shape, dtype=x.dtype, pin_memory=True))
        return self._pinned_bufs

    def _executor(self) -> ggml_lib.Executor:
        """The ggml executor of these settings; its lock also serialises the other engines' layers."""
        return ggml_lib.executor(self.threads, self.poll, ggml_lib.core_cpus() if self.pin else None)

    def _run(self, ex: ggml_lib.Executor, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """These tokens on the chosen engine; returns float32 [T, hidden] that stays valid until the
        next call of any layer (caller holds ex.lock)."""
        return self._engine_for(idx.shape[1]).run(ex, x, idx, w)

    def _run_into(self, ex: ggml_lib.Executor, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                  out: torch.Tensor) -> torch.Tensor:
        """_run written into `out` (a decode call's pinned bf16 buffer: engines that can, write it directly)."""
        return self._engine_for(idx.shape[1]).run_into(ex, x, idx, w, out)

    def _engine_for(self, k: int) -> cpu_engines.CPUEngine:
        """The engine instance for calls of top-k `k` (made on first use)."""
        key = (self.threads, k)
        if self._engine_key != key:  # threads are set after load (threads.apply); kt sizes buffers by top-k
            self._engine = self.engine_class(self.weights, self.threads, self.chunk_tokens, k)
            self._engine_key = key
        return self._engine

    def extra_repr(self) -> str:
        types = "not loaded" if self.weights is None else "/".join(ggml_lib.type_name(t) for t in self.weights.types)
        return (f"n_experts={self.n_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
                f"threads={self.threads}, poll={self.poll}, {types}, "
                f"engine={self.engine_class.name if self.engine_class else self.engine}"
                + (", pinned" if self.pin else "") + (", huge pages" if self.hugepages else "")
                + (f", prefill on {self.prefill_device} "
                   + (f"from {self.prefill_min_tokens} tokens" if self.prefill_min_tokens else "by cost")
                   if self.prefill else ""))
