"""This project's own CPU expert kernel (kernels/cpu_experts.c, engine `native`): built with the
system C compiler on first use, cached, loaded with ctypes, and wrapped as a thread pool.

The library is compiled for the host it runs on into ~/.cache/hybrid_r1 (or $HYBRID_R1_CACHE),
named by a hash of the source, the compiler, its flags and the CPU's model and flags, so a home
folder shared by different machines keeps one build per machine. Variants (VARIANTS): "native"
(-march=native: the AVX-512 VNNI dot products where the CPU has them, else AVX2, else plain C),
"avx2" (-march=haswell: the AVX2 path on any AVX2 CPU, for comparing the two on one host) and
"portable" (-DHR1_SCALAR: plain C, what the tests hold the SIMD paths to). A build is
written under a temporary name and renamed, so processes building at once never load half a file.
Nothing is built or loaded at import.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from importlib import resources
from pathlib import Path

import torch

TYPES = frozenset({12, 14})  # Q4_K, Q6_K: the Q4_K_M mix's expert types
# idle workers spin this long, then sleep on a futex (a waker costs them ~10-50 us, and a late
# worker only joins late: rows are claimed, not assigned). Short, so that between two layers' calls
# the cores are left to the threads that launch and wait for the GPU's part; one noisy sweep on the
# device host had its fastest 4-layer decode step at the shortest spin (8.93 ms; 9.46 at 2 ms):
# benchmarks/results/decode_overlap_native_spin*_h200.md.
SPIN_NS = 50_000
VARIANTS = {"native": ["-march=native"], "avx2": ["-march=haswell"], "portable": ["-DHR1_SCALAR"]}
VARIANT = "native"  # what pool() builds (benchmarks set "avx2" to compare the paths on one host)
# bytes ahead the dot products prefetch: decode on the device host's Xeon took 3.0 ms a layer with
# the hardware prefetchers alone, 2.5 at 1 KiB and 2.2 at 4 KiB (benchmarks/results/experts_cpu_native_run1.md;
# 2-16 KiB alike: experts_cpu_native_pf.md)
PREFETCH = 4096
X_BF16, OUT_BF16 = 1, 2  # hr1_moe's flags
FLOATS = (torch.float32, torch.bfloat16)
ERRORS = {-1: "a weight type or width it does not compute", -2: "an expert id out of range", -3: "out of memory"}


class KernelBuildError(RuntimeError):
    """The C compiler is missing or failed: the engine is then not available (its reason)."""


def _compiler() -> str:
    cc = os.environ.get("CC", "cc")
    path = shutil.which(cc)
    if path is None:
        raise KernelBuildError(f"no C compiler: {cc!r} is not on PATH (set CC)")
    return path


def _cpu_key() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(lines)))


def _cache_dir() -> Path:
    root = os.environ.get("HYBRID_R1_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hybrid_r1")
    return Path(root)


def library(variant: str = "native") -> ctypes.CDLL:
    """The compiled kernel for this host (KernelBuildError if it cannot be built: the reason is
    kept, so a failed build is not retried on every layer)."""
    lib = _built(variant)
    if isinstance(lib, str):
        raise KernelBuildError(lib)
    return lib


@functools.cache
def _built(variant: str) -> ctypes.CDLL | str:
    try:
        return _load(_build(variant))
    except KernelBuildError as e:
        return str(e)


def _build(variant: str) -> Path:
    source = resources.files("hybrid_r1_kernels").joinpath("cpu_experts.c").read_bytes()
    cc = _compiler()
    flags = ["-O3", "-std=c11", "-shared", "-fPIC", "-pthread", *VARIANTS[variant]]
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), version.encode(), _cpu_key().encode()]))
    name = f"cpu_experts-{key.hexdigest()[:16]}.so"
    try:
        return _compile(cc, flags, source, _cache_dir(), name)
    except OSError:  # an unwritable cache folder: a private one for this process
        try:
            return _compile(cc, flags, source, Path(tempfile.mkdtemp(prefix="hybrid_r1_")), name)
        except OSError as e:
            raise KernelBuildError(f"no folder to build the kernel in: {e}") from None


def _compile(cc: str, flags: list[str], source: bytes, folder: Path, name: str) -> Path:
    target = folder / name
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        src = Path(tmp) / "cpu_experts.c"
        src.write_bytes(source)
        out = Path(tmp) / name
        done = subprocess.run([cc, *flags, "-o", str(out), str(src), "-lm"], capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["no message"]
            why = next((ln for ln in lines if "error" in ln), lines[-1])
            raise KernelBuildError(f"{cc} could not build kernels/cpu_experts.c: {why.strip()}")
        os.replace(out, target)  # whole or not at all, for processes building at once
    return target


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.hr1_simd.restype = ctypes.c_int
    lib.hr1_pool_new.restype = ctypes.c_void_p
    lib.hr1_pool_new.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.c_long]
    lib.hr1_pool_free.argtypes = [ctypes.c_void_p]
    lib.hr1_pool_threads.restype = ctypes.c_int
    lib.hr1_pool_threads.argtypes = [ctypes.c_void_p]
    p, i, l = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    lib.hr1_moe.restype = ctypes.c_int
    lib.hr1_moe.argtypes = [p, p, p, p, i, i, i, i, i, i, i, i, p, p, p, p, i, i]
    lib.hr1_poller_new.restype = p
    lib.hr1_poller_new.argtypes = [p, p, i, i, i, i, l, l]
    lib.hr1_poller_slot.restype = i
    lib.hr1_poller_slot.argtypes = [p, i, ctypes.POINTER(_Slot)]
    lib.hr1_poller_state.argtypes = [p, ctypes.POINTER(ctypes.c_int64)]
    lib.hr1_poller_stop.argtypes = [p]
    lib.hr1_poller_free.argtypes = [p]
    return lib


def missing() -> str | None:
    """Why the kernel cannot run here (no compiler, a failed build), or None."""
    try:
        library()
    except KernelBuildError as e:
        return str(e)
    return None


def simd(variant: str | None = None) -> int:
    """The dot products a build (default VARIANT) runs here: 2 AVX-512 VNNI, 1 AVX2, 0 plain C."""
    return int(library(variant or VARIANT).hr1_simd())


def _flags(what: str, weights, rows: int, k: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
           out: torch.Tensor) -> int:
    """hr1_moe's flags for a call's buffers, once they are checked: all contiguous on the CPU, x and
    out [rows, hidden] float32 or bfloat16, ids [rows, k] int64, w [rows, k] float32."""
    if any(t.device.type != "cpu" for t in (x, ids, w, out)):
        raise ValueError(f"cpu_experts {what}: x, ids, w and out must be on the CPU")
    if x.dtype not in FLOATS or out.dtype not in FLOATS or ids.dtype != torch.int64 or w.dtype != torch.float32:
        raise TypeError(f"cpu_experts {what}: x/out float32 or bfloat16, ids int64, w float32; got "
                        f"{x.dtype}, {out.dtype}, {ids.dtype}, {w.dtype}")
    if not (x.shape == out.shape == (rows, weights.hidden) and ids.shape == w.shape == (rows, k)
            and all(t.is_contiguous() for t in (x, ids, w, out))):
        raise ValueError(f"cpu_experts {what}: x and out [{rows}, {weights.hidden}], ids and w [{rows}, {k}], "
                         f"contiguous; got {list(x.shape)}, {list(out.shape)}, {list(ids.shape)}, {list(w.shape)}")
    return (X_BF16 if x.dtype == torch.bfloat16 else 0) | (OUT_BF16 if out.dtype == torch.bfloat16 else 0)


class Pool:
    """`threads` threads computing one call at a time (the kernel serialises its callers: Python's
    and a hand-over Poller's): the caller's thread and threads-1 workers (worker i pinned to
    cpus[i], wrapping, where given)."""

    def __init__(self, threads: int, cpus: tuple[int, ...] | None = None, spin_ns: int | None = None,
                 variant: str = "native"):
        spin_ns = SPIN_NS if spin_ns is None else spin_ns
        self.lib = library(variant)
        arr = (ctypes.c_int * max(1, threads - 1))(*(cpus[i % len(cpus)] for i in range(1, threads)) if cpus else ())
        self.handle = self.lib.hr1_pool_new(threads, arr if cpus else None, spin_ns)
        if not self.handle:
            raise KernelBuildError(f"could not start {threads} kernel threads")
        self.threads = self.lib.hr1_pool_threads(self.handle)

    def moe(self, weights, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, out: torch.Tensor,
            prefetch: int | None = None) -> torch.Tensor:
        """out[T, hidden] = the routed experts of x [T, hidden], ids [T, k] (int64), w [T, k]
        (float32), all contiguous on the CPU; x and out float32 or bfloat16 (read and written as
        they are: a GPU's pinned decode buffers need no conversion pass). prefetch: bytes ahead the
        dot products prefetch (default PREFETCH). ValueError for ids out of range (nothing written)."""
        T, k = ids.shape
        flags = _flags("kernel", weights, T, k, x, ids, w, out)
        prefetch = PREFETCH if prefetch is None else prefetch
        rc = self.lib.hr1_moe(self.handle, *weights.addresses, *weights.types, weights.n_experts,
                              weights.hidden, weights.intermediate, T, k, x.data_ptr(), ids.data_ptr(),
                              w.data_ptr(), out.data_ptr(), prefetch, flags)
        if rc == -2:
            lo, hi = (v.item() for v in torch.aminmax(ids))
            raise ValueError(f"expert ids must lie in [0, {weights.n_experts}), got {lo}..{hi}")
        if rc:
            raise ValueError(f"cpu_experts kernel: {ERRORS.get(rc, rc)}")
        return out

    def __del__(self):
        handle, self.handle = getattr(self, "handle", None), None
        if handle:
            self.lib.hr1_pool_free(handle)


class _Slot(ctypes.Structure):
    """kernels/cpu_experts.c's hr1_slot: one layer's call as the hand-over poller runs it."""

    _fields_ = [(n, ctypes.c_void_p) for n in ("gate", "up", "down")] + \
        [(n, ctypes.c_int) for n in ("tg", "tu", "td", "n_experts", "hidden", "inter", "k", "max_tokens", "flags", "pf")] + \
        [(n, ctypes.c_void_p) for n in ("x", "ids", "w", "out")]


POLLER_KINDS = {1: "sequence", 2: "slot", 3: "tokens", 4: "kernel"}  # hr1_poller_state's failure kinds


class Poller:
    """The kernel's own hand-over thread (hybrid_r1/handoff.py's protocol, served in C): polls the
    request word of `ctrl` (int64 words at `layout`'s offsets), runs the named slot's call on
    `pool` and publishes done. Spins for `hot_ns` after a request, then looks every `idle_ns`."""

    def __init__(self, pool: Pool, ctrl: torch.Tensor, layout: dict[str, int], hot_ns: int, idle_ns: int):
        if ctrl.dtype != torch.int64 or ctrl.device.type != "cpu" or not ctrl.is_contiguous():
            raise ValueError("cpu_experts poller: the control words must be contiguous int64 on the CPU")
        if not 0 <= idle_ns < 1_000_000_000:
            raise ValueError(f"cpu_experts poller: idle_ns must be in [0, 1e9), got {idle_ns}")
        self.pool, self.ctrl, self.lib = pool, ctrl, pool.lib  # the pool and the words outlive the thread
        self.handle = self.lib.hr1_poller_new(pool.handle, ctrl.data_ptr(), layout["req"], layout["slot"],
                                              layout["ntok"], layout["done"], hot_ns, idle_ns)
        if not self.handle:
            raise KernelBuildError("could not start the kernel's hand-over thread")

    def set_slot(self, index: int, weights, k: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
                 out: torch.Tensor) -> None:
        """Slot `index` computes `weights`' experts (top-k `k`) from x [max_tokens, hidden], ids and w
        [max_tokens, k] (int64, float32) into out (x's shape); x and out float32 or bfloat16, all
        contiguous on the CPU and kept alive by the caller while the slot is set."""
        m = x.shape[0]
        flags = _flags("poller", weights, m, k, x, ids, w, out)
        s = _Slot(*weights.addresses, *weights.types, weights.n_experts, weights.hidden, weights.intermediate, k, m,
                  flags, PREFETCH, x.data_ptr(), ids.data_ptr(), w.data_ptr(), out.data_ptr())
        if self.lib.hr1_poller_slot(self.handle, index, ctypes.byref(s)):
            raise ValueError(f"cpu_experts poller: slot {index} out of range")

    def drop_slot(self, index: int) -> None:
        """Slot `index` no longer computes (a call in flight on it finishes first): its requests are
        answered NaN in its output buffer, which the caller keeps; its weights are not read again."""
        if self.handle:
            self.lib.hr1_poller_slot(self.handle, index, None)

    def state(self) -> dict:
        """requests, busy_s, compute_s, running, and `failure`: None or (kind, request, slot, detail);
        after close(), the state it ended in."""
        if not self.handle:
            return self._final
        v = (ctypes.c_int64 * 8)()
        self.lib.hr1_poller_state(self.handle, v)
        return {"requests": v[0], "busy_s": v[1] / 1e9, "compute_s": v[2] / 1e9, "running": bool(v[3]),
                "failure": (POLLER_KINDS[v[4]], v[5], v[6], v[7]) if v[4] else None}

    def close(self) -> None:
        """End the thread (a call in flight finishes first); state() then keeps what it ended in."""
        if getattr(self, "handle", None):
            self.lib.hr1_poller_stop(self.handle)
            final = self.state()  # after the join: nothing is served after it
            handle, self.handle = self.handle, None
            self.lib.hr1_poller_free(handle)
            self._final = final

    def __del__(self):
        self.close()


_pools: dict[tuple, Pool] = {}
_pools_lock = threading.Lock()
_fork_hook: list[bool] = []  # registered once, with the first pool


def pool(threads: int, cpus: tuple[int, ...] | None = None) -> Pool:
    """The process's pool of these settings and VARIANT (made on first use, shared by every layer)."""
    key = (threads, cpus, VARIANT)
    with _pools_lock:
        if not _fork_hook and hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_forget_pools)
            _fork_hook.append(True)
        if key not in _pools:
            _pools[key] = Pool(threads, cpus, variant=VARIANT)
        return _pools[key]


def _forget_pools() -> None:
    """In a forked child: the pools' threads did not come along (freeing them would wait forever),
    so their handles are dropped and the child makes its own pools."""
    global _pools_lock
    _pools_lock = threading.Lock()
    for p in _pools.values():
        p.handle = None
    _pools.clear()

