"""INT8 W8A8 GEMM and linear wrappers (kernels/int8_gemm.py, int8_linear.py) vs an fp64 reference.

Tolerances. The int8 dot products are exact in int32, so the only error sources are:
  - fp32 scale products and, for block scales, the fp32 sum over K tiles: per element at most a few
    fp32 ulps of sum_k |a_q w| * scales ("absref" below), so |out - ref| <= 4e-6 * absref
    (about 30 ulps: the sum runs over at most 17 tiles here, plus two products per tile);
  - the output cast: bf16 keeps 8 significant bits, so a bf16 output may be off by another 2**-8
    of |ref| (round to nearest on the GPU); Triton's interpreter truncates, so 2**-7 there.
Without CUDA the kernels run in Triton's interpreter at small sizes.
"""


import pytest
import torch

CUDA = torch.cuda.is_available()


# Without CUDA, tests/conftest.py has switched Triton to its interpreter before any import of it.
pytest.importorskip("triton")

from hybrid_r1 import quant  # noqa: E402  (the weight formulas; the test only needs valid int8 weights)
from conftest import needs_cuda  # noqa: E402
from hybrid_r1_kernels import reference as ref  # noqa: E402
from hybrid_r1_kernels.act_quant import per_token_group_quant, per_token_quant  # noqa: E402
from hybrid_r1_kernels.configs import GemmConfig  # noqa: E402
from hybrid_r1_kernels.int8_gemm import int8_block_gemm, int8_channel_gemm, int8_gemm  # noqa: E402
from hybrid_r1_kernels.int8_linear import (  # noqa: E402
    int8_block_gate_up, int8_block_linear, int8_channel_gate_up, int8_channel_linear)

DEV = "cuda" if CUDA else "cpu"
FP32_TOL = 4e-6
BF16_TOL = 2.0**-8 if CUDA else 2.0**-7


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _weights(N, K, block, glu, seed):
    """Random dense weight quantized as the releases are (block: trunc per tile; channel: RNE per
    row), with a zero 128x128 tile and a zero row to check s = 0 handling."""
    dense = torch.randn(2 * N if glu else N, K, generator=_gen(seed)) * 0.05
    dense[:128, :128] = 0
    dense[-1] = 0
    if not block:
        q, s = quant.quantize_channel(dense)
    elif glu:  # each half keeps its own scale grid: cat the two [ceil(N/128), KB] grids
        (qg, sg), (qu, su) = quant.quantize_block(dense[:N]), quant.quantize_block(dense[N:])
        q, s = torch.cat([qg, qu]), torch.cat([sg, su])
    else:
        q, s = quant.quantize_block(dense)
    return q.to(DEV), s.to(DEV)


def _activation(M, K, seed, dtype=torch.bfloat16):
    x = torch.randn(M, K, generator=_gen(seed)) * (1 + 10 * torch.rand(M, 1, generator=_gen(seed + 1)))
    if M > 1:
        x[1] = 0  # zero row: amax 0 must give 0 out, not NaN
    return x.to(dtype).to(DEV)


def _expect_close(out, a_q, a_s, w, w_s, block, glu, bf16_out):
    gemm_ref = ref.block_gemm_ref if block else ref.channel_gemm_ref
    f64 = dict(out_dtype=torch.float64, compute_dtype=torch.float64)
    want = gemm_ref(a_q.cpu(), a_s.cpu(), w.cpu(), w_s.cpu(), glu=glu, **f64)
    if glu:  # bound the gate and up sums separately: silu(g) * u scales both errors
        absg = gemm_ref(a_q.cpu().abs(), a_s.cpu(), w.cpu().abs(), w_s.cpu(), **f64)
        g, u = gemm_ref(a_q.cpu(), a_s.cpu(), w.cpu(), w_s.cpu(), **f64).chunk(2, -1)
        ag, au = absg.chunk(2, -1)
        bound = FP32_TOL * (ag * (u.abs() + au) + au * g.abs() + ag * au)
    else:
        bound = FP32_TOL * gemm_ref(a_q.cpu().abs(), a_s.cpu(), w.cpu().abs(), w_s.cpu(), **f64)
    if bf16_out:
        bound = bound + BF16_TOL * want.abs()
    got = out.cpu().double()
    assert not torch.isnan(got).any(), "unwritten (poisoned) or NaN output"
    err = (got - want).abs()
    assert (err <= bound + 1e-30).all(), f"max excess {(err - bound).max().item():.3e}"


