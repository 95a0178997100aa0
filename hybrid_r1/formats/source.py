"""What every checkpoint reader offers the loader and the operators: the `WeightSource` protocol.

Names are always the Hugging Face names (`model.layers.3.self_attn.q_a_proj.weight`); a reader of
another format (GGUF, merged folders) maps them. Operators never open files: they ask a source.
A reader may compose others (a safetensors folder for the linears + a GGUF for the routed experts)
by implementing the same protocol over them. `hybrid_r1.loading.open_checkpoint` is the one entry
that turns what a user passes into a reader.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from ..config import ModelConfig
from ..errors import CheckpointError
from .ggml_tensor import GGMLTensor


@runtime_checkable
class WeightSource(Protocol):
    path: str  # what the user passed, for messages
    config: ModelConfig
    metadata: dict[str, Any]  # format-level: the safetensors shards' __metadata__ (merged), a GGUF's key-values

    def names(self) -> list[str]:
        """Every tensor name (HF names) the checkpoint holds."""

    def has(self, name: str) -> bool:
        """True if the checkpoint holds `name` (HF name)."""

    def shape(self, name: str) -> tuple[int, ...]:
        """HF-orientation shape of `name`, without reading its data."""

    def file_of(self, name: str) -> str:
        """The file that holds `name`, for messages."""

    def tensor(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """`name` dequantized (FP8 block scales, GGML blocks, ...) to `dtype`, on the CPU, HF orientation.

        Raises CheckpointError naming the file and tensor if it is missing or malformed."""

    def raw(self, name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`name` as stored (e.g. int8 or float8 weight) plus its companion tensors by suffix
        (`weight_scale_inv`, `weight_scale`), for operators that run the stored format."""

    def ggml_experts(self, layer: int) -> dict[str, GGMLTensor] | None:
        """GGML-quantized routed experts of `layer` as {"gate", "up", "down"} -> GGMLTensor
        (3-D, one expert per outer index), or None if this source stores experts otherwise."""

    def quantization(self) -> str | None:
        """How the linears are stored: "fp8", "int8_block", "int8_channel" or None (as floats, or
        GGML blocks that the operators dequantize)."""

    def tokenizer(self):
        """The checkpoint's hybrid_r1.tokenizer.Tokenizer (tokenizer.json beside it, or one a GGUF
        carries in its metadata), or None."""


def check_tensor(source: WeightSource, name: str, shape: tuple[int, ...]) -> None:
    """`name` must be in `source` with the model's `shape`; else a CheckpointError naming both."""
    if not source.has(name):
        raise CheckpointError("tensor missing from the checkpoint", file=source.path, tensor=name)
    found = tuple(source.shape(name))
    if found != tuple(shape):
        raise CheckpointError(f"shape {list(found)} does not match the model's {list(shape)}",
                              file=source.file_of(name), tensor=name)
