"""W8A8 INT8 GEMM (Triton), block-wise and channel-wise scales, one kernel.

  block:   acc_f32 += dot(a_i8, b_i8)_i32 * a_s[m, kt] * w_s[n // 128, kt]   per K tile of 128
  channel: acc_i32 += dot(a_i8, b_i8) over all K; out = acc * a_s[m] * w_s[n]
Options, all compile-time:
  QUANT_A  A arrives as bf16/fp16/fp32 and is quantized in registers (per 128-group for block, per
           token for channel after an amax pre-pass over the row): no separate launch, no int8 A in
           memory. Every N tile re-quantizes A, so it pays only with few N tiles (kv_a at M = 1 on
           the H100); the tuner decides per shape (GemmConfig.FUSED).
  SPLIT_K  programs along grid axis 1 each take a K range and write a partial tile to a workspace;
           the last one to finish a tile (atomic counter) sums the partials and runs the epilogue, so
           split-K stays one launch. For decode, where M <= 16 leaves too few N tiles to fill the SMs.
  GLU      W is [2N, K] = cat(gate, up); the epilogue writes silu(gate) * up, [M, N].
Layouts: a [M, K] (row stride free, K contiguous); w [N, K] contiguous (nn.Linear); block a_s
[M, ceil(K/128)], w_s [ceil(N/128), ceil(K/128)]; channel a_s [M, 1], w_s [N, 1] or [N]; all fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .act_quant import _quant, _scale, check_rounding
from .configs import GemmConfig, get_config

SCALE_BLOCK = 128  # block format: weight tile side and activation group
_LOCK_SLOTS = 1 << 16  # split-K tile counters per (device, stream); self-resetting
_locks: dict = {}


@triton.jit
def _i32_to_f32(d):
    # |d| <= 128 * 128 * 128 < 2**22 for one 128-deep K tile, so adding the bits of 1.5 * 2**23
    # gives the float 1.5 * 2**23 + d exactly: an integer add and a float add, both full rate,
    # instead of I2F, which runs at a quarter of the FMA rate and bounds the block-scaled loop.
    return (d + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def _scaled(d, a_sc, b_sc, SCALAR_BS: tl.constexpr):
    if SCALAR_BS:
        return _i32_to_f32(d) * (a_sc * b_sc)[:, None]  # one FMA per element with the +=
    else:
        return _i32_to_f32(d) * a_sc[:, None] * b_sc[None, :]


@triton.jit
def _sum4(ptrs, step, mask, left):
    left = tl.zeros(mask.shape, tl.int32) + left  # a tensor: the interpreter rejects mask & scalar
    p0 = tl.load(ptrs, mask=mask, other=0, cache_modifier=".cg")
    p1 = tl.load(ptrs + step, mask=mask & (left > 1), other=0, cache_modifier=".cg")
    p2 = tl.load(ptrs + 2 * step, mask=mask & (left > 2), other=0, cache_modifier=".cg")
    p3 = tl.load(ptrs + 3 * step, mask=mask & (left > 3), other=0, cache_modifier=".cg")
    return (p0 + p1) + (p2 + p3)


@triton.jit
def _finish(acc, acc_up, a_tok, w_sc, w_sc_up, BLOCK_SCALE: tl.constexpr, GLU: tl.constexpr):
    if BLOCK_SCALE:
        out = acc
        up = acc_up
    else:
        out = acc.to(tl.float32) * a_tok[:, None] * w_sc[None, :]
        up = acc_up.to(tl.float32) * a_tok[:, None] * w_sc_up[None, :]
    if GLU:
        out = out * tl.sigmoid(out) * up
    return out


@triton.jit(do_not_specialize=["M", "split_k"])
def _int8_gemm_kernel(
    a_ptr, a_s_ptr, b_ptr, b_s_ptr, c_ptr, ws_ptr, lock_ptr,
    M, N, K, split_k,
    stride_am, stride_asm, stride_bn, stride_bsn, stride_cm,
    up_row, up_srow,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, USE_SPLIT: tl.constexpr,
    BLOCK_SCALE: tl.constexpr, QUANT_A: tl.constexpr, TRUNC: tl.constexpr, GLU: tl.constexpr,
):
    # Grouped tile order: GROUP_M row tiles share each weight tile while it is in L2.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    gsize = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gsize
    pid_n = (pid % width) // gsize

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m % M  # wrapped: loads stay in bounds unmasked; the store drops the extra rows/cols
    rn = offs_n % N
    rk = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + rm[:, None] * stride_am
    b_cols = b_ptr + rn[None, :] * stride_bn
    b_cols_up = b_ptr + (rn + up_row)[None, :] * stride_bn
    # A tile of at most 128 columns sits inside one 128-row scale block: one scale per K tile.
    SCALAR_BS: tl.constexpr = BLOCK_N <= 128
    if SCALAR_BS:
        bs_rows = b_s_ptr + (pid_n * BLOCK_N // 128) * stride_bsn
        bs_rows_up = b_s_ptr + (pid_n * BLOCK_N // 128 + up_srow) * stride_bsn
    else:
        bs_rows = b_s_ptr + (rn // 128) * stride_bsn
        bs_rows_up = b_s_ptr + (rn // 128 + up_srow) * stride_bsn

    n_kt = tl.cdiv(K, BLOCK_K)
    kt_per = tl.cdiv(n_kt, split_k)
    kt0 = pid_k * kt_per
    kt1 = tl.minimum(kt0 + kt_per, n_kt)

    a_tok = tl.zeros([BLOCK_M], dtype=tl.float32)  # per-token scale (channel only)
    if not BLOCK_SCALE:
        if QUANT_A:
            amax = tl.zeros([BLOCK_M], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + rk
                x = tl.load(a_rows + k[None, :], mask=k[None, :] < K, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
            a_tok = _scale(amax)
        else:
            a_tok = tl.load(a_s_ptr + rm * stride_asm)

    if BLOCK_SCALE:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    acc_up = tl.zeros_like(acc)

    for kt in range(kt0, kt1):
        k = kt * BLOCK_K + rk
        if EVEN_K:
            a = tl.load(a_rows + k[None, :])
            b = tl.load(b_cols + k[:, None])
        else:
            a = tl.load(a_rows + k[None, :], mask=k[None, :] < K, other=0)
            b = tl.load(b_cols + k[:, None], mask=k[:, None] < K, other=0)
        if QUANT_A:
            af = a.to(tl.float32)
            if BLOCK_SCALE:
                a_sc = _scale(tl.max(tl.abs(af), axis=1))  # the K tile is the 128-group
            else:
                a_sc = a_tok
            a = _quant(af, a_sc, TRUNC)
        elif BLOCK_SCALE:
            a_sc = tl.load(a_s_ptr + rm * stride_asm + kt)
        if BLOCK_SCALE:
            acc += _scaled(tl.dot(a, b, out_dtype=tl.int32), a_sc, tl.load(bs_rows + kt), SCALAR_BS)
        else:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        if GLU:
            if EVEN_K:
                bu = tl.load(b_cols_up + k[:, None])
            else:
                bu = tl.load(b_cols_up + k[:, None], mask=k[:, None] < K, other=0)
            if BLOCK_SCALE:
                acc_up += _scaled(tl.dot(a, bu, out_dtype=tl.int32), a_sc, tl.load(bs_rows_up + kt), SCALAR_BS)
            else:
                acc_up = tl.dot(a, bu, acc_up, out_dtype=tl.int32)

    w_sc = tl.zeros([BLOCK_N], dtype=tl.float32)
    w_sc_up = tl.zeros([BLOCK_N], dtype=tl.float32)
    if not BLOCK_SCALE:
        w_sc = tl.load(b_s_ptr + rn * stride_bsn)
        if GLU:
            w_sc_up = tl.load(b_s_ptr + (rn + up_srow) * stride_bsn)

    c_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
    if not USE_SPLIT:
        out = _finish(acc, acc_up, a_tok, w_sc, w_sc_up, BLOCK_SCALE, GLU)
        tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=c_mask)
    else:
        # Partials: ws[split, 1 + GLU, M, N] (int32 for channel: exact; fp32 for block).
        mn = M * N
        n_acc = 2 if GLU else 1
        tile = offs_m[:, None] * N + offs_n[None, :]
        tl.store(ws_ptr + pid_k * (n_acc * mn) + tile, acc, mask=c_mask)
        if GLU:
            tl.store(ws_ptr + pid_k * (n_acc * mn) + mn + tile, acc_up, mask=c_mask)
        # All threads' partial stores precede the counter bump (bar.sync, then an acq_rel atomic
        # at GPU scope): the last program to arrive sees every partial.
        tl.debug_barrier()
        tile_id = pid_m * grid_n + pid_n
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
            out = _finish(acc, acc_up, a_tok, w_sc, w_sc_up, BLOCK_SCALE, GLU)
            tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=c_mask)
            tl.atomic_xchg(lock_ptr + tile_id, 0)  # ready for the next launch on this stream


def _lock_buffer(device: torch.device) -> torch.Tensor:
    # One counter array per (device, stream): two split-K launches running concurrently on
    # different streams must not share counters. Zeroed once; each tile's last program resets it.
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = _locks.get(key)
    if buf is None:
        buf = torch.zeros(_LOCK_SLOTS, dtype=torch.int32, device=device)
        _locks[key] = buf
    return buf


def _check_weight(w, w_s, n_rows, K, block_scale, glu):
    if w.dtype != torch.int8 or w.dim() != 2 or w.shape[1] != K or not w.is_contiguous():
        raise ValueError(f"weight must be contiguous int8 [N, {K}], got {w.dtype} {tuple(w.shape)}")
    if glu and n_rows % 2:
        raise ValueError(f"gate_up weight needs an even row count (gate then up), got {n_rows}")
    if w_s.dtype != torch.float32:
        raise ValueError(f"weight scales must be float32, got {w_s.dtype}")
    n_out = n_rows // 2 if glu else n_rows
    if block_scale:
        per = triton.cdiv(n_out, SCALE_BLOCK)
        want = (2 * per if glu else per, triton.cdiv(K, SCALE_BLOCK))
        if tuple(w_s.shape) != want or w_s.stride(1) != 1:
            raise ValueError(f"block weight scales must be {want} row-major, got {tuple(w_s.shape)}")
    elif w_s.numel() != n_rows:
        raise ValueError(f"channel weight scales must have {n_rows} elements, got {tuple(w_s.shape)}")


def int8_gemm(
    a: torch.Tensor,
    a_s: torch.Tensor | None,
    w: torch.Tensor,
    w_s: torch.Tensor,
    *,
    block_scale: bool,
    glu: bool = False,
    out_dtype: torch.dtype = torch.bfloat16,
    rounding: str = "nearest_even",
    config: GemmConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The launcher behind every public wrapper. a [M, K]: int8 with scales a_s, or float with
    a_s=None (quantized inside the kernel with `rounding`). Returns [M, N] (N = rows of w, halved
    for glu) in out_dtype, written into `out` when given (row stride free, columns contiguous)."""
    if a.dim() != 2 or a.stride(1) != 1:
        raise ValueError(f"activation must be 2-D with contiguous rows, got {tuple(a.shape)}")
    M, K = a.shape
    n_rows = w.shape[0]
    _check_weight(w, w_s, n_rows, K, block_scale, glu)
    quant_a = a_s is None
    trunc = check_rounding(rounding)
    if quant_a and not a.is_floating_point():
        raise ValueError("an int8 activation needs its scales a_s")
    if not quant_a and (a.dtype != torch.int8 or a_s.dtype != torch.float32):
        raise ValueError(f"expected int8 activation and fp32 scales, got {a.dtype}, {a_s.dtype}")
    N = n_rows // 2 if glu else n_rows
    if not quant_a:
        want = triton.cdiv(K, SCALE_BLOCK) if block_scale else 1
        if a_s.dim() != 2 or tuple(a_s.shape) != (M, want) or a_s.stride(1) != 1:
            raise ValueError(f"activation scales must be [{M}, {want}] row-major, got {tuple(a_s.shape)}")
    if max(M * a.stride(0), n_rows * K, M * N) >= 2**31:
        raise ValueError("tensor too large for 32-bit offsets")  # not reached by DeepSeek shapes

    if out is None:
        c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    elif out.shape != (M, N) or out.stride(1) != 1:
        raise ValueError(f"out must be [{M}, {N}] with contiguous rows, got {tuple(out.shape)}")
    else:
        c = out
    if M == 0:
        return c
    cfg = config or get_config("block" if block_scale else "channel", N, K, M, glu, a.device)
    if block_scale and cfg.BLOCK_K != SCALE_BLOCK:
        raise ValueError(f"block scales need BLOCK_K == {SCALE_BLOCK}, got {cfg.BLOCK_K}")
    grid_mn = triton.cdiv(M, cfg.BLOCK_M) * triton.cdiv(N, cfg.BLOCK_N)
    split = max(1, min(cfg.SPLIT_K, triton.cdiv(K, cfg.BLOCK_K)))
    if split > 1:
        if grid_mn > _LOCK_SLOTS:
            raise ValueError(f"split-K over {grid_mn} tiles exceeds {_LOCK_SLOTS} counters")
        acc_dtype = torch.float32 if block_scale else torch.int32
        ws = torch.empty(split * (2 if glu else 1) * M * N, dtype=acc_dtype, device=a.device)
        locks = _lock_buffer(a.device)
    else:
        ws, locks = c, c  # unused
    w_s2 = w_s.reshape(w_s.shape[0], -1) if block_scale else w_s.reshape(-1)
    a_s_arg = a_s if a_s is not None else c  # unused when quantizing in the kernel
    _int8_gemm_kernel[(grid_mn, split)](
        a, a_s_arg, w, w_s2, c, ws, locks,
        M, N, K, split,
        a.stride(0), a_s.stride(0) if a_s is not None else 0, w.stride(0),
        w_s2.stride(0), c.stride(0),
        N if glu else 0, (w_s2.shape[0] // 2 if block_scale else N) if glu else 0,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        EVEN_K=K % cfg.BLOCK_K == 0, USE_SPLIT=split > 1,
        BLOCK_SCALE=block_scale, QUANT_A=quant_a, TRUNC=trunc, GLU=glu,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return c


def int8_block_gemm(a_q, a_s, w, w_s, out_dtype=torch.bfloat16, config=None, out=None):
    """Block W8A8: a_q int8 [M, K], a_s fp32 [M, ceil(K/128)], w int8 [N, K],
    w_s fp32 [ceil(N/128), ceil(K/128)] -> [M, N]."""
    return int8_gemm(a_q, a_s, w, w_s, block_scale=True, out_dtype=out_dtype, config=config, out=out)


def int8_channel_gemm(a_q, a_s, w, w_s, out_dtype=torch.bfloat16, config=None, out=None):
    """Channel W8A8: a_q int8 [M, K], a_s fp32 [M, 1], w int8 [N, K], w_s fp32 [N, 1] -> [M, N]."""
    return int8_gemm(a_q, a_s, w, w_s, block_scale=False, out_dtype=out_dtype, config=config, out=out)