def _quant(x, block, rounding):
    return per_token_group_quant(x, 128, rounding) if block else per_token_quant(x, rounding)


def _poison(M, N, dtype=torch.float32):
    return torch.full((M, N), float("nan"), dtype=dtype, device=DEV)


@pytest.mark.parametrize("M,N,K", [(1, 576, 320), (3, 200, 2112), (17, 200, 320)])
@pytest.mark.parametrize("block", [True, False], ids=["block", "channel"])
@pytest.mark.parametrize("split", [1, 5])  # 5: the split-K reduction takes two steps of four
def test_gemm_int8_inputs(M, N, K, block, split):
    w, w_s = _weights(N, K, block, False, seed=N + K)
    a_q, a_s = _quant(_activation(M, K, seed=M), block, "nearest_even")
    cfg = GemmConfig(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=split)
    gemm = int8_block_gemm if block else int8_channel_gemm
    out = gemm(a_q, a_s, w, w_s, torch.float32, cfg, out=_poison(M, N))
    _expect_close(out, a_q, a_s, w, w_s, block, False, False)


@pytest.mark.parametrize("M,K,split", [(40, 320, 1), (40, 640, 2), (3, 2112, 3)])
def test_block_paired_k_tiles(M, K, split):
    # Two K tiles a step: odd tile counts per split (320: 3 tiles; 2112: 17) leave a lone last tile.
    N = 200
    w, w_s = _weights(N, K, True, False, seed=K + split)
    a_q, a_s = _quant(_activation(M, K, seed=M + K), True, "nearest_even")
    cfg = GemmConfig(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, SPLIT_K=split, PAIRED=True)
    out = int8_block_gemm(a_q, a_s, w, w_s, torch.float32, cfg, out=_poison(M, N))
    _expect_close(out, a_q, a_s, w, w_s, True, False, False)


@pytest.mark.parametrize("block", [True, False], ids=["block", "channel"])
@pytest.mark.parametrize("glu", [False, True], ids=["plain", "glu"])
@pytest.mark.parametrize("rounding", ["nearest_even", "trunc"])
@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("M", [1, 3, 17])  # 1 and 3 rows broadcast into a 16-row tile; 17: two tiles
def test_fused_quant(block, glu, rounding, split, M):
    # Activation quantized inside the GEMM must equal quantize-then-GEMM exactly (same formula).
    N, K = 200, 320
    w, w_s = _weights(N, K, block, glu, seed=5)
    x = _activation(M, K, seed=9)
    cfg = GemmConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, SPLIT_K=split)
    out = int8_gemm(x, None, w, w_s, block_scale=block, glu=glu, out_dtype=torch.float32,
                    rounding=rounding, config=cfg, out=_poison(M, N))
    a_q, a_s = _quant(x, block, rounding)
    _expect_close(out, a_q, a_s, w, w_s, block, glu, False)


@pytest.mark.parametrize("block", [True, False], ids=["block", "channel"])
@pytest.mark.parametrize("M", [1, 17])
def test_linear_wrappers_default_config(block, M):
    # Table or heuristic config, bf16 in and out, 3-D input.
    N, K = 200, 320
    w, w_s = _weights(N, K, block, False, seed=M)
    x = _activation(M, K, seed=3).reshape(1, M, K)
    linear = int8_block_linear if block else int8_channel_linear
    out = linear(x, w, w_s)
    assert out.shape == (1, M, N) and out.dtype == torch.bfloat16
    a_q, a_s = _quant(x.reshape(M, K), block, "nearest_even")
    _expect_close(out.reshape(M, N), a_q, a_s, w, w_s, block, False, True)


