"""Weight quantization: the INT8 formats' formulas bit for bit, the dequantizers, and one table
naming each scheme wherever it appears (CLI, config.json, tensor names, operators, kernels).

Formats (FORMATS.md section 2): every scale is multiplicative, value = q * s.
- FP8 (the DeepSeek release): float8_e4m3fn weight, `weight_scale_inv` fp32 per 128x128 tile.
- block (meituan/DeepSeek-R1-Block-INT8): int8 weight, `weight_scale_inv` fp32 per 128x128 tile.
- channel (meituan/DeepSeek-R1-Channel-INT8): int8 weight, `weight_scale` fp32 [N, 1].

The conversion formulas reproduce Meituan's converters bit for bit (checked in tests/test_quantize.py
against an independent numpy version and against tiles measured on an H100):

- block, per 128x128 tile, in fp32 as their Triton kernel runs it: `s = amax / 127`,
  `q = int8(x / s)` (the cast truncates toward zero). Triton lowers an fp32 `/` to PTX
  `div.full.f32`, i.e. `a * rcp.approx(b)` rounded once; for every bf16 `amax` that gives
  `s = fl(amax * fl(1/127))`, and for every element but the tile's own +-amax the truncated quotient
  equals that of an exact division. For the +-amax elements the hardware reciprocal decides between
  126 and 127; `_AMAX_TRUNCATES_TO_126` lists the 16 bf16 mantissas where it gives 126. Checked
  against a Triton kernel written like theirs on an H100 (Triton 3.6): 0 differing bits over 13,504
  tiles / 219M elements, every bf16 mantissa as a tile maximum at exponents -40..12 among them (a
  tile maximum below ~2^-119 would make s subnormal: not covered). An all-zero tile stores s = 0
  and q = 0, what their kernel writes (0/0 is NaN, cast to 0); it dequantizes to exactly 0.
- channel, per output row, in bf16 as their PyTorch code runs it on a bf16 tensor:
  `s = bf16(amax / 127)`, `q = clamp(round_half_even(bf16(x / s)), -127, 127)`, scale stored as
  fp32 `[N, 1]`. A zero row stores s = 0, q = 0 (no NaN).
- FP8 -> BF16 (DeepSeek's `fp8_cast_bf16`): fp32 `w_fp8 * s`, rounded to bf16 by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .errors import CheckpointError

BLOCK = 128  # tile side of the block-scaled formats (FP8 release, Block-INT8); also the activation group
INT8_MAX = 127  # symmetric int8: -127..127, as both converters clamp
FP8_MAX = 448.0  # largest finite float8_e4m3fn
ROWS_PER_CHUNK = 8 * BLOCK  # rows quantized at a time: bounds the fp32 temporaries of one tensor
# bf16 mantissas (7 bits) of a tile's amax for which Triton's fp32 `amax / (amax / 127)` truncates
# to 126 rather than 127 (MUFU reciprocal rounding, measured on H100, sm_90, Triton 3.6).
_AMAX_TRUNCATES_TO_126 = (3, 18, 19, 22, 23, 24, 33, 48, 49, 81, 85, 87, 95, 112, 113, 116)


# ---- the formulas ---------------------------------------------------------------------------------
def quantize_block(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 [N, K] -> (int8 [N, K], fp32 [ceil(N/128), ceil(K/128)]) as Meituan's Triton converter."""
    n, k = w.shape
    nb, kb = -(-n // BLOCK), -(-k // BLOCK)
    # tail tiles zero-padded, as masked loads read them
    x = torch.zeros(nb * BLOCK, kb * BLOCK, dtype=torch.float32, device=w.device)
    x[:n, :k] = w.to(torch.bfloat16)
    tiles = x.view(nb, BLOCK, kb, BLOCK)
    amax = tiles.abs().amax(dim=(1, 3), keepdim=True)  # [nb, 1, kb, 1], bf16 values held exactly in fp32
    # == div.full.f32(amax, 127) for every bf16 amax
    s = amax * torch.tensor(1 / INT8_MAX, dtype=torch.float32, device=w.device)
    q = tiles.div(torch.where(s > 0, s, 1.0)).trunc_()  # a zero tile divides 0 by 1: q = 0, s = 0
    qmax = torch.full((128,), float(INT8_MAX), device=w.device)  # indexed by the 7-bit mantissa, not a block size
    qmax[list(_AMAX_TRUNCATES_TO_126)] = INT8_MAX - 1.0
    top = qmax[amax.to(torch.bfloat16).view(torch.int16).long() & 0x7F]  # by amax's 7-bit bf16 mantissa
    q = torch.where(tiles.abs() == amax, tiles.sign() * top, q)
    return q.view(nb * BLOCK, kb * BLOCK)[:n, :k].to(torch.int8), s.view(nb, kb)


def quantize_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 [N, K] -> (int8 [N, K], fp32 [N, 1]) as Meituan's converter computes it on bf16 tensors."""
    x = w.to(torch.bfloat16)
    amax = x.abs().amax(dim=1, keepdim=True).float()
    # A tensor divisor: torch on CUDA turns division by a Python scalar into a multiply by its
    # reciprocal, not the IEEE quotient (which the CPU computes either way).
    s = (amax / torch.full_like(amax, INT8_MAX)).to(torch.bfloat16)  # the bf16 op rounds its fp32 result
    y = x.float().div(torch.where(s > 0, s, 1).float()).to(torch.bfloat16)  # likewise bf16(x / s); zero row: 0 / 1
    return y.float().round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8), s.float()  # torch.round: half to even


