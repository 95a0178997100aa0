"""GPU prefill of GGML experts (ops/experts_gpu_prefill.py, through GGMLExperts' prefill_device).

Against DequantExperts in fp64 on the same GGUF blocks. The GPU path multiplies BF16 activations by
BF16-rounded dequantized weights with fp32 accumulation: about 2**-8 relative per product, averaging
down over 256-long dot products, so 1e-2 relative L2 leaves a wide margin while a wrong block layout,
a wrong expert or a lost token gives O(1)."""

from __future__ import annotations

import dataclasses
import logging
import mmap

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from conftest import needs_cuda
from test_experts_ggml import E, H, I, K, PREFIX, FakeSource, expert_tensors, load_pair, rel, routing

from hybrid_r1.host_pinning import PinningError, page_spans
from hybrid_r1.ops import experts_gpu_prefill as egp
from hybrid_r1.ops.experts_ggml import GGMLExperts
from hybrid_r1.ops.experts_reference import DequantExperts

CUDA = torch.cuda.is_available()


@needs_cuda
@pytest.mark.parametrize("types", [(QT.Q4_K, QT.Q4_K, QT.Q6_K), (QT.Q5_K, QT.Q5_K, QT.Q8_0),
                                   (QT.Q2_K, QT.Q2_K, QT.Q3_K), (QT.BF16,) * 3, (QT.Q4_K, QT.Q5_K, QT.Q6_K)],
                         ids=["Q4_K_M", "Q5_K+Q8_0", "Q2_K+Q3_K", "BF16", "gate!=up"])
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
    with pytest.raises(ValueError, match="prefill_pinning"):
        GGMLExperts(E, H, 256, prefill_device="cuda", prefill_pinning="mlock")


def test_groups_runs_and_page_spans():
    used = [0, 1, 2, 5, 6, 9]
    assert egp.expert_groups(used, 10, budget=25) == [[0, 1], [2, 5], [6, 9]]
    assert egp.expert_groups(used, 10, budget=5) == [[e] for e in used]  # one expert at least
    assert egp.runs(used) == [(0, 3), (5, 7), (9, 10)]
    m = mmap.mmap(-1, 8 * 4096)  # page-aligned, so the expected spans are literal
    buf = np.frombuffer(m, np.uint8)
    base = buf.ctypes.data
    assert base % 4096 == 0
    a, b, c = buf[100:5000], buf[5000:8192], buf[4 * 4096 + 8:7 * 4096]
    # a and b touch: their bytes [100, 8192) are one range, of which page 1 is whole (page 0 holds
    # 100 other bytes: never locked); c's [16392, 28672): pages 5-6
    assert page_spans([c, b, a], page=4096) == [(base + 4096, base + 8192), (base + 5 * 4096, base + 7 * 4096)]
    assert page_spans([buf[10:4000]], page=4096) == []  # inside one page that holds other bytes
    assert page_spans([buf[:4096], buf[4096:8192]], page=4096) == [(base, base + 8192)]  # merged


@pytest.mark.parametrize("fused", [True, False])
def test_group_products_match_a_loop(fused):
    """group_products (one gather and scatter for the group, SwiGLU per expert) against a plain loop
    over the assignments, fp32 on the CPU: only summation order differs (~1e-6)."""
    gen = torch.Generator().manual_seed(8)
    n_exp, hid, inter, T, k = 6, 32, 16, 30, 2
    x = torch.randn(T, hid, generator=gen)
    idx = torch.stack([torch.randperm(n_exp, generator=gen)[:k] for _ in range(T)])
    idx[idx == 2] = 3  # expert 2 unused: an empty range inside the group (a repeated 3 counts twice in both)
    idx[0] = torch.tensor([0, 1])
    w = torch.rand(T, k, generator=gen)
    gate, up = torch.randn(n_exp, inter, hid, generator=gen), torch.randn(n_exp, inter, hid, generator=gen)
    down = torch.randn(n_exp, hid, inter, generator=gen)
    from hybrid_r1.model import group_by_expert

    order, token, counts = group_by_expert(idx, n_exp)
    starts = [0, *torch.cumsum(counts, 0).tolist()]
    group = [0, 1, 3, 4]  # used experts only, as expert_groups gives them
    weights = ((torch.cat([gate[group], up[group]], 1).reshape(-1, hid), down[group].reshape(-1, inter)) if fused
               else (gate[group].reshape(-1, hid), up[group].reshape(-1, hid), down[group].reshape(-1, inter)))
    out = torch.full((T, hid), 0.0)
    egp.group_products(out, x, token, w.reshape(-1)[order], starts, group, weights)
    ref = torch.zeros(T, hid)
    for t in range(T):
        for s in range(k):
            e = int(idx[t, s])
            if e in group:
                h = torch.nn.functional.silu(gate[e] @ x[t]) * (up[e] @ x[t])
                ref[t] += w[t, s] * (down[e] @ h)
    assert rel(out, ref) < 1e-5 and out.abs().sum() > 0


