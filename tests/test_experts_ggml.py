"""GGMLExperts (ggml's CPU kernels on GGUF bytes in place) and ggml_lib.quantize.

Weights are drawn at a realistic scale (std 1/sqrt(fan_in)), quantized by ggml into each type and
served through a fake WeightSource as zero-copy GGMLTensors. The reference is fp64 math on the
weights gguf-py DEQUANTIZES from the same bytes, so the only error left is ggml's: activations are
converted to the weights' dot-product type before the integer dot products (x before gate/up,
h = silu(gate) * up * w before down). Two checks per type:

- against the plain fp64 reference, a bound per activation type (relative Frobenius error over
  tokens x hidden). Rounding to a grid of step d errs by d/sqrt(12) RMS; what sets the bound is
  step / RMS of the rounded vector:
    Q8_K (K-quants, IQ types; 256-blocks, scale amax/127): x (Gaussian, amax ~ 3 rms) errs ~0.7%,
      h (heavy-tailed, amax ~ 7 rms) ~1.6%; both pass through near-orthogonal weights: ~2% -> 0.035.
    Q8_0 / Q8_1 (32-blocks, fp16 scale): amax ~ 2.2 / 4 rms: ~1.2% -> 0.02.
    BF16 (8-bit mantissa, 2^-9 / sqrt(3) per element, twice): ~3e-3 -> 6e-3.
    F16 (11-bit mantissa): ~4e-4 -> 1e-3.   F32 (fp32 accumulation only): 1e-5.
- against the fp64 reference with the activations quantized exactly as ggml does (numpy emulation
  of quantize_row_q8_K / q8_0, fp16 and bf16 rounding): what remains is fp32 accumulation, ~1e-7,
  plus at most a rare flip of one rounding (~3e-4 of a token): bound 2e-3, 10x below the first.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import quants

from hybrid_r1 import ggml_lib
from hybrid_r1.errors import CheckpointError
from hybrid_r1.formats.ggml_tensor import GGMLTensor
from hybrid_r1.ops import op_class
from hybrid_r1.ops.experts_ggml import GGMLExperts
from hybrid_r1.ops.experts_reference import DequantExperts

E, H, I, K = 8, 256, 256, 4  # experts, hidden, intermediate (K-quants need multiples of 256), used per token
PREFIX = "model.layers.3.mlp.experts"

# type -> bound against the plain fp64 reference (see the module docstring)
# Relative L2 error of ggml's experts vs fp64 on the dequantized weights, by the activation type
# ggml converts x (and the SwiGLU output) to. F16: each conversion rounds to u = 2^-11, and CPUs with
# AVX512-FP16 (ggml built -march=native) also add the dot products' partial sums in fp16: 4u bounds
# the two roundings plus that accumulation (measured 1.2e-3 on such a Xeon, 5e-4 without FP16 math).
ACT_BOUND = {QT.Q8_K: 0.035, QT.Q8_0: 0.02, QT.Q8_1: 0.02, QT.BF16: 6e-3, QT.F16: 4 * 2**-11, QT.F32: 1e-5}
TYPES = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
         "IQ4_XS", "IQ4_NL", "IQ3_XXS", "IQ3_S", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_S", "IQ1_M",
         "TQ1_0", "TQ2_0", "MXFP4", "NVFP4"]
EMULATED = {QT.Q8_K, QT.Q8_0, QT.BF16, QT.F16, QT.F32}  # activation types emulated bit for bit below


class FakeSource:
    path = "fake.gguf"

    def __init__(self, tensors: dict[str, GGMLTensor], layer: int = 3):
        self.tensors, self.layer = tensors, layer

    def ggml_experts(self, layer: int):
        return self.tensors if layer == self.layer else None


def expert_tensors(types: tuple[int, int, int], seed: int, n_experts: int = E):
    """{"gate", "up", "down"} GGMLTensors of random experts, quantized by ggml."""
    rng = np.random.default_rng(seed)
    out = {}
    for part, (rows, ne0), t in zip(("gate", "up", "down"), ((I, H), (I, H), (H, I)), types):
        w = (rng.standard_normal((n_experts * rows, ne0)) / np.sqrt(ne0)).astype(np.float32)
        q = ggml_lib.quantize(w, t)
        out[part] = GGMLTensor(f"blk.3.ffn_{part}_exps.weight", "fake.gguf", int(t), (ne0, rows, n_experts),
                               q.reshape(n_experts, rows, -1))
    return out


def load_pair(tensors, threads=2, engine="ggml", **kw):
    """(the op on `engine`: ggml here; tests/test_cpu_engines.py runs the others, the fp64 reference)."""
    src = FakeSource(tensors)
    n = tensors["gate"].ne[2]
    op = GGMLExperts(n, H, I, threads=threads, engine=engine, **kw)
    op.load_weights(src, PREFIX)
    ref = DequantExperts(n, H, I, compute_dtype=torch.float64)
    ref.load_weights(src, PREFIX)
    return op, ref


def routing(T: int, k: int, n_experts: int, gen: torch.Generator):
    idx = torch.stack([torch.randperm(n_experts, generator=gen)[:k] for _ in range(T)])
    return idx, torch.rand(T, k, generator=gen) * 2.5 / k


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def act_round(a: np.ndarray, vt: int) -> np.ndarray:
    """Rows of `a` as ggml's CPU backend rounds activations to type `vt` (then back to float32)."""
    a = np.ascontiguousarray(a, np.float32)
    if vt == QT.F32:
        return a
    if vt == QT.F16:
        return a.astype(np.float16).astype(np.float32)
    if vt == QT.BF16:
        return torch.from_numpy(a).to(torch.bfloat16).float().numpy()
    b = a.reshape(-1, 256 if vt == QT.Q8_K else 32)
    with np.errstate(divide="ignore", invalid="ignore"):
        if vt == QT.Q8_K:  # quantize_row_q8_K_ref: signed max, iscale = -127/max, fp32 scale 1/iscale
            mx = b[np.arange(len(b)), np.abs(b).argmax(1)][:, None]
            iscale = np.where(mx != 0, np.float32(-127) / mx, 0).astype(np.float32)
            q = np.minimum(127, np.rint(iscale * b))
            d = np.where(mx != 0, np.float32(1) / iscale, 0).astype(np.float32)
        else:  # quantize_row_q8_0 (x86): scale amax/127 stored as fp16, values rounded with 127/amax
            amax = np.abs(b).max(1, keepdims=True)
            d = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
            q = np.rint(b * np.where(amax != 0, np.float32(127) / amax, 0).astype(np.float32))
    return (q * d).astype(np.float32).reshape(a.shape)