def quantize_fp8_block(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The DeepSeek FP8 release format (for synthetic checkpoints): per 128x128 tile s = amax/448,
    q = fp8(w/s); tail tiles are zero-padded before their amax (which padding does not change)."""
    n, k = w.shape
    nb, kb = -(-n // BLOCK), -(-k // BLOCK)
    padded = torch.zeros(nb * BLOCK, kb * BLOCK, dtype=torch.float32)
    padded[:n, :k] = w.float()
    tiles = padded.view(nb, BLOCK, kb, BLOCK)
    scale = tiles.abs().amax(dim=(1, 3)) / FP8_MAX  # [nb, kb]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (tiles / scale[:, None, :, None]).view(nb * BLOCK, kb * BLOCK)[:n, :k].to(torch.float8_e4m3fn)
    return q, scale


def quantize_weight(w: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One weight [N, K] (taken as bf16, as the converter sees it) -> (int8, fp32 scale) of `scheme`,
    bit for bit what `merge_tools quantize` writes, ROWS_PER_CHUNK rows at a time (tiles and rows
    are independent). Used to quantize while loading."""
    quantize = scheme_of(scheme).quantize
    parts = [quantize(w[r0 : r0 + ROWS_PER_CHUNK]) for r0 in range(0, max(w.shape[0], 1), ROWS_PER_CHUNK)]
    return torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts])