@pytest.mark.parametrize("block", [True, False], ids=["block", "channel"])
def test_gate_up_wrapper_unfused_quant(block):
    M, N, K = 17, 200, 320  # N not a multiple of 128: the up half's scale grid starts at row 2
    w, w_s = _weights(N, K, block, True, seed=11)
    x = _activation(M, K, seed=4)
    cfg = GemmConfig(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, FUSED=False)
    gate_up = int8_block_gate_up if block else int8_channel_gate_up
    out = gate_up(x, w, w_s, "trunc", torch.float32, cfg)
    a_q, a_s = _quant(x, block, "trunc")
    _expect_close(out, a_q, a_s, w, w_s, block, True, False)


def test_channel_bk256_multi_m_tiles():
    # Channel mode allows BLOCK_K != 128; M spans two row tiles and the grouped tile order.
    M, N, K = 40, 96, 640
    w, w_s = _weights(N, K, False, False, seed=2)
    a_q, a_s = _quant(_activation(M, K, seed=8), False, "nearest_even")
    cfg = GemmConfig(BLOCK_M=32, BLOCK_N=32, BLOCK_K=256, GROUP_M=2, SPLIT_K=1)
    out = int8_channel_gemm(a_q, a_s, w, w_s, torch.float32, cfg, out=_poison(M, N))
    _expect_close(out, a_q, a_s, w, w_s, False, False, False)


def test_bad_shapes_raise():
    w, w_s = _weights(200, 320, True, False, seed=1)
    a_q, a_s = _quant(_activation(2, 320, seed=1), True, "nearest_even")
    with pytest.raises(ValueError):
        int8_block_gemm(a_q, a_s, w, w_s[:1])
    with pytest.raises(ValueError):
        int8_block_gemm(a_q, a_s[:, :1], w, w_s)
    with pytest.raises(ValueError):
        int8_block_gemm(a_q, a_s, w, w_s, config=GemmConfig(BLOCK_K=256))
    with pytest.raises(ValueError):
        int8_block_gate_up(_activation(2, 320, seed=1), w[:199], w_s)


# DeepSeek sizes on the GPU, with the shipped (or default) tile configs.
SHAPES = {"q_a": (1536, 7168), "q_b": (24576, 1536), "kv_a": (576, 7168), "kv_b": (32768, 512),
          "o": (7168, 16384), "shexp_gate_up": (4096, 7168), "shexp_down": (7168, 2048),
          "dense_gate_up": (36864, 7168), "dense_down": (7168, 18432), "qkv_a": (2112, 7168)}


@needs_cuda
@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("M", [1, 16, 1024])
@pytest.mark.parametrize("block", [True, False], ids=["block", "channel"])
def test_cuda_deepseek_linear(name, M, block):
    N, K = SHAPES[name]
    gen = torch.Generator(device=DEV).manual_seed(M + N)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=DEV, generator=gen)
    shape_s = (-(-N // 128), -(-K // 128)) if block else (N, 1)
    w_s = torch.rand(shape_s, device=DEV, generator=gen) * 1e-3 + 1e-4
    x = torch.randn(M, K, device=DEV, generator=gen).bfloat16()
    out = (int8_block_linear if block else int8_channel_linear)(x, w, w_s, "trunc")
    a_q, a_s = _quant(x, block, "trunc")
    gemm_ref = ref.block_gemm_ref if block else ref.channel_gemm_ref
    want = gemm_ref(a_q, a_s, w, w_s, torch.float64, torch.float64)
    absref = gemm_ref(a_q.abs(), a_s, w.abs(), w_s, torch.float64, torch.float64)
    err = (out.double() - want).abs()
    assert not out.isnan().any()
    assert (err <= FP32_TOL * absref + BF16_TOL * want.abs() + 1e-30).all()


@needs_cuda
@pytest.mark.parametrize("M", [1, 64, 2048])
@pytest.mark.parametrize("block", [True, False], ids=["block", "channel"])
def test_cuda_shared_expert_gate_up(M, block):
    N, K = 2048, 7168
    w, w_s = _weights(N, K, block, True, seed=M)
    x = _activation(M, K, seed=M)
    out = (int8_block_gate_up if block else int8_channel_gate_up)(x, w, w_s, out_dtype=torch.float32)
    a_q, a_s = _quant(x, block, "nearest_even")
    _expect_close(out, a_q, a_s, w, w_s, block, True, False)
