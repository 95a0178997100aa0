"""Page-lock host memory the GPU's copy engine then reads directly (cuMemHostRegister).

Why: a GGUF is memory-mapped, so its pages are pageable; a copy from pageable memory goes through
the driver's own staging buffer, or ours (a pinned bounce ring filled by CPU threads), and each
staged byte crosses DRAM three times (read, write, DMA read): at ~100 GB/s of DRAM that caps the
stream below the ~55 GB/s of PCIe. Registered pages are DMA'd in place: one DRAM read per byte.

The driver API (libcuda) is used, not torch.cuda.cudart(): a refused cudaHostRegister would leave
the runtime's last-error set, and torch's next kernel launch would raise it; a driver call does not.
The read-only flag lets the driver lock PROT_READ file mappings (numpy memmap mode "r").
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import weakref

import numpy as np

log = logging.getLogger(__name__)
_FLAGS = 0x01 | 0x08  # CU_MEMHOSTREGISTER_PORTABLE (any context may copy) | READ_ONLY


class PinningError(RuntimeError):
    """The driver refused to lock a range (no libcuda, no CUDA context, no read-only support, a page
    locked already by another registration, or the locked-memory limit)."""


def _libcuda() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libcuda.so.1")  # the handle the CUDA runtime already loaded
    except OSError as e:
        raise PinningError(f"no CUDA driver library: {e}") from None
    lib.cuMemHostRegister_v2.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
    lib.cuMemHostUnregister.argtypes = [ctypes.c_void_p]
    lib.cuCtxGetCurrent.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
    lib.cuCtxPushCurrent_v2.argtypes = [ctypes.c_void_p]
    lib.cuCtxPopCurrent_v2.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
    return lib


def page_spans(arrays: list[np.ndarray], page: int = mmap.PAGESIZE) -> list[tuple[int, int]]:
    """The [start, end) address ranges of the whole pages that `arrays` cover: their bytes merged
    where they touch or overlap, then rounded in to pages. Why in, not out: a page the arrays share
    with other data (a GGUF's next tensor, a neighbour on the heap) must stay unregistered, since
    the driver refuses (CUDA_ERROR_INVALID_VALUE) any copy whose range is partly registered and
    partly not, and a later copy of that other data may start in such a page. The arrays' own
    bytes outside the spans are copied as pageable memory (Pinning.split)."""
    byte_ranges = sorted((a.ctypes.data, a.ctypes.data + a.nbytes) for a in arrays if a.nbytes)
    merged: list[list[int]] = []
    for s, e in byte_ranges:
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    spans = [(-(-s // page) * page, e // page * page) for s, e in merged]
    return [(s, e) for s, e in spans if e > s]


def _unregister(lib: ctypes.CDLL, ctx: int | None, starts: list[int], arrays: list[np.ndarray]) -> None:
    # `arrays` rides along so the memory stays mapped until it is unlocked: unmapped first, the
    # driver would keep a lock on addresses that a later allocation reuses (its copies then fail,
    # "invalid argument", even from ordinary tensors there). The registering context is made
    # current for the calls: a finalizer may run on any thread (the garbage collector's), where no
    # context is current and the driver would refuse to unlock.
    pushed = ctx is not None and lib.cuCtxPushCurrent_v2(ctypes.c_void_p(ctx)) == 0
    try:
        for s in starts:
            err = lib.cuMemHostUnregister(ctypes.c_void_p(s))
            if err != 0:
                log.warning("cuMemHostUnregister at 0x%x failed with CUresult %d: those pages stay locked", s, err)
    finally:
        if pushed:
            lib.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))


class Pinning:
    """The locked spans of some arrays; unlocked by close(), or when this object is collected (it
    must outlive every copy that reads them: the owner keeps it beside the arrays). The arrays are
    held until they are unlocked."""

    def __init__(self, arrays: list[np.ndarray]):
        """Lock the pages of `arrays` (call with the device's CUDA context current, i.e. after torch
        used that device on this thread). Raises PinningError, having unlocked what it locked."""
        lib = _libcuda()
        ctx = ctypes.c_void_p()
        if lib.cuCtxGetCurrent(ctypes.byref(ctx)) != 0 or not ctx.value:
            raise PinningError("no current CUDA context to lock host pages in")
        self.spans = page_spans(arrays)
        self.nbytes = sum(e - s for s, e in self.spans)
        done: list[int] = []
        for s, e in self.spans:
            err = lib.cuMemHostRegister_v2(ctypes.c_void_p(s), e - s, _FLAGS)
            if err != 0:
                _unregister(lib, ctx.value, done, arrays)
                raise PinningError(f"cuMemHostRegister of {(e - s) / 2**20:.0f} MiB failed with CUresult {err}")
            done.append(s)
        self._close = weakref.finalize(self, _unregister, lib, ctx.value, done, list(arrays))

    def split(self, ptr: int, n: int) -> list[tuple[int, int, bool]]:
        """(start, end, locked) offsets into the n bytes at `ptr`, cut where a locked span begins or
        ends, so that each piece is wholly locked or wholly not (see page_spans)."""
        cuts = {0, n}
        for s, e in self.spans:
            for c in (s - ptr, e - ptr):
                if 0 < c < n:
                    cuts.add(c)
        edges = sorted(cuts)
        return [(a, b, any(s <= ptr + a < e for s, e in self.spans)) for a, b in zip(edges, edges[1:])]

    def close(self) -> None:
        self._close()