def emulated(ref: DequantExperts, types, x, idx, w) -> torch.Tensor:
    """fp64 experts on the dequantized weights with activations rounded as ggml rounds them."""
    vg, vd = ggml_lib.vec_dot_type(types[0]), ggml_lib.vec_dot_type(types[2])
    xq = torch.from_numpy(act_round(x.float().numpy(), vg)).double()
    experts = {e: ref.expert(e) for e in idx.unique().tolist()}
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for s in range(idx.shape[1]):
            gate, up, down = experts[int(idx[t, s])]
            h = torch.nn.functional.silu(gate @ xq[t]) * (up @ xq[t]) * float(w[t, s])
            out[t] += down @ torch.from_numpy(act_round(h.float().numpy(), vd)).double()
    return out


# ---- quantize ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0", "MXFP4"])
def test_quantize_bit_exact_with_gguf_py(name):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((96, 512)) / 16).astype(np.float32)
    x[0, :40] = 0  # an all-zero block
    x[1, 7] = 5.0  # an outlier
    mine = ggml_lib.quantize(x, QT[name])
    theirs = quants.quantize(x, QT[name]).view(np.uint8).reshape(mine.shape)
    assert mine.shape == (96, ggml_lib.row_bytes(QT[name], 512))
    np.testing.assert_array_equal(mine, theirs)


# relative RMS round-trip error of N(0, 1/256) rows of 256 (each bit of a K-quant halves it);
# measured values x ~1.3. IQ2_XXS/IQ2_XS/IQ1_S with the uniform imatrix quantize() supplies. The
# first IQ1_*/IQ2_* quantization in a process builds ggml's search tables (IQ1_S ~12 s, IQ2_S ~6 s).
ROUNDTRIP = {"F16": 5e-4, "BF16": 3e-3, "Q8_0": 7e-3, "Q6_K": 0.023, "Q5_K": 0.047, "Q4_K": 0.092, "Q3_K": 0.2,
             "Q2_K": 0.38, "Q5_0": 0.056, "Q4_0": 0.11, "IQ4_XS": 0.1, "IQ4_NL": 0.1, "IQ3_S": 0.22,
             "IQ3_XXS": 0.28, "IQ2_S": 0.34, "IQ2_XS": 0.39, "IQ2_XXS": 0.45, "IQ1_M": 0.75, "IQ1_S": 0.64,
             "MXFP4": 0.15, "NVFP4": 0.125}


