"""The model on a CUDA GPU (bf16, and INT8 through the Triton kernels) against the CPU paths.
Skipped without CUDA; run on the device machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import hybrid_r1
from conftest import NEEDS_CUDA, random_ids
from routing import metrics, record_routing, replay_routing

pytestmark = NEEDS_CUDA


@pytest.fixture(scope="module")
def reference(tiny_dir):
    ref = hybrid_r1.load(tiny_dir, device="cpu")
    prompt = random_ids(24, seed=40)
    ids = prompt + list(ref.generate(prompt, max_new_tokens=40, stop=[]))
    return ids, *record_routing(ref, ids)


def cuda_metrics(tiny_dir, reference, **kw):
    ids, ref_logits, chosen, _ = reference
    model = hybrid_r1.load(tiny_dir, device="cuda", **kw)
    replay_routing(model, [c.cuda() for c in chosen])
    logits = model.logits(ids)
    assert logits.device.type == "cuda" and torch.isfinite(logits).all()
    return model, *metrics(logits.cpu(), ref_logits)


def test_bf16_on_cuda_within_bf16_envelope(tiny_dir, reference):
    model, kl, rel = cuda_metrics(tiny_dir, reference)
    assert model.module.lm_head.weight.dtype == torch.bfloat16
    assert kl.mean() <= 3e-4 and rel.max() <= 0.05, (kl.mean(), rel.max())


@pytest.mark.parametrize("scheme, kl_bound, rel_bound", [("block", 7e-3, 0.2), ("channel", 3e-3, 0.15)])
def test_int8_triton_on_cuda(tiny_dir, reference, scheme, kl_bound, rel_bound):
    model, kl, rel = cuda_metrics(tiny_dir, reference, quantize=scheme)
    assert sum(p.op == f"linear.int8_{scheme}" for p in model.placements) > 100
    assert kl.mean() <= kl_bound and rel.max() <= rel_bound, (kl.mean(), rel.max())


def test_cuda_decode_matches_prefill(tiny_dir):
    model = hybrid_r1.load(tiny_dir, device="cuda", dtype=torch.float32)
    ids = random_ids(30, seed=41)
    full = model.logits(ids)
    stepped = model.logits(ids, chunk=1)
    assert ((stepped - full).norm() / full.norm()).item() <= 1e-4  # TF32-free fp32 on GPU
    out = model.generate(ids, max_new_tokens=8, stop=[])
    assert len(out) == 8 and out.stats.decode_tok_s > 0


def _hybrid_vs_fp32(tmp_path, rules):
    """Loads a tiny GGUF model under `rules` and checks it against the same GGUF in fp32 on the CPU
    (the same GGML experts), routing replayed. Returns the loaded model."""
    from conftest import SMALL_VOCAB
    from hybrid_r1.formats.gguf_writer import write_gguf_from_checkpoint
    from hybrid_r1.synth import SyntheticWeights, preset_config

    cfg = preset_config("tiny", vocab_size=SMALL_VOCAB, q_lora_rank=128)  # 128 rows: q_a+kv_a fuse in block INT8
    (gguf,) = write_gguf_from_checkpoint(SyntheticWeights(cfg, seed=3), tmp_path / "m.gguf", type_mix="Q8_0")
    model = hybrid_r1.load(gguf, rules=rules)
    ops = {p.path: (p.op, p.device.type) for p in model.placements if p.op}
    assert ops["model.layers.1.mlp.experts"] == ("experts.ggml_cpu", "cpu")
    assert ops["model.layers.0.self_attn.o_proj"] == ("linear.int8_block", "cuda")
    assert model.module.model.layers[1].self_attn.qkv_a_proj is not None  # fused on the GPU
    ref = hybrid_r1.load(gguf, device="cpu", dtype=torch.float32)  # same GGML experts, fp32 elsewhere
    ids = random_ids(40, seed=42)
    ref_logits, chosen, _ = record_routing(ref, ids)
    hooks = replay_routing(model, [c.cuda() for c in chosen])
    kl, rel = metrics(model.logits(ids).cpu(), ref_logits)
    for h in hooks:
        h.remove()
    print(f"hybrid vs fp32: mean KL {kl.mean():.2e}, max rel {rel.max():.3f}")
    assert kl.mean() <= 1e-2 and rel.max() <= 0.25, (kl.mean(), rel.max())  # block INT8 + bf16 on top of Q8_0
    out = model.generate(ids, max_new_tokens=4, stop=[])
    assert len(out) == 4
    return model


RULES = Path(__file__).resolve().parent.parent / "rules" / "int8-gpu-ggml-experts.yaml"


def test_default_hybrid_rules_ggml_experts_on_cpu_int8_on_gpu(tmp_path):
    """The product's placement: rules/int8-gpu-ggml-experts.yaml on a GGUF model. Routed experts run
    by ggml on the CPU from the file's bytes, everything else on the GPU with INT8 linears; a
    40-token prompt is below the cost model's GPU-prefill crossover (its fixed cost per call alone
    exceeds the tiny layer's CPU time)."""
    model = _hybrid_vs_fp32(tmp_path, RULES)
    experts = model.module.model.layers[1].mlp.experts
    k = model.module.config.num_experts_per_tok
    assert experts.prefill is not None and experts.prefill_min_tokens is None and not experts.use_gpu(40, k)


def test_hybrid_rules_with_gpu_expert_prefill(tmp_path):
    """The same with the threshold at 1 token: the prompt's experts stream to the GPU (Q8_0 blocks
    expanded by the Triton kernel), decode stays on ggml."""
    rules = yaml.safe_load(RULES.read_text())
    for rule in rules:
        if rule.get("op") == "experts.ggml_cpu":
            rule["args"] = {**rule.get("args", {}), "prefill_min_tokens": 1}
    model = _hybrid_vs_fp32(tmp_path, rules)
    experts = model.module.model.layers[1].mlp.experts
    assert experts.prefill_min_tokens == 1
    # the GGUF's read-only file mapping is page-locked in place (host_pinning.py), not bounced
    assert experts.prefill.pinning == "register", experts.prefill.pin_error
