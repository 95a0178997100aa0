"""Public INT8 linear wrappers: float activation in, out = x @ W^T (or silu(gate) * up) in x's dtype.

Each quantizes the activation dynamically and runs the W8A8 GEMM. The tile config (tuned table or
default, see configs.py) decides whether the quant is fused into the GEMM (small M: one launch) or
runs first as its own kernel (large M: quantize A once instead of once per N tile).

Weights, as the Meituan releases store them (shared/reference/FORMATS.md section 2):
  block:   w int8 [N, K], w_s fp32 [ceil(N/128), ceil(K/128)]   (`weight_scale_inv`)
  channel: w int8 [N, K], w_s fp32 [N, 1]                        (`weight_scale`)
Gate+up fusion: w = cat([gate, up], 0) -> [2N, K]; block w_s = cat([gate_s, up_s], 0) ->
[2 * ceil(N/128), ceil(K/128)] (each half keeps its own tail block); channel w_s = cat -> [2N, 1].
"""

from __future__ import annotations

from .act_quant import per_token_group_quant, per_token_quant
from .configs import GemmConfig, get_config
from .int8_gemm import SCALE_BLOCK, int8_gemm


def _linear(x, w, w_s, block_scale, glu, rounding, out_dtype, config: GemmConfig | None):
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    N = w.shape[0] // 2 if glu else w.shape[0]
    scheme = "block" if block_scale else "channel"
    cfg = config or get_config(scheme, N, K, M, glu, x.device)
    out_dtype = out_dtype or x.dtype
    if cfg.FUSED:
        a, a_s = x2, None
    elif block_scale:
        a, a_s = per_token_group_quant(x2, SCALE_BLOCK, rounding)
    else:
        a, a_s = per_token_quant(x2, rounding)
    out = int8_gemm(a, a_s, w, w_s, block_scale=block_scale, glu=glu, out_dtype=out_dtype,
                    rounding=rounding, config=cfg)
    return out.reshape(*x.shape[:-1], N)


def int8_block_linear(x, w, w_s, rounding="nearest_even", out_dtype=None, config=None):
    """x [..., K] float -> [..., N]; activation quantized per token per 128-group."""
    return _linear(x, w, w_s, True, False, rounding, out_dtype, config)


def int8_channel_linear(x, w, w_s, rounding="nearest_even", out_dtype=None, config=None):
    """x [..., K] float -> [..., N]; activation quantized per token."""
    return _linear(x, w, w_s, False, False, rounding, out_dtype, config)


def int8_block_gate_up(x, w_gate_up, w_s, rounding="nearest_even", out_dtype=None, config=None):
    """x [..., K] -> silu(x @ gate^T) * (x @ up^T) [..., N] with w_gate_up [2N, K] (layout above)."""
    return _linear(x, w_gate_up, w_s, True, True, rounding, out_dtype, config)


def int8_channel_gate_up(x, w_gate_up, w_s, rounding="nearest_even", out_dtype=None, config=None):
    """Channel-scaled int8_block_gate_up: w_s [2N, 1] = cat(gate_s, up_s)."""
    return _linear(x, w_gate_up, w_s, False, True, rounding, out_dtype, config)
