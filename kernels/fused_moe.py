"""Fused MoE (Triton): all routed experts of a step in one launch per projection, W8A8 INT8 with
block or channel scales (the Meituan formats, as the linears), or BF16 (the baseline).

  gate_up  h[p] = silu(x[t] @ W13[e, :I]^T) * (x[t] @ W13[e, I:]^T)   pair p = t * k + j, e = ids[t, j]
  down     y[t] = sum_j weights[t, j] * (h[t * k + j] @ W2[e]^T)
moe_align sorts the T * k (token, expert) pairs by expert on the device and pads each expert's run
to a multiple of BLOCK_M, so a program's BLOCK_M rows share one expert: fixed-size outputs, no host
sync (graph-capturable). Each projection is then a tiled GEMM over the sorted rows (the int8_tiles
helpers the linears use), A rows gathered by pair, W offset by the block's expert.
INT8: activations are quantized before each projection by act_quant.py, per token per 128 group
(block) or per token (channel), as the linears do; h is kept in fp32 up to its quantization (bf16
mode: in the weights' dtype). The down projection writes fp32 slots [T, k, H] (routing weight
applied); their sum over k runs in a fixed order, then rounds once to x's dtype: deterministic, and
one output rounding in all.
Layouts: x [T, H]; W13 int8 [E, 2I, H] = cat(gate, up) per expert, scales block [E, 2 * ceil(I/128),
ceil(H/128)] (each half its own grid) or channel [E, 2I, 1]; W2 int8 [E, H, I], scales block
[E, ceil(H/128), ceil(I/128)] or channel [E, H, 1]; topk_ids [T, k] ints in [0, E) (not checked on
the device), topk_weights [T, k] float.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .act_quant import per_token_group_quant, per_token_quant
from .configs import MOE_SCHEMES, GemmConfig, get_moe_config
from .int8_tiles import (SCALE_BLOCK, channel_scales, check_block_k, epilogue, grouped_tile,
                         tiled_mma, weight_ptrs)


@dataclasses.dataclass(frozen=True)
class MoeRouting:
    """Pairs sorted by expert, each expert's run padded to a multiple of block_m."""
    sorted_pairs: torch.Tensor  # [n_blocks * block_m] int32: pair t * k + j; n_pairs marks padding
    block_expert: torch.Tensor  # [n_blocks] int32: the expert of each block (E past the end)
    n_padded: torch.Tensor  # [1] int32: rows in use, a multiple of block_m
    block_m: int
    top_k: int
    n_pairs: int

    @property
    def n_blocks(self) -> int:
        return self.block_expert.numel()


ALIGN_PAIRS = 128  # up to this many pairs (decode) the sort is one Triton program: [P, P] in registers


