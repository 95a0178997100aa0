"""The store of the INT8 GEMM kernels: the epilogue (int8_tiles.epilogue), directly or after the split-K
reduction.

Split-K stays one launch: every program writes its partial tile to a workspace ws[split, 1 + GLU,
M, N] (int32 for channel: exact; fp32 for block), bumps a per-tile counter, and the last one to
arrive sums the partials, runs the epilogue, and resets the counter for the next launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .int8_tiles import epilogue

LOCK_SLOTS = 1 << 16  # split-K tile counters per (device, stream); self-resetting
_locks: dict = {}


@triton.jit
def _sum4(ptrs, step, mask, left):
    left = tl.zeros(mask.shape, tl.int32) + left  # a tensor: the interpreter rejects mask & scalar
    p0 = tl.load(ptrs, mask=mask, other=0, cache_modifier=".cg")
    p1 = tl.load(ptrs + step, mask=mask & (left > 1), other=0, cache_modifier=".cg")
    p2 = tl.load(ptrs + 2 * step, mask=mask & (left > 2), other=0, cache_modifier=".cg")
    p3 = tl.load(ptrs + 3 * step, mask=mask & (left > 3), other=0, cache_modifier=".cg")
    return (p0 + p1) + (p2 + p3)


@triton.jit
def store_tile(acc, acc_up, a_tok, w_sc, w_sc_up, offs_m, offs_n, M, N, c_ptr, stride_cm,
               ws_ptr, lock_ptr, tile_id, pid_k, split_k,
               USE_SPLIT: tl.constexpr, BLOCK_SCALE: tl.constexpr, GLU: tl.constexpr):
    """acc / acc_up: this program's [BM, BN] sums (fp32 block-scaled, int32 channel); a_tok [BM]
    and w_sc [BN] the channel scales (unused for block). Writes c, directly or via split-K."""
    c_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
    if not USE_SPLIT:
        out = epilogue(acc, acc_up, a_tok, w_sc, w_sc_up, BLOCK_SCALE, GLU)
        tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=c_mask)
    else:
        mn = M * N
        n_acc = 2 if GLU else 1
        tile = offs_m[:, None] * N + offs_n[None, :]
        tl.store(ws_ptr + pid_k * (n_acc * mn) + tile, acc, mask=c_mask)
        if GLU:
            tl.store(ws_ptr + pid_k * (n_acc * mn) + mn + tile, acc_up, mask=c_mask)
        # All threads' partial stores precede the counter bump (bar.sync, then an acq_rel atomic
        # at GPU scope): the last program to arrive sees every partial.
        tl.debug_barrier()
        count = tl.atomic_add(lock_ptr + tile_id, 1)
        if count == split_k - 1:
            acc = tl.zeros_like(acc)
            acc_up = tl.zeros_like(acc)
            # Four partials per step, loads independent: L2 latency overlaps instead of adding up.
            step = n_acc * mn
            for s in range(0, split_k, 4):
                part = ws_ptr + s * step + tile
                acc += _sum4(part, step, c_mask, split_k - s)
                if GLU:
                    acc_up += _sum4(part + mn, step, c_mask, split_k - s)
            out = epilogue(acc, acc_up, a_tok, w_sc, w_sc_up, BLOCK_SCALE, GLU)
            tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=c_mask)
            tl.atomic_xchg(lock_ptr + tile_id, 0)  # ready for the next launch on this stream


def workspace(split: int, tiles: int, M: int, N: int, glu: bool, block_scale: bool, device):
    """(partials, counters) for a split-K launch; (None, None) without split."""
    if split <= 1:
        return None, None
    if tiles > LOCK_SLOTS:
        raise ValueError(f"split-K over {tiles} tiles exceeds {LOCK_SLOTS} counters")
    acc_dtype = torch.float32 if block_scale else torch.int32
    ws = torch.empty(split * (2 if glu else 1) * M * N, dtype=acc_dtype, device=device)
    return ws, _lock_buffer(device)


def _lock_buffer(device: torch.device) -> torch.Tensor:
    # One counter array per (device, stream): two split-K launches running concurrently on
    # different streams must not share counters. Zeroed once; each tile's last program resets it.
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = _locks.get(key)
    if buf is None:
        buf = torch.zeros(LOCK_SLOTS, dtype=torch.int32, device=device)
        _locks[key] = buf
    return buf
