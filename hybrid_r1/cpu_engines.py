"""The CPU expert engines: the libraries that can compute one layer's routed experts from its
GGUF bytes in place, behind one small contract, and the choice between them (`engine:` of the
`experts.ggml_cpu` rule).

An engine declares the GGML types it computes (`types`), says why it cannot run in this process
(`missing()`: not installed, wrong CPU or Python), and computes `run(x, ids, w) -> out` (float32
[T, hidden] in and out, ids int64 [T, k], w float32 [T, k]) on the bytes of an
`ggml_lib.ExpertWeights`, never copying them. Engines:

    ggml          this project's ggml_lib (ggml-python): every type ggml's CPU backend multiplies.
    ggml_numa     ggml with one thread pool per NUMA node, each computing only the experts of its
                  node's share (numa.py): for two-socket hosts; never chosen by `auto` (the device
                  host has one node: not measured).
    kt_llamafile  kt-kernel's LLAMAFILE MoE (KTransformers' CPU kernels, PyPI `kt-kernel`), an
                  optional install: the K-quants, Q4_0, Q5_0 and Q8_0 (the types it computes to
                  within ggml's own rounding in tests/test_cpu_engines.py; it aborts the process on
                  IQ4_NL, IQ3_*, Q4_1, Q5_1, and errs 4% on IQ4_XS, so those never reach it).
                  Activations go in as float32, like ggml's: the same Q8_K rounding, the same bound.
    native        this project's own kernel (kernels/cpu_experts.c, cpu_kernels.py): Q4_K and Q6_K,
                  built on first use by the system C compiler; the same Q8_K rounding as ggml.
    native_numa   native split across NUMA nodes like ggml_numa (never chosen by `auto`).

`auto` takes the first engine of FASTEST_FIRST that is installed and was measured faster on all
three of a layer's types (`measured`), so ggml for any type the others cannot run or were not
measured on. The measurements (the device host's Xeon, same bytes, fresh routing): native read a
decode call's experts at 85-107 GB/s, 1.06-1.45x faster than kt_llamafile and 1.36-1.63x than ggml,
and stays ahead of
kt to 64 tokens (kt 7% ahead at 128) and of ggml to 256 (benchmarks/results/experts_cpu_native.md),
so auto runs native up to 96 tokens a call (256 where kt is absent; 1 with the AVX2 build) and the
next engine above (AutoNativeEngine); kt_llamafile beat ggml on Q4_K
gate/up + Q6_K down (the Q4_K_M mix) at decode and 1.4-2.1x from 128 tokens
(benchmarks/results/experts_cpu_engines.md); its other types run when a rule names it.

Nothing optional is imported or built at module import: kt-kernel is imported, and the native
kernel built, by `missing()` on first use.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import importlib
import importlib.util
import os
import sys
import threading
from typing import ClassVar

import torch

from . import cpu_kernels, ggml_lib
from .errors import HybridR1Error

ENGINE_NAMES = ("auto", "ggml", "ggml_numa", "kt_llamafile", "native", "native_numa")
FASTEST_FIRST = ("native", "kt_llamafile", "ggml")  # benchmarks/results/experts_cpu_native.md, _engines.md
KT_INSTALL = ("pip install --no-deps kt-kernel==0.7.2 (cp311/cp312 wheels; without its torch pin: "
              "it runs on the installed torch)")


class EngineError(HybridR1Error, ValueError):
    """An engine a rule asks for that cannot run here, or cannot run these types."""


class CPUEngine:
    """One layer's routed experts on one engine. Subclasses set `name` and `types` and implement
    `missing()`, `__init__(weights, threads, max_tokens, n_used)` and `run()`. The caller holds one lock
    around `run` and the use of its result (GGMLExperts: the ggml executor's), so one layer
    computes on the cores at a time."""

    name: ClassVar[str]
    types: ClassVar[frozenset[int] | None]  # GGML types it computes; None: all that ggml_lib's problems() accepts
    measured: ClassVar[frozenset[int] | None] = None  # types `auto` may choose it for (None: all it runs)

    @classmethod
    def missing(cls) -> str | None:
        """Why this engine cannot run in this process, or None."""
        return None

    @classmethod
    def runs(cls, types: tuple[int, int, int]) -> bool:
        return cls.types is None or all(t in cls.types for t in types)

    @classmethod
    def auto_runs(cls, types: tuple[int, int, int]) -> bool:
        return cls.runs(types) and (cls.measured is None or all(t in cls.measured for t in types))

    def run(self, ex: ggml_lib.Executor, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """float32 [T, hidden], valid until the next run of any layer (caller holds ex.lock)."""
        raise NotImplementedError

    def checks_ids(self, tokens: int) -> bool:
        """Whether a call of `tokens` tokens refuses expert ids out of range itself (ValueError,
        nothing written), so the caller need not look at them first."""
        return False

    def run_into(self, ex: ggml_lib.Executor, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
                 out: torch.Tensor) -> torch.Tensor:
        """run() written into `out` (any float dtype, [T, hidden]): engines that can write there
        directly skip the copy."""
        return out.copy_(self.run(ex, x, ids, w))

    @classmethod
    def c_handoff(cls) -> bool:
        """Whether the native kernel's C hand-over thread (handoff.NativeWorker, on the pool
        cpu_kernels.pool(threads, cpus)) serves this engine's overlapped decode calls, with no
        Python between the stream's request and the kernel; else the Python worker calls run_into."""
        return False