@pytest.mark.parametrize("name", list(ROUNDTRIP))
def test_quantize_round_trip_error(name):
    x = (np.random.default_rng(2).standard_normal((256, 256)) / 16).astype(np.float32)
    q = ggml_lib.quantize(x, QT[name])
    back = quants.dequantize(q, QT[name]).reshape(x.shape)
    err = np.linalg.norm(back - x) / np.linalg.norm(x)
    assert err < ROUNDTRIP[name], f"{name}: {err:.4f}"
    assert err > ROUNDTRIP[name] / 4, f"{name}: {err:.4f} is suspiciously small"  # really that type


def test_quantize_threads_and_imatrix():
    x = (np.random.default_rng(3).standard_normal((64, 256)) / 16).astype(np.float32)
    assert np.array_equal(ggml_lib.quantize(x, QT.Q4_K), ggml_lib.quantize(x, QT.Q4_K, threads=3))
    assert ggml_lib.requires_imatrix(QT.IQ2_XXS) and ggml_lib.requires_imatrix(QT.IQ1_S)
    assert not ggml_lib.requires_imatrix(QT.Q4_K) and not ggml_lib.requires_imatrix(QT.IQ1_M)
    uniform = ggml_lib.quantize(x[:4], QT.IQ2_XXS)
    assert np.array_equal(uniform, ggml_lib.quantize(x[:4], QT.IQ2_XXS, imatrix=np.ones(256, np.float32)))
    with pytest.raises(ValueError, match="multiple of 256"):
        ggml_lib.quantize(x[:, :100], QT.Q4_K)
    with pytest.raises(ValueError, match="cannot quantize to Q8_K"):
        ggml_lib.quantize(x, QT.Q8_K)
    with pytest.raises(ValueError, match="imatrix"):
        ggml_lib.quantize(x, QT.Q4_K, imatrix=np.ones(3, np.float32))


# ---- the experts op ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", TYPES)
def test_experts_match_dequantized_reference(name):
    t = QT[name]
    types = (t, t, t)
    op, ref = load_pair(expert_tensors(types, seed=10 + t))
    bound = ACT_BOUND[QT(ggml_lib.vec_dot_type(t))]
    gen = torch.Generator().manual_seed(t)
    for T in (1, 3, 17):  # decode, and prefill with several tokens per expert
        x = torch.randn(T, H, generator=gen)
        idx, w = routing(T, K, E, gen)
        y = op(x, idx, w)
        assert y.shape == (T, H) and y.dtype == torch.float32
        plain = rel(y, ref(x.double(), idx, w.double()))
        assert plain < bound, f"{name} T={T}: {plain:.2e} >= {bound}"
        if QT(ggml_lib.vec_dot_type(t)) in EMULATED:
            tight = rel(y, emulated(ref, types, x, idx, w))
            assert tight < 2e-3, f"{name} T={T}: {tight:.2e} against emulated activation rounding"


def test_mixed_types_like_q4_k_m():
    types = (QT.Q4_K, QT.Q4_K, QT.Q6_K)
    op, ref = load_pair(expert_tensors(types, seed=5))
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(9, H, generator=gen)
    idx, w = routing(9, K, E, gen)
    y = op(x, idx, w)
    assert rel(y, ref(x.double(), idx, w.double())) < ACT_BOUND[QT.Q8_K]
    assert rel(y, emulated(ref, types, x, idx, w)) < 2e-3


