"""The GPU half of a hand-over to a host thread inside a CUDA stream (no host sync, capturable in a
CUDA graph): `submit` copies a call's inputs into host-mapped (pinned) buffers and publishes a
request number in a host-mapped control word; `collect` spins until the host publishes the same
number as done, then reads the host's output back, adding a tensor computed meanwhile on the GPU.

The control words live in pinned host memory at offsets the caller passes (it owns the layout).
Ordering follows the PTX memory model: every thread's stores, a CTA barrier, then a system-scope
release store of the request; on the way back a system-scope acquire load of the done word before
any output is read. Plain stores and volatile loads are enough for the rest. No atomics touch host
memory (PCIe atomics are not available on every host). The request number comes from a counter in
device memory that `submit` increments, so a replayed graph publishes a new number every time.

`collect` runs one CTA per block of the output, so the reads of host memory (a PCIe round trip
each) go in parallel: CTA 0 alone polls the done word and passes its verdict to the others through
the counter's second word, in device memory (the others have no timeout of their own: CTA 0
always writes a verdict, answered or timed out). It gives up after `timeout_ns` of GPU time
(%globaltimer): it sets the error word and writes NaN instead of hanging the stream forever, so a
dead host thread shows as an error, not a hang.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024
# The stream's pause between looks at the done word: back-to-back uncached reads of host memory
# over PCIe (every thread of the waiting CTA) compete with the CPU experts for the host's memory
# system; a pause this short adds at most that much to the hand-over. Read at each launch (a
# captured graph keeps the value it was captured with).
POLL_SLEEP_NS = 500


@triton.jit
def _st_release_sys(ptr, value):
    # every thread stores the same value: each one's release covers what it saw before the barrier
    return tl.inline_asm_elementwise("st.release.sys.global.b64 [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,l",
                                     [ptr, value], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _ld_acquire_sys(ptr):
    return tl.inline_asm_elementwise("ld.acquire.sys.global.b64 $0, [$1];", "=l,l", [ptr], dtype=tl.int64,
                                     is_pure=False, pack=1)


@triton.jit
def _st_release_gpu(ptr, value):
    return tl.inline_asm_elementwise("st.release.gpu.global.b64 [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,l",
                                     [ptr, value], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _ld_acquire_gpu(ptr):
    return tl.inline_asm_elementwise("ld.acquire.gpu.global.b64 $0, [$1];", "=l,l", [ptr], dtype=tl.int64,
                                     is_pure=False, pack=1)


@triton.jit
def _now_ns(dep):
    # `dep` only gives the asm a shape; %globaltimer is the GPU's nanosecond clock
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,l", [dep], dtype=tl.int64, is_pure=False,
                                     pack=1)


@triton.jit
def _nanosleep(ns):
    return tl.inline_asm_elementwise("nanosleep.u32 $1;\n\tmov.u32 $0, 0;", "=r,r", [ns], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def _copy(src, dst, n, BLOCK: tl.constexpr):
    for s in range(0, n, BLOCK):
        o = s + tl.arange(0, BLOCK)
        m = o < n
        tl.store(dst + o, tl.load(src + o, mask=m), mask=m)


@triton.jit(do_not_specialize=["slot", "n_tokens", "n_x", "n_k"])  # 1 would become a constant
def _submit_kernel(x, idx, w, hx, hidx, hw, seq, ctrl, slot, n_tokens, n_x, n_k,
                   REQ: tl.constexpr, SLOT: tl.constexpr, NTOK: tl.constexpr, BLOCK: tl.constexpr):
    _copy(x, hx, n_x, BLOCK)
    _copy(idx, hidx, n_k, BLOCK)
    _copy(w, hw, n_k, BLOCK)
    number = tl.atomic_add(seq, 1) + 1  # device memory: one increment per launch, seen by all threads
    tl.store(ctrl + SLOT, slot.to(tl.int64))
    tl.store(ctrl + NTOK, n_tokens.to(tl.int64))
    tl.debug_barrier()
    _st_release_sys(ctrl + REQ, number)


@triton.jit(do_not_specialize=["n", "timeout_ns", "sleep_ns"])
def _collect_kernel(hout, beside, out, seq, ctrl, n, timeout_ns, sleep_ns, HAS_BESIDE: tl.constexpr,
                    DONE: tl.constexpr, ERR: tl.constexpr, BLOCK: tl.constexpr):
    number = tl.load(seq)
    if tl.program_id(0) == 0:  # the one CTA that reads the done word over PCIe
        t0 = _now_ns(number)
        seen = _ld_acquire_sys(ctrl + DONE)
        waited = t0 - t0
        while (seen != number) & (waited <= timeout_ns):
            _nanosleep(sleep_ns)
            seen = _ld_acquire_sys(ctrl + DONE)
            waited = _now_ns(seen) - t0
        if seen != number:
            tl.store(ctrl + ERR, number)
        verdict = tl.where(seen == number, number, -number)
        _st_release_gpu(seq + 1, verdict)  # tells the other CTAs, in device memory
    else:  # the others wait for CTA 0's verdict (+number answered, -number timed out)
        verdict = _ld_acquire_gpu(seq + 1)
        while (verdict != number) & (verdict != -number):
            _nanosleep(64)
            verdict = _ld_acquire_gpu(seq + 1)
    ok = verdict == number
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    y = tl.load(hout + o, mask=m, volatile=True).to(tl.float32)
    if HAS_BESIDE:
        y += tl.load(beside + o, mask=m).to(tl.float32)
    y = tl.where(ok, y, float("nan"))
    tl.store(out + o, y.to(out.dtype.element_ty), mask=m)


def submit(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, hx: torch.Tensor, hidx: torch.Tensor,
           hw: torch.Tensor, seq: torch.Tensor, ctrl: torch.Tensor, slot: int, layout: dict[str, int]) -> None:
    """Copy x/idx/w (GPU, contiguous) into the first elements of hx/hidx/hw (pinned, same dtypes),
    write `slot` and the token count into the control words, then publish seq + 1 as the request."""
    assert x.dtype == hx.dtype and idx.dtype == hidx.dtype and w.dtype == hw.dtype
    assert x.is_contiguous() and idx.is_contiguous() and w.is_contiguous()
    assert ctrl.dtype == torch.int64 and seq.dtype == torch.int64
    _submit_kernel[(1,)](x, idx, w, hx, hidx, hw, seq, ctrl, slot, x.shape[0], x.numel(), idx.numel(),
                         REQ=layout["req"], SLOT=layout["slot"], NTOK=layout["ntok"], BLOCK=_BLOCK, num_warps=4)


def collect(hout: torch.Tensor, beside: torch.Tensor | None, seq: torch.Tensor, ctrl: torch.Tensor,
            shape: tuple[int, ...], dtype: torch.dtype, timeout_ns: int, layout: dict[str, int]) -> torch.Tensor:
    """Wait for the done word to equal the last request, then hout[:numel] (+ beside) as a new GPU
    tensor of `shape`/`dtype`; NaN, and the error word set, if the host did not answer in time."""
    out = torch.empty(shape, dtype=dtype, device=seq.device)
    if beside is not None:
        assert beside.shape == out.shape and beside.is_contiguous()
    assert seq.numel() >= 2  # the counter, then CTA 0's verdict
    _collect_kernel[(triton.cdiv(out.numel(), _BLOCK),)](hout, beside if beside is not None else out, out, seq, ctrl,
                                                        out.numel(), timeout_ns,
                          POLL_SLEEP_NS, HAS_BESIDE=beside is not None, DONE=layout["done"], ERR=layout["err"],
                          BLOCK=_BLOCK, num_warps=4)
    return out
