"""host_pinning.Pinning against a stand-in for libcuda (no GPU needed): which ranges it locks, that a
refusal unlocks what was locked, and that the memory stays mapped until it is unlocked."""

from __future__ import annotations

import gc
import mmap
import weakref

import numpy as np
import pytest

from hybrid_r1 import host_pinning


class FakeCuda:
    def __init__(self, refuse_at: int | None = None):
        self.locked: dict[int, int] = {}
        self.calls: list[tuple] = []
        self.refuse_at, self.alive_at_unlock = refuse_at, []
        self.watch: weakref.ref | None = None
        self.cuMemHostRegister_v2 = self._register
        self.cuMemHostUnregister = self._unregister
        self.current: list[int] = [0xC0]  # this thread's context stack (the registering context on top)

    def cuCtxGetCurrent(self, out):
        out._obj.value = self.current[-1] if self.current else None
        return 0

    def cuCtxPushCurrent_v2(self, ctx):
        self.current.append(ctx.value)
        return 0

    def cuCtxPopCurrent_v2(self, out):
        self.current.pop()
        return 0

    def _register(self, ptr, size, flags):
        assert self.current and self.current[-1] == 0xC0
        self.calls.append(("register", ptr.value, size, flags))
        if self.refuse_at is not None and len(self.locked) == self.refuse_at:
            return 1  # CUDA_ERROR_INVALID_VALUE
        self.locked[ptr.value] = size
        return 0

    def _unregister(self, ptr):
        if not self.current or self.current[-1] != 0xC0:  # the driver: no context, no unlock
            return 201  # CUDA_ERROR_INVALID_CONTEXT
        self.calls.append(("unregister", ptr.value))
        self.alive_at_unlock.append(self.watch is not None and self.watch() is not None)
        del self.locked[ptr.value]
        return 0


def test_locks_page_spans_and_unlocks_before_the_memory_goes(monkeypatch):
    fake = FakeCuda()
    monkeypatch.setattr(host_pinning, "_libcuda", lambda: fake)
    m = mmap.mmap(-1, 8 * mmap.PAGESIZE)
    buf = np.frombuffer(m, np.uint8)
    parts = [buf[10:mmap.PAGESIZE + 5], buf[mmap.PAGESIZE + 5:2 * mmap.PAGESIZE], buf[5 * mmap.PAGESIZE:]]
    base = buf.ctypes.data
    pin = host_pinning.Pinning(parts)
    # the first two touch: bytes [10, 2 pages), of which page 1 is whole (page 0 holds 10 other
    # bytes: never locked); the third: pages 5-7; read-only + portable
    page = mmap.PAGESIZE
    assert fake.locked == {base + page: page, base + 5 * page: 3 * page}
    assert {c[3] for c in fake.calls} == {0x09} and pin.nbytes == 4 * page
    # a copy of the first part splits where the lock begins: [10, page) pageable, [page, page + 5) locked
    assert pin.split(base + 10, page - 5) == [(0, page - 10, False), (page - 10, page - 5, True)]
    assert pin.split(base + 3 * page, page) == [(0, page, False)]  # nothing locked there: one piece
    assert pin.split(base + 4 * page, 4 * page) == [(0, page, False), (page, 4 * page, True)]
    fake.watch = weakref.ref(parts[2].base)  # the mapping's owner array
    del parts, buf
    fake.current = []  # collected where no context is current (another thread's garbage collection)
    del pin
    gc.collect()
    assert fake.locked == {} and fake.alive_at_unlock == [True, True]  # unlocked while still mapped
    assert fake.current == []  # the registering context was pushed for the unlock, then popped


def test_no_current_context_is_refused(monkeypatch):
    fake = FakeCuda()
    fake.current = []
    monkeypatch.setattr(host_pinning, "_libcuda", lambda: fake)
    with pytest.raises(host_pinning.PinningError, match="context"):
        host_pinning.Pinning([np.zeros(mmap.PAGESIZE, np.uint8)])
    assert fake.calls == []


def test_refusal_unlocks_what_was_locked(monkeypatch):
    fake = FakeCuda(refuse_at=1)
    monkeypatch.setattr(host_pinning, "_libcuda", lambda: fake)
    m = mmap.mmap(-1, 8 * mmap.PAGESIZE)
    buf = np.frombuffer(m, np.uint8)
    with pytest.raises(host_pinning.PinningError, match="CUresult 1"):
        host_pinning.Pinning([buf[:2 * mmap.PAGESIZE], buf[4 * mmap.PAGESIZE:]])
    assert fake.locked == {} and [c[0] for c in fake.calls] == ["register", "register", "unregister"]