def test_odd_routing():
    types = (QT.Q4_K, QT.Q4_K, QT.Q6_K)
    op, ref = load_pair(expert_tensors(types, seed=6))
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(12, H, generator=gen)
    w = torch.rand(12, K, generator=gen)
    cases = {
        "all tokens on expert 5": torch.full((12, K), 5),
        "experts 4-7 never used": torch.randint(0, 4, (12, K), generator=gen),
        "last expert only in slot 0": torch.cat([torch.full((12, 1), E - 1),
                                                 torch.randint(0, 3, (12, K - 1), generator=gen)], 1),
    }
    for what, idx in cases.items():
        y = op(x, idx, w)
        assert rel(y, emulated(ref, types, x, idx, w)) < 2e-3, what
    # one expert per token (no sum), int32 ids, zero weights
    idx1, w1 = torch.randint(0, E, (12, 1), generator=gen, dtype=torch.int32), torch.rand(12, 1, generator=gen)
    assert rel(op(x, idx1, w1), emulated(ref, types, x, idx1, w1)) < 2e-3
    assert torch.count_nonzero(op(x, cases["all tokens on expert 5"], torch.zeros(12, K))) == 0
    assert op(x[:0], cases["all tokens on expert 5"][:0], w[:0]).shape == (0, H)


def test_chunks_layers_and_dtypes():
    """Chunked prefill is bit-identical; two layers sharing the executor's graphs stay apart; the
    result comes back in x's dtype (and device)."""
    tensors_a = expert_tensors((QT.Q4_K, QT.Q4_K, QT.Q6_K), seed=7)
    a, ref_a = load_pair(tensors_a)
    a5, _ = load_pair(tensors_a, chunk_tokens=5)
    b, ref_b = load_pair(expert_tensors((QT.Q4_K, QT.Q4_K, QT.Q6_K), seed=8))
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(23, H, generator=gen)
    idx, w = routing(23, K, E, gen)
    ya = a(x, idx, w)
    assert torch.equal(a5(x, idx, w), ya)  # five chunks == one
    for _ in range(2):  # alternate layers and token counts: graphs re-pointed, arena reused
        assert rel(b(x[:1], idx[:1], w[:1]), emulated(ref_b, b.weights.types, x[:1], idx[:1], w[:1])) < 2e-3
        assert torch.equal(a(x, idx, w), ya)
    assert rel(ya, ref_a(x.double(), idx, w.double())) < ACT_BOUND[QT.Q8_K]
    yb = a(x.bfloat16(), idx, w.bfloat16())
    assert yb.dtype == torch.bfloat16 and rel(yb, ya) < 0.03
    if torch.cuda.is_available():
        yc = a(x.cuda(), idx.cuda(), w.cuda())
        assert yc.device.type == "cuda" and torch.equal(yc.cpu(), ya)


def test_weights_are_used_in_place():
    tensors = expert_tensors((QT.Q8_0, QT.Q8_0, QT.Q8_0), seed=9)
    op, _ = load_pair(tensors)
    for part in ("gate", "up", "down"):
        assert getattr(op.weights, part).ctypes.data == tensors[part].data.ctypes.data
    x, idx, w = torch.randn(2, H), torch.tensor([[1, 2, 3, 4], [4, 3, 2, 1]]), torch.ones(2, K)
    y0 = op(x, idx, w)
    tensors["down"].data[2] = 0  # change the file's bytes: the op sees it at once
    assert not torch.equal(op(x, idx, w), y0)