# ---- the dequantizers -----------------------------------------------------------------------------
def dequant_block(q: torch.Tensor, scale: torch.Tensor, *, name: str = "", file: str | None = None) -> torch.Tensor:
    """Block-scaled weight (FP8 or INT8) -> fp32: each 128x128 tile times its scale; tails are
    cropped (the release padded tail tiles with zeros before computing their scale)."""
    n, k = q.shape
    want = (-(-n // BLOCK), -(-k // BLOCK))
    if tuple(scale.shape) != want:
        raise CheckpointError(f"block scale has shape {list(scale.shape)}, expected {list(want)} for weight {[n, k]}",
                              file=file, tensor=name)
    s = scale.float().repeat_interleave(BLOCK, 0)[:n].repeat_interleave(BLOCK, 1)[:, :k]
    return q.float() * s


def dequant_int8(q: torch.Tensor, extra: dict[str, torch.Tensor], *, name: str = "",
                 file: str | None = None) -> torch.Tensor:
    """INT8 weight -> fp32, `extra` the companions by suffix (as WeightSource.raw gives them): block
    scales (`weight_scale_inv`) or per-row scales (`weight_scale` [N, 1])."""
    if SCHEMES["block"].scale_suffix in extra:
        return dequant_block(q, extra[SCHEMES["block"].scale_suffix], name=name, file=file)
    s = extra[SCHEMES["channel"].scale_suffix]
    if tuple(s.shape) not in ((q.shape[0], 1), (q.shape[0],)):
        raise CheckpointError(f"channel scale has shape {list(s.shape)}, expected [{q.shape[0]}, 1]",
                              file=file, tensor=name)
    return q.float() * s.float().view(-1, 1)


# ---- the scheme table -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Scheme:
    """One INT8 scheme under every name it has."""

    name: str  # --scheme, quantize=, operator args
    kind: str  # what detection reports for a checkpoint stored so (SafetensorsCheckpoint.quantization)
    quant_method: str  # config.json quantization_config.quant_method
    scale_suffix: str  # the scale tensor beside `<prefix>.weight`
    op: str  # the operator that runs it (hybrid_r1.ops.OPS)
    kernel_linear: str  # functions of hybrid_r1_kernels.int8_linear, by name (kernels never import hybrid_r1)
    kernel_gate_up: str
    act_group: int | None  # activation quantization group: BLOCK channels, or None (per token)
    quantize: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # bf16 [N, K] -> (int8, fp32 scale)

    def scale_shape(self, n: int, k: int) -> tuple[int, int]:
        return (-(-n // BLOCK), -(-k // BLOCK)) if self.name == "block" else (n, 1)

    def quant_config(self) -> dict:
        """config.json's quantization_config for a checkpoint of this scheme (a fresh dict)."""
        if self.name == "block":
            return {"quant_method": self.quant_method, "weight_block_size": [BLOCK, BLOCK],
                    "activation_scheme": "dynamic"}
        # SGLang's W8A8Int8Config reads nothing else from here (per-token dynamic activations are implied).
        return {"quant_method": self.quant_method, "activation_scheme": "dynamic"}


SCHEMES: dict[str, Scheme] = {
    "block": Scheme("block", "int8_block", "blockwise_int8", "weight_scale_inv", "linear.int8_block",
                    "int8_block_linear", "int8_block_gate_up", BLOCK, quantize_block),
    "channel": Scheme("channel", "int8_channel", "w8a8_int8", "weight_scale", "linear.int8_channel",
                      "int8_channel_linear", "int8_channel_gate_up", None, quantize_channel),
}
SCALE_SUFFIX = {s.name: s.scale_suffix for s in SCHEMES.values()}  # scheme -> scale tensor suffix
FP8_SCALE_SUFFIX = "weight_scale_inv"
SCALE_SUFFIXES = tuple(dict.fromkeys([FP8_SCALE_SUFFIX, *SCALE_SUFFIX.values()]))  # every companion a weight may have
FP8_QUANT_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                    "weight_block_size": [BLOCK, BLOCK]}
# config.json quant_method -> what the tensors hold (detection's vocabulary)
QUANT_METHODS = {"fp8": "fp8", **{s.quant_method: s.kind for s in SCHEMES.values()}}


def scheme_of(name: str) -> Scheme:
    """The Scheme called `name` ("block" or "channel"); ValueError naming the choices otherwise."""
    try:
        return SCHEMES[name]
    except (KeyError, TypeError):
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {name!r}") from None


def scheme_of_kind(kind: str | None) -> Scheme | None:
    """The Scheme of a detected storage kind ("int8_block", "int8_channel"), None for anything else."""
    return next((s for s in SCHEMES.values() if s.kind == kind), None)
