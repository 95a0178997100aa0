"""Fused MoE (kernels/fused_moe.py) vs the per-expert fp64 reference (kernels/reference.py).

Tolerances. Both projections' int8 dots are exact in int32, and each activation is quantized by the
act_quant kernels, which the reference reproduces bit for bit (tests/test_kernels_act_quant.py); so
the reference is fed the kernel's own quantized inputs (x's, and the kernel's intermediate h's) and
what remains is rounding:
  - per projection, fp32 scale products and the fp32 sum over K tiles: at most (tiles + 4) fp32
    ulps of absref (the same sums over |a_q| |w|): 60 * 2**-24 = 3.6e-6 for H = 7168 (56 tiles), so
    |err| <= 4e-6 * absref, as in test_kernels_int8_gemm.py; SiLU * up propagates it (bound below);
  - the routing-weight product and the sum of the k fp32 slots: < (k + 1) * 2**-24 of the sum of
    |slots|, inside the same 4e-6;
  - the one final rounding to the output dtype: bf16 2**-8 of |out| on the GPU (round to nearest),
    2**-7 in Triton's interpreter (it truncates); fp16 (the float mode here) 2**-11 / 2**-10.
Hence per element |out - ref| <= u_out * |ref| + 4e-6 * absref, and the mean relative error
mean|out - ref| / mean|ref| <= u_out + 4e-6 * mean(absref) / mean|ref| (about 2**-8 = 3.9e-3 in
bf16 on the GPU, measured well below: the rounding errors average out). Against a reference that
computes h itself (fully independent), the int8 re-quantization of h can also differ by one step
where the fp32 and fp64 h straddle a rounding boundary; there the issue's bar is asserted
(<= 1e-2 block, <= 2e-2 channel).
Without CUDA the kernels run in Triton's interpreter at small sizes; its dot mishandles bf16, so the
float (BF16-baseline) mode is checked there in fp16.
"""

import pytest
import torch

CUDA = torch.cuda.is_available()

# Without CUDA, tests/conftest.py has switched Triton to its interpreter before any import of it.
pytest.importorskip("triton")

from hybrid_r1_kernels import reference as ref  # noqa: E402
from hybrid_r1_kernels.act_quant import per_token_group_quant, per_token_quant  # noqa: E402
from hybrid_r1_kernels.configs import GemmConfig, get_moe_config  # noqa: E402
from hybrid_r1_kernels.fused_moe import ALIGN_PAIRS, fused_moe, moe_align, moe_gemm  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
FP32_TOL = 4e-6
U_OUT = {torch.bfloat16: 2.0**-8 if CUDA else 2.0**-7, torch.float16: 2.0**-11 if CUDA else 2.0**-10,
         torch.float32: 2.0**-24}
ISSUE_BAR = {"block": 1e-2, "channel": 2e-2, "bf16": 1e-2}


