"""Pure-torch INT8 W8A8 math: the CPU fallback for the model and the reference the kernel tests
check against. Formulas: shared/reference/FORMATS.md section 2 (Meituan block / channel INT8).
The weight conversion formulas (bf16 -> int8 + scale, bit for bit as Meituan's converters) are not
here: they are hybrid_r1.quant's (this package never imports hybrid_r1; its tests may).

Layouts (same as the Triton kernels):
  x        [..., K] float                  activation
  a_q      [..., K] int8, a_s [..., ceil(K/g)] fp32 (per token group) or [..., 1] (per token)
  w        [N, K] int8                      weight, nn.Linear order (out, in)
  w_s      block: [ceil(N/128), ceil(K/128)] fp32; channel: [N, 1] or [N] fp32
All scales are multiplicative: value = q * s.
"""

from __future__ import annotations

import torch

BLOCK = 128  # weight tile and activation group of the block format
ROUNDINGS = ("nearest_even", "trunc")


def _div127(t: torch.Tensor) -> torch.Tensor:
    # A tensor divisor: torch on CUDA turns division by a Python scalar into a multiply by its
    # reciprocal, which is not the IEEE quotient the kernels (and torch on the CPU) compute.
    return t / torch.full_like(t, 127.0)


def _quantize(x: torch.Tensor, s: torch.Tensor, rounding: str) -> torch.Tensor:
    # x fp32 [..., G], s fp32 [..., 1]. |x/s| <= 127 up to one ulp, so the clamp only guards rounding.
    v = (x / s).clamp(-127.0, 127.0)
    if rounding == "nearest_even":
        v = torch.round(v)  # torch.round is round-half-to-even
    elif rounding != "trunc":
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return v.to(torch.int8)  # float -> int casts truncate toward zero


