"""Activation quantizers (kernels/act_quant.py) vs the torch reference, bit for bit.

Without CUDA the kernels run in Triton's interpreter (small shapes). Exact equality is expected:
amax and max(., 1e-10) are exact, the kernel divides with IEEE division (div_rn) like torch, and
both round half to even (or truncate) the same fp32 quotient."""


import pytest
import torch

CUDA = torch.cuda.is_available()


# Without CUDA, tests/conftest.py has switched Triton to its interpreter before any import of it.
pytest.importorskip("triton")

import hybrid_r1_kernels.act_quant as aq  # noqa: E402
from conftest import needs_cuda  # noqa: E402
from hybrid_r1_kernels.reference import act_quant_ref  # noqa: E402

DEV = "cuda" if CUDA else "cpu"


def _poisoned(M, K, n_scales):
    # -128 is never produced (the quantizer clamps to +-127): it marks unwritten q elements.
    return (torch.full((M, K), -128, dtype=torch.int8, device=DEV),
            torch.full((M, n_scales), float("nan"), dtype=torch.float32, device=DEV))


def _input(M, K, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 4
    x[0, : min(K, 130)] = 0  # a zero first group (and partial second): amax 0 must not give NaN
    if M > 2:
        x[2] = 0  # a whole zero row
    return x.to(dtype).to(DEV)


def _check(q, s, qr, sr):
    assert not torch.isnan(s).any()
    assert (q != -128).all(), "unwritten or unclamped q"
    assert torch.equal(s.cpu(), sr.cpu())
    assert torch.equal(q.cpu(), qr.cpu())


@pytest.mark.parametrize("M,K", [(1, 320), (3, 2112), (17, 100), (5, 128)])
@pytest.mark.parametrize("rounding", ["nearest_even", "trunc"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_group_quant(M, K, rounding, dtype):
    x = _input(M, K, dtype, seed=M * 1000 + K)
    out = _poisoned(M, K, -(-K // 128))
    q, s = aq.per_token_group_quant(x, 128, rounding, out=out)
    _check(q, s, *act_quant_ref(x.cpu(), 128, rounding))


@pytest.mark.parametrize("M,K", [(1, 320), (3, 2112), (17, 100), (5, 18432)])  # 18432: two-pass rows
@pytest.mark.parametrize("rounding", ["nearest_even", "trunc"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_token_quant(M, K, rounding, dtype):
    x = _input(M, K, dtype, seed=M * 7 + K)
    out = _poisoned(M, K, 1)
    q, s = aq.per_token_quant(x, rounding, out=out)
    _check(q, s, *act_quant_ref(x.cpu(), None, rounding))


def test_group_64_strided_3d():
    # Rows with a stride (a column slice of a wider tensor) and leading dims are accepted.
    wide = _input(6, 400, torch.bfloat16, seed=1)
    x = wide[:, :300].reshape(2, 3, 300)
    q, s = aq.per_token_group_quant(x, 64, "trunc")
    qr, sr = act_quant_ref(x.cpu(), 64, "trunc")
    assert q.shape == (2, 3, 300) and s.shape == (2, 3, 5)
    _check(q, s, qr, sr)


def test_rounding_modes_differ_and_ties():
    # Quotients exactly at .5 round to even; truncation drops the fraction.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -2.5, -0.5, 3.7, -3.7]], device=DEV)
    q, _ = aq.per_token_group_quant(x, 128, "nearest_even")
    assert q.cpu().tolist() == [[127, 0, 2, 2, -2, 0, 4, -4]]
    q, _ = aq.per_token_group_quant(x, 128, "trunc")
    assert q.cpu().tolist() == [[127, 0, 1, 2, -2, 0, 3, -3]]


def test_bad_arguments():
    x = torch.randn(2, 128, device=DEV)
    with pytest.raises(ValueError):
        aq.per_token_group_quant(x, 128, "round")
    with pytest.raises(ValueError):
        aq.per_token_group_quant(x, 100)
    with pytest.raises(TypeError):
        aq.per_token_quant(x.to(torch.int8))


@needs_cuda
@pytest.mark.parametrize("M,K", [(4096, 7168), (1, 18432), (333, 576)])
@pytest.mark.parametrize("rounding", ["nearest_even", "trunc"])
def test_cuda_deepseek_sizes(M, K, rounding):
    x = _input(M, K, torch.bfloat16, seed=K)  # references on the CPU: IEEE division everywhere
    _check(*aq.per_token_group_quant(x, 128, rounding, out=_poisoned(M, K, -(-K // 128))),
           *act_quant_ref(x.cpu(), 128, rounding))
    _check(*aq.per_token_quant(x, rounding, out=_poisoned(M, K, 1)), *act_quant_ref(x.cpu(), None, rounding))