def test_bad_calls_and_weights():
    tensors = expert_tensors((QT.Q4_0, QT.Q4_0, QT.Q4_0), seed=11)
    op, _ = load_pair(tensors)
    x = torch.randn(2, H)
    with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 8\)"):
        op(x, torch.tensor([[0, 8, 1, 2], [0, 1, 2, 3]]), torch.ones(2, K))
    with pytest.raises(ValueError, match="expert ids"):
        op(x, torch.tensor([[0, -1, 1, 2], [0, 1, 2, 3]]), torch.ones(2, K))
    with pytest.raises(ValueError, match="x must be"):
        op(torch.randn(2, H + 1), torch.zeros(2, K, dtype=torch.long), torch.ones(2, K))
    with pytest.raises(ValueError, match="topk_idx and topk_w"):
        op(x, torch.zeros(2, K, dtype=torch.long), torch.ones(2, K + 1))
    with pytest.raises(ValueError, match="int64 or int32"):
        op(x, torch.zeros(2, K), torch.ones(2, K))
    with pytest.raises(RuntimeError, match="load_weights first"):
        GGMLExperts(E, H, I, threads=1)(x, torch.zeros(2, K, dtype=torch.long), torch.ones(2, K))
    with pytest.raises(CheckpointError, match=r"ne \[256, 256, 8\] does not match.*blk.3.ffn_gate_exps"):
        GGMLExperts(E, H, 512, threads=1).load_weights(FakeSource(tensors), PREFIX)
    with pytest.raises(CheckpointError, match="no GGML-quantized routed experts"):
        GGMLExperts(E, H, I, threads=1).load_weights(FakeSource(tensors, layer=4), PREFIX)
    with pytest.raises(ValueError, match="not a routed-experts module name"):
        GGMLExperts(E, H, I, threads=1).load_weights(FakeSource(tensors), "model.layers.3.mlp")
    q8k = dict(tensors, up=GGMLTensor("blk.3.ffn_up_exps.weight", "fake.gguf", int(QT.Q8_K), (H, I, E),
                                       np.zeros((E, I, ggml_lib.row_bytes(QT.Q8_K, H)), np.uint8)))
    with pytest.raises(CheckpointError, match="no matmul for Q8_K.*ffn_up_exps"):
        GGMLExperts(E, H, I, threads=1).load_weights(FakeSource(q8k), PREFIX)
    q6k = dict(tensors, gate=GGMLTensor("blk.3.ffn_gate_exps.weight", "fake.gguf", int(QT.Q6_K), (H, I, E),
                                        tensors["gate"].data))  # Q4_0 rows (144 bytes) labelled Q6_K (210)
    with pytest.raises(CheckpointError, match=r"expected uint8 \[8, 256, 210\] \(Q6_K\).*ffn_gate_exps"):
        GGMLExperts(E, H, I, threads=1).load_weights(FakeSource(q6k), PREFIX)
    with pytest.raises(CheckpointError, match="do not hold 256 Q6_K values.*ffn_gate_exps"):
        DequantExperts(E, H, I).load_weights(FakeSource(q6k), PREFIX)
    strided = dict(tensors, down=GGMLTensor("blk.3.ffn_down_exps.weight", "fake.gguf", int(QT.Q4_0), (I, H, E),
                                            np.repeat(tensors["down"].data, 2, axis=0)[::2]))
    with pytest.raises(CheckpointError, match="not contiguous"):
        GGMLExperts(E, H, I, threads=1).load_weights(FakeSource(strided), PREFIX)


def test_built_by_placement_rules():
    from hybrid_r1.model import Experts

    class Cfg:
        hidden_size, moe_intermediate_size, n_routed_experts = H, I, E

    with torch.device("meta"):
        module = Experts(Cfg)
    ggml_op = op_class("experts.ggml_cpu")
    op = ggml_op.from_module(module, torch.device("cpu"), torch.bfloat16, ggml_op.Args.parse({"threads": 3}))
    assert (op.n_experts, op.hidden_size, op.intermediate_size, op.threads) == (E, H, I, 3)
    assert op_class("experts.dequant").from_module(module, device="cpu", dtype=torch.bfloat16).n_experts == E
    from hybrid_r1.placement import parse_rules

    with pytest.raises(ValueError, match="computes on cpu, but the rule says device: cuda"):
        parse_rules([{"class": "Experts", "op": "experts.ggml_cpu", "device": "cuda"}])
    assert GGMLExperts(E, H, I).threads == ggml_lib.physical_cores() >= 1


def test_gil_released_while_ggml_computes():
    """A Python thread keeps running while another is inside ggml_graph_compute."""
    op, _ = load_pair(expert_tensors((QT.Q4_0, QT.Q4_0, QT.Q4_0), seed=12), threads=1)
    x, idx, w = torch.randn(256, H), torch.randint(0, E, (256, K)), torch.rand(256, K)
    ex = ggml_lib.executor(1)
    spans, compute = [], ex.compute

    def timed(graph):
        t0 = time.perf_counter()
        compute(graph)
        spans.append((t0, time.perf_counter()))

    ex.compute = timed
    try:
        done = threading.Event()
        worker = threading.Thread(target=lambda: ([op(x, idx, w) for _ in range(5)], done.set()))
        ticks, n = [], 0
        worker.start()
        while not done.is_set():
            n += 1
            if n % 64 == 0:
                ticks.append(time.perf_counter())
        worker.join()
    finally:
        del ex.compute
    inside = sum(t0 < t < t1 for t in ticks for t0, t1 in spans)
    busy = sum(t1 - t0 for t0, t1 in spans)
    assert busy > 0.01 and inside > 20, f"{inside} ticks of the main thread during {busy * 1e3:.0f} ms in ggml"
