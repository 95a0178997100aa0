"""The model on a CUDA GPU (bf16, and INT8 through the Triton kernels) against the CPU paths.
Skipped without CUDA; run on the device machine."""

from __future__ import annotations

import pytest
import torch

import hybrid_r1
from conftest import random_ids
from routing import metrics, record_routing, replay_routing

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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