def _own_pages(t):
    """The tensor's bytes in a mapping of their own, as a GGUF's are: heap arrays may share a page with
    another layer's, and two locks may not overlap (the op would fall back to "bounce")."""
    m = mmap.mmap(-1, t.data.nbytes)
    a = np.frombuffer(m, np.uint8).reshape(t.data.shape)
    a[...] = t.data
    return dataclasses.replace(t, data=a)


def _layer(seed: int, layer: int, **kw):
    tensors = {p: _own_pages(t) for p, t in expert_tensors((QT.Q4_K, QT.Q4_K, QT.Q6_K), seed=seed).items()}
    src = FakeSource(tensors, layer)
    op = GGMLExperts(E, H, I, threads=2, prefill_device="cuda", prefill_min_tokens=1, **kw)
    op.load_weights(src, f"model.layers.{layer}.mlp.experts")
    ref = DequantExperts(E, H, I, compute_dtype=torch.float64)
    ref.load_weights(src, f"model.layers.{layer}.mlp.experts")
    op.prefill.timing = True
    return op, ref


@needs_cuda
@pytest.mark.parametrize("pinning", ["register", "bounce"])
def test_stream_in_groups_across_layers(pinning, monkeypatch):
    """Three groups of three experts per layer through the two shared buffers (poisoned first), two
    layers in turn: layer 4 takes the two groups layer 3 copied ahead (registered pages only), a
    call that skips experts drops them; each layer still matches its own fp64 reference."""
    a, ref_a = _layer(21, 3, prefill_pinning=pinning)
    b, ref_b = _layer(22, 4, prefill_pinning=pinning)
    assert a.prefill.pinning == pinning, a.prefill.pin_error  # the lent H200 host locks mapped pages
    monkeypatch.setattr(egp, "GROUP_BYTES", 3 * a.prefill.per_expert)
    ring = egp._ring(torch.device("cuda"))
    ring.reserve(3 * a.prefill.per_expert, pinning == "bounce")
    for buf in ring.dev:
        buf.fill_(255)  # the blocks of NaN scales: a stale buffer cannot pass
    gen = torch.Generator().manual_seed(5)
    reg = pinning == "register"
    # (layer, every expert used, groups it should find copied ahead): a's second call drops what its
    # first copied ahead for b (another layer); the last b call takes what a copied ahead for it.
    calls = [(a, ref_a, True, 0), (a, ref_a, False, 0), (b, ref_b, True, 0), (a, ref_a, True, 0),
             (b, ref_b, True, 2 if reg else 0)]
    for op, ref, every, ahead in calls:
        T = 48
        x = torch.randn(T, H, generator=gen)
        idx, w = routing(T, K, E if every else E - 1, gen)
        if every:
            idx[: E // K] = torch.arange(E).view(-1, K)  # every expert used: the next layer is copied ahead
        else:
            idx = idx + 1  # expert 0 unused: the first group differs from what was copied ahead
        y = op(x.cuda(), idx.cuda(), w.cuda())
        assert rel(y.cpu(), ref(x.double(), idx, w.double())) < 1e-2
        st = op.prefill.last_stats()
        assert st.groups == 3 and st.experts == (E if every else E - 1) and st.pinning == pinning
        assert st.ahead == ahead
        # the wall holds each activity (event timestamps: ~1 us); idle gaps make the overlap negative
        assert st.copy_ms > 0 and st.compute_ms > 0 and st.wall_ms >= max(st.copy_ms, st.compute_ms) - 0.01
        assert st.overlap <= 1 + 1e-3 and st.copy_wait_compute_ms >= 0 and st.copy_wait_host_ms >= 0


@needs_cuda
def test_refused_pinning_falls_back_to_bounce(monkeypatch, caplog):
    def refuse(arrays):
        raise PinningError("cuMemHostRegister of 1 MiB failed with CUresult 1")

    monkeypatch.setattr(egp, "Pinning", refuse)
    with caplog.at_level(logging.WARNING):
        op, ref = _layer(23, 3)
    assert op.prefill.pinning == "bounce" and "staging through pinned host buffers" in caplog.text
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(20, H, generator=gen)
    idx, w = routing(20, K, E, gen)
    assert rel(op(x, idx, w), ref(x.double(), idx, w.double())) < 1e-2
