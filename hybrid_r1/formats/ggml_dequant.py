"""GGML block types -> float, in torch, on whatever device the bytes are on.

For the GPU expert prefill (ops/experts_ggml.py): the raw GGUF blocks of the used experts cross PCIe
as they are (4-6 bits per weight instead of 16) and are expanded here, on the GPU, with vectorised
bit operations. The layouts are ggml's (ggml-common.h); tests/test_ggml_dequant.py checks every type
bit for bit against gguf-py's numpy dequantizers. Types not listed in SUPPORTED stay on the CPU path.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as QT

QK_K = 256  # values per K-quant super-block


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[n, 2] little-endian fp16 bytes -> [n, 1] float32."""
    return b.contiguous().view(torch.float16).float()


def _shifted(b: torch.Tensor, shifts: list[int], mask: int) -> torch.Tensor:
    """b [n, g, w] uint8 -> [n, g, len(shifts), w]: (b >> s) & mask for each shift."""
    s = torch.tensor(shifts, dtype=torch.uint8, device=b.device).view(1, 1, -1, 1)
    return (b.unsqueeze(2) >> s) & mask


def _q8_0(b: torch.Tensor) -> torch.Tensor:  # [n, 34]: d, 32 x int8
    return _f16(b[:, :2]) * b[:, 2:].contiguous().view(torch.int8).float()


def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 bytes of 6-bit scales and mins of Q4_K / Q5_K -> (scales, mins), [n, 8] each."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], 1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], 1)
    return sc.float(), mn.float()


def _k4_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 32-value sub-block multiplier and offset of Q4_K / Q5_K: [n, 8, 1] each."""
    sc, mn = _scale_min_k4(b[:, 4:16])
    return (_f16(b[:, 0:2]) * sc).unsqueeze(2), (_f16(b[:, 2:4]) * mn).unsqueeze(2)


def _q4_k(b: torch.Tensor) -> torch.Tensor:  # [n, 144]: d, dmin, scales[12], qs[128]
    n = b.shape[0]
    dl, ml = _k4_scales(b)
    q = _shifted(b[:, 16:].reshape(n, 4, 32), [0, 4], 0x0F).reshape(n, 8, 32)
    return (dl * q.float() - ml).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:  # [n, 176]: d, dmin, scales[12], qh[32], qs[128]
    n = b.shape[0]
    dl, ml = _k4_scales(b)
    ql = _shifted(b[:, 48:].reshape(n, 4, 32), [0, 4], 0x0F).reshape(n, 8, 32)
    qh = _shifted(b[:, 16:48].reshape(n, 1, 32), list(range(8)), 0x01).reshape(n, 8, 32)
    return (dl * (ql | (qh << 4)).float() - ml).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:  # [n, 210]: ql[128], qh[64], scales[16] int8, d
    n = b.shape[0]
    ql = _shifted(b[:, :128].reshape(n, 2, 64), [0, 4], 0x0F).reshape(n, 8, 32)
    qh = _shifted(b[:, 128:192].reshape(n, 2, 32), [0, 2, 4, 6], 0x03).reshape(n, 8, 32)
    q = ((ql | (qh << 4)).to(torch.int16) - 32).reshape(n, 16, 16).float()
    d = _f16(b[:, 208:210]) * b[:, 192:208].contiguous().view(torch.int8).float()  # [n, 16]
    return (d.unsqueeze(2) * q).reshape(n, QK_K)


def _q2_k(b: torch.Tensor) -> torch.Tensor:  # [n, 84]: scales[16] (low: scale, high: min), qs[64], d, dmin
    n = b.shape[0]
    sc = b[:, :16]
    dl = (_f16(b[:, 80:82]) * (sc & 0x0F).float()).unsqueeze(2)  # [n, 16, 1]
    ml = (_f16(b[:, 82:84]) * (sc >> 4).float()).unsqueeze(2)
    q = _shifted(b[:, 16:80].reshape(n, 2, 32), [0, 2, 4, 6], 0x03).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:  # [n, 110]: hmask[32], qs[64], scales[12], d
    n = b.shape[0]
    lo = _shifted(b[:, 96:104].reshape(n, 1, 8), [0, 4], 0x0F).reshape(n, 16)
    hi = _shifted(b[:, 104:108].reshape(n, 1, 4), [0, 2, 4, 6], 0x03).reshape(n, 16)
    scales = ((lo | (hi << 4)).to(torch.int16) - 32).float()
    dl = (_f16(b[:, 108:110]) * scales).unsqueeze(2)  # [n, 16, 1]
    ql = _shifted(b[:, 32:96].reshape(n, 2, 32), [0, 2, 4, 6], 0x03).reshape(n, 16, 16)
    qh = _shifted(b[:, :32].reshape(n, 1, 32), list(range(8)), 0x01).reshape(n, 16, 16) ^ 1
    q = (ql.to(torch.int16) - (qh.to(torch.int16) << 2)).float()  # a set bit means no -4 offset
    return (dl * q).reshape(n, QK_K)


# ggml type -> (values per block, bytes per block, block decoder)
_BLOCKS = {QT.Q8_0: (32, 34, _q8_0), QT.Q2_K: (QK_K, 84, _q2_k), QT.Q3_K: (QK_K, 110, _q3_k),
           QT.Q4_K: (QK_K, 144, _q4_k), QT.Q5_K: (QK_K, 176, _q5_k), QT.Q6_K: (QK_K, 210, _q6_k)}
_PLAIN = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}
SUPPORTED = frozenset(int(t) for t in (*_BLOCKS, *_PLAIN))


def dequantize(raw: torch.Tensor, ggml_type: int, ne0: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """raw: uint8 [rows, row_bytes], rows of `ne0` values of `ggml_type` -> [rows, ne0] in dtype."""
    if raw.dtype != torch.uint8 or raw.dim() != 2:
        raise ValueError(f"raw blocks must be uint8 [rows, bytes], got {raw.dtype} {tuple(raw.shape)}")
    qt = QT(ggml_type)
    rows = raw.shape[0]
    if qt in _PLAIN:
        return raw.contiguous().view(_PLAIN[qt]).reshape(rows, ne0).to(dtype)
    if qt not in _BLOCKS:
        raise ValueError(f"no torch dequantizer for ggml type {qt.name}")
    per, nbytes, decode = _BLOCKS[qt]
    if ne0 % per or raw.shape[1] != ne0 // per * nbytes:
        raise ValueError(f"rows of {raw.shape[1]} bytes do not hold {ne0} {qt.name} values")
    return decode(raw.reshape(-1, nbytes)).reshape(rows, ne0).to(dtype)
