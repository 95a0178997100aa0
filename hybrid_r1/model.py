"""DeepSeek-V3/R1 in plain torch: the math only, no file I/O and no placement.

Module and parameter names are the Hugging Face checkpoint names, so `model.layers.3.mlp.experts`
is a module a placement rule can replace, and each parameter loads from the tensor of the same name.
Shapes in comments: B batch, T new tokens, S cached + new tokens, H heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from .cache import KVCache, Step
from .config import ModelConfig, yarn_mscale

# Query rows per block in the absorbed attention, so [H, rows, S] fp32 scores stay small.
_ABSORB_SCORE_BYTES = 1 << 28
# The same bound for the naive attention's query blocks, were SDPA to pick its math backend (the
# flash and memory-efficient ones never hold the scores): long chunks (8K-32K tokens) fit.
_NAIVE_SCORE_BYTES = 4 << 30
# From this many new tokens "auto" expands the cached latents too (naive) rather than attending in
# the latent space: the absorbed path costs rank / (nope + v) = 2x the products per query-key pair
# and holds fp32 scores, the expansion costs (nope + v) / 2 = 128 queries' worth per cached token.
NAIVE_MIN_TOKENS = 128


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, scale in the input dtype (as the reference implementations do).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear without bias and without random init: the model is built on the meta device and
    every weight comes from the checkpoint (the init of 45k expert linears would cost seconds)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__(n_in, n_out, bias=False)

    def reset_parameters(self) -> None:
        pass

    def dense_weight(self) -> torch.Tensor:
        """The [out, in] weight (quantized linear operators dequantize theirs here)."""
        return self.weight


def linear(n_in: int, n_out: int) -> nn.Linear:
    return Linear(n_in, n_out)


class Rotary:
    """YaRN rotary embedding on interleaved pairs (x[2i], x[2i+1]), as DeepSeek's weights expect."""

    def __init__(self, cfg: ModelConfig):
        dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
        # Built on the CPU explicitly: the model itself is constructed under torch.device("meta").
        freqs = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
        self.attention_factor = 1.0
        rs = cfg.rope_scaling
        if rs is not None:
            def corr(rot: float) -> float:
                return dim * math.log(rs.original_max_position_embeddings / (rot * 2 * math.pi)) / (2 * math.log(base))

            low = max(math.floor(corr(rs.beta_fast)), 0)
            high = min(math.ceil(corr(rs.beta_slow)), dim - 1)
            high = high + 0.001 if low == high else high
            ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
            freqs = freqs / rs.factor * ramp + freqs * (1 - ramp)
            if rs.mscale and rs.mscale_all_dim:
                self.attention_factor = yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim)
            else:
                self.attention_factor = yarn_mscale(rs.factor)
        self.inv_freq = freqs  # [dim/2], on the CPU
        self._inv_freq_on: dict[torch.device, torch.Tensor] = {}  # a copy per device, made once

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, T, ..., dim], positions [B, T] -> x rotated, same layout and dtype."""
        inv = self._inv_freq_on.get(x.device)
        if inv is None:  # (no host-to-device copy per call: a CUDA graph could not capture one)
            inv = self._inv_freq_on[x.device] = self.inv_freq.to(x.device)
        angle = positions.to(x.device, torch.float32)[..., None] * inv  # [B, T, dim/2]
        angle = angle.view(*angle.shape[:2], *([1] * (x.dim() - 3)), angle.shape[-1])
        cos, sin = angle.cos() * self.attention_factor, angle.sin() * self.attention_factor
        xf = x.float().unflatten(-1, (-1, 2))
        x1, x2 = xf[..., 0], xf[..., 1]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)
        return out.flatten(-2).to(x.dtype)


class MLA(nn.Module):
    """Multi-head latent attention with a compressed cache (c_kv after norm, k_pe after RoPE)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads = cfg.num_attention_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        self.q_lora_rank = cfg.q_lora_rank
        self.scale = cfg.softmax_scale
        qk = self.n_heads * cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = linear(cfg.hidden_size, qk)
        else:
            self.q_a_proj = linear(cfg.hidden_size, cfg.q_lora_rank)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6)  # the latent norms use 1e-6, not rms_norm_eps
            self.q_b_proj = linear(cfg.q_lora_rank, qk)
        self.kv_a_proj_with_mqa = linear(cfg.hidden_size, self.rank + self.rope)
        self.kv_a_layernorm = RMSNorm(self.rank, 1e-6)
        self.kv_b_proj = linear(self.rank, self.n_heads * (self.nope + self.v_dim))
        self.o_proj = linear(self.n_heads * self.v_dim, cfg.hidden_size)
        # q_a_proj and kv_a_proj_with_mqa as one GEMM: set by placement's fusion pass, which then
        # sets the two it replaces to None.
        self.register_module("qkv_a_proj", None)
        self.rotary = Rotary(cfg)

    def forward(self, x: torch.Tensor, step: Step, cache: KVCache) -> torch.Tensor:
        b, t, _ = x.shape
        if self.q_lora_rank is None:
            q, kv = self.q_proj(x), self.kv_a_proj_with_mqa(x)
        else:
            if self.qkv_a_proj is not None:
                q_lat, kv = self.qkv_a_proj(x).split([self.q_lora_rank, self.rank + self.rope], -1)
            else:
                q_lat, kv = self.q_a_proj(x), self.kv_a_proj_with_mqa(x)
            q = self.q_b_proj(self.q_a_layernorm(q_lat))
        q = q.view(b, t, self.n_heads, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], -1)
        q_pe = self.rotary(q_pe, step.positions)
        c, k_pe = kv.split([self.rank, self.rope], -1)
        c_kv = self.kv_a_layernorm(c)  # [B, T, rank]
        k_pe = self.rotary(k_pe, step.positions)  # [B, T, rope], one key shared by all heads
        c_kv, k_pe = cache.write(self.layer, step, c_kv, k_pe)  # [B, S, .]
        allowed = attention_mask(step, x.device)  # [B, T, S]
        if step.mode == "naive":
            fresh = step.slots is None
            o = self._naive(q_nope, q_pe, c_kv, k_pe, allowed, step.start if fresh else None,
                            fresh and bool(step.key_valid.all()))
        else:
            o = self._absorbed(q_nope, q_pe, c_kv, k_pe, allowed)
        return self.o_proj(o.reshape(b, t, self.n_heads * self.v_dim))

    def _naive(self, q_nope, q_pe, c_kv, k_pe, allowed, start, causal: bool = False) -> torch.Tensor:
        """Expand the latents into per-head keys and values: cheap for a long prompt. Queries go in
        blocks (see _NAIVE_SCORE_BYTES); with the new tokens' first slot `start` known, a block sees
        only the keys up to its last query (the mask hides later ones): half a causal prompt's work.
        causal (no padding key): the mask is exactly causal, aligned to the last key, and is passed as
        such (causal_lower_right), which lets SDPA's fused kernels skip it instead of reading it."""
        b, s, _ = c_kv.shape
        t = q_nope.shape[1]
        kv = self.kv_b_proj(c_kv).view(b, s, self.n_heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], -1)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(-1, -1, self.n_heads, -1)], -1).transpose(1, 2)
        v = v.transpose(1, 2)  # [B, H, S, v_dim]
        q = torch.cat([q_nope, q_pe], -1).transpose(1, 2)  # [B, H, T, qk]
        if causal and start is not None and padded_flash(q, k):
            end = min(s, start + t)
            return causal_attention(q, k[:, :, :end], v[:, :, :end], self.scale).transpose(1, 2)
        rows = max(1, _NAIVE_SCORE_BYTES // (4 * b * self.n_heads * s))
        out = []
        for r0 in range(0, t, rows):
            r1 = min(t, r0 + rows)
            end = s if start is None else min(s, start + r1)
            mask = causal_lower_right(r1 - r0, end) if causal and start is not None else allowed[:, None, r0:r1, :end]
            out.append(F.scaled_dot_product_attention(q[:, :, r0:r1], k[:, :, :end], v[:, :, :end], attn_mask=mask,
                                                      scale=self.scale))
        return torch.cat(out, 2).transpose(1, 2)  # [B, T, H, v_dim]

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, allowed) -> torch.Tensor:
        """Attend in the latent space: W_UK folded into the query, W_UV applied after (decode)."""
        w = self.kv_b_proj.dense_weight().view(self.n_heads, self.nope + self.v_dim, self.rank)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope :]  # [H, nope, rank], [H, v, rank]
        q_abs = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)  # [B, T, H, rank]
        b, t, h, _ = q_abs.shape
        s = c_kv.shape[1]
        rows = max(1, _ABSORB_SCORE_BYTES // (4 * h * s * b))
        out = []
        for r0 in range(0, t, rows):
            sl = slice(r0, r0 + rows)
            scores = torch.einsum("bthc,bsc->bhts", q_abs[:, sl], c_kv)
            scores = scores + torch.einsum("bthr,bsr->bhts", q_pe[:, sl], k_pe)
            scores = scores.float() * self.scale
            scores = scores.masked_fill(~allowed[:, None, sl], float("-inf"))
            p = scores.softmax(-1).to(c_kv.dtype)
            out.append(torch.einsum("bhts,bsc->bthc", p, c_kv))
        o_lat = torch.cat(out, 1)  # [B, T, H, rank]
        return torch.einsum("bthc,hvc->bthv", o_lat, w_uv)


def padded_flash(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether SDPA's flash kernel takes these queries and keys with values padded to their head dim.
    Why pad: flash needs one head dim for q, k and v, and MLA's are 192 / 128, so unpadded SDPA falls
    back to its memory-efficient kernel, measured ~4x slower at 8K-32K tokens on an H200
    (benchmarks/results/prefill_attention_h200.md); the zero columns cost 20% more products."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    try:  # v padded is k's shape; the last argument (enable_gqa) came with torch 2.5
        params = torch.backends.cuda.SDPAParams(q, k, k, None, 0.0, False, False)
    except TypeError:
        params = torch.backends.cuda.SDPAParams(q, k, k, None, 0.0, False)
    return torch.backends.cuda.can_use_flash_attention(params)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention aligned to the last key (q [B, H, T, d], k [B, H, S, d], v [B, H, S, dv], T <= S),
    in one SDPA call with v zero-padded to d (see padded_flash): [B, H, T, dv]. No query blocks: the
    flash kernel never holds the scores."""
    d, dv = q.shape[-1], v.shape[-1]
    vp = F.pad(v, (0, d - dv)) if dv < d else v
    out = F.scaled_dot_product_attention(q, k, vp, attn_mask=causal_lower_right(q.shape[2], k.shape[2]), scale=scale)
    return out[..., :dv]


def attention_mask(step: Step, device: torch.device) -> torch.Tensor:
    """[B, T, S] bool: causal over cache slots, padding keys hidden; each query always sees itself
    (so a padding query's row is never empty and never NaN)."""
    if step.allowed is not None:  # a graph step: kept up to date by its runner
        return step.allowed
    t = step.positions.shape[1]
    s = step.start + t
    q_slot = torch.arange(step.start, s, device=device)
    k_slot = torch.arange(s, device=device)
    causal = k_slot[None, :] <= q_slot[:, None]  # [T, S]
    allowed = causal[None] & step.key_valid.to(device)[:, None, :]
    return allowed | (k_slot[None, :] == q_slot[:, None])[None]


class MLP(nn.Module):
    """SwiGLU: dense layers, the shared expert and each routed expert."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = linear(hidden, inter)
        self.up_proj = linear(hidden, inter)
        self.down_proj = linear(inter, hidden)
        # gate and up as one GEMM with silu(gate) * up in its epilogue: set by placement's fusion
        # pass, which then sets gate_proj and up_proj to None.
        self.register_module("gate_up_proj", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            return self.down_proj(self.gate_up_proj(x))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def fp32_params(module: nn.Module) -> tuple[str, ...]:
    """Tensors of `module` kept in fp32 whatever the run dtype: the router's (its scores choose
    the experts, and bf16 would flip near-ties)."""
    return ("weight", "e_score_correction_bias") if isinstance(module, Gate) else ()


class Gate(nn.Module):
    """Router: scores, group-limited top-k selection, normalised and scaled weights."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size), requires_grad=False)
        if cfg.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.empty(cfg.n_routed_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> expert ids [N, k] int64, weights [N, k] fp32."""
        cfg = self.cfg
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(-1)
        choice = scores
        if cfg.topk_method != "greedy" and cfg.n_group > 1:
            if cfg.topk_method == "noaux_tc":
                choice = scores + self.e_score_correction_bias  # bias steers selection only
                group = choice.view(-1, cfg.n_group, cfg.n_routed_experts // cfg.n_group).topk(2, -1)[0].sum(-1)
            else:  # group_limited_greedy
                group = choice.view(-1, cfg.n_group, cfg.n_routed_experts // cfg.n_group).amax(-1)
            keep = torch.zeros_like(group, dtype=torch.bool)
            keep.scatter_(1, group.topk(cfg.topk_group, -1)[1], True)
            keep = keep[:, :, None].expand(-1, -1, cfg.n_routed_experts // cfg.n_group).reshape(choice.shape)
            choice = choice.masked_fill(~keep, float("-inf"))
        elif cfg.topk_method == "noaux_tc":
            choice = scores + self.e_score_correction_bias
        idx = choice.topk(cfg.num_experts_per_tok, -1)[1]
        w = scores.gather(1, idx)
        if cfg.norm_topk_prob and cfg.num_experts_per_tok > 1:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, w * cfg.routed_scaling_factor


def group_by_expert(idx: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """idx [N, k] -> (order, token, counts), all on idx's device, no host sync: the N*k (token,
    slot) assignments sorted by expert (stable; indices into idx.flatten()), the token of each, and
    how many each expert received [n_experts]. The one grouping every experts implementation uses."""
    flat = idx.flatten()
    order = flat.argsort(stable=True)
    return order, order // idx.shape[1], torch.bincount(flat, minlength=n_experts)


class Experts(nn.ModuleList):
    """The routed experts of one layer; a rule may replace this whole module (e.g. by CPU GGML experts).

    Any replacement takes the same call: (x [N, hidden], idx [N, k], w [N, k]) -> [N, hidden].
    This reference loops over the used experts, which it learns from the host: a decode graph
    breaks around it (graphs.py), as around any operator that declares host_sync."""

    host_sync = True
    runs_beside = False  # MoE adds the shared expert after (a replacement may declare it runs beside)

    def __init__(self, cfg: ModelConfig):
        super().__init__(MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.n_routed_experts))

    def forward(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        order, token, counts = group_by_expert(idx, len(self))
        pos = 0
        for e, n in enumerate(counts.tolist()):  # tokens grouped by expert: one matmul per used expert
            if n:
                sel = order[pos : pos + n]
                tok = token[pos : pos + n]
                out.index_add_(0, tok, self[e](x[tok]).float() * w.flatten()[sel, None])
                pos += n
        return out.to(x.dtype)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        idx, w = self.gate(x)
        shared = self.shared_experts
        if shared is not None and self.experts.runs_beside:  # e.g. on the GPU while the CPU computes the routed
            return self.experts(x, idx, w, lambda: shared(x)).view(shape)
        y = self.experts(x, idx, w)
        if shared is not None:
            y = y + shared(x)
        return y.view(shape)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h: torch.Tensor, step: Step, cache: KVCache) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), step, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # _weight skips the random init: on the meta device it would only cost time (torch imports
        # its compiler stack for normal_), and the checkpoint overwrites it anyway.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekV3(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = linear(cfg.hidden_size, cfg.vocab_size)

    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        valid: torch.Tensor | None = None,
        mode: str = "auto",
        last_only: bool = False,
    ) -> torch.Tensor:
        """tokens [B, T] -> float32 logits [B, T, vocab] ([B, 1, vocab] with last_only).

        valid [B, T] marks real tokens (False = padding). mode: "naive" expands keys and values
        per head, "absorb" attends in the latent space; "auto" takes naive for a fresh multi-token
        prompt or a chunk of NAIVE_MIN_TOKENS+ tokens, absorbed otherwise (decode, short chunks)."""
        if valid is None:
            valid = torch.ones(tokens.shape, dtype=torch.bool)
        if mode == "auto":
            t = tokens.shape[1]
            mode = "naive" if t > 1 and (cache.length == 0 or t >= NAIVE_MIN_TOKENS) else "absorb"
        if mode not in ("naive", "absorb"):
            raise ValueError(f"attention mode must be auto, naive or absorb, got {mode!r}")
        return self.body(tokens, cache.begin(valid, mode), cache, last_only)

    def body(self, tokens: torch.Tensor, step: Step, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """The forward pass for a step already begun in the cache (graphs.py replays this)."""
        # Token ids come from the host; inside the model, placement's bridges move activations
        # across devices (placement.py), so the math here never names a device.
        h = self.model.embed_tokens(tokens.to(self.input_device))
        for block in self.model.layers:
            h = block(h, step, cache)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(self.model.norm(h)).float()

    @property
    def input_device(self) -> torch.device:
        return self.model.embed_tokens.weight.device
