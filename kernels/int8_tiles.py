"""@triton.jit building blocks of the INT8 W8A8 kernels, shared by the linear GEMMs (int8_gemm.py)
and the fused MoE kernel (fused_moe.py): tile order, K range of a split, weight pointers, one K
tile's dot with its scales, the K loop over an int8 A, the channel weight scales, the epilogue.

Scales (fp32, multiplicative): block acc_f32 += dot_i32 * a_s[m, kt] * w_s[n // 128, kt] per K tile
of 128; channel acc_i32 += dot over all K, out = acc * a_s[m] * w_s[n]. A float acc with
BLOCK_SCALE=False is an unscaled float GEMM (the fused MoE's BF16 mode).
"""

from __future__ import annotations

import triton
import triton.language as tl

SCALE_BLOCK = 128  # block format: weight tile side and activation group


@triton.jit
def i32_to_f32(d):
    # |d| <= 128 * 128 * 128 < 2**22 for one 128-deep K tile, so adding the bits of 1.5 * 2**23
    # gives the float 1.5 * 2**23 + d exactly: an integer add and a float add, both full rate,
    # instead of I2F, which runs at a quarter of the FMA rate and bounds the block-scaled loop.
    return (d + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped tile order: GROUP_M row tiles share each weight tile while it is in L2.
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    gsize = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gsize
    pid_n = (pid % width) // gsize
    return pid_m, pid_n, grid_n


@triton.jit
def k_tiles(K, split_k, pid_k, BLOCK_K: tl.constexpr):
    """[kt0, kt1): the K tiles of split pid_k; n_kt: all K tiles."""
    n_kt = tl.cdiv(K, BLOCK_K)
    kt_per = tl.cdiv(n_kt, split_k)
    kt0 = pid_k * kt_per
    kt1 = tl.minimum(kt0 + kt_per, n_kt)
    return kt0, kt1, n_kt


@triton.jit
def weight_ptrs(b_ptr, b_s_ptr, pid_n, rn, stride_bn, stride_bsn, up_row, up_srow,
                BLOCK_N: tl.constexpr, SCALAR_BS: tl.constexpr):
    """Column pointers [1, BN] into w [N, K] (and its up half, up_row rows further) and the block
    scale rows of this N tile. SCALAR_BS (BLOCK_N <= 128): the tile sits inside one 128-row scale
    block, so one scale per K tile."""
    b_cols = b_ptr + rn[None, :] * stride_bn
    b_cols_up = b_ptr + (rn + up_row)[None, :] * stride_bn
    if SCALAR_BS:
        bs_rows = b_s_ptr + (pid_n * BLOCK_N // 128) * stride_bsn
        bs_rows_up = b_s_ptr + (pid_n * BLOCK_N // 128 + up_srow) * stride_bsn
    else:
        bs_rows = b_s_ptr + (rn // 128) * stride_bsn
        bs_rows_up = b_s_ptr + (rn // 128 + up_srow) * stride_bsn
    return b_cols, b_cols_up, bs_rows, bs_rows_up


@triton.jit
def load_k(ptrs, k, K, EVEN_K: tl.constexpr):
    """One K tile at offsets k (broadcast against ptrs); zeros past K unless K is a tile multiple."""
    if EVEN_K:
        return tl.load(ptrs + k)
    else:
        return tl.load(ptrs + k, mask=k < K, other=0)


@triton.jit
def scaled(d, a_sc, b_sc, SCALAR_BS: tl.constexpr):
    if SCALAR_BS:
        return i32_to_f32(d) * (a_sc * b_sc)[:, None]  # one FMA per element with the +=
    else:
        return i32_to_f32(d) * a_sc[:, None] * b_sc[None, :]


@triton.jit
def mma(acc, a, b, a_sc, bs_rows, kt, BLOCK_SCALE: tl.constexpr, SCALAR_BS: tl.constexpr):
    """acc + a @ b for K tile kt: block-scaled into fp32, or accumulated in acc's own type."""
    if BLOCK_SCALE:
        acc += scaled(tl.dot(a, b, out_dtype=tl.int32), a_sc, tl.load(bs_rows + kt), SCALAR_BS)
    else:
        acc = tl.dot(a, b, acc, out_dtype=acc.dtype)
    return acc


@triton.jit
def mma_glu(acc, acc_up, a, a_sc, b, b_cols_up, bs_rows, bs_rows_up, k, kt, K,
            EVEN_K: tl.constexpr, BLOCK_SCALE: tl.constexpr, SCALAR_BS: tl.constexpr, GLU: tl.constexpr):
    """One K tile: the gate (or only) half with the loaded b, then the up half (GLU)."""
    acc = mma(acc, a, b, a_sc, bs_rows, kt, BLOCK_SCALE, SCALAR_BS)
    if GLU:
        bu = load_k(b_cols_up, k[:, None], K, EVEN_K)
        acc_up = mma(acc_up, a, bu, a_sc, bs_rows_up, kt, BLOCK_SCALE, SCALAR_BS)
    return acc, acc_up


@triton.jit
def tiled_mma(acc, acc_up, a_rows, as_rows, b_cols, b_cols_up, bs_rows, bs_rows_up, kt0, kt1, n_kt, K,
              BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_SCALE: tl.constexpr,
              SCALAR_BS: tl.constexpr, GLU: tl.constexpr, PAIRED: tl.constexpr):
    """K tiles [kt0, kt1) of an A already quantized: a_rows [BM, 1] row pointers into int8 A (or
    float A, unscaled), as_rows [BM] pointers to its block scales (unused for channel)."""
    rk = tl.arange(0, BLOCK_K)
    if PAIRED:
        # Block scales, no GLU: two K tiles a step, both dots issued before either is scaled, so
        # the second can run on the tensor cores while the first's int32 result is converted and
        # scaled (on Hopper each dot otherwise drains before its scaling).
        k_end = tl.minimum(K, kt1 * BLOCK_K)
        for kt in range(kt0, kt1, 2):
            k = kt * BLOCK_K + rk
            k2 = k + BLOCK_K
            kt2 = tl.minimum(kt + 1, n_kt - 1)  # in bounds; its dot is all zeros past kt1
            a0 = load_k(a_rows, k[None, :], K, EVEN_K)
            b0 = load_k(b_cols, k[:, None], K, EVEN_K)
            a1 = tl.load(a_rows + k2[None, :], mask=k2[None, :] < k_end, other=0)
            b1 = tl.load(b_cols + k2[:, None], mask=k2[:, None] < k_end, other=0)
            d0 = tl.dot(a0, b0, out_dtype=tl.int32)
            d1 = tl.dot(a1, b1, out_dtype=tl.int32)
            acc += scaled(d0, tl.load(as_rows + kt), tl.load(bs_rows + kt), SCALAR_BS)
            acc += scaled(d1, tl.load(as_rows + kt2), tl.load(bs_rows + kt2), SCALAR_BS)
    else:
        for kt in range(kt0, kt1):
            k = kt * BLOCK_K + rk
            b = load_k(b_cols, k[:, None], K, EVEN_K)
            a = load_k(a_rows, k[None, :], K, EVEN_K)
            a_sc = 0.0  # channel / float: scales come in the epilogue
            if BLOCK_SCALE:
                a_sc = tl.load(as_rows + kt)
            acc, acc_up = mma_glu(acc, acc_up, a, a_sc, b, b_cols_up, bs_rows, bs_rows_up, k, kt, K,
                                  EVEN_K, BLOCK_SCALE, SCALAR_BS, GLU)
    return acc, acc_up


@triton.jit
def channel_scales(b_s_ptr, rn, stride_bsn, up_srow, BLOCK_N: tl.constexpr, BLOCK_SCALE: tl.constexpr,
                   GLU: tl.constexpr):
    """Channel weight scales of this N tile (zeros for block: its scales are already applied)."""
    w_sc = tl.zeros([BLOCK_N], dtype=tl.float32)
    w_sc_up = tl.zeros([BLOCK_N], dtype=tl.float32)
    if not BLOCK_SCALE:
        w_sc = tl.load(b_s_ptr + rn * stride_bsn)
        if GLU:
            w_sc_up = tl.load(b_s_ptr + (rn + up_srow) * stride_bsn)
    return w_sc, w_sc_up


@triton.jit
def epilogue(acc, acc_up, a_tok, w_sc, w_sc_up, SCALED: tl.constexpr, GLU: tl.constexpr):
    """fp32 result of a tile: SCALED (block scales, or an unscaled float GEMM) as it is, else the
    int32 sums times a_tok [BM] and w_sc [BN]; GLU: silu(gate) * up."""
    if SCALED:
        out = acc
        up = acc_up
    else:
        out = acc.to(tl.float32) * a_tok[:, None] * w_sc[None, :]
        up = acc_up.to(tl.float32) * a_tok[:, None] * w_sc_up[None, :]
    if GLU:
        out = out * tl.sigmoid(out) * up
    return out


def check_block_k(block_scale: bool, block_k: int) -> None:
    if block_scale and block_k != SCALE_BLOCK:
        raise ValueError(f"block scales need BLOCK_K == {SCALE_BLOCK}, got {block_k}")

