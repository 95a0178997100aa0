"""The INT8 linear operators: CPU path == the kernels' torch reference; loading stored or on the fly."""

from __future__ import annotations

import pytest
import torch

from hybrid_r1.errors import CheckpointError
from hybrid_r1.ops.linear_int8 import Int8BlockLinear, Int8ChannelLinear
from hybrid_r1_kernels.reference import block_linear_ref, channel_linear_ref
from hybrid_r1_merge_tools.quantize import quantize_weight


class Source:
    """A minimal WeightSource holding one stored tensor and its companions."""

    path = "<test>"

    def __init__(self, name, stored, extra=None, dense=None):
        self.name, self.stored, self.extra, self.dense = name, stored, extra or {}, dense

    def has(self, name):
        return name == self.name

    def shape(self, name):
        return tuple(self.stored.shape)

    def raw(self, name):
        return self.stored, self.extra

    def tensor(self, name, dtype):
        return self.dense.to(dtype)


@pytest.mark.parametrize("cls, ref", [(Int8BlockLinear, block_linear_ref), (Int8ChannelLinear, channel_linear_ref)])
@pytest.mark.parametrize("k", [256, 320])  # 320: a partial 128-group
@pytest.mark.parametrize("rounding", ["nearest_even", "trunc"])
def test_cpu_path_equals_reference(cls, ref, k, rounding):
    g = torch.Generator().manual_seed(k)
    w = torch.randn(200, k, generator=g) / k ** 0.5
    op = cls(k, 200, "cpu", torch.float32, rounding=rounding)
    op.load_weights(Source("l.weight", w.bfloat16(), dense=w.bfloat16()), "l")  # quantized while loading
    assert op.weight.dtype == torch.int8
    q, s = quantize_weight(w.bfloat16(), cls.scheme)
    assert torch.equal(op.weight, q) and torch.equal(op.weight_scale, s)  # exactly the converter's bits
    x = torch.randn(7, k, generator=g) * 3
    got = op(x)
    want = ref(x, q, s, rounding=rounding, out_dtype=torch.float32, compute_dtype=torch.float64)
    # Same int8 products, exact in fp32 per 128-tile; only the order of fp32 sums differs.
    assert ((got.double() - want.double()).norm() / want.double().norm()).item() < 1e-6


def test_stored_int8_of_the_other_scheme_is_an_error():
    q, s = quantize_weight(torch.randn(128, 256).bfloat16(), "channel")
    op = Int8BlockLinear(256, 128, "cpu", torch.float32)
    with pytest.raises(CheckpointError, match="needs weight_scale_inv, found weight_scale") as e:
        op.load_weights(Source("l.weight", q, {"weight_scale": s}), "l")
    assert "l.weight" in str(e.value)
    with pytest.raises(CheckpointError, match="shape"):
        Int8BlockLinear(128, 128, "cpu").load_weights(Source("l.weight", q, {"weight_scale": s}), "l")
    with pytest.raises(ValueError, match="rounding"):
        Int8BlockLinear(128, 128, "cpu", rounding="up")
