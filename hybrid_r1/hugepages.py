"""Expert bytes in anonymous transparent huge pages (2 MiB), copied once at load, and what the
kernel gives a memory-mapped GGUF.

A GGUF's experts are read where they are mapped: page-cache pages of a regular file, 4 KiB each
unless the filesystem hands out large folios (the kernel may then map them with 2 MiB entries);
`madvise(MADV_HUGEPAGE)` on a file mapping only lets khugepaged collapse it later, where the kernel
has CONFIG_READ_ONLY_THP_FOR_FS. Every 4 KiB page costs a TLB entry; a decode step touches ~230 MB
of scattered experts per layer, far more than the TLB covers, so page walks come on top of the DRAM
reads. A copy into anonymous memory advised MADV_HUGEPAGE takes 2 MiB pages where THP is `always`
or `madvise`.

Measured on the device host (Linux 6.18, ext4; benchmarks/results/experts_cpu_engines.md): the
page-cache mapping already had 2 MiB entries for 79% of the experts (large folios), madvise changed
nothing, and the anonymous huge-page copy read and computed at the same speed. So `hugepages:` is
off by default, for kernels and filesystems that map page cache in 4 KiB pages.

Cost: the copy is private RAM the kernel cannot reclaim (the experts' full size: ~380 GiB for
DeepSeek-V3 Q4_K_M), while the file's page cache stays reclaimable (after the copy nothing reads it
any more, so the kernel drops it under pressure, but not at once: budget for both until then).
"""

from __future__ import annotations

import mmap

import numpy as np

HUGE = 2 << 20


def thp_mode() -> str:
    """The kernel's transparent-huge-page mode for anonymous memory ('always', 'madvise', 'never'),
    or 'unknown' where /sys does not say."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return "unknown"
    return text[text.index("[") + 1: text.index("]")] if "[" in text else "unknown"


def anonymous_copy(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of `a` in fresh anonymous memory, 2 MiB aligned and advised
    MADV_HUGEPAGE (a no-op where THP is off: the copy then has 4 KiB pages, which
    `huge_page_bytes` shows). The memory lives as long as the returned array."""
    n = a.nbytes
    buf = mmap.mmap(-1, n + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = (-np.frombuffer(buf, np.uint8, 1).ctypes.data) % HUGE  # first 2 MiB boundary
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buf.madvise(mmap.MADV_HUGEPAGE, start, max(n, 1))
    out = np.frombuffer(buf, a.dtype, n // a.itemsize, start).reshape(a.shape)  # keeps buf alive
    np.copyto(out, a)
    return out


def huge_page_bytes(a: np.ndarray) -> int:
    """Bytes of `a`'s mapping that the kernel backs with huge pages now (AnonHugePages plus
    FilePmdMapped of the mappings it lies in, from /proc/self/smaps); 0 if unknown."""
    lo = a.ctypes.data
    hi = lo + a.nbytes
    total, inside = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):
                    start, end = (int(v, 16) for v in head.split("-"))
                    inside = start < hi and end > lo
                elif inside and head in ("AnonHugePages:", "FilePmdMapped:", "ShmemPmdMapped:"):
                    total += int(line.split()[1]) * 1024
    except OSError:
        return 0
    return total
