"""W8A8 INT8 GEMM (Triton), block-wise and channel-wise scales: two kernels on shared helpers
(int8_tiles.py), picked by whether A arrives quantized.

  block:   acc_f32 += dot(a_i8, b_i8)_i32 * a_s[m, kt] * w_s[n // 128, kt]   per K tile of 128
  channel: acc_i32 += dot(a_i8, b_i8) over all K; out = acc * a_s[m] * w_s[n]
_int8_gemm_kernel          the tiled GEMM: A int8 with its scales; PAIRED (block, no GLU): two K
                           tiles a step.
_int8_gemm_quant_a_kernel  the decode GEMM: A bf16/fp16/fp32, quantized in registers (per 128-group
                           for block, one K tile ahead, only the distinct rows; per token for channel
                           after an amax pre-pass over the row): no separate launch, no int8 A in
                           memory. Every N tile re-quantizes A, so it pays only with few N tiles (kv_a
                           at M = 1 on the H100); the tuner decides per shape (GemmConfig.FUSED).
Options of both, compile-time:
  SPLIT_K  programs along grid axis 1 each take a K range and write a partial tile; the last one to
           finish a tile sums them (splitk.py), so split-K stays one launch.
  GLU      W is [2N, K] = cat(gate, up); the epilogue writes silu(gate) * up, [M, N].
Layouts: a [M, K] (row stride free, K contiguous); w [N, K] contiguous (nn.Linear); block a_s
[M, ceil(K/128)], w_s [ceil(N/128), ceil(K/128)]; channel a_s [M, 1], w_s [N, 1] or [N]; all fp32."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .act_quant import _quant, _scale, check_rounding
from .configs import GemmConfig, get_config
from .int8_tiles import (SCALE_BLOCK, channel_scales, check_block_k, grouped_tile, k_tiles, load_k,
                         mma_glu, tiled_mma, weight_ptrs)
from .splitk import store_tile, workspace


@triton.jit(do_not_specialize=["M", "split_k"])
def _int8_gemm_kernel(
    a_ptr, a_s_ptr, b_ptr, b_s_ptr, c_ptr, ws_ptr, lock_ptr,
    M, N, K, split_k,
    stride_am, stride_asm, stride_bn, stride_bsn, stride_cm,
    up_row, up_srow,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, USE_SPLIT: tl.constexpr, BLOCK_SCALE: tl.constexpr, GLU: tl.constexpr,
    PAIRED: tl.constexpr,
):
    """The tiled GEMM: A int8, quantized beforehand, with its scales."""
    pid_m, pid_n, grid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m % M  # wrapped: loads stay in bounds unmasked; the store drops the extra rows/cols
    rn = offs_n % N
    SCALAR_BS: tl.constexpr = BLOCK_N <= 128
    b_cols, b_cols_up, bs_rows, bs_rows_up = weight_ptrs(b_ptr, b_s_ptr, pid_n, rn, stride_bn, stride_bsn,
                                                         up_row, up_srow, BLOCK_N, SCALAR_BS)
    kt0, kt1, n_kt = k_tiles(K, split_k, pid_k, BLOCK_K)
    as_rows = a_s_ptr + rm * stride_asm
    a_tok = tl.zeros([BLOCK_M], dtype=tl.float32)  # per-token scale (channel only)
    if BLOCK_SCALE:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        a_tok = tl.load(as_rows)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    acc, acc_up = tiled_mma(acc, tl.zeros_like(acc), a_ptr + rm[:, None] * stride_am, as_rows,
                            b_cols, b_cols_up, bs_rows, bs_rows_up, kt0, kt1, n_kt, K,
                            BLOCK_K, EVEN_K, BLOCK_SCALE, SCALAR_BS, GLU, PAIRED)
    w_sc, w_sc_up = channel_scales(b_s_ptr, rn, stride_bsn, up_srow, BLOCK_N, BLOCK_SCALE, GLU)
    store_tile(acc, acc_up, a_tok, w_sc, w_sc_up, offs_m, offs_n, M, N, c_ptr, stride_cm,
               ws_ptr, lock_ptr, pid_m * grid_n + pid_n, pid_k, split_k, USE_SPLIT, BLOCK_SCALE, GLU)


@triton.jit(do_not_specialize=["M", "split_k"])
def _int8_gemm_quant_a_kernel(
    a_ptr, b_ptr, b_s_ptr, c_ptr, ws_ptr, lock_ptr,
    M, N, K, split_k,
    stride_am, stride_bn, stride_bsn, stride_cm,
    up_row, up_srow,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, USE_SPLIT: tl.constexpr, A_ROWS: tl.constexpr,
    BLOCK_SCALE: tl.constexpr, TRUNC: tl.constexpr, GLU: tl.constexpr,
):
    """The decode GEMM: A float, quantized in registers (per 128-group for block, per token for
    channel after an amax pre-pass over the row)."""
    pid_m, pid_n, grid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m % M  # wrapped: loads stay in bounds unmasked; the store drops the extra rows/cols
    rn = offs_n % N
    rk = tl.arange(0, BLOCK_K)
    SCALAR_BS: tl.constexpr = BLOCK_N <= 128
    b_cols, b_cols_up, bs_rows, bs_rows_up = weight_ptrs(b_ptr, b_s_ptr, pid_n, rn, stride_bn, stride_bsn,
                                                         up_row, up_srow, BLOCK_N, SCALAR_BS)
    kt0, kt1, n_kt = k_tiles(K, split_k, pid_k, BLOCK_K)
    a_rows = a_ptr + rm[:, None] * stride_am
    a_tok = tl.zeros([BLOCK_M], dtype=tl.float32)  # per-token scale (channel only)
    if BLOCK_SCALE:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    acc_up = tl.zeros_like(acc)

    if BLOCK_SCALE:
        # Only the A_ROWS distinct rows (all of them when M fills the tile) are read and quantized,
        # one K tile ahead of use, because Triton does not pipeline loads that feed anything but a
        # dot, and padding M = 1 to 16 rows would quantize 16 copies.
        k_end = tl.minimum(K, kt1 * BLOCK_K)
        a_rows_c = a_ptr + ((pid_m * BLOCK_M + tl.arange(0, A_ROWS)) % M)[:, None] * stride_am
        k = kt0 * BLOCK_K + rk
        a_next = tl.load(a_rows_c + k[None, :], mask=k[None, :] < k_end, other=0.0)
        for kt in range(kt0, kt1):
            k = kt * BLOCK_K + rk
            b = load_k(b_cols, k[:, None], K, EVEN_K)
            af = a_next.to(tl.float32)
            a_next = tl.load(a_rows_c + (k + BLOCK_K)[None, :], mask=(k + BLOCK_K)[None, :] < k_end,
                             other=0.0)
            a_sc = _scale(tl.max(tl.abs(af), axis=1))  # the K tile is the 128-group
            a = _quant(af, a_sc, TRUNC)
            if A_ROWS < BLOCK_M:  # tile row r holds row r % A_ROWS: exact for the rows r < M kept
                a = tl.reshape(tl.broadcast_to(a[None, :, :], [BLOCK_M // A_ROWS, A_ROWS, BLOCK_K]),
                               [BLOCK_M, BLOCK_K])
                a_sc = tl.reshape(tl.broadcast_to(a_sc[None, :], [BLOCK_M // A_ROWS, A_ROWS]), [BLOCK_M])
            acc, acc_up = mma_glu(acc, acc_up, a, a_sc, b, b_cols_up, bs_rows, bs_rows_up, k, kt, K,
                                  EVEN_K, True, SCALAR_BS, GLU)
    else:
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + rk
            x = tl.load(a_rows + k[None, :], mask=k[None, :] < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        a_tok = _scale(amax)
        for kt in range(kt0, kt1):
            k = kt * BLOCK_K + rk
            b = load_k(b_cols, k[:, None], K, EVEN_K)
            a = _quant(load_k(a_rows, k[None, :], K, EVEN_K).to(tl.float32), a_tok, TRUNC)
            acc, acc_up = mma_glu(acc, acc_up, a, a_tok, b, b_cols_up, bs_rows, bs_rows_up, k, kt, K,
                                  EVEN_K, False, SCALAR_BS, GLU)

    w_sc, w_sc_up = channel_scales(b_s_ptr, rn, stride_bsn, up_srow, BLOCK_N, BLOCK_SCALE, GLU)
    store_tile(acc, acc_up, a_tok, w_sc, w_sc_up, offs_m, offs_n, M, N, c_ptr, stride_cm,
               ws_ptr, lock_ptr, pid_m * grid_n + pid_n, pid_k, split_k, USE_SPLIT, BLOCK_SCALE, GLU)


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
    w_s2 = w_s.reshape(w_s.shape[0], -1) if block_scale else w_s.reshape(-1)
    check_block_k(block_scale, cfg.BLOCK_K)
    grid_mn = triton.cdiv(M, cfg.BLOCK_M) * triton.cdiv(N, cfg.BLOCK_N)
    split = max(1, min(cfg.SPLIT_K, triton.cdiv(K, cfg.BLOCK_K)))
    ws, locks = workspace(split, grid_mn, M, N, glu, block_scale, a.device)
    ws = ws if ws is not None else c  # unused without split-K
    locks = locks if locks is not None else c
    up_row = N if glu else 0
    up_srow = (w_s2.shape[0] // 2 if block_scale else N) if glu else 0
    common = dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
                  EVEN_K=K % cfg.BLOCK_K == 0, USE_SPLIT=split > 1, BLOCK_SCALE=block_scale, GLU=glu,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if quant_a:
        a_rows = min(triton.next_power_of_2(M), cfg.BLOCK_M) if M <= cfg.BLOCK_M else cfg.BLOCK_M
        _int8_gemm_quant_a_kernel[(grid_mn, split)](
            a, w, w_s2, c, ws, locks, M, N, K, split,
            a.stride(0), w.stride(0), w_s2.stride(0), c.stride(0), up_row, up_srow,
            A_ROWS=a_rows, TRUNC=trunc, **common)
    else:
        _int8_gemm_kernel[(grid_mn, split)](
            a, a_s, w, w_s2, c, ws, locks, M, N, K, split,
            a.stride(0), a_s.stride(0), w.stride(0), w_s2.stride(0), c.stride(0), up_row, up_srow,
            PAIRED=cfg.PAIRED and block_scale and not glu, **common)
    return c


def int8_block_gemm(a_q, a_s, w, w_s, out_dtype=torch.bfloat16, config=None, out=None):
    """Block W8A8: a_q int8 [M, K], a_s fp32 [M, ceil(K/128)], w int8 [N, K],
    w_s fp32 [ceil(N/128), ceil(K/128)] -> [M, N]."""
    return int8_gemm(a_q, a_s, w, w_s, block_scale=True, out_dtype=out_dtype, config=config, out=out)


def int8_channel_gemm(a_q, a_s, w, w_s, out_dtype=torch.bfloat16, config=None, out=None):
    """Channel W8A8: a_q int8 [M, K], a_s fp32 [M, 1], w int8 [N, K], w_s fp32 [N, 1] -> [M, N]."""
    return int8_gemm(a_q, a_s, w, w_s, block_scale=False, out_dtype=out_dtype, config=config, out=out)
