"""The compressed MLA cache: per layer only `c_kv` (after its norm) and `k_pe` (after RoPE) per token.

That is kv_lora_rank + qk_rope_head_dim values per token per layer (576 for DeepSeek-V3). Each layer's
tensors are allocated on first write, on the device and dtype of that layer's attention, so a rule
that puts layers on different GPUs needs nothing here. Capacity grows in steps as tokens arrive.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Callable

import torch

from .errors import HybridR1Error

_GROW = 256  # capacity is a multiple of this many tokens


class ContextOverflowError(HybridR1Error):
    """More tokens than the cache was allowed to hold (`max_tokens`)."""


@dataclass
class Step:
    """What one forward call tells each attention layer about the tokens it processes."""

    positions: torch.Tensor  # [B, T] int64 RoPE positions (left padding shifts them per row)
    start: int  # cache slot of the first new token; same for every row
    key_valid: torch.Tensor  # [B, start + T] bool: False for padding slots
    mode: str  # "naive" or "absorb"
    # A step replayed by a CUDA graph (graphs.py) takes everything from fixed device tensors: the
    # new tokens' cache slots [T] (written with index_copy_) and the attention mask over the whole
    # reserved capacity [B, T, capacity]; `start` and `key_valid` are then unused.
    slots: torch.Tensor | None = None
    allowed: torch.Tensor | None = None


class KVCache:
    def __init__(self, num_layers: int, batch: int = 1, max_tokens: int | None = None):
        self.num_layers = num_layers
        self.batch = batch
        self.max_tokens = max_tokens
        self.length = 0  # tokens written (slots 0..length-1 are valid or padding)
        self.tokens: list[int] = []  # batch-1 token history, so a new prompt can reuse the prefix
        self._kv: list[torch.Tensor | None] = [None] * num_layers  # [B, cap, kv_lora_rank]
        self._pe: list[torch.Tensor | None] = [None] * num_layers  # [B, cap, qk_rope_head_dim]
        self._valid = torch.zeros(batch, 0, dtype=torch.bool)  # [B, length] on the CPU
        self._next_pos = torch.zeros(batch, dtype=torch.int64)  # next RoPE position per row
        self.version = 0  # bumped whenever a layer's buffers move (CUDA graphs must be recaptured)
        # Tensor parallelism: rank 0's caches tell the other ranks' twins of each step and
        # truncation (parallel.Leader.attach); None on one device and on the other ranks.
        self.mirror: Callable[..., None] | None = None

    # ---- per forward call -------------------------------------------------------------------
    def begin(self, new_valid: torch.Tensor, mode: str) -> Step:
        """Reserve slots for T new tokens (new_valid [B, T] bool, False = padding)."""
        b, t = new_valid.shape
        if b != self.batch:
            raise ValueError(f"batch {b} does not match the cache's batch {self.batch}")
        if self.max_tokens is not None and self.length + t > self.max_tokens:
            raise ContextOverflowError(
                f"{self.length + t} tokens exceed the context limit of {self.max_tokens} tokens"
            )
        new_valid = new_valid.to("cpu", torch.bool)
        # Padding tokens take the position of the next real token; they are never attended to.
        positions = self._next_pos[:, None] + torch.cumsum(new_valid.long(), 1) - new_valid.long()
        start = self.length
        self._valid = torch.cat([self._valid[:, :start], new_valid], 1)
        self._next_pos = self._next_pos + new_valid.long().sum(1)
        self.length = start + t
        return Step(positions=positions, start=start, key_valid=self._valid, mode=mode)

    def write(self, layer: int, step: Step, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a layer's new latents at the step's slots, return views of slots 0..start+T (the
        whole reserved capacity for a graph step, whose mask hides what is not written)."""
        if step.slots is not None:
            kv, pe = self._kv[layer], self._pe[layer]
            kv.index_copy_(1, step.slots, c_kv)
            pe.index_copy_(1, step.slots, k_pe)
            return kv, pe
        end = step.start + c_kv.shape[1]
        kv, pe = self._grow(layer, end, c_kv, k_pe)
        kv[:, step.start:end] = c_kv
        pe[:, step.start:end] = k_pe
        return kv[:, :end], pe[:, :end]

    def _grow(self, layer: int, end: int, c_kv: torch.Tensor, k_pe: torch.Tensor):
        kv, pe = self._kv[layer], self._pe[layer]
        if kv is None or kv.shape[1] < end:
            cap = -(-end // _GROW) * _GROW
            new_kv = c_kv.new_zeros(self.batch, cap, c_kv.shape[-1])
            new_pe = k_pe.new_zeros(self.batch, cap, k_pe.shape[-1])
            if kv is not None:
                new_kv[:, : kv.shape[1]] = kv
                new_pe[:, : pe.shape[1]] = pe
            kv, pe = self._kv[layer], self._pe[layer] = new_kv, new_pe
            self.version += 1
        return kv, pe

    def reserve(self, capacity: int) -> None:
        """Grow every allocated layer to hold `capacity` tokens now (a CUDA graph needs buffers that
        do not move while it is replayed)."""
        for layer, (kv, pe) in enumerate(zip(self._kv, self._pe)):
            if kv is not None:
                self._grow(layer, capacity, kv[:, :0], pe[:, :0])

    @property
    def capacity(self) -> int:
        """Tokens every allocated layer can hold without moving (0 before the first write)."""
        caps = [kv.shape[1] for kv in self._kv if kv is not None]
        return min(caps) if caps else 0

    def truncate(self, length: int) -> None:
        """Forget slots from `length` on (batch 1: used to rewind to a shared prompt prefix)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        if self.mirror is not None:
            self.mirror("truncate", length)
        self._valid = self._valid[:, :length]
        self._next_pos = self._valid.long().sum(1)
        self.length = length
        del self.tokens[length:]

    @property
    def valid(self) -> torch.Tensor:
        """[B, length] bool on the CPU: False for padding slots."""
        return self._valid

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._kv + self._pe if t is not None)