class GGMLEngine(CPUEngine):
    """ggml_lib's graph on the executor the operator hands in (its threads, poll and pinning)."""

    name = "ggml"
    types = None

    def __init__(self, weights: ggml_lib.ExpertWeights, threads: int, max_tokens: int, n_used: int):
        self.weights = weights

    def run(self, ex, x, ids, w):
        g = ex.moe_graph(self.weights, ids.shape[0], ids.shape[1])
        g.tensors["x"].copy_(x)  # to float32 on the CPU, int64 ids to int32, in one pass each
        g.tensors["ids"].copy_(ids)
        g.tensors["w"].copy_(w)
        ex.compute(g)
        return g.tensors["out"]


class NumaEngine(CPUEngine):
    """`inner`, the layer's experts split into one contiguous range per NUMA node (numa.py): node
    p's pool (its physical cores, pinned) computes the slots routed to its range, all nodes at once
    (the engines release the GIL), and the parts are summed. No weight is duplicated; each node reads
    only its range, which is local where its pages were first touched on that node."""

    inner: ClassVar[type[CPUEngine]]
    measured = frozenset()  # auto never picks it: one-node device host, not measured

    @classmethod
    def missing(cls) -> str | None:
        return cls.inner.missing()

    def __init__(self, weights: ggml_lib.ExpertWeights, threads: int, max_tokens: int, n_used: int):
        from concurrent.futures import ThreadPoolExecutor

        from . import numa

        nodes = numa.nodes()
        cores = set(ggml_lib.core_cpus())
        self.ranges = numa.expert_ranges(weights.n_experts, len(nodes))
        self.parts = []
        for (lo, hi), cpus in zip(self.ranges, nodes.values()):
            mine = tuple(c for c in cpus if c in cores) or cpus  # one thread per physical core of the node
            part = ggml_lib.ExpertWeights(weights.gate[lo:hi], weights.up[lo:hi], weights.down[lo:hi],
                                          weights.types, weights.hidden, weights.intermediate)
            # the node's executor: its threads and CPUs (native makes its pinned pool from them) and lock
            self.parts.append((self.inner(part, len(mine), max_tokens, n_used),
                               ggml_lib.executor(len(mine), 0, mine)))
        self.pool = ThreadPoolExecutor(len(self.parts)) if len(self.parts) > 1 else None

    def run(self, ex, x, ids, w):
        from . import numa

        x = x.to(torch.float32)
        splits = numa.split_routing(ids, w, self.ranges)

        def part(i: int) -> torch.Tensor | None:
            if splits[i] is None:
                return None
            engine, pex = self.parts[i]
            with contextlib.nullcontext() if pex is ex else pex.lock:  # the caller holds ex.lock
                return engine.run(pex, x, *splits[i]).clone()

        outs = list(self.pool.map(part, range(len(self.parts)))) if self.pool else [part(0)]
        outs = [o for o in outs if o is not None]
        if not outs:  # no tokens
            return torch.zeros((ids.shape[0], self.parts[0][0].weights.hidden))
        return functools.reduce(torch.add, outs)


