"""GPU prefill of GGML experts (ops/experts_gpu_prefill.py, through GGMLExperts' prefill_device).

Against DequantExperts in fp64 on the same GGUF blocks. The GPU path multiplies BF16 activations by
BF16-rounded dequantized weights with fp32 accumulation: about 2**-8 relative per product, averaging
down over 256-long dot products, so 1e-2 relative L2 leaves a wide margin while a wrong block layout,
a wrong expert or a lost token gives O(1)."""

from __future__ import annotations

import logging

import pytest
import torch
from gguf import GGMLQuantizationType as QT

from conftest import needs_cuda
from test_experts_ggml import E, H, K, PREFIX, FakeSource, expert_tensors, load_pair, rel, routing

from hybrid_r1.ops.experts_ggml import GGMLExperts

CUDA = torch.cuda.is_available()


@needs_cuda
@pytest.mark.parametrize("types", [(QT.Q4_K, QT.Q4_K, QT.Q6_K), (QT.Q5_K, QT.Q5_K, QT.Q8_0),
                                   (QT.Q2_K, QT.Q2_K, QT.Q3_K), (QT.BF16,) * 3],
                         ids=["Q4_K_M", "Q5_K+Q8_0", "Q2_K+Q3_K", "BF16"])
def test_gpu_prefill_matches_reference(types):
    op, ref = load_pair(expert_tensors(types, seed=7), prefill_device="cuda", prefill_min_tokens=16)
    assert op.prefill is not None
    gen = torch.Generator().manual_seed(3)
    for T in (16, 40):  # the GPU path
        x = torch.randn(T, H, generator=gen)
        idx, w = routing(T, K, E - 1, gen)
        idx = idx + 1  # expert 0 unused: skipped, and expert e's bytes must not shift to e - 1
        y = op(x, idx, w)
        assert y.shape == (T, H) and y.dtype == torch.float32 and y.device.type == "cpu"
        assert rel(y, ref(x.double(), idx, w.double())) < 1e-2
    x = torch.randn(5, H, generator=gen)  # below the threshold: ggml on the CPU
    idx, w = routing(5, K, E, gen)
    assert rel(op(x, idx, w), ref(x.double(), idx, w.double())) < 0.035


@needs_cuda
def test_gpu_prefill_bf16_input_on_gpu():
    # The placement hands the op CPU tensors, but a GPU caller gets its own device and dtype back.
    op, ref = load_pair(expert_tensors((QT.Q4_K, QT.Q4_K, QT.Q6_K), seed=8), prefill_device="cuda",
                        prefill_min_tokens=1)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(33, H, generator=gen)
    idx, w = routing(33, K, E, gen)
    y = op(x.cuda().bfloat16(), idx.cuda(), w.cuda())
    assert y.device.type == "cuda" and y.dtype == torch.bfloat16
    assert rel(y.cpu(), ref(x.double(), idx, w.double())) < 1.5e-2


def test_unsupported_types_stay_on_the_cpu(caplog):
    tensors = expert_tensors((QT.IQ4_XS, QT.IQ4_XS, QT.IQ4_XS), seed=9)
    op = GGMLExperts(E, H, tensors["gate"].ne[1], threads=2, prefill_device="cuda:0")
    with caplog.at_level(logging.WARNING):
        op.load_weights(FakeSource(tensors), PREFIX)
    assert op.prefill is None and "prefill stays on the CPU" in caplog.text


def test_bad_prefill_args():
    with pytest.raises(ValueError, match="CUDA"):
        GGMLExperts(E, H, 256, prefill_device="cpu")
    with pytest.raises(ValueError, match="prefill_min_tokens"):
        GGMLExperts(E, H, 256, prefill_device="cuda", prefill_min_tokens=0)
