"""The one module that talks to ggml (llama.cpp's tensor library) through the ctypes bindings of the
PyPI package ggml-python: quantization of float rows into any ggml type, and the routed-experts graph
(three `ggml_mul_mat_id` + SwiGLU) computed by ggml's CPU kernels on GGUF bytes in place.

Nothing happens at import: the shared libraries load on first use. ggml aborts the process on a
failed assert, so every argument is checked here before it reaches ggml.

ctypes releases the GIL for the whole of every foreign call (the bindings use `ctypes.CDLL`), so
other Python threads (the GPU side of a decode step) run while ggml computes.

ggml-python 0.0.45 declares a few functions with a 32-bit return type where C returns a pointer
(`ggml_backend_cpu_buffer_type`, `ggml_backend_alloc_buffer`, `ggml_backend_cpu_buffer_from_ptr`,
`ggml_backend_reg_get_default_buffer_type`, ...: restype `NewType(..., int)`, which ctypes reads as a
C int): calling them truncates the pointer. This module uses none of them (no backend buffers or
ggml-alloc: weight tensors point into numpy memory, activations into an arena this module lays out).
Should one be needed, take a fresh handle (`ctypes.CDLL(path)[name]`) and set its restype to
c_void_p rather than mutating the bindings' shared function object.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

# ggml_type values (include/ggml.h; equal to gguf.GGMLQuantizationType)
F32, F16, Q8_0, Q8_K, I32, BF16 = 0, 1, 8, 15, 26, 30

# types ggml_quantize_chunk writes (any other type reaches an assert that aborts the process)
QUANTIZE_TYPES = {
    "F32": 0, "F16": 1, "BF16": 30, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8,
    "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14,
    "IQ2_XXS": 16, "IQ2_XS": 17, "IQ3_XXS": 18, "IQ1_S": 19, "IQ4_NL": 20, "IQ3_S": 21, "IQ2_S": 22,
    "IQ4_XS": 23, "IQ1_M": 29, "TQ1_0": 34, "TQ2_0": 35, "MXFP4": 39, "NVFP4": 40, "Q1_0": 41,
}
_TYPE_NAMES = {v: k for k, v in QUANTIZE_TYPES.items()} | {9: "Q8_1", 15: "Q8_K", 24: "I8", 25: "I16", 26: "I32"}


@functools.cache
def _ggml():
    """The ggml-python module, its libraries loaded (first call only)."""
    try:
        import ggml
    except ImportError as e:  # a hard dependency: say how to get it
        raise ImportError(f"hybrid_r1 needs ggml-python (pip install ggml-python==0.0.45): {e}") from e
    ggml.ggml_cpu_init()
    return ggml


def type_name(ggml_type: int) -> str:
    return _TYPE_NAMES.get(ggml_type, f"type {ggml_type}")


def block_size(ggml_type: int) -> int:
    """Elements per block (256 for K-quants and most IQ types, 32 for Q4_0..Q8_0, 1 for floats)."""
    return int(_ggml().ggml_blck_size(ggml_type))


def row_bytes(ggml_type: int, ne0: int) -> int:
    """Bytes of one row of `ne0` elements; ne0 must be a multiple of the block size."""
    bs = block_size(ggml_type)
    if ne0 % bs:
        raise ValueError(f"{type_name(ggml_type)} rows need a multiple of {bs} elements, got {ne0}")
    return int(_ggml().ggml_row_size(ggml_type, ne0))


def requires_imatrix(ggml_type: int) -> bool:
    """True for the types ggml refuses to quantize without an importance matrix (IQ2_XXS, IQ2_XS, IQ1_S)."""
    return bool(_ggml().ggml_quantize_requires_imatrix(ggml_type))


def vec_dot_type(ggml_type: int) -> int:
    """The type ggml converts activations to before its dot products with weights of `ggml_type`
    (Q8_K for K-quants and most IQ types, Q8_0/Q8_1 for the 32-blocks, the float type itself)."""
    return int(_ggml().ggml_get_type_traits_cpu(ggml_type).contents.vec_dot_type)


def supports_matmul(ggml_type: int) -> bool:
    """True if ggml's CPU backend has a dot product for weights of this type."""
    if not 0 <= ggml_type < _ggml().GGML_TYPE_COUNT or ggml_type in (I32, 24, 25, 27):
        return False
    g = _ggml()
    traits = g.ggml_get_type_traits_cpu(ggml_type).contents
    if not traits.vec_dot:
        return False
    act = g.ggml_get_type_traits_cpu(traits.vec_dot_type).contents
    return traits.vec_dot_type == F32 or bool(act.from_float)