class GGMLNumaEngine(NumaEngine):
    """ggml split across NUMA nodes (NumaEngine)."""

    name = "ggml_numa"
    types = None
    inner = GGMLEngine


# GGML type numbers kt-kernel 0.7.2's LLAMAFILE backend computes as ggml does (see the docstring)
KT_TYPES = frozenset({2, 6, 8, 10, 11, 12, 13, 14})  # Q4_0 Q5_0 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K


@functools.cache
def _kt():
    """kt-kernel's extension module, or the reason it cannot load (a str)."""
    if importlib.util.find_spec("kt_kernel") is None:
        return f"kt-kernel is not installed ({KT_INSTALL})"
    try:
        importlib.import_module("kt_kernel")  # picks the CPU variant (AMX, AVX-512, AVX2) and registers the extension
        return importlib.import_module("kt_kernel_ext")
    except Exception as e:  # noqa: BLE001 - any failure to load an optional native module means "absent"
        return f"kt-kernel is installed but does not load here: {type(e).__name__}: {str(e).splitlines()[0]}"


@contextlib.contextmanager
def _stdout_to_stderr():
    """kt-kernel's C++ prints banners to stdout (fd 1), where `hybrid-r1 generate` writes the
    answer: while kt builds its pools and layers, fd 1 points at stderr. Both C stdio buffers are
    flushed at each switch, so nothing buffered crosses over."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    libc.fflush(None)
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def _stdout_to_stderr_at_exit() -> None:
    """Its pools say goodbye on stdout when the interpreter tears them down: after everything
    else has been written and flushed, fd 1 points at stderr for the rest of the shutdown."""
    sys.stdout.flush()
    ctypes.CDLL(None).fflush(None)
    os.dup2(2, 1)


_kt_pools: dict[int, object] = {}
_kt_pools_lock = threading.Lock()


def kt_worker_threads(threads: int) -> int:
    """kt-kernel's worker count for `threads`: one fewer where `threads` fills every usable CPU, as
    its submitting thread spins on a core of its own (at 16 workers on 16 CPUs decode ran 4-5x
    slower on the device host; shared/reference/PEERS.md)."""
    from .threads import usable_cpus

    return max(1, threads - 1) if threads >= usable_cpus() else threads


class KTLlamafileEngine(CPUEngine):
    """kt-kernel's LLAMAFILE MoE over the GGUF bytes in place (its MOEConfig takes their addresses
    and reads them there: tests/test_cpu_engines.py changes the bytes and sees it)."""

    name = "kt_llamafile"
    types = KT_TYPES
    measured = frozenset({12, 14})  # Q4_K, Q6_K: benchmarks/results/experts_cpu_engines.md

    @classmethod
    def missing(cls) -> str | None:
        kt = _kt()
        return kt if isinstance(kt, str) else None

    def __init__(self, weights: ggml_lib.ExpertWeights, threads: int, max_tokens: int, n_used: int):
        kt = _kt()
        if isinstance(kt, str):
            raise EngineError(f"engine kt_llamafile: {kt}")
        self.weights, self.max_tokens, self.n_used = weights, max_tokens, n_used
        self.pool = self._pool(kt, kt_worker_threads(threads))
        self._mask = torch.zeros(weights.n_experts, dtype=torch.bool)  # no expert on a GPU; read by kt
        cfg = kt.moe.MOEConfig(weights.n_experts, n_used, weights.hidden, weights.intermediate, self._mask.data_ptr())
        cfg.layer_idx, cfg.pool = 0, self.pool.backend_
        cfg.m_block, cfg.group_min_len = 32, 10  # kt's own LLAMAFILE settings (one-token path below 10)
        cfg.max_len = cfg.group_max_len = max_tokens  # sizes its activation buffers
        cfg.gate_proj, cfg.up_proj, cfg.down_proj = weights.addresses
        cfg.gate_type, cfg.up_type, cfg.down_type = weights.types
        cfg.hidden_type = kt.kvcache.ggml_type.FP32
        self._map = torch.arange(weights.n_experts, dtype=torch.int32)
        with _stdout_to_stderr():
            self.moe = kt.moe.MOE(cfg)
            self.pool.submit(self.moe.load_weights_task(self._map.data_ptr()))
            self.pool.sync()
        self._bsz = torch.zeros(1, dtype=torch.int32)
        self._out = torch.empty(0)

    @staticmethod
    def _pool(kt, n: int):
        """One kt worker pool per worker count in the process, shared by its layers."""
        with _kt_pools_lock:
            if n not in _kt_pools:
                cfg = kt.WorkerPoolConfig()
                cfg.subpool_count, cfg.subpool_numa_map, cfg.subpool_thread_count = 1, [0], [n]
                if not _kt_pools:
                    atexit.register(_stdout_to_stderr_at_exit)
                with _stdout_to_stderr():
                    _kt_pools[n] = kt.CPUInfer(cfg)
            return _kt_pools[n]

    def run(self, ex, x, ids, w):
        T, k = ids.shape
        if T > self.max_tokens or k != self.n_used:  # kt sized its buffers for these: more would overrun them
            raise ValueError(f"this kt_llamafile layer takes at most {self.max_tokens} tokens of {self.n_used} "
                             f"experts a call, got {T} of {k}")
        if T == 0:
            return torch.empty((0, self.weights.hidden))
        x = x.to(torch.float32).contiguous()
        ids = ids.to(torch.int64).contiguous()
        w = w.to(torch.float32).contiguous()
        if self._out.shape != x.shape:
            self._out = torch.empty(x.shape, dtype=torch.float32)
        self._bsz[0] = T
        self.pool.submit(self.moe.forward_task(self._bsz.data_ptr(), k, ids.data_ptr(), w.data_ptr(),
                                               x.data_ptr(), self._out.data_ptr(), False))
        self.pool.sync()
        return self._out


class NativeEngine(CPUEngine):
    """This project's own kernel (kernels/cpu_experts.c through cpu_kernels.py): Q4_K and Q6_K,
    activations rounded to Q8_K as ggml rounds them, rows claimed from a shared counter by a pool of
    threads (the calling thread one of them) of the executor the operator hands in: its count and,
    with `pin: true`, its CPUs (worker i on the i-th, the caller where it is).

    `up_to()`: calls of more tokens go to `above`, the fastest other engine for the layer's types
    (auto's choice, AutoNativeEngine: the kernel dots a row with at most 4 tokens at a time, which
    wins while a call reads more than it computes; kt-kernel's tiled GEMM wins from ~100 tokens)."""

    name = "native"
    types = cpu_kernels.TYPES

    @classmethod
    def missing(cls) -> str | None:
        return cpu_kernels.missing()

    @classmethod
    def auto_runs(cls, types: tuple[int, int, int]) -> bool:  # where a SIMD path builds (plain C: never)
        return super().auto_runs(types) and cls.missing() is None and cpu_kernels.simd() > 0

    @classmethod
    def above(cls, types: tuple[int, int, int]) -> type[CPUEngine]:
        return _fastest(types, skip=cls.name)

    @classmethod
    def up_to(cls, types: tuple[int, int, int]) -> int | None:
        """The most tokens a call computes here (None: all); more go to above(types)."""
        return None

    def __init__(self, weights: ggml_lib.ExpertWeights, threads: int, max_tokens: int, n_used: int):
        self.weights = weights
        self._out = torch.empty(0)
        self._up_to = self.up_to(weights.types)
        self._above = (self.above(weights.types)(weights, threads, max_tokens, n_used)
                       if self._up_to is not None and max_tokens > self._up_to else None)

    def _hands_up(self, ids: torch.Tensor) -> bool:
        return self._above is not None and ids.shape[0] > self._up_to

    def checks_ids(self, tokens: int) -> bool:  # the kernel returns an error before it reads a row
        return self._above is None or tokens <= self._up_to

    @classmethod
    def c_handoff(cls) -> bool:
        # the hand-over's calls (<= 8 tokens) all on this kernel, auto's too: correct at any size,
        # and decode's 1-token calls are what it is for (auto hands longer calls to another engine
        # for speed at dozens of tokens and more)
        return True

    def run(self, ex, x, ids, w):
        if self._hands_up(ids):
            return self._above.run(ex, x, ids, w)
        if self._out.shape != x.shape:
            self._out = torch.empty(x.shape, dtype=torch.float32)
        return self.run_into(ex, x, ids, w, self._out)

    def run_into(self, ex, x, ids, w, out):
        if self._hands_up(ids):
            return self._above.run_into(ex, x, ids, w, out)
        direct = out.device.type == "cpu" and out.dtype in cpu_kernels.FLOATS and out.is_contiguous()
        target = out if direct else torch.empty(out.shape, dtype=torch.float32)
        x = x if x.device.type == "cpu" and x.dtype in cpu_kernels.FLOATS and x.is_contiguous() \
            else x.to("cpu", torch.float32).contiguous()
        cpu_kernels.pool(ex.n_threads, ex.cpus).moe(self.weights, x, ids.to("cpu", torch.int64).contiguous(),
                                                     w.to("cpu", torch.float32).contiguous(), target)
        return out if direct else out.copy_(target)


class AutoNativeEngine(NativeEngine):
    """auto's choice where the native kernel has a SIMD path: native for calls of up to UP_TO tokens,
    the next engine above. Measured on the device host's Xeon (benchmarks/results/experts_cpu_native.md):
    AVX-512 beat kt-kernel at 1-64 tokens (kt 7% faster at 128) and ggml at 1-256; the AVX2 build
    (run on that Xeon, -march=haswell) beat both at decode (1 token) and lost to ggml from 8 (before
    its 4-token kernel, which is not measured there yet: the threshold stays at 1)."""

    UP_TO: ClassVar[dict[tuple[int, str], int]] = {(2, "kt_llamafile"): 96, (2, "ggml"): 256,
                                                  (1, "kt_llamafile"): 1, (1, "ggml"): 1}

    @classmethod
    def up_to(cls, types: tuple[int, int, int]) -> int:
        return cls.UP_TO[(cpu_kernels.simd(), cls.above(types).name)]


class NativeNumaEngine(NumaEngine):
    """The native kernel split across NUMA nodes (NumaEngine): one pinned pool per node."""

    name = "native_numa"
    types = cpu_kernels.TYPES
    inner = NativeEngine


ENGINES: dict[str, type[CPUEngine]] = {"ggml": GGMLEngine, "ggml_numa": GGMLNumaEngine,
                                       "kt_llamafile": KTLlamafileEngine, "native": NativeEngine,
                                       "native_numa": NativeNumaEngine}


def installed() -> list[str]:
    """Names of the engines that can run in this process, fastest first."""
    return [n for n in FASTEST_FIRST if ENGINES[n].missing() is None]


def check_installed(name: str) -> None:
    """EngineError if engine `name` (not auto) cannot run here."""
    if name != "auto":
        why = ENGINES[name].missing()
        if why is not None:
            raise EngineError(f"engine {name} cannot run: {why}")


def choose(name: str, types: tuple[int, int, int]) -> tuple[type[CPUEngine], str]:
    """The engine class for a layer of these gate/up/down types, and why it was chosen."""
    shown = "/".join(ggml_lib.type_name(t) for t in types)
    if name != "auto":
        check_installed(name)
        cls = ENGINES[name]
        if not cls.runs(types):
            runs = ", ".join(sorted(ggml_lib.type_name(t) for t in cls.types or ()))
            raise EngineError(f"engine {name} runs {runs}, not {shown} (engine: ggml or auto runs any type)")
        return cls, "engine: " + name
    cls = _fastest(types)
    if cls is NativeEngine:
        n, above = AutoNativeEngine.up_to(types), AutoNativeEngine.above(types).name
        simd = "AVX-512" if cpu_kernels.simd() == 2 else "AVX2"
        return AutoNativeEngine, (f"auto: native ({simd}) up to {n} token{'s' * (n != 1)} a call, {above} above, "
                                  f"for {shown}")
    return cls, f"auto: the fastest installed engine for {shown}"


def _fastest(types: tuple[int, int, int], skip: str = "") -> type[CPUEngine]:
    """The first engine of FASTEST_FIRST (but `skip`) that auto may pick for these types and can run here."""
    for n in FASTEST_FIRST:
        cls = ENGINES[n]
        if n != skip and cls.missing() is None and cls.auto_runs(types):
            return cls
    raise AssertionError("ggml runs every type")  # GGMLEngine.types is None


def describe_missing() -> str:
    """One line on the optional engines that are not installed (for the startup line), or ''."""
    absent = [n for n in FASTEST_FIRST if ENGINES[n].missing() is not None]
    return f"not installed: {', '.join(absent)}" if absent else ""
