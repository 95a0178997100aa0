"""Dynamic INT8 activation quantizers (Triton): per token group (block W8A8) and per token
(channel W8A8). s = max(amax, 1e-10) / 127, q = round(x / s) with the rounding named by the caller:
"nearest_even" (default, SGLang's CUDA kernel) or "trunc" (SGLang's Triton path, Meituan's evals).
The jit helpers `_scale` and `_quant` are shared with the fused GEMM in int8_gemm.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROUNDINGS = ("nearest_even", "trunc")
# 1.5 * 2**23: adding and subtracting it rounds an fp32 |v| < 2**22 to an integer, half to even,
# in IEEE arithmetic (the GPU and the interpreter agree; libdevice.rint has no interpreter path).
_RNE_MAGIC = tl.constexpr(12582912.0)
_ONE_PASS_MAX_K = 16384


@triton.jit
def _scale(amax):
    # div_rn: plain `/` lowers to an approximate fp32 division on NVIDIA.
    return tl.math.div_rn(tl.maximum(amax, 1e-10), 127.0)


@triton.jit
def _quant(x, s, TRUNC: tl.constexpr):
    # x fp32 [R, C], s fp32 [R]. |x/s| <= 127 up to one ulp: the clamp only guards rounding.
    v = tl.math.div_rn(x, s[:, None])
    v = tl.minimum(tl.maximum(v, -127.0), 127.0)
    if not TRUNC:
        v = (v + _RNE_MAGIC) - _RNE_MAGIC
    return v.to(tl.int8)  # fp -> int casts truncate toward zero


@triton.jit
def _group_quant_kernel(
    x_ptr, q_ptr, s_ptr, n_pairs, K, n_groups, stride_xm,
    GROUP: tl.constexpr, BLOCK_P: tl.constexpr, TRUNC: tl.constexpr,
):
    # One "pair" = (row, group); pairs are laid out as s is: p = row * n_groups + group.
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    row = p // n_groups
    col = (p % n_groups)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    mask = (p < n_pairs)[:, None] & (col < K)
    x = tl.load(x_ptr + row[:, None].to(tl.int64) * stride_xm + col, mask=mask, other=0.0).to(tl.float32)
    s = _scale(tl.max(tl.abs(x), axis=1))
    q = _quant(x, s, TRUNC)
    tl.store(q_ptr + row[:, None].to(tl.int64) * K + col, q, mask=mask)
    tl.store(s_ptr + p, s, mask=p < n_pairs)


@triton.jit
def _token_quant_kernel(
    x_ptr, q_ptr, s_ptr, M, K, stride_xm,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, TRUNC: tl.constexpr, ONE_PASS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < M
    x_row = x_ptr + rows[:, None].to(tl.int64) * stride_xm
    q_row = q_ptr + rows[:, None].to(tl.int64) * K
    if ONE_PASS:  # the row fits one block: read it once, keep it in registers
        cols = tl.arange(0, BLOCK_K)[None, :]
        mask = rmask[:, None] & (cols < K)
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        s = _scale(tl.max(tl.abs(x), axis=1))
        tl.store(q_row + cols, _quant(x, s, TRUNC), mask=mask)
        tl.store(s_ptr + rows, s, mask=rmask)
    else:  # longer rows: two passes, amax then quantize (the second mostly hits L2)
        amax = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)[None, :]
            x = tl.load(x_row + cols, mask=rmask[:, None] & (cols < K), other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        s = _scale(amax)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)[None, :]
            mask = rmask[:, None] & (cols < K)
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(q_row + cols, _quant(x, s, TRUNC), mask=mask)
        tl.store(s_ptr + rows, s, mask=rmask)


def check_rounding(rounding: str) -> bool:
    """Validates the rounding name; returns True for truncation."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return rounding == "trunc"


def _rows(x: torch.Tensor) -> torch.Tensor:
    if not x.is_floating_point():
        raise TypeError(f"activation must be floating point, got {x.dtype}")
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _outputs(out, M, K, n_scales, device):
    if out is None:
        return (torch.empty((M, K), dtype=torch.int8, device=device),
                torch.empty((M, n_scales), dtype=torch.float32, device=device))
    q, s = out
    if q.dtype != torch.int8 or q.numel() != M * K or not q.is_contiguous():
        raise ValueError(f"q out must be contiguous int8 with {M}x{K} elements")
    if s.dtype != torch.float32 or s.numel() != M * n_scales or not s.is_contiguous():
        raise ValueError(f"s out must be contiguous fp32 with {M}x{n_scales} elements")
    return q, s


def per_token_group_quant(
    x: torch.Tensor, group_size: int = 128, rounding: str = "nearest_even", out=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] float -> (q int8 [..., K], s fp32 [..., ceil(K/group_size)]), s row-major.
    out: optional preallocated (q, s) (CUDA graphs, tests)."""
    trunc = check_rounding(rounding)
    if group_size & (group_size - 1) or group_size < 16:
        raise ValueError(f"group_size must be a power of two >= 16, got {group_size}")
    x2 = _rows(x)
    M, K = x2.shape
    n_groups = triton.cdiv(K, group_size)
    q, s = _outputs(out, M, K, n_groups, x.device)
    n_pairs = M * n_groups
    if n_pairs:
        # Swept by benchmarks/bench_act_quant.py (H200): few rows want small programs (more of
        # them, shorter latency chains); many rows want 16 groups per program on 2 warps.
        block_p, warps = (4, 4) if M <= 64 else (16, 2)
        grid = (triton.cdiv(n_pairs, block_p),)
        _group_quant_kernel[grid](
            x2, q, s, n_pairs, K, n_groups, x2.stride(0),
            GROUP=group_size, BLOCK_P=block_p, TRUNC=trunc, num_warps=warps,
        )
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], n_groups)


def per_token_quant(
    x: torch.Tensor, rounding: str = "nearest_even", out=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] float -> (q int8 [..., K], s fp32 [..., 1]). out: optional preallocated (q, s)."""
    trunc = check_rounding(rounding)
    x2 = _rows(x)
    M, K = x2.shape
    q, s = _outputs(out, M, K, 1, x.device)
    if M:
        # Rows up to 16K are read once and held in registers, one row per program (H100: twice
        # as fast as two passes at K=7168). A 32K block for 18432-wide rows was slower than two
        # passes (301 vs 151 us at M=4096). Warps and two-pass block from bench_act_quant.py's
        # sweep (H200): with few rows, 32 warps shorten each row's chain (K=7168, M=1: 3.1 vs 4.4 us).
        one_pass = K <= _ONE_PASS_MAX_K
        if one_pass:
            block_r, block_k = 1, triton.next_power_of_2(max(K, 16))
            warps = 32 if M <= 64 and block_k >= 1024 else 16 if block_k >= 16384 else 8 if block_k >= 4096 else 4
        else:
            block_r, block_k, warps = 1, 4096, 8
        _token_quant_kernel[(triton.cdiv(M, block_r),)](
            x2, q, s, M, K, x2.stride(0),
            BLOCK_R=block_r, BLOCK_K=block_k, TRUNC=trunc, ONE_PASS=one_pass, num_warps=warps,
        )
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], 1)