def quantize(x: np.ndarray, ggml_type: int, imatrix: np.ndarray | None = None, threads: int = 1) -> np.ndarray:
    """Rows of float32 `x` [rows, ne0] as ggml blocks: uint8 [rows, row_bytes(ggml_type, ne0)].

    Byte for byte what llama-quantize writes. IQ2_XXS, IQ2_XS and IQ1_S need an importance matrix
    (one weight per column, [ne0]); without one every column weighs the same (a uniform imatrix).
    The other types use `imatrix` if given. `threads` > 1 quantizes row chunks in parallel."""
    if ggml_type not in QUANTIZE_TYPES.values():
        raise ValueError(f"ggml cannot quantize to {type_name(ggml_type)}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"quantize takes [rows, ne0], got shape {list(x.shape)}")
    rows, ne0 = x.shape
    out = np.empty((rows, row_bytes(ggml_type, ne0)), np.uint8)
    if imatrix is None and requires_imatrix(ggml_type):
        imatrix = np.ones(ne0, np.float32)
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.shape != (ne0,):
            raise ValueError(f"imatrix must be [{ne0}], got {list(imatrix.shape)}")
    if rows == 0:
        return out
    g = _ggml()
    fp = ctypes.POINTER(ctypes.c_float)
    src, dst = x.ctypes.data_as(fp), out.ctypes.data
    im = imatrix.ctypes.data_as(fp) if imatrix is not None else None

    def chunk(r0: int, r1: int) -> None:
        g.ggml_quantize_chunk(ggml_type, src, dst, r0 * ne0, r1 - r0, ne0, im)

    step = -(-rows // max(1, threads))
    if threads <= 1 or rows < 2 * threads:
        chunk(0, rows)
    else:
        with ThreadPoolExecutor(threads) as pool:  # the GIL is released inside ggml
            list(pool.map(lambda r: chunk(r, min(rows, r + step)), range(0, rows, step)))
    return out


def cpu_features() -> list[str]:
    """The x86 instruction sets this ggml build uses (compiled in, and present on this CPU)."""
    g = _ggml()
    names = ("avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni", "avx512", "avx512_vbmi", "avx512_vnni", "avx512_bf16",
             "amx_int8")
    return [n.upper() for n in names if getattr(g, f"ggml_cpu_has_{n}", lambda: 0)()]


def core_cpus() -> tuple[int, ...]:
    """One logical CPU per physical core this process may run on (the lowest-numbered SMT sibling),
    sorted: where pinned threads go. Without /sys topology, every usable CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    first: dict[tuple[str, str], int] = {}
    for c in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{c}/topology/core_id") as f:
                core = f.read().strip()
            with open(f"/sys/devices/system/cpu/cpu{c}/topology/physical_package_id") as f:
                package = f.read().strip()
        except OSError:
            return tuple(cpus)
        first.setdefault((package, core), c)
    return tuple(sorted(first.values())) or tuple(cpus)


def physical_cores() -> int:
    """Cores this process may run on, one per physical core (SMT siblings counted once)."""
    return max(1, len(core_cpus()))


@dataclass(frozen=True)
class ExpertWeights:
    """The routed experts of one layer as ggml sees them: three 3-D tensors whose bytes stay where
    they are (e.g. a memory-mapped GGUF). Arrays are uint8 (n_experts, rows, row_bytes), C-contiguous."""

    gate: np.ndarray  # rows = intermediate, ne0 = hidden
    up: np.ndarray
    down: np.ndarray  # rows = hidden, ne0 = intermediate
    types: tuple[int, int, int]  # ggml types of gate, up, down
    hidden: int
    intermediate: int

    @property
    def n_experts(self) -> int:
        return self.gate.shape[0]

    @property
    def key(self) -> tuple:
        return (self.types, self.n_experts, self.hidden, self.intermediate)

    @functools.cached_property
    def addresses(self) -> tuple[int, int, int]:
        return self.gate.ctypes.data, self.up.ctypes.data, self.down.ctypes.data

    def problems(self) -> dict[str, str]:
        """{"gate" | "up" | "down": why ggml cannot run that tensor in place}; empty if all is well."""
        want = {"gate": (self.intermediate, self.hidden), "up": (self.intermediate, self.hidden),
                "down": (self.hidden, self.intermediate)}
        found = {}
        for (part, (rows, ne0)), t in zip(want.items(), self.types):
            a = getattr(self, part)
            if not supports_matmul(t):
                found[part] = f"ggml's CPU backend has no matmul for {type_name(t)}"
                continue
            shape = (self.n_experts, rows, row_bytes(t, ne0))
            if a.dtype != np.uint8 or a.shape != shape:
                found[part] = f"expected uint8 {list(shape)} ({type_name(t)}), got {a.dtype} {list(a.shape)}"
            elif not a.flags.c_contiguous:
                found[part] = "the expert bytes are not contiguous (ggml reads them in place)"
        return found


def _align(n: int, a: int = 64) -> int:
    return -(-n // a) * a


class MoEGraph:
    """The experts graph for `n_tokens` tokens, `n_used` experts each (llama.cpp's build_moe_ffn):
    gate = mul_mat_id(W_gate, x), up = mul_mat_id(W_up, x), h = silu(gate) * up * w,
    y = mul_mat_id(W_down, h), out = sum over the n_used slots of y.
    Weight tensors are re-pointed at a layer's bytes before each run; activations live in the
    executor's arena at fixed offsets (gate/up and y share memory: gate/up are dead once h exists)."""

    @staticmethod
    def layout(key: tuple, n_tokens: int, n_used: int) -> tuple[dict[str, int], int]:
        """Byte offsets of the activations in the arena, and the bytes needed."""
        _, _, H, I = key
        T, k = n_tokens, n_used
        offs, pos = {}, 0
        for name, nbytes in (("x", H * T * 4), ("ids", k * T * 4), ("w", k * T * 4), ("h", I * k * T * 4),
                             ("gu_y", max(2 * I * k * T * 4, H * k * T * 4))):
            offs[name], pos = pos, pos + _align(nbytes)
        return offs, pos

    def __init__(self, key: tuple, n_tokens: int, n_used: int, arena: np.ndarray):
        g = _ggml()
        (tg, tu, td), n_exp, H, I = key
        T, k = n_tokens, n_used
        offs, need = self.layout(key, T, k)
        assert need <= arena.nbytes
        n_nodes = 4 * k + 32
        meta = g.ggml_tensor_overhead() * n_nodes + g.ggml_graph_overhead_custom(n_nodes, False)
        params = g.ggml_init_params(mem_size=meta, mem_buffer=None, no_alloc=True)  # metadata only
        self.ctx = g.ggml_init(params)
        if not self.ctx:
            raise MemoryError("ggml_init failed")
        ctx = self.ctx
        base = arena.ctypes.data

        def at(t, off):
            t.contents.data = base + off
            return t

        wg = g.ggml_new_tensor_3d(ctx, tg, H, I, n_exp)
        wu = g.ggml_new_tensor_3d(ctx, tu, H, I, n_exp)
        wd = g.ggml_new_tensor_3d(ctx, td, I, H, n_exp)
        self._weights = (wg.contents, wu.contents, wd.contents)  # structs in ggml's memory, re-pointed by bind()
        x = at(g.ggml_new_tensor_3d(ctx, F32, H, 1, T), offs["x"])
        ids = at(g.ggml_new_tensor_2d(ctx, I32, k, T), offs["ids"])
        w = at(g.ggml_new_tensor_3d(ctx, F32, 1, k, T), offs["w"])
        gate = at(g.ggml_mul_mat_id(ctx, wg, x, ids), offs["gu_y"])
        up = at(g.ggml_mul_mat_id(ctx, wu, x, ids), offs["gu_y"] + I * k * T * 4)
        h = at(g.ggml_swiglu_split(ctx, gate, up), offs["h"])
        h = g.ggml_mul_inplace(ctx, h, w)  # routing weight before down: down is linear
        y = at(g.ggml_mul_mat_id(ctx, wd, h, ids), offs["gu_y"])
        out = g.ggml_view_2d(ctx, y, H, T, y.contents.nb[2], 0)
        for slot in range(1, k):
            out = g.ggml_add_inplace(ctx, out, g.ggml_view_2d(ctx, y, H, T, y.contents.nb[2], slot * y.contents.nb[1]))
        self.graph = g.ggml_new_graph_custom(ctx, n_nodes, False)
        g.ggml_build_forward_expand(self.graph, out)

        def view(name, n, dtype, shape):
            return arena[offs[name]: offs[name] + n * np.dtype(dtype).itemsize].view(dtype).reshape(shape)

        self.x = view("x", T * H, np.float32, (T, H))  # inputs, written by the caller
        self.ids = view("ids", T * k, np.int32, (T, k))
        self.w = view("w", T * k, np.float32, (T, k))
        self.out = view("gu_y", T * k * H, np.float32, (T, k, H))[:, 0, :]  # the sum lands in slot 0
        with torch.inference_mode(False):  # plain tensors: written from any thread, in inference mode or not
            self.tensors = {name: torch.from_numpy(getattr(self, name)) for name in ("x", "ids", "w", "out")}
        self.plan = None  # ggml_cplan, made by the executor on first run

    def bind(self, weights: ExpertWeights) -> None:
        for tensor, address in zip(self._weights, weights.addresses):
            tensor.data = address

    def free(self) -> None:
        if self.ctx:
            _ggml().ggml_free(self.ctx)
            self.ctx = None


class Executor:
    """A ggml thread pool with its work buffer, activation arena and cached graphs, shared by every
    experts layer that runs with the same thread count. One graph runs at a time (hold `lock` from
    writing a graph's inputs to reading its output).

    `poll` (0-100, ggml's scale; llama.cpp uses 50): how long idle workers spin waiting for the next
    graph before they sleep. 50 spins ~0.1 s after every graph, on every worker; 0 sleeps at once,
    leaving the cores to the rest of the step (the GPU side) at a wake-up cost of microseconds.

    `cpus` pins each thread to one of the lowest `n_threads` of these CPUs (ggml's strict placement,
    wrapping if there are fewer; e.g. core_cpus(): one thread per physical core). ggml pins the
    calling thread too (as thread 0, at creation and on wake-up); its affinity is put back after
    every call, else threads it starts later (torch's pool) would inherit one CPU. A ggml built with
    OpenMP (some installs are; the sdist's own build is pthreads) pins OpenMP's workers, shared by
    every executor, on each pinned call: they stay pinned for unpinned executors in the process."""

    MAX_GRAPHS = 32

    def __init__(self, n_threads: int, poll: int = 0, cpus: tuple[int, ...] | None = None):
        if n_threads < 1:
            raise ValueError(f"threads must be >= 1, got {n_threads}")
        if not 0 <= poll <= 100:
            raise ValueError(f"poll must be in 0..100, got {poll}")
        g = _ggml()
        if cpus is not None and (not cpus or any(not 0 <= c < g.GGML_MAX_N_THREADS for c in cpus)):
            raise ValueError(f"cpus must be CPU numbers below {g.GGML_MAX_N_THREADS}, got {cpus}")
        self.n_threads, self.poll, self.cpus = n_threads, poll, cpus
        self.lock = threading.Lock()
        params = g.ggml_threadpool_params_default(n_threads)
        params.poll = poll
        if cpus is not None:  # strict: each thread takes the next set CPU, in ascending order, wrapping
            for c in sorted(cpus)[:n_threads]:
                params.cpumask[c] = True
            params.strict_cpu = True
        with _keep_affinity():
            self.threadpool = g.ggml_threadpool_new(ctypes.byref(params))
        if not self.threadpool:
            raise RuntimeError(f"ggml could not start {n_threads} threads")
        self._arena = np.empty(0, np.uint8)
        self._work = np.empty(0, np.uint8)
        self._graphs: collections.OrderedDict[tuple, MoEGraph] = collections.OrderedDict()

    def moe_graph(self, weights: ExpertWeights, n_tokens: int, n_used: int) -> MoEGraph:
        """The cached graph for this layer shape and token count, weights bound (caller holds `lock`)."""
        key = (weights.key, n_tokens, n_used)
        graph = self._graphs.get(key)
        if graph is None:
            _, need = MoEGraph.layout(weights.key, n_tokens, n_used)
            if need > self._arena.nbytes:  # grow: every cached graph points into the old arena
                self.clear()
                self._arena = _aligned_empty(need)
            graph = MoEGraph(weights.key, n_tokens, n_used, self._arena)
            self._graphs[key] = graph
            if len(self._graphs) > self.MAX_GRAPHS:
                self._graphs.popitem(last=False)[1].free()
        self._graphs.move_to_end(key)
        graph.bind(weights)
        return graph

    def compute(self, graph: MoEGraph) -> None:
        """Run `graph` on the pool (caller holds `lock`); the GIL is released meanwhile."""
        g = _ggml()
        if graph.plan is None:
            graph.plan = g.ggml_graph_plan(graph.graph, self.n_threads, self.threadpool)
        if graph.plan.work_size > self._work.nbytes:
            self._work = _aligned_empty(graph.plan.work_size)
        graph.plan.work_data = ctypes.cast(self._work.ctypes.data, ctypes.POINTER(ctypes.c_uint8))
        if self.cpus is None:
            status = g.ggml_graph_compute(graph.graph, ctypes.byref(graph.plan))
        else:
            with _keep_affinity():
                status = g.ggml_graph_compute(graph.graph, ctypes.byref(graph.plan))
        if status != 0:
            raise RuntimeError(f"ggml_graph_compute failed with status {status}")

    def clear(self) -> None:
        while self._graphs:
            self._graphs.popitem()[1].free()


def _aligned_empty(nbytes: int) -> np.ndarray:
    raw = np.empty(nbytes + 64, np.uint8)
    start = (-raw.ctypes.data) % 64
    return raw[start: start + nbytes]


class _keep_affinity:
    """Restores the calling thread's CPU affinity on exit (ggml pins its caller when it pins)."""

    def __enter__(self):
        self.saved = os.sched_getaffinity(0)  # pid 0 = the calling thread on Linux

    def __exit__(self, *exc):
        os.sched_setaffinity(0, self.saved)


_executors: dict[tuple, Executor] = {}
_executors_lock = threading.Lock()


def executor(n_threads: int, poll: int = 0, cpus: tuple[int, ...] | None = None) -> Executor:
    """The process-wide executor for these settings (made on first use, then shared)."""
    key = (n_threads, poll, cpus)
    with _executors_lock:
        if key not in _executors:
            _executors[key] = Executor(n_threads, poll, cpus)
        return _executors[key]
