"""How many prompt tokens one forward pass takes: as many as the activations' memory allows.

Why: with GPU expert prefill each pass streams every layer's routed experts over PCIe once (~7.8 s
for a Q4_K_M 671B model at 55 GB/s), whatever its token count, so a prompt should go through in as
few passes as fit; an 8K prompt is one pass on an 80 GB GPU. Equal chunks: the passes are
ceil(tokens / fitting) and each takes an equal share (the last is not a sliver).

Memory per pass, at the model's widths in BF16, an estimate with room to spare (SAFETY):
- per new token: the residual stream and its normed, attention and MLP outputs (8 hidden vectors,
  the routed experts' fp32 sum counted twice), the query and its concatenated copy, the attention
  output (padded to the query's width by the flash path, and its slice), the widest MLP's
  gate/up/product intermediates;
- per attended token (the naive attention expands the latents of the whole context): keys, values,
  their concatenated copy and the values zero-padded for the flash kernel (model.causal_attention),
  plus the cache's own latents of every layer for the new tokens;
- the attention's score blocks (model._NAIVE_SCORE_BYTES) and the cost of nothing else: the weights
  are loaded already.
"""

from __future__ import annotations

import math

import torch

from . import model as model_math
from .config import ModelConfig

SAFETY = 2.0  # allocator fragmentation, transients the estimate leaves out
# The smallest chunk chosen: when even that does not fit, what is short is the context's memory,
# which smaller chunks do not reduce (the last one attends to everything), while passes multiply.
MIN_CHUNK = 512


def per_token_bytes(cfg: ModelConfig) -> tuple[int, int]:
    """(bytes per new token, bytes per attended context token) of one pass, BF16."""
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    mlp = max(cfg.intermediate_size, cfg.moe_intermediate_size * max(cfg.n_shared_experts or 0, 1))
    new = 2 * (10 * h + 3 * heads * cfg.qk_head_dim + heads * cfg.v_head_dim + 3 * mlp)
    context = 2 * (heads * (cfg.qk_nope_head_dim + cfg.v_head_dim) + 2 * heads * cfg.qk_head_dim + heads * cfg.v_head_dim)
    cache = 2 * cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    return new + cache, context


def free_bytes(device: torch.device) -> int:
    """Memory a pass may take on `device`: the GPU's free memory plus what torch holds unused; on
    the CPU, half of MemAvailable (the mapped experts' pages share the rest)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 8 << 30  # no /proc: a modest default


def fitting_tokens(cfg: ModelConfig, free: int, context: int, limit: int) -> int:
    """The most new tokens (MIN_CHUNK..limit) whose pass fits in `free` bytes when attending to `context` tokens."""
    new, per_context = per_token_bytes(cfg)
    room = free / SAFETY - model_math._NAIVE_SCORE_BYTES - per_context * context
    return min(limit, max(MIN_CHUNK, int(room // new)))


def chunk_size(cfg: ModelConfig, tokens: int, free: int, cached: int = 0) -> int:
    """Tokens per pass for a prompt of `tokens` after `cached` tokens: equal passes, each fitting
    (sized for the last, which attends to the whole context)."""
    if tokens < 1:
        raise ValueError(f"chunk_size needs at least one token, got {tokens}")
    fit = fitting_tokens(cfg, free, cached + tokens, tokens)
    passes = math.ceil(tokens / fit)
    return math.ceil(tokens / passes)
