"""Tensor names Hugging Face <-> GGUF (llama.cpp architecture `deepseek2`): one table, both ways.

Each rule pairs an HF name template with a GGUF one (`{L}` layer, `{E}` expert) and says how the HF
tensor sits inside the GGUF tensor:

    same     one tensor on each side, same values; the ggml `ne` is the HF shape reversed
    experts  the HF per-expert tensors stacked on the outermost ggml axis (ne[2] = expert)
    k_b, v_b new layout only: HF `kv_b_proj` [H*(nope+v), kv_lora] split per head into
             attn_k_b (the nope rows, transposed: ne [nope, kv_lora, H]) and attn_v_b (ne [kv_lora, v, H])

The old layout (files before April 2025) stores `attn_kv_b` as is; the new one stores only the split.
MTP (next-token prediction) tensors are not listed: llama.cpp's deepseek2 converter drops them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import ModelConfig

SAME, EXPERTS, K_B, V_B = "same", "experts", "k_b", "v_b"
OLD, NEW = "old", "new"
LAYOUTS = (OLD, NEW)


@dataclass(frozen=True)
class Rule:
    hf: str
    gguf: str
    kind: str = SAME
    layouts: tuple[str, ...] = LAYOUTS


_A = "model.layers.{L}.self_attn."
_M = "model.layers.{L}.mlp."
RULES: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", "token_embd.weight"),
    Rule("model.norm.weight", "output_norm.weight"),
    Rule("lm_head.weight", "output.weight"),
    Rule("model.layers.{L}.input_layernorm.weight", "blk.{L}.attn_norm.weight"),
    Rule("model.layers.{L}.post_attention_layernorm.weight", "blk.{L}.ffn_norm.weight"),
    Rule(_A + "q_proj.weight", "blk.{L}.attn_q.weight"),  # models without q_lora_rank
    Rule(_A + "q_a_proj.weight", "blk.{L}.attn_q_a.weight"),
    Rule(_A + "q_a_layernorm.weight", "blk.{L}.attn_q_a_norm.weight"),
    Rule(_A + "q_b_proj.weight", "blk.{L}.attn_q_b.weight"),
    Rule(_A + "kv_a_proj_with_mqa.weight", "blk.{L}.attn_kv_a_mqa.weight"),
    Rule(_A + "kv_a_layernorm.weight", "blk.{L}.attn_kv_a_norm.weight"),
    Rule(_A + "kv_b_proj.weight", "blk.{L}.attn_kv_b.weight", SAME, (OLD,)),
    Rule(_A + "kv_b_proj.weight", "blk.{L}.attn_k_b.weight", K_B, (NEW,)),
    Rule(_A + "kv_b_proj.weight", "blk.{L}.attn_v_b.weight", V_B, (NEW,)),
    Rule(_A + "o_proj.weight", "blk.{L}.attn_output.weight"),
    Rule(_M + "gate_proj.weight", "blk.{L}.ffn_gate.weight"),  # dense layers
    Rule(_M + "up_proj.weight", "blk.{L}.ffn_up.weight"),
    Rule(_M + "down_proj.weight", "blk.{L}.ffn_down.weight"),
    Rule(_M + "gate.weight", "blk.{L}.ffn_gate_inp.weight"),  # router
    Rule(_M + "gate.e_score_correction_bias", "blk.{L}.exp_probs_b.bias"),  # note `.bias`
    Rule(_M + "experts.{E}.gate_proj.weight", "blk.{L}.ffn_gate_exps.weight", EXPERTS),
    Rule(_M + "experts.{E}.up_proj.weight", "blk.{L}.ffn_up_exps.weight", EXPERTS),
    Rule(_M + "experts.{E}.down_proj.weight", "blk.{L}.ffn_down_exps.weight", EXPERTS),
    Rule(_M + "shared_experts.gate_proj.weight", "blk.{L}.ffn_gate_shexp.weight"),
    Rule(_M + "shared_experts.up_proj.weight", "blk.{L}.ffn_up_shexp.weight"),
    Rule(_M + "shared_experts.down_proj.weight", "blk.{L}.ffn_down_shexp.weight"),
)

# GGUF names of a layer's routed experts, by the role ggml_experts() hands out.
EXPERT_ROLES = {"gate": "blk.{L}.ffn_gate_exps.weight", "up": "blk.{L}.ffn_up_exps.weight",
                "down": "blk.{L}.ffn_down_exps.weight"}


def _regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{L\}", r"(?P<L>\d+)").replace(r"\{E\}", r"(?P<E>\d+)")
    return re.compile(pattern + r"\Z")


_HF = [(_regex(r.hf), r) for r in RULES]
_GGUF = [(_regex(r.gguf), r) for r in RULES]


@dataclass(frozen=True)
class Match:
    """One rule applied to one name: which layer and (HF side of `experts`) which expert."""

    rule: Rule
    layer: int | None
    expert: int | None = None

    @property
    def gguf(self) -> str:
        return _fill(self.rule.gguf, self.layer, None)

    @property
    def kind(self) -> str:
        return self.rule.kind

    def hf(self, expert: int | None = None) -> str:
        e = self.expert if expert is None else expert
        if self.rule.kind == EXPERTS and e is None:
            raise ValueError(f"{self.gguf} stacks experts: say which one")
        return _fill(self.rule.hf, self.layer, e)


def _fill(template: str, layer: int | None, expert: int | None) -> str:
    return template.replace("{L}", str(layer)).replace("{E}", str(expert))


def _int(m: re.Match, group: str) -> int | None:
    return int(m.group(group)) if group in m.re.groupindex else None


def match_hf(name: str, layout: str = NEW) -> list[Match]:
    """The GGUF tensor(s) holding HF tensor `name`: one, or two for kv_b_proj in the new layout;
    [] for names GGUF files do not carry (MTP, unknown)."""
    _check_layout(layout)
    out = []
    for rx, rule in _HF:
        if layout in rule.layouts and (m := rx.match(name)):
            out.append(Match(rule, _int(m, "L"), _int(m, "E")))
    return out


def match_gguf(name: str) -> Match | None:
    """The rule for GGUF tensor `name`, or None for a name outside the table."""
    for rx, rule in _GGUF:
        if m := rx.match(name):
            return Match(rule, _int(m, "L"))
    return None


def hf_to_gguf(name: str, layout: str = NEW) -> list[str]:
    return [m.gguf for m in match_hf(name, layout)]


def gguf_to_hf(name: str, n_experts: int | None = None) -> list[str]:
    """HF names stored in GGUF tensor `name` (every expert of a stacked tensor: give n_experts)."""
    m = match_gguf(name)
    if m is None:
        return []
    if m.kind == EXPERTS:
        if n_experts is None:
            raise ValueError(f"{name} stacks experts: pass n_experts")
        return [m.hf(e) for e in range(n_experts)]
    return [m.hf()]


def expected_tensors(cfg: ModelConfig, layout: str = NEW, *,
                     router_bias: bool | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """(GGUF name, ne) of every tensor a deepseek2 file of `cfg` holds, in the order this project writes them.

    router_bias: whether MoE layers carry exp_probs_b (V3 noaux_tc routing); default from cfg."""
    _check_layout(layout)
    if router_bias is None:
        router_bias = cfg.topk_method == "noaux_tc"
    h, heads, kvr = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank
    nope, rope, v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (h, cfg.vocab_size))]
    for i in range(cfg.num_hidden_layers):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (h,))]
        if cfg.q_lora_rank is None:
            out += [(b + "attn_q.weight", (h, heads * (nope + rope)))]
        else:
            out += [(b + "attn_q_a.weight", (h, cfg.q_lora_rank)), (b + "attn_q_a_norm.weight", (cfg.q_lora_rank,)),
                    (b + "attn_q_b.weight", (cfg.q_lora_rank, heads * (nope + rope)))]
        out += [(b + "attn_kv_a_mqa.weight", (h, kvr + rope)), (b + "attn_kv_a_norm.weight", (kvr,))]
        if layout == OLD:
            out += [(b + "attn_kv_b.weight", (kvr, heads * (nope + v)))]
        else:
            out += [(b + "attn_k_b.weight", (nope, kvr, heads)), (b + "attn_v_b.weight", (kvr, v, heads))]
        out += [(b + "attn_output.weight", (heads * v, h)), (b + "ffn_norm.weight", (h,))]
        if cfg.is_moe_layer(i):
            e, f = cfg.n_routed_experts, cfg.moe_intermediate_size
            out += [(b + "ffn_gate_inp.weight", (h, e))]
            if router_bias:
                out += [(b + "exp_probs_b.bias", (e,))]
            out += [(b + "ffn_gate_exps.weight", (h, f, e)), (b + "ffn_up_exps.weight", (h, f, e)),
                    (b + "ffn_down_exps.weight", (f, h, e))]
            if cfg.n_shared_experts:
                fs = f * cfg.n_shared_experts
                out += [(b + "ffn_gate_shexp.weight", (h, fs)), (b + "ffn_up_shexp.weight", (h, fs)),
                        (b + "ffn_down_shexp.weight", (fs, h))]
        else:
            f = cfg.intermediate_size
            out += [(b + "ffn_gate.weight", (h, f)), (b + "ffn_up.weight", (h, f)), (b + "ffn_down.weight", (f, h))]
    out += [("output_norm.weight", (h,))]
    if not cfg.tie_word_embeddings:
        out += [("output.weight", (h, cfg.vocab_size))]
    return out


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
