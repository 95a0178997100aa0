"""The INT8 linear operators: CPU path == the kernels' torch reference; loading stored or on the fly."""

from __future__ import annotations

import pytest
import torch

from hybrid_r1.errors import CheckpointError
from hybrid_r1.ops.linear_int8 import Int8BlockLinear, Int8ChannelLinear
from hybrid_r1_kernels.reference import block_linear_ref, channel_linear_ref
from hybrid_r1.quant import quantize_weight


class Source:
    """A minimal WeightSource holding one stored tensor and its companions."""

    path = "<test>"

    def __init__(self, name, stored, extra=None, dense=None):
        self.name, self.stored, self.extra, self.dense = name, stored, extra or {}, dense

    def has(self, name):
        prefix = self.name[: -len("weight")]
        return name == self.name or name in {prefix + k for k in self.extra}

    def shape(self, name):
        return tuple(self.stored.shape)

    def file_of(self, name):
        return self.path

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


@pytest.mark.parametrize("scheme, q_lora_rank", [("channel", 96), ("block", 128)])
def test_fused_projections_compute_the_same(tmp_path, monkeypatch, scheme, q_lora_rank):
    """q_a+kv_a as one GEMM and gate+up with SiLU*up fused give the unfused model's logits."""
    import hybrid_r1
    import hybrid_r1.loading as loading
    from hybrid_r1.synth import SyntheticWeights, preset_config, write_checkpoint

    cfg = preset_config("tiny", vocab_size=64, num_hidden_layers=2, q_lora_rank=q_lora_rank)
    path = write_checkpoint(tmp_path / "ck", SyntheticWeights(cfg), tokenizer=False)
    fused = hybrid_r1.load(path, device="cpu", quantize=scheme)
    attn, mlp = fused.module.model.layers[0].self_attn, fused.module.model.layers[0].mlp
    assert attn.qkv_a_proj is not None and attn.q_a_proj is None
    assert mlp.gate_up_proj is not None and mlp.gate_up_proj.glu
    assert fused.module.model.layers[1].mlp.shared_experts.gate_up_proj is not None
    monkeypatch.setattr(loading.placement, "fuse", lambda module: 0)
    plain = hybrid_r1.load(path, device="cpu", quantize=scheme)
    assert plain.module.model.layers[0].self_attn.q_a_proj is not None
    ids = list(range(3, 40))
    a, b = fused.logits(ids), plain.logits(ids)
    assert ((a - b).norm() / b.norm()).item() < 1e-6  # same products; fp32 sum order only
