"""The torch GGML dequantizers (hybrid_r1/formats/ggml_dequant.py) vs gguf-py's numpy ones, bit for
bit: both compute in float32 in the same order, so any difference is a layout bug. Inputs are random
bytes with the fp16 scale fields replaced by finite values (random fp16 bits include NaN and inf)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize

from conftest import NEEDS_CUDA
from hybrid_r1.formats.ggml_dequant import SUPPORTED, dequantize

DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]
# byte offsets of the fp16 fields in each block
F16_AT = {QT.Q8_0: (0,), QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,)}
TYPES = [QT.Q8_0, QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K]


def _blocks(qt: QT, rows: int, ne0: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    per, nbytes = GGML_QUANT_SIZES[qt]
    raw = rng.integers(0, 256, (rows, ne0 // per, nbytes), dtype=np.uint8)
    for off in F16_AT[qt]:
        d = (rng.standard_normal((rows, ne0 // per)) * 1e-2).astype(np.float16)
        raw[:, :, off:off + 2] = d.view(np.uint8).reshape(rows, ne0 // per, 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qt", TYPES, ids=lambda q: q.name)
def test_block_types_bit_exact(qt, device):
    rows, ne0 = 6, 512
    raw = _blocks(qt, rows, ne0, seed=int(qt))
    want = gguf_dequantize(raw, qt).reshape(rows, ne0)
    got = dequantize(torch.from_numpy(raw).to(device), int(qt), ne0, torch.float32).cpu().numpy()
    assert np.isfinite(want).all()
    assert np.array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("qt,dtype", [(QT.F32, np.float32), (QT.F16, np.float16)], ids=["F32", "F16"])
def test_plain_types(qt, dtype):
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(dtype)
    got = dequantize(torch.from_numpy(x.view(np.uint8).copy()), int(qt), 64, torch.float32)
    assert torch.equal(got, torch.from_numpy(x.astype(np.float32)))
    assert int(QT.BF16) in SUPPORTED


def test_refuses_what_it_cannot_read():
    raw = torch.zeros(2, 144, dtype=torch.uint8)
    with pytest.raises(ValueError, match="IQ2_XXS"):
        dequantize(raw, int(QT.IQ2_XXS), 256)
    with pytest.raises(ValueError, match="do not hold"):
        dequantize(raw, int(QT.Q4_K), 512)


@pytest.mark.parametrize("qt", TYPES, ids=lambda q: q.name)
def test_triton_kernel_matches_torch(qt):
    # kernels/ggml_dequant.py (the interpreter without CUDA) vs the torch reference above. Bound: two
    # fp32 ulps, as the compiler may fuse the Q4_K/Q5_K multiply and subtract into one FMA.
    pytest.importorskip("triton")
    from hybrid_r1_kernels.ggml_dequant import dequantize as triton_dequantize

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rows, ne0 = 5, 768 if qt != QT.Q8_0 else 96  # 3 blocks a row: a program's blocks span rows
    raw = torch.from_numpy(_blocks(qt, rows, ne0, seed=11 + int(qt))).to(dev)
    want = dequantize(raw, int(qt), ne0, torch.float32)
    got = triton_dequantize(raw, int(qt), ne0, torch.float32)
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert ((got - want).abs() <= 2.0**-22 * want.abs() + 1e-30).all()
