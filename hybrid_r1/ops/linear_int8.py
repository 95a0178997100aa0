"""W8A8 INT8 linears (Meituan layout): Triton kernels on CUDA, the torch reference on the CPU.

Weights load as stored in an INT8 checkpoint (block: `weight_scale_inv` [ceil(N/128), ceil(K/128)];
channel: `weight_scale` [N, 1]) or are quantized while loading from a BF16/FP8 checkpoint with the
same formulas the converter uses. Activations are quantized per call (per token per 128-group, or
per token), rounding to nearest even unless the rule says `rounding: trunc`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CheckpointError
from ..formats.source import WeightSource

SCHEMES = {"block": "weight_scale_inv", "channel": "weight_scale"}


class Int8Linear(nn.Module):
    scheme = ""  # set by subclasses

    def __init__(self, in_features: int, out_features: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.bfloat16, rounding: str = "nearest_even"):
        super().__init__()
        if rounding not in ("nearest_even", "trunc"):
            raise ValueError(f"rounding must be nearest_even or trunc, got {rounding!r}")
        self.in_features, self.out_features = in_features, out_features
        self.device, self.dtype, self.rounding = torch.device(device), dtype, rounding
        self.weight: torch.Tensor | None = None  # int8 [N, K]
        self.weight_scale: torch.Tensor | None = None  # fp32, layout per scheme

    @classmethod
    def from_module(cls, module: nn.Linear, device, dtype, **args) -> "Int8Linear":
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{cls.__name__} replaces a Linear, not a {type(module).__name__}")
        return cls(module.in_features, module.out_features, device, dtype, **args)

    def load_weights(self, source: WeightSource, prefix: str) -> None:
        name = prefix + ".weight"
        if not source.has(name):
            raise CheckpointError("tensor missing from the checkpoint", file=source.path, tensor=name)
        shape = tuple(source.shape(name))
        if shape != (self.out_features, self.in_features):
            raise CheckpointError(f"shape {list(shape)} does not match the model's "
                                  f"{[self.out_features, self.in_features]}", file=source.path, tensor=name)
        stored, extra = source.raw(name)
        if stored.dtype == torch.int8:
            scale = extra.get(SCHEMES[self.scheme])
            if scale is None:
                found = ", ".join(extra) or "no scale"
                raise CheckpointError(f"an int8 {self.scheme} linear needs {SCHEMES[self.scheme]}, found {found}: "
                                      f"the checkpoint is quantized with another scheme", file=source.path, tensor=name)
            q, s = stored, scale.float()
        else:  # quantize while loading, exactly as the converter would
            from hybrid_r1_merge_tools.quantize import quantize_weight

            q, s = quantize_weight(source.tensor(name, torch.bfloat16), self.scheme)
        self.weight = q.to(self.device).contiguous()
        self.weight_scale = s.to(self.device).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        if x.device.type == "cuda":
            from hybrid_r1_kernels import int8_linear

            fn = int8_linear.int8_block_linear if self.scheme == "block" else int8_linear.int8_channel_linear
        else:
            from hybrid_r1_kernels import reference

            fn = reference.block_linear_ref if self.scheme == "block" else reference.channel_linear_ref
        return fn(x, self.weight, self.weight_scale, rounding=self.rounding, out_dtype=x.dtype)

    def dense_weight(self) -> torch.Tensor:
        """Dequantized [N, K] weight in the run dtype (the absorbed attention reads kv_b_proj so)."""
        from ..formats.safetensors import dequant_int8

        return dequant_int8(self.weight, {SCHEMES[self.scheme]: self.weight_scale}).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.scheme}, {self.device}, rounding={self.rounding}"


class Int8BlockLinear(Int8Linear):
    """Block-wise W8A8: 128x128 weight tiles, activations per token per 128 channels."""

    scheme = "block"


class Int8ChannelLinear(Int8Linear):
    """Channel-wise W8A8: one scale per output row, one per token; int32 accumulation."""

    scheme = "channel"