def _gen(seed, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


def _routing(T, E, k, seed):
    """Distinct experts per token, random weights; once T * k >= E the first tokens between them
    take every expert (a random permutation cut into tokens), so all experts are reached."""
    g = _gen(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    if T * k >= E:
        perm = torch.randperm(E, generator=g)
        for t in range(-(-E // k)):
            part = perm[t * k:(t + 1) * k]
            rest = [e for e in torch.randperm(E, generator=g).tolist() if e not in part.tolist()]
            ids[t] = torch.cat([part, torch.tensor(rest[:k - part.numel()], dtype=part.dtype)])
        assert set(ids.flatten().tolist()) == set(range(E))
    weights = torch.rand(T, k, generator=g) + 0.1
    return ids.to(DEV), weights.to(DEV)


def _experts(E, H, I, scheme, seed, dtype=torch.float16):
    """Random int8 weights and positive scales in the release layouts (values do not matter to the
    kernel: any int8 and any fp32 scale), or float weights for the BF16 mode."""
    g, d = _gen(seed, DEV), dict(device=DEV)
    if scheme == "bf16":
        return ((torch.randn(E, 2 * I, H, generator=g, **d) * 0.05).to(dtype), None,
                (torch.randn(E, H, I, generator=g, **d) * 0.05).to(dtype), None)
    w13 = torch.randint(-127, 128, (E, 2 * I, H), dtype=torch.int8, generator=g, **d)
    w2 = torch.randint(-127, 128, (E, H, I), dtype=torch.int8, generator=g, **d)
    if scheme == "block":
        s13 = torch.rand(E, 2 * -(-I // 128), -(-H // 128), generator=g, **d) * 1e-3 + 1e-4
        s2 = torch.rand(E, -(-H // 128), -(-I // 128), generator=g, **d) * 1e-3 + 1e-4
    else:
        s13 = torch.rand(E, 2 * I, 1, generator=g, **d) * 1e-3 + 1e-4
        s2 = torch.rand(E, H, 1, generator=g, **d) * 1e-3 + 1e-4
    return w13, s13, w2, s2


def _activation(T, H, seed, dtype):
    x = torch.randn(T, H, generator=_gen(seed)) * (1 + 10 * torch.rand(T, 1, generator=_gen(seed + 1)))
    if T > 1:
        x[1] = 0  # zero row: amax 0 must give 0 out, not NaN
    return x.to(dtype).to(DEV)


def _quant(t, scheme):
    if scheme == "bf16":
        return t, None
    return per_token_group_quant(t) if scheme == "block" else per_token_quant(t)


def _check_moe(T, E, H, I, k, scheme, configs, x_dtype, seed):
    w13, s13, w2, s2 = _experts(E, H, I, scheme, seed, x_dtype)
    ids, wts = _routing(T, E, k, seed)
    x = _activation(T, H, seed, x_dtype)
    out = torch.full((T, H), float("nan"), dtype=x_dtype, device=DEV)
    fused_moe(x, w13, s13, w2, s2, wts, ids, scheme=scheme, configs=configs, out=out)
    assert not out.isnan().any(), "unwritten (poisoned) or NaN output"

    # Stage 1 alone, same routing and config as inside fused_moe: h vs fp64, per element.
    cfg13 = configs[0] if configs else get_moe_config(scheme, E, I, H, T, k, True, x.device)
    a, a_s = _quant(x, scheme)
    h = torch.full((T * k, I), float("nan"), dtype=w2.dtype if scheme == "bf16" else torch.float32, device=DEV)
    moe_gemm(a, a_s, w13, s13, moe_align(ids, E, cfg13.BLOCK_M), scheme=scheme, glu=True, per_pair=False,
             config=cfg13, out=h)
    f64 = torch.float64
    want_h = ref.moe_gate_up_ref(a, a_s, w13, s13, ids, scheme).to(f64)
    g, u = ref.moe_gate_up_ref(a, a_s, w13, s13, ids, scheme, glu=False).chunk(2, -1)
    ag, au = ref.moe_gate_up_ref(a.abs(), a_s, w13.abs(), s13, ids, scheme,
                                 glu=False).chunk(2, -1)
    bound_h = FP32_TOL * (ag * (u.abs() + au) + au * g.abs() + ag * au)  # silu(g) * u, |silu'| <= 1.1
    if scheme == "bf16":
        bound_h = bound_h + U_OUT[w2.dtype] * want_h.abs()  # h is stored in the weights' dtype
    err_h = (h.double() - want_h).abs()
    assert not h.isnan().any()
    assert (err_h <= bound_h + 1e-30).all(), f"h: max excess {(err_h - bound_h).max().item():.3e}"

    # Stage 2 + slot sum + output rounding, the reference fed the kernel's h. (The references run
    # on the kernel's device: fp64 on the GPU at DeepSeek sizes.)
    h_q, h_s = _quant(h, scheme)
    slots = ref.moe_down_ref(h_q, h_s, w2, s2, wts, ids, scheme)
    want = slots.reshape(T, k, H).sum(1)
    absref = ref.moe_down_ref(h_q.abs(), h_s, w2.abs(), s2, wts, ids,
                              scheme).reshape(T, k, H).sum(1)
    got = out.double()
    err = (got - want).abs()
    bound = U_OUT[x_dtype] * want.abs() + FP32_TOL * absref
    assert (err <= bound + 1e-30).all(), f"out: max excess {(err - bound).max().item():.3e}"
    mean_rel = (err.mean() / want.abs().mean()).item()
    assert mean_rel <= U_OUT[x_dtype] + FP32_TOL * (absref.mean() / want.abs().mean()).item()

    # Fully independent reference (computes h itself): the issue's bar.
    indep = ref.fused_moe_ref(x, w13, s13, w2, s2, wts, ids, scheme)
    assert ((got - indep).abs().mean() / indep.abs().mean()).item() <= ISSUE_BAR[scheme]
    return mean_rel


# The interpreter's cost is per program: wide N tiles keep the program count small there (the
# default configs run at T = 1 and on the GPU).
WIDE = (GemmConfig(BLOCK_M=16, BLOCK_N=128, GROUP_M=1), GemmConfig(BLOCK_M=16, BLOCK_N=128, GROUP_M=1))


@pytest.mark.parametrize("T,E", [(1, 16), (3, 16), (17, 16), (33, 8)])
@pytest.mark.parametrize("scheme", ["block", "channel"])
def test_fused_moe_int8(T, E, scheme):
    # Top-8: every expert reached once T * 8 >= E; T = 33 of 8 experts: 3 row blocks per expert.
    _check_moe(T, E, 256, 128, 8, scheme, None if CUDA or T == 1 else WIDE, torch.bfloat16, seed=T)


@pytest.mark.parametrize("scheme", ["block", "channel"])
def test_fused_moe_int8_tile_variants(scheme):
    # Row tiles of 32 (gate_up) and 16 (down: a second alignment), a 256-wide N tile (block: a scale
    # per column), grouped order, two K tiles a step in the down projection, H not a multiple of
    # the 128 K tile (masked K), fp32 activations (output rounding 2**-24: the fp32 terms exposed).
    cfg13 = GemmConfig(BLOCK_M=32, BLOCK_N=256, BLOCK_K=128, GROUP_M=2, num_warps=4, num_stages=2)
    cfg2 = GemmConfig(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, PAIRED=scheme == "block")
    _check_moe(9, 8, 320, 128, 8, scheme, (cfg13, cfg2), torch.float32, seed=5)


def test_fused_moe_float_mode():
    # The BF16 baseline path (float weights, no scales), in fp16 here: see the module docstring.
    _check_moe(5, 8, 256, 128, 8, "bf16", None, torch.float16 if not CUDA else torch.bfloat16, seed=7)


@pytest.mark.parametrize("T,E,k,block_m", [(1, 16, 8, 16), (3, 16, 8, 32), (16, 256, 8, 16), (16, 8, 8, 64),
                                           (33, 16, 8, 16), (50, 8, 8, 64)])
def test_moe_align(T, E, k, block_m):
    ids, _ = _routing(T, E, k, seed=T + E)
    r = moe_align(ids, E, block_m)
    if T * k <= ALIGN_PAIRS:  # the one-launch Triton sort must equal the torch one exactly
        t = moe_align(ids, E, block_m, impl="torch")
        assert torch.equal(r.sorted_pairs, t.sorted_pairs) and torch.equal(r.block_expert, t.block_expert)
        assert torch.equal(r.n_padded, t.n_padded)
    P = T * k
    pairs, experts = r.sorted_pairs.cpu(), r.block_expert.cpu()
    n_used = int(r.n_padded.item())
    counts = torch.bincount(ids.flatten().cpu(), minlength=E)
    assert n_used == int(((counts + block_m - 1) // block_m * block_m).sum())
    assert n_used <= pairs.numel() == r.n_blocks * block_m
    used = pairs[:n_used]
    real = used[used < P]
    assert sorted(real.tolist()) == list(range(P)), "every pair exactly once"
    assert (pairs[n_used:] == P).all()
    flat = ids.flatten().cpu()
    for b in range(n_used // block_m):
        blk = pairs[b * block_m:(b + 1) * block_m]
        blk = blk[blk < P]
        assert (flat[blk.long()] == experts[b]).all(), "a block mixes experts"
        assert (blk[1:] > blk[:-1]).all(), "pair order kept within an expert"


def test_bad_inputs_raise():
    w13, s13, w2, s2 = _experts(4, 256, 128, "block", seed=1)
    ids, wts = _routing(2, 4, 2, seed=1)
    x = _activation(2, 256, 1, torch.bfloat16)
    with pytest.raises(ValueError, match="w13 block scales"):
        fused_moe(x, w13, s13[:, :1], w2, s2, wts, ids, scheme="block")
    with pytest.raises(ValueError, match="w2 must be"):
        fused_moe(x, w13, s13, w2[:, :128], s2, wts, ids, scheme="block")
    with pytest.raises(ValueError, match="topk_ids"):
        fused_moe(x, w13, s13, w2, s2, wts, ids[:1], scheme="block")
    with pytest.raises(ValueError, match="scheme"):
        fused_moe(x, w13, s13, w2, s2, wts, ids, scheme="fp8")
    a, a_s = per_token_group_quant(x)
    with pytest.raises(ValueError, match="BLOCK_M"):
        moe_gemm(a, a_s, w13, s13, moe_align(ids, 4, 16), scheme="block", glu=True, per_pair=False,
                 config=GemmConfig(BLOCK_M=32))


# DeepSeek-V3/R1 routed experts on the GPU: E = 256, H = 7168, I = 2048, top-8.
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("T", [1, 200])
@pytest.mark.parametrize("scheme", ["block", "channel"])
def test_cuda_deepseek_fused_moe(T, scheme):
    _check_moe(T, 256, 7168, 2048, 8, scheme, None, torch.bfloat16, seed=T)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("T", [5, 40])  # 40 * 8 pairs: the torch sort instead of the one-program one
@pytest.mark.parametrize("scheme", ["block", "channel"])
def test_cuda_graph_replay_new_routing(scheme, T):
    # No host sync: the whole MoE is captured once and replayed on fresh routing and activations.
    E, H, I, k = 16, 1024, 256, 8
    w13, s13, w2, s2 = _experts(E, H, I, scheme, seed=3)
    ids, wts = _routing(T, E, k, seed=3)
    x = _activation(T, H, 3, torch.bfloat16)
    out = torch.empty_like(x)
    fused_moe(x, w13, s13, w2, s2, wts, ids, scheme=scheme, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused_moe(x, w13, s13, w2, s2, wts, ids, scheme=scheme, out=out)
    for seed in (11, 12):
        new_ids, new_wts = _routing(T, E, k, seed=seed)
        ids.copy_(new_ids)
        wts.copy_(new_wts)
        x.copy_(_activation(T, H, seed, torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        eager = fused_moe(x, w13, s13, w2, s2, wts, ids, scheme=scheme)
        assert torch.equal(out, eager)
