"""GGML block types -> float in one Triton kernel (the GPU expert prefill's expander).

One program expands NB blocks; every output value computes its own byte offsets and scale from its
index, so the kernel is a single pass: read the raw blocks once, write the values once. The layouts
are ggml's; hybrid_r1/formats/ggml_dequant.py is the torch reference this is tested against (the
results agree to an fp32 ulp: the compiler may fuse a multiply and a subtract into one FMA).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# ggml type ids (gguf.GGMLQuantizationType) -> (values per block, bytes per block)
Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = 8, 10, 11, 12, 13, 14
BLOCKS = {Q8_0: (32, 34), Q2_K: (256, 84), Q3_K: (256, 110), Q4_K: (256, 144), Q5_K: (256, 176),
          Q6_K: (256, 210)}


@triton.jit
def _f16_at(ptr):
    lo = tl.load(ptr).to(tl.uint16)
    hi = tl.load(ptr + 1).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _u8(ptr):
    return tl.load(ptr).to(tl.int32)


@triton.jit
def _k4_scale_min(s_ptr, sb):
    # 6-bit scale and min of sub-block sb (0..7) from the 12 packed bytes at s_ptr (Q4_K, Q5_K).
    lo = sb < 4
    a = _u8(s_ptr + tl.where(lo, sb, sb + 4))
    b = _u8(s_ptr + tl.where(lo, sb + 4, sb - 4))
    c = _u8(s_ptr + sb)
    sc = tl.where(lo, a & 63, (a & 0x0F) | ((b >> 6) << 4))
    mn = tl.where(lo, b & 63, (a >> 4) | ((c >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _dequant_kernel(raw_ptr, out_ptr, n_blocks, TYPE: tl.constexpr, PER: tl.constexpr,
                    NBYTES: tl.constexpr, NB: tl.constexpr):
    blk = tl.program_id(0) * NB + tl.arange(0, NB)[:, None]  # [NB, 1]
    v = tl.arange(0, PER)[None, :]  # [1, PER] value index inside the block
    ok = (blk < n_blocks) & (v < PER)
    blk = tl.where(blk < n_blocks, blk, 0)  # keep the gathers in bounds; the store is masked
    base = raw_ptr + blk.to(tl.int64) * NBYTES
    if TYPE == 8:  # Q8_0: d, 32 x int8
        q = tl.load(base + 2 + v).to(tl.int8, bitcast=True).to(tl.float32)
        y = _f16_at(base) * q
    elif TYPE == 10 or TYPE == 11:  # Q2_K: scales[16], qs[64], d, dmin; Q3_K: hmask[32], qs[64], scales[12], d
        s = v // 16
        r = v % 128
        QS2: tl.constexpr = 16 if TYPE == 10 else 32
        q = (_u8(base + QS2 + 32 * (v // 128) + r % 32) >> (2 * (r // 32))) & 0x03
        if TYPE == 10:
            sc = _u8(base + s)
            y = (_f16_at(base + 80) * (sc & 0x0F).to(tl.float32)) * q.to(tl.float32) \
                - _f16_at(base + 82) * (sc >> 4).to(tl.float32)
        else:
            lo = (_u8(base + 96 + s % 8) >> (4 * (s // 8))) & 0x0F
            hi = (_u8(base + 104 + s % 4) >> (2 * (s // 4))) & 0x03
            dl = _f16_at(base + 108) * ((lo | (hi << 4)) - 32).to(tl.float32)
            qh = ((_u8(base + v % 32) >> (v // 32)) & 1) ^ 1  # a set bit means no -4 offset
            y = dl * (q - (qh << 2)).to(tl.float32)
    elif TYPE == 14:  # Q6_K: ql[128], qh[64], scales[16] int8, d
        h = v // 128
        r = v % 128
        lo = (_u8(base + 64 * h + r % 64) >> (4 * (r // 64))) & 0x0F
        hi = (_u8(base + 128 + 32 * h + r % 32) >> (2 * (r // 32))) & 0x03
        q = ((lo | (hi << 4)) - 32).to(tl.float32)
        sc = tl.load(base + 192 + v // 16).to(tl.int8, bitcast=True).to(tl.float32)
        y = (_f16_at(base + 208) * sc) * q
    else:  # Q4_K / Q5_K: d, dmin, scales[12], (Q5_K: qh[32]), qs[128]
        sb = v // 32
        l = v % 32
        QS: tl.constexpr = 48 if TYPE == 13 else 16
        q = (_u8(base + QS + 32 * (sb // 2) + l) >> (4 * (sb % 2))) & 0x0F
        if TYPE == 13:
            q = q | (((_u8(base + 16 + l) >> sb) & 1) << 4)
        sc, mn = _k4_scale_min(base + 4, sb)
        y = (_f16_at(base) * sc) * q.to(tl.float32) - _f16_at(base + 2) * mn
    tl.store(out_ptr + blk.to(tl.int64) * PER + v, y.to(out_ptr.dtype.element_ty), mask=ok)


def dequantize(raw: torch.Tensor, ggml_type: int, ne0: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """raw: uint8 [rows, row_bytes] on a GPU, rows of `ne0` values of `ggml_type` (one of BLOCKS)
    -> [rows, ne0] in dtype."""
    if ggml_type not in BLOCKS:
        raise ValueError(f"no Triton dequantizer for ggml type {ggml_type}")
    per, nbytes = BLOCKS[ggml_type]
    if raw.dtype != torch.uint8 or raw.dim() != 2 or ne0 % per or raw.shape[1] != ne0 // per * nbytes:
        raise ValueError(f"raw must be uint8 [rows, {ne0 // per * nbytes}] for {ne0} values a row, "
                         f"got {raw.dtype} {tuple(raw.shape)}")
    raw = raw.contiguous()
    out = torch.empty(raw.shape[0], ne0, dtype=dtype, device=raw.device)
    n_blocks = raw.shape[0] * (ne0 // per)
    nb = 8 if per == 256 else 64
    if n_blocks:
        _dequant_kernel[(triton.cdiv(n_blocks, nb),)](raw, out, n_blocks, TYPE=ggml_type, PER=per,
                                                      NBYTES=nbytes, NB=nb, num_warps=4)
    return out
