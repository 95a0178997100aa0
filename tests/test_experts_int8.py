"""experts.int8_gpu: a layer's routed experts stacked as INT8 for the fused MoE kernel.

On the CPU the operator computes the kernel's function in torch (tests/test_kernels_fused_moe.py
runs the kernel itself in Triton's interpreter); on a GPU it goes through the rules, the loader and
CUDA graphs."""

from __future__ import annotations

import pytest
import torch

import hybrid_r1
from conftest import SMALL_VOCAB, needs_cuda, random_ids
from hybrid_r1.loading import build
from hybrid_r1.model import Experts
from hybrid_r1.ops.experts_int8 import Int8GPUExperts
from hybrid_r1.quant import dequant_int8, quantize_weight
from hybrid_r1.synth import SyntheticWeights, preset_config
from hybrid_r1_kernels.reference import fused_moe_ref

PREFIX = "model.layers.1.mlp.experts"


@pytest.mark.parametrize("scheme", ["block", "channel"])
def test_stacked_experts_compute_the_layer(scheme):
    cfg = preset_config("tiny", vocab_size=64, num_hidden_layers=2)
    source = SyntheticWeights(cfg, seed=7)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU: the same function in torch
    op = Int8GPUExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, dev, scheme)
    op.load_weights(source, PREFIX)
    g = torch.Generator().manual_seed(3)
    T, k = 5, cfg.num_experts_per_tok
    x = torch.randn(T, cfg.hidden_size, generator=g)
    idx = torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=g)
    y = op(x.to(dev), idx.to(dev), w.to(dev)).cpu()
    op.w13, op.w13_s, op.w2, op.w2_s = (t.cpu() for t in (op.w13, op.w13_s, op.w2, op.w2_s))
    # 1. the kernel on the stacked weights: exact int8 products, fp32 sums (and on a GPU, where the
    # kernel's fp32 intermediate may land one int8 step from fp64's, a rare step: 1e-3 covers it)
    ref = fused_moe_ref(x, op.w13, op.w13_s, op.w2, op.w2_s, w, idx, scheme)
    assert ((y.double() - ref).norm() / ref.norm()).item() < (1e-5 if dev == "cpu" else 1e-3)
    # 2. the layout, independently: the model's own Experts on each expert's converter-quantized
    # weights dequantized (fp32), the activations unquantized. What remains is the int8 rounding of
    # x and of the SwiGLU output, half a step (max/127) each: ~1% of a Gaussian row's rms each.
    with torch.device("meta"):
        experts = Experts(cfg)
    for e, mlp in enumerate(experts):
        for part in ("gate", "up", "down"):
            name = f"{PREFIX}.{e}.{part}_proj.weight"
            q, s = quantize_weight(source.tensor(name, torch.bfloat16), scheme)
            suffix = "weight_scale_inv" if scheme == "block" else "weight_scale"
            getattr(mlp, f"{part}_proj").weight = torch.nn.Parameter(dequant_int8(q, {suffix: s}), requires_grad=False)
    plain = experts(x, idx, w)
    rel = ((y - plain).norm() / plain.norm()).item()
    assert 1e-4 < rel < 3e-2, rel


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_slices_add_up_to_the_whole_layer(world):
    """Tensor parallelism splits each expert's intermediate dimension: the ranks' partial outputs
    (fp32, unrounded) add up to one device's. Block scheme: a rank's weights and its 128-groups of
    the SwiGLU output are one device's, so in float64 only the order of additions differs (~1e-16)."""
    from hybrid_r1.ops.base import Shard

    cfg = preset_config("tiny", vocab_size=64, num_hidden_layers=2, moe_intermediate_size=512)
    source = SyntheticWeights(cfg, seed=9)
    whole = Int8GPUExperts(cfg.n_routed_experts, cfg.hidden_size, 512, "cpu", "block")
    whole.load_weights(source, PREFIX)
    g = torch.Generator().manual_seed(4)
    T, k = 7, cfg.num_experts_per_tok
    x = torch.randn(T, cfg.hidden_size, generator=g, dtype=torch.float64)
    idx = torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=g)
    total = torch.zeros(T, cfg.hidden_size, dtype=torch.float64)
    for rank in range(world):
        part = Int8GPUExperts(cfg.n_routed_experts, cfg.hidden_size, 512, "cpu", "block")
        part.load_weights(source, PREFIX, Shard(rank, world, 0))
        assert part.w13.shape == (cfg.n_routed_experts, 2 * 512 // world, cfg.hidden_size) and part.partial
        y = part(x, idx, w)
        assert y.dtype == torch.float64
        total += y
    ref = whole(x, idx, w)
    assert ((total - ref).norm() / ref.norm()).item() < 1e-12


def test_placement_and_planned_bytes():
    from hybrid_r1 import placement
    from hybrid_r1.plan import memory_plan

    cfg = preset_config("tiny", vocab_size=64, num_hidden_layers=2)
    module = build(cfg)
    rules = placement.parse_rules([{"class": "Experts", "op": "experts.int8_gpu", "device": "cuda",
                                    "args": {"scheme": "channel"}}])
    placement.apply(module, rules, torch.device("cuda"), torch.bfloat16)
    op = module.model.layers[1].mlp.experts
    assert isinstance(op, Int8GPUExperts) and op.scheme == "channel"
    E, H, inter = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    plan = memory_plan(module, None, torch.bfloat16, 0)
    assert plan.by_kind["cuda", "experts.int8_gpu"] == E * (3 * H * inter + 4 * (2 * inter + H))
    with pytest.raises(placement.RuleError, match="scheme"):
        placement.parse_rules([{"class": "Experts", "op": "experts.int8_gpu", "args": {"scheme": "fp8"}}])


@needs_cuda
@pytest.mark.parametrize("scheme", ["block", "channel"])
def test_all_int8_model_on_one_gpu(tmp_path, scheme):
    """Every weight INT8 on the GPU (the multi-GPU mode's single-device path): the whole decode step
    is one CUDA graph (no operator syncs with the host) and decodes the same tokens as eager; with
    the routing of the per-expert INT8 model replayed, the logits stay within the block INT8
    envelope of tests/test_int8_model.py (mean KL 7e-3, max relative error 0.2)."""
    from routing import metrics, record_routing, replay_routing

    from hybrid_r1.synth import write_checkpoint

    cfg = preset_config("tiny", vocab_size=SMALL_VOCAB)
    path = write_checkpoint(tmp_path / "ck", SyntheticWeights(cfg, seed=2), tokenizer=False)
    linears = [{"name": r"\.kv_b_proj$", "device": "cuda"},
               {"name": r"^model\.layers\.\d+\.", "class": "Linear", "op": f"linear.int8_{scheme}", "device": "cuda"},
               {"name": "^", "device": "cuda"}]
    fused = hybrid_r1.load(path, rules=[{"class": "Experts", "op": "experts.int8_gpu", "device": "cuda",
                                         "args": {"scheme": scheme}}] + linears)
    plain = hybrid_r1.load(path, quantize=scheme, device="cuda")
    ids = random_ids(20, seed=8)
    ref, chosen, _ = record_routing(plain, ids)
    hooks = replay_routing(fused, chosen)
    kl, rel = metrics(fused.logits(ids), ref)
    for h in hooks:
        h.remove()
    assert kl.mean() <= 7e-3 and rel.max() <= 0.2, (kl.mean(), rel.max())
    cache = fused.new_cache()
    graphed = fused.generate(ids, max_new_tokens=12, stop=[], cache=cache)
    assert list(graphed) == list(fused.generate(ids, max_new_tokens=12, stop=[], cuda_graphs=False))
    runner = fused.decode_graphs(cache)
    assert runner.breaks == 0 and len(runner.segments) == 1  # one graph: nothing breaks it