def act_quant_ref(
    x: torch.Tensor, group_size: int | None = BLOCK, rounding: str = "nearest_even"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quant. group_size=None: per token, scales [..., 1]; else per token group,
    scales [..., ceil(K/group_size)] (the last group may be partial). s = max(amax, 1e-10) / 127."""
    K = x.shape[-1]
    xf = x.float()
    g = K if group_size is None else group_size
    groups = -(-K // g)
    pad = groups * g - K
    xp = torch.nn.functional.pad(xf, (0, pad)) if pad else xf
    xg = xp.reshape(*x.shape[:-1], groups, g)
    s = _div127(xg.abs().amax(dim=-1, keepdim=True).clamp(min=1e-10))
    q = _quantize(xg, s, rounding).reshape(*x.shape[:-1], groups * g)[..., :K]
    return q.contiguous(), s.squeeze(-1).contiguous()


def _block_acc(a2, s2, w, w_s, compute_dtype):
    N, K = w.shape
    ws_rows = w_s.to(compute_dtype).repeat_interleave(BLOCK, 0)[:N]  # [N, KB]
    acc = torch.zeros(a2.shape[0], N, dtype=compute_dtype, device=a2.device)
    for kt, k0 in enumerate(range(0, K, BLOCK)):
        part = a2[:, k0 : k0 + BLOCK].to(compute_dtype) @ w[:, k0 : k0 + BLOCK].to(compute_dtype).T
        acc += part * s2[:, kt : kt + 1] * ws_rows[:, kt][None, :]
    return acc


def block_gemm_ref(
    a_q: torch.Tensor,
    a_s: torch.Tensor,
    w: torch.Tensor,
    w_s: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    compute_dtype: torch.dtype = torch.float32,
    glu: bool = False,
) -> torch.Tensor:
    """out[m, n] = sum_kt dot(a_q[m, kt], w[n, kt]) * a_s[m, kt] * w_s[n // 128, kt].
    Each 128-wide int8 dot is at most 128*127*127 < 2**24, so it is exact in fp32 too.
    glu: w = cat(gate, up) [2N, K], w_s = cat(gate_s, up_s); returns silu(gate) * up [.., N]."""
    lead, K = a_q.shape[:-1], a_q.shape[-1]
    a2 = a_q.reshape(-1, K)
    s2 = a_s.reshape(-1, a_s.shape[-1]).to(compute_dtype)
    if glu:
        n, nb = w.shape[0] // 2, w_s.shape[0] // 2
        acc = silu_mul(_block_acc(a2, s2, w[:n], w_s[:nb], compute_dtype),
                        _block_acc(a2, s2, w[n:], w_s[nb:], compute_dtype))
    else:
        acc = _block_acc(a2, s2, w, w_s, compute_dtype)
    return acc.to(out_dtype).reshape(*lead, acc.shape[-1])


def channel_gemm_ref(
    a_q: torch.Tensor,
    a_s: torch.Tensor,
    w: torch.Tensor,
    w_s: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    compute_dtype: torch.dtype = torch.float32,
    glu: bool = False,
) -> torch.Tensor:
    """out[m, n] = dot(a_q[m], w[n]) * a_s[m] * w_s[n]. Exact integer sums need fp64
    (they reach 3e8 > 2**24); fp32 is close enough for a CPU fallback. glu as block_gemm_ref."""
    lead, K = a_q.shape[:-1], a_q.shape[-1]
    N = w.shape[0]
    acc = a_q.reshape(-1, K).to(compute_dtype) @ w.to(compute_dtype).T
    acc = acc * a_s.reshape(-1, 1).to(compute_dtype) * w_s.reshape(1, N).to(compute_dtype)
    if glu:
        acc = silu_mul(*acc.chunk(2, dim=-1))
    return acc.to(out_dtype).reshape(*lead, acc.shape[-1])


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(g) * u


# Fused MoE (kernels/fused_moe.py), one expert at a time: x [T, H]; w13 [E, 2I, H] (gate then up) and
# w2 [E, H, I] with their scales (block or channel layouts above, one per expert), or float weights
# and no scales for scheme "bf16"; topk_ids / topk_weights [T, k]; pair p = t * k + j.

def _expert_gemm(a, a_s, w, w_s, scheme, glu, dtype):
    if scheme == "bf16":
        acc = a.to(dtype) @ w.to(dtype).T
        return silu_mul(*acc.chunk(2, dim=-1)) if glu else acc
    gemm = block_gemm_ref if scheme == "block" else channel_gemm_ref
    return gemm(a, a_s, w, w_s, dtype, dtype, glu)


def moe_gate_up_ref(a, a_s, w13, w13_s, topk_ids, scheme, glu=True, dtype=torch.float64):
    """Pair rows [T * k, I] (glu) or the gate and up sums [T * k, 2I]: expert ids[t, j] on token row
    a[t] (int8 with scales a_s, or float with a_s None for bf16)."""
    T, k = topk_ids.shape
    out = torch.zeros(T * k, w13.shape[1] // 2 if glu else w13.shape[1], dtype=dtype, device=a.device)
    for e in range(w13.shape[0]):
        t, j = (topk_ids == e).nonzero(as_tuple=True)
        if t.numel():
            s = a_s[t] if a_s is not None else None
            out[t * k + j] = _expert_gemm(a[t], s, w13[e], w13_s[e] if w13_s is not None else None,
                                          scheme, glu, dtype)
    return out


def moe_down_ref(h, h_s, w2, w2_s, topk_weights, topk_ids, scheme, dtype=torch.float64):
    """Slots [T * k, H]: topk_weights[t, j] * expert ids[t, j] on pair row h[t * k + j]."""
    T, k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    out = torch.zeros(T * k, w2.shape[1], dtype=dtype, device=h.device)
    for e in range(w2.shape[0]):
        p = (flat == e).nonzero(as_tuple=True)[0]
        if p.numel():
            s = h_s[p] if h_s is not None else None
            y = _expert_gemm(h[p], s, w2[e], w2_s[e] if w2_s is not None else None, scheme, False, dtype)
            out[p] = y * topk_weights.reshape(-1)[p, None].to(dtype)
    return out


def fused_moe_ref(x, w13, w13_s, w2, w2_s, topk_weights, topk_ids, scheme, rounding="nearest_even"):
    """fp64 [T, H], as fused_moe computes it: each projection's activation quantized as the kernel
    does (per 128-group for block, per token for channel; the intermediate from fp32), or for bf16
    the intermediate rounded to the weights' dtype."""
    group = BLOCK if scheme == "block" else None
    quant = (lambda t: (t, None)) if scheme == "bf16" else (lambda t: act_quant_ref(t, group, rounding))
    h = moe_gate_up_ref(*quant(x), w13, w13_s, topk_ids, scheme)
    h = h.to(w2.dtype) if scheme == "bf16" else h.float()
    slots = moe_down_ref(*quant(h), w2, w2_s, topk_weights, topk_ids, scheme)
    return slots.reshape(*topk_ids.shape, -1).sum(dim=1)


def block_linear_ref(x, w, w_s, rounding="nearest_even", out_dtype=None,
                     compute_dtype=torch.float32, glu=False):
    """x [..., K] float -> as int8_block_linear (glu: int8_block_gate_up)."""
    a_q, a_s = act_quant_ref(x, BLOCK, rounding)
    return block_gemm_ref(a_q, a_s, w, w_s, out_dtype or x.dtype, compute_dtype, glu)


def channel_linear_ref(x, w, w_s, rounding="nearest_even", out_dtype=None,
                       compute_dtype=torch.float32, glu=False):
    """x [..., K] float -> as int8_channel_linear (glu: int8_channel_gate_up)."""
    a_q, a_s = act_quant_ref(x, None, rounding)
    return channel_gemm_ref(a_q, a_s, w, w_s, out_dtype or x.dtype, compute_dtype, glu)