@triton.jit
def _moe_align_kernel(ids_ptr, pairs_ptr, block_expert_ptr, n_padded_ptr, P, E, n_rows, n_blocks,
                      BLOCK_M: tl.constexpr, P2: tl.constexpr, FILL: tl.constexpr):
    """moe_align in one program, by pairwise comparison: a pair's row is the padded runs of the
    experts below its own plus its rank among the earlier pairs of its expert."""
    i = tl.arange(0, P2)
    live = i < P
    e = tl.load(ids_ptr + i, mask=live, other=-1).to(tl.int32)
    same = (e[:, None] == e[None, :]) & live[None, :]  # [i, j]
    rank = tl.sum((same & (i[None, :] < i[:, None])).to(tl.int32), axis=1)
    padded = (tl.sum(same.to(tl.int32), axis=1) + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # of e's run
    first = live & (rank == 0)  # one pair stands for each expert's run
    start = tl.sum(tl.where(first[None, :] & (e[None, :] < e[:, None]), padded[None, :], 0), axis=1)
    total = tl.sum(tl.where(first, padded, 0), axis=0)
    for r0 in range(0, n_rows, FILL):
        r = r0 + tl.arange(0, FILL)
        tl.store(pairs_ptr + r, tl.zeros([FILL], dtype=tl.int32) + P, mask=r < n_rows)
    tl.debug_barrier()  # the padding marks land before the pairs overwrite some of them
    tl.store(pairs_ptr + start + rank, i, mask=live)
    row = i * BLOCK_M  # n_blocks <= P blocks
    inside = first[None, :] & (start[None, :] <= row[:, None]) & (row[:, None] < (start + padded)[None, :])
    be = tl.where(row < total, tl.sum(tl.where(inside, e[None, :], 0), axis=1), E)
    tl.store(block_expert_ptr + i, be, mask=i < n_blocks)
    tl.store(n_padded_ptr, total)


def moe_align(topk_ids: torch.Tensor, n_experts: int, block_m: int, impl: str = "auto") -> MoeRouting:
    """Device-side sort of the pairs by expert (stable: pair order within an expert), with output
    sizes fixed by the shapes. At most min(P, E) runs are non-empty and each pads by < block_m, so
    P + min(P, E) * (block_m - 1) rows always suffice. impl: "triton" (one launch; P <= ALIGN_PAIRS),
    "torch" (a few dozen small ops: their launches would dominate at decode), "auto" picks by P."""
    if topk_ids.dim() != 2 or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32/int64 [T, k], got {topk_ids.dtype} {tuple(topk_ids.shape)}")
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl must be auto, triton or torch, got {impl!r}")
    T, k = topk_ids.shape
    P, dev = T * k, topk_ids.device
    n_blocks = triton.cdiv(P + min(P, n_experts) * (block_m - 1), block_m)
    if impl == "triton" and P > ALIGN_PAIRS:
        raise ValueError(f"the Triton sort takes at most {ALIGN_PAIRS} pairs, got {P}")
    if impl == "triton" or (impl == "auto" and 0 < P <= ALIGN_PAIRS):
        sorted_pairs = torch.empty(n_blocks * block_m, dtype=torch.int32, device=dev)
        block_expert = torch.empty(n_blocks, dtype=torch.int32, device=dev)
        n_padded = torch.empty(1, dtype=torch.int32, device=dev)
        _moe_align_kernel[(1,)](topk_ids.reshape(-1), sorted_pairs, block_expert, n_padded, P, n_experts,
                                n_blocks * block_m, n_blocks, BLOCK_M=block_m,
                                P2=max(16, triton.next_power_of_2(P)), FILL=1024, num_warps=8)
        return MoeRouting(sorted_pairs, block_expert, n_padded, block_m, k, P)
    flat = topk_ids.reshape(-1).long()
    # scatter_add, not bincount: bincount reads the maximum back to the host.
    counts = torch.zeros(n_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    sorted_e, order = torch.sort(flat, stable=True)
    rank = torch.arange(P, device=dev) - (torch.cumsum(counts, 0) - counts)[sorted_e]
    sorted_pairs = torch.full((n_blocks * block_m,), P, dtype=torch.int32, device=dev)
    sorted_pairs.scatter_(0, (ends - padded)[sorted_e] + rank, order.to(torch.int32))
    first_row = torch.arange(n_blocks, device=dev) * block_m
    block_expert = torch.searchsorted(ends, first_row, right=True).to(torch.int32)
    return MoeRouting(sorted_pairs, block_expert, ends[-1:].to(torch.int32), block_m, k, P)


@triton.jit
def _moe_gemm_kernel(
    a_ptr, a_s_ptr, b_ptr, b_s_ptr, c_ptr, pairs_ptr, block_expert_ptr, n_padded_ptr, weights_ptr,
    N, K, n_rows, n_pairs,
    stride_am, stride_asm, stride_be, stride_bn, stride_bse, stride_bsn, stride_cm,
    up_row, up_srow,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, ROW_DIV: tl.constexpr, BLOCK_SCALE: tl.constexpr, FLOAT: tl.constexpr,
    GLU: tl.constexpr, PAIRED: tl.constexpr, ROUTED_WEIGHT: tl.constexpr,
):
    """One BLOCK_M x BLOCK_N tile of one expert: rows = sorted pairs, A row = pair // ROW_DIV
    (k: x's token rows; 1: h's pair rows), c row = pair. FLOAT: bf16/fp16 A and W, no scales."""
    pid_m, pid_n, _ = grouped_tile(tl.program_id(0), n_rows, N, BLOCK_M, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(n_padded_ptr):
        return  # past the last expert's run: the grid covers the worst case
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)  # int64: E * 2I * H passes 2**31
    pair = tl.load(pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pair < n_pairs
    row = tl.where(valid, pair // ROW_DIV, 0)  # padding rows read row 0; the store drops them
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = offs_n % N
    SCALAR_BS: tl.constexpr = BLOCK_N <= 128
    SCALED: tl.constexpr = BLOCK_SCALE or FLOAT
    b_s_e = b_s_ptr + e * stride_bse
    b_cols, b_cols_up, bs_rows, bs_rows_up = weight_ptrs(b_ptr + e * stride_be, b_s_e, pid_n, rn, stride_bn,
                                                         stride_bsn, up_row, up_srow, BLOCK_N, SCALAR_BS)
    as_rows = a_s_ptr + row * stride_asm
    a_tok = tl.zeros([BLOCK_M], dtype=tl.float32)  # per-token scale (channel only)
    if SCALED:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        a_tok = tl.load(as_rows)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    n_kt = tl.cdiv(K, BLOCK_K)
    acc, acc_up = tiled_mma(acc, tl.zeros_like(acc), a_ptr + row[:, None] * stride_am, as_rows,
                            b_cols, b_cols_up, bs_rows, bs_rows_up, 0, n_kt, n_kt, K,
                            BLOCK_K, EVEN_K, BLOCK_SCALE, SCALAR_BS, GLU, PAIRED)
    w_sc, w_sc_up = channel_scales(b_s_e, rn, stride_bsn, up_srow, BLOCK_N, SCALED, GLU)
    out = epilogue(acc, acc_up, a_tok, w_sc, w_sc_up, SCALED, GLU)
    if ROUTED_WEIGHT:
        out = out * tl.load(weights_ptr + pair, mask=valid, other=0.0)[:, None]
    c_mask = valid[:, None] & (offs_n < N)[None, :]
    tl.store(c_ptr + pair[:, None] * stride_cm + offs_n[None, :], out.to(c_ptr.dtype.element_ty), mask=c_mask)


def _check_experts(name: str, w, w_s, E: int, rows: int, K: int, scheme: str, glu: bool) -> None:
    want_dtype = torch.int8 if scheme != "bf16" else None
    if w.dim() != 3 or tuple(w.shape) != (E, rows, K) or not w.is_contiguous() or \
            (want_dtype and w.dtype != want_dtype) or (not want_dtype and not w.dtype.is_floating_point):
        raise ValueError(f"{name} must be contiguous {want_dtype or 'float'} [{E}, {rows}, {K}], "
                         f"got {w.dtype} {tuple(w.shape)}")
    if scheme == "bf16":
        return
    if w_s is None or w_s.dtype != torch.float32 or w_s.dim() != 3 or w_s.stride(2) != 1:
        raise ValueError(f"{name} scales must be float32 [E, rows, cols] with contiguous rows")
    if scheme == "block":
        per = triton.cdiv(rows // 2 if glu else rows, SCALE_BLOCK)
        want = (E, 2 * per if glu else per, triton.cdiv(K, SCALE_BLOCK))
    else:
        want = (E, rows, 1)
    if tuple(w_s.shape) != want:
        raise ValueError(f"{name} {scheme} scales must be {list(want)}, got {list(w_s.shape)}")


def moe_gemm(a, a_s, w, w_s, routing: MoeRouting, *, scheme: str, glu: bool, per_pair: bool,
             topk_weights: torch.Tensor | None = None, config: GemmConfig | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """One projection over the sorted pairs: out [P, N] (P = T * k, N = rows of w, halved for glu),
    row p = pair p. a: [T, K] read by token (per_pair False) or [P, K] by pair; int8 with scales
    a_s (block [.., ceil(K/128)], channel [.., 1]), or float with a_s None (scheme bf16).
    topk_weights [T, k]: multiplies each pair's row. out: fp32 or a.dtype-like float, preallocated."""
    E, n_rows, K = w.shape
    N = n_rows // 2 if glu else n_rows
    _check_experts("expert weight", w, w_s, E, n_rows, K, scheme, glu)
    P, k = routing.n_pairs, routing.top_k
    want_rows = P if per_pair else P // k
    if a.dim() != 2 or tuple(a.shape) != (want_rows, K) or a.stride(1) != 1:
        raise ValueError(f"activation must be [{want_rows}, {K}] with contiguous rows, got {tuple(a.shape)}")
    if scheme == "bf16":
        if a.dtype != w.dtype or a_s is not None:
            raise ValueError(f"scheme bf16 takes an activation in the weights' dtype {w.dtype} and no "
                             f"scales, got {a.dtype}")
    else:
        n_sc = triton.cdiv(K, SCALE_BLOCK) if scheme == "block" else 1
        if a.dtype != torch.int8 or a_s is None or a_s.dtype != torch.float32 or \
                tuple(a_s.shape) != (want_rows, n_sc) or a_s.stride(1) != 1:
            raise ValueError(f"INT8 schemes take an int8 activation with fp32 scales [{want_rows}, {n_sc}]")
    if max(want_rows * a.stride(0), P * N, n_rows * K) >= 2**31:
        raise ValueError("tensor too large for 32-bit offsets")
    if out is None:
        out = torch.empty((P, N), dtype=torch.float32, device=a.device)
    elif tuple(out.shape) != (P, N) or out.stride(1) != 1:
        raise ValueError(f"out must be [{P}, {N}] with contiguous rows, got {tuple(out.shape)}")
    cfg = config or get_moe_config(scheme, E, N, K, P // k, k, glu, a.device)
    if cfg.BLOCK_M != routing.block_m or cfg.SPLIT_K != 1 or cfg.FUSED:
        raise ValueError(f"fused MoE config needs BLOCK_M == routing's {routing.block_m}, SPLIT_K 1 and "
                         f"FUSED off, got {cfg}")
    check_block_k(scheme == "block", cfg.BLOCK_K)
    if P == 0:
        return out
    if topk_weights is not None:
        topk_weights = topk_weights.reshape(-1).float().contiguous()
        if topk_weights.numel() != P:
            raise ValueError(f"topk_weights must have {P} elements, got {topk_weights.numel()}")
    w_s_arg = w_s if w_s is not None else w  # unused by bf16
    w_s_strides = (w_s.stride(0), w_s.stride(1)) if w_s is not None else (0, 0)
    n_rows_pad = routing.n_blocks * routing.block_m
    grid = (routing.n_blocks * triton.cdiv(N, cfg.BLOCK_N),)
    _moe_gemm_kernel[grid](
        a, a_s if a_s is not None else a, w, w_s_arg, out, routing.sorted_pairs, routing.block_expert,
        routing.n_padded, topk_weights if topk_weights is not None else out,
        N, K, n_rows_pad, P,
        a.stride(0), a_s.stride(0) if a_s is not None else 0, w.stride(0), w.stride(1), *w_s_strides,
        out.stride(0),
        N if glu else 0, (w_s.shape[1] // 2 if scheme == "block" else N) if glu else 0,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        EVEN_K=K % cfg.BLOCK_K == 0, ROW_DIV=1 if per_pair else k, BLOCK_SCALE=scheme == "block",
        FLOAT=scheme == "bf16", GLU=glu, PAIRED=cfg.PAIRED and scheme == "block" and not glu,
        ROUTED_WEIGHT=topk_weights is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def quantize_activation(x, scheme: str, rounding: str = "nearest_even"):
    """(a, a_s) as the projections take them: per 128-group (block), per token (channel), or x as it
    is with no scales (bf16)."""
    if scheme == "bf16":
        return x, None
    if scheme == "block":
        return per_token_group_quant(x, SCALE_BLOCK, rounding)
    return per_token_quant(x, rounding)


def fused_moe(x, w13, w13_s, w2, w2_s, topk_weights, topk_ids, *, scheme: str,
              rounding: str = "nearest_even", configs: tuple[GemmConfig, GemmConfig] | None = None,
              out: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [T, H] -> sum_j topk_weights[t, j] * expert_{ids[t, j]}(x[t]), [T, H] in x's dtype (written
    into `out` when given). scheme "block" / "channel" (INT8 weights and scales, layouts above) or
    "bf16" (float weights, w13_s = w2_s = None). configs: (gate_up, down) tile configs; default:
    tuned table or heuristic (configs.py). out_dtype: of the result (default x's; float32 keeps a
    tensor-parallel rank's partial sum unrounded)."""
    if scheme not in MOE_SCHEMES:
        raise ValueError(f"scheme must be one of {MOE_SCHEMES}, got {scheme!r}")
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be float [T, H], got {x.dtype} {tuple(x.shape)}")
    T, H = x.shape
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_ids and topk_weights must both be [{T}, k], got "
                         f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}")
    E, two_i, _ = w13.shape
    _check_experts("w13", w13, w13_s, E, two_i, H, scheme, True)
    _check_experts("w2", w2, w2_s, E, H, two_i // 2, scheme, False)
    k = topk_ids.shape[1]
    out_dtype = out_dtype or x.dtype
    if out is not None and (tuple(out.shape) != (T, H) or out.dtype != out_dtype):
        raise ValueError(f"out must be {out_dtype} [{T}, {H}], got {out.dtype} {tuple(out.shape)}")
    cfg13, cfg2 = configs or (get_moe_config(scheme, E, two_i // 2, H, T, k, True, x.device),
                              get_moe_config(scheme, E, H, two_i // 2, T, k, False, x.device))
    x = x if x.stride(1) == 1 else x.contiguous()
    r13 = moe_align(topk_ids, E, cfg13.BLOCK_M)
    r2 = r13 if cfg2.BLOCK_M == cfg13.BLOCK_M else moe_align(topk_ids, E, cfg2.BLOCK_M)
    a, a_s = quantize_activation(x, scheme, rounding)
    # INT8: h stays fp32 until its quantization (rounding it to bf16 first would add an error of
    # the size of the int8 step's neighbour); bf16: the down GEMM's A must be the weights' dtype.
    h = torch.empty((T * k, two_i // 2), dtype=w2.dtype if scheme == "bf16" else torch.float32, device=x.device)
    moe_gemm(a, a_s, w13, w13_s, r13, scheme=scheme, glu=True, per_pair=False, config=cfg13, out=h)
    h_q, h_s = quantize_activation(h, scheme, rounding)
    slots = moe_gemm(h_q, h_s, w2, w2_s, r2, scheme=scheme, glu=False, per_pair=True,
                     topk_weights=topk_weights, config=cfg2)
    y = slots.view(T, k, H).sum(dim=1)
    if out is None:
        return y.to(out_dtype)
    return out.copy_(y)


def fused_moe_int8(x, w13, w13_s, w2, w2_s, topk_weights, topk_ids, *, block_scale: bool,
                   rounding: str = "nearest_even", configs=None, out=None) -> torch.Tensor:
    """fused_moe with INT8 experts: block scales (block_scale=True) or channel scales."""
    return fused_moe(x, w13, w13_s, w2, w2_s, topk_weights, topk_ids, scheme="block" if block_scale else "channel",
                     rounding=rounding, configs=configs, out=out)
