"""A GGML-quantized tensor as stored in a GGUF file: raw blocks, its ggml type and shape.

This is what readers hand to CPU operators: the bytes stay in the memory-mapped file (zero copy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GGMLTensor:
    name: str  # name in the file, e.g. "blk.3.ffn_gate_exps.weight"
    file: str  # file (shard) that holds the bytes, for error messages
    ggml_type: int  # gguf.GGMLQuantizationType value
    ne: tuple[int, ...]  # ggml order: ne[0] is the contiguous (input) dim
    data: np.ndarray  # uint8, shape (*reversed(ne[1:]), row_bytes): one row of ne[0] elements per last axis

    @property
    def n_rows(self) -> int:
        return int(np.prod(self.ne[1:])) if len(self.ne) > 1 else 1

    def expert(self, e: int) -> np.ndarray:
        """Raw bytes of expert `e` of a 3-D expert tensor: (rows, row_bytes), a view."""
        assert self.data.ndim == 3, f"{self.name} is not a 3-D expert tensor"
        return self.data[e]
