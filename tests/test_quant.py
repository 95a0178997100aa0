"""hybrid_r1.quant: the one copy of the weight formulas agrees with what reads and runs them (the
kernels' torch reference, the dequantizers, the operators), and its scheme table with the registry.
Bit exactness against Meituan's converters is tests/test_quantize.py's."""

from __future__ import annotations

import pytest
import torch

from hybrid_r1 import quant
from hybrid_r1.ops import OPS, op_class
from hybrid_r1_kernels import reference as ref


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[:128, :128] = 0  # a zero tile (block) and zero rows (channel): s = 0 must dequantize to 0
    return w.bfloat16()


def test_constants_are_the_kernels():
    assert quant.BLOCK == ref.BLOCK == 128


@pytest.mark.parametrize("scheme", ["block", "channel"])
def test_kernel_reference_runs_what_quant_writes(scheme):
    """The kernels' reference GEMM on quant's (int8, scale) equals the fp64 product of the
    activation as the kernels quantize it and the weight as quant.dequant_int8 reads it back: the
    two agree on the scale layout. The reference is exact but for fp64 sums; dequant_int8 returns
    fp32, so each q * s (7 + 24 bits) is rounded once: 2^-24 relative per weight, so
    |got - want| <= (2^-24 + K * 2^-52) * sum |a * w|. A wrong scale layout is off by O(1)."""
    s = quant.SCHEMES[scheme]
    n, k = 300, 384  # a 44-row tail tile
    q, w_s = s.quantize(_weight(n, k, 1))
    assert w_s.shape == s.scale_shape(n, k) and q.dtype == torch.int8 and q.abs().max() <= quant.INT8_MAX
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(2))
    a_q, a_s = ref.act_quant_ref(x, s.act_group)
    got = (ref.block_gemm_ref if scheme == "block" else ref.channel_gemm_ref)(
        a_q, a_s, q, w_s, out_dtype=torch.float64, compute_dtype=torch.float64)
    g = s.act_group or k
    a = (a_q.double().unflatten(-1, (-1, g)) * a_s.double()[..., None]).flatten(-2)
    w = quant.dequant_int8(q, {s.scale_suffix: w_s}).double()
    want = a @ w.T
    bound = (2**-24 + k * 2**-52) * (a.abs() @ w.abs().T)
    assert ((got - want).abs() <= bound).all()
    assert not w[:128, :128].any() and w.abs().max() > 0


@pytest.mark.parametrize("scheme", ["block", "channel"])
def test_quantize_weight_chunks_like_the_whole(scheme):
    """Rows are quantized ROWS_PER_CHUNK (a multiple of 128) at a time: identical to one call."""
    w = _weight(quant.ROWS_PER_CHUNK + 76, 200, 3)
    q, s = quant.quantize_weight(w, scheme)
    q1, s1 = quant.SCHEMES[scheme].quantize(w)
    assert torch.equal(q, q1) and torch.equal(s.view(torch.int32), s1.view(torch.int32))
    with pytest.raises(ValueError, match="block, channel"):
        quant.quantize_weight(w, "tensor")


def test_scheme_table_matches_the_registry():
    for name, s in quant.SCHEMES.items():
        assert s.op in OPS and op_class(s.op).scheme == name
        assert quant.QUANT_METHODS[s.quant_method] == s.kind and quant.scheme_of_kind(s.kind) is s
        assert s.quant_config()["quant_method"] == s.quant_method
    assert quant.SCALE_SUFFIXES == ("weight_scale_inv", "weight_scale")
    kernels = pytest.importorskip("hybrid_r1_kernels.int8_linear")
    for s in quant.SCHEMES.values():
        assert callable(getattr(kernels, s.kernel_linear)) and callable(getattr(kernels, s.kernel_gate_up))


def test_fp8_block_round_trip():
    """quant.quantize_fp8_block (the synthetic FP8 release) read back by dequant_block: each value
    within half an e4m3 step (3 mantissa bits: 2^-4 relative) of the original, plus the smallest
    subnormal step 2^-9 * s for values near zero."""
    w = torch.randn(200, 300, generator=torch.Generator().manual_seed(4))
    q, s = quant.quantize_fp8_block(w)
    back = quant.dequant_block(q, s)
    step = s.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]
    assert ((back - w).abs() <= w.abs() * 2**-4 + step * 2**-10).all()
