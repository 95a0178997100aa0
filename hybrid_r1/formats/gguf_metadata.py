"""GGUF metadata of a `deepseek2` file -> ModelConfig and tokenizer.

Metadata older files lack, and what stands in (metadata always wins; `config_json` is an optional
HF config.json, a path or a dict, consulted only for these):
- expert_group_count / expert_group_used_count (absent before Sep 2025): config.json's n_group /
  topk_group, else 1 / 1 with a warning (routing over all experts, as llama.cpp did then).
- expert_gating_func (absent in V2-era files): config.json's scoring_func, else sigmoid if the file
  has exp_probs_b router biases (only V3-style noaux_tc routers have them, and they are sigmoid),
  else softmax (llama.cpp's own default for such files); a warning either way.
- topk_method has no key: noaux_tc if the file has exp_probs_b, else group_limited_greedy with
  expert groups, else greedy.
- expert_weights_norm / expert_weights_scale: config.json, else false / 1.0 (llama.cpp's defaults).
- head dims: `attention.key_length_mla` / `value_length_mla` (new files), else `key_length` /
  `value_length` (old files: the real dims); a new-layout file without `_mla` keys takes them from
  attn_k_b / attn_v_b.
- YaRN: mscale_all_dim = rope.scaling.yarn_log_multiplier / 0.1; mscale = mscale_all_dim (GGUF
  stores one number; llama.cpp assumes the two equal); beta_fast / beta_slow default 32 / 1.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import gguf

from .. import checks
from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from . import names as N

log = logging.getLogger(__name__)

ARCH = "deepseek2"
GATING = {1: "softmax", 2: "sigmoid"}


def detect_layout(ne: dict[str, tuple[int, ...]], meta: dict[str, Any]) -> str:
    """'old' (attn_kv_b) or 'new' (attn_k_b / attn_v_b). Files carrying both use attn_kv_b."""
    if any(".attn_kv_b." in n for n in ne):
        return N.OLD
    if any(".attn_k_b." in n for n in ne):
        return N.NEW
    return N.NEW if f"{ARCH}.attention.key_length_mla" in meta else N.OLD


# The type each `deepseek2.*` key must have (ranges are ModelConfig's); a wrong one names the key.
KINDS = {**dict.fromkeys((
    "block_count", "nextn_predict_layers", "attention.head_count", "rope.dimension_count", "vocab_size",
    "embedding_length", "feed_forward_length", "expert_feed_forward_length", "attention.q_lora_rank",
    "attention.kv_lora_rank", "attention.key_length", "attention.value_length", "attention.key_length_mla",
    "attention.value_length_mla", "expert_count", "expert_used_count", "expert_shared_count",
    "leading_dense_block_count", "context_length", "expert_gating_func", "expert_group_count",
    "expert_group_used_count", "rope.scaling.original_context_length"), int),
    **dict.fromkeys(("expert_weights_scale", "attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.scaling.factor",
                     "rope.scaling.yarn_log_multiplier", "rope.scaling.yarn_beta_fast",
                     "rope.scaling.yarn_beta_slow"), float),
    "expert_weights_norm": bool, "rope.scaling.type": str}


class _Meta:
    """`deepseek2.*` metadata lookups that name the missing key, or the key of the wrong type."""

    def __init__(self, meta: dict[str, Any], source: str | None):
        self.meta, self.source = meta, source

    def __contains__(self, key: str) -> bool:
        return f"{ARCH}.{key}" in self.meta

    def __call__(self, key: str, default: Any = ConfigError) -> Any:
        full = f"{ARCH}.{key}"
        if full in self.meta:
            return self._typed(full, KINDS.get(key), self.meta[full])
        if default is ConfigError:
            raise ConfigError(f"metadata key {full} is missing", self.source)
        return default

    def _typed(self, full: str, kind, value):
        def err(msg: str) -> ConfigError:
            return ConfigError(f"metadata key {msg}", self.source)

        if kind is int:
            return checks.integer(full, value, error=err)
        if kind is float:
            return checks.number(full, value, error=err)
        if kind is bool:
            return checks.boolean(full, value, error=err)
        if kind is str and not isinstance(value, str):
            raise err(f"{full} must be a string, got {value!r}")
        return value


def config_from_metadata(meta: dict[str, Any], ne: dict[str, tuple[int, ...]], *, source: str | None = None,
                         config_json: str | Path | dict | None = None) -> ModelConfig:
    """ModelConfig from deepseek2 metadata and the file's tensor shapes (GGUF name -> ne); see the
    module docstring for the fallbacks."""
    hf = _read_config_json(config_json)
    get = _Meta(meta, source)
    router_bias = any(n.endswith(".exp_probs_b.bias") for n in ne)
    heads, rope_dim = get("attention.head_count"), get("rope.dimension_count")
    qk, v = _head_dims(get, ne, detect_layout(ne, meta), rope_dim)
    n_layers, nextn = get("block_count"), get("nextn_predict_layers", 0)
    d = dict(
        vocab_size=get("vocab_size", ne.get("token_embd.weight", (0, None))[1]),
        hidden_size=get("embedding_length"), intermediate_size=get("feed_forward_length", 0),
        moe_intermediate_size=get("expert_feed_forward_length", 0), num_hidden_layers=n_layers - nextn,
        num_nextn_predict_layers=nextn, num_attention_heads=heads, num_key_value_heads=heads,
        q_lora_rank=get("attention.q_lora_rank", None) or None,  # llama.cpp writes 0 for "no q-LoRA"
        kv_lora_rank=get("attention.kv_lora_rank"),
        qk_nope_head_dim=qk - rope_dim, qk_rope_head_dim=rope_dim, v_head_dim=v,
        n_routed_experts=get("expert_count"), num_experts_per_tok=get("expert_used_count"),
        n_shared_experts=get("expert_shared_count", 0),
        routed_scaling_factor=get("expert_weights_scale", hf.get("routed_scaling_factor", 1.0)),
        norm_topk_prob=get("expert_weights_norm", hf.get("norm_topk_prob", False)),
        first_k_dense_replace=get("leading_dense_block_count", 0),
        rms_norm_eps=get("attention.layer_norm_rms_epsilon"), rope_theta=get("rope.freq_base", 10000.0),
        rope_scaling=_rope_scaling(get, hf), max_position_embeddings=get("context_length"),
        tie_word_embeddings="output.weight" not in ne,
        **_routing(get, hf, router_bias),
    )
    for key, hf_key in (("tokenizer.ggml.bos_token_id", "bos_token_id"), ("tokenizer.ggml.eos_token_id", "eos_token_id")):
        if key in meta:
            d[hf_key] = meta[key]
    return ModelConfig.from_hf_dict(d, source=source)


def _head_dims(get: _Meta, ne: dict[str, tuple[int, ...]], layout: str, rope_dim: int) -> tuple[int, int]:
    """(qk head dim, v head dim): new files keep them in the `_mla` keys (key_length is then the MQA
    width kv_lora + rope); old files in key_length / value_length."""
    if "attention.key_length_mla" in get:
        return get("attention.key_length_mla"), get("attention.value_length_mla")
    k_b, v_b = ne.get("blk.0.attn_k_b.weight"), ne.get("blk.0.attn_v_b.weight")
    if layout == N.NEW and k_b and v_b:
        log.info("%s: no key_length_mla/value_length_mla; head dims from attn_k_b/attn_v_b", get.source)
        return k_b[0] + rope_dim, v_b[1]
    return get("attention.key_length"), get("attention.value_length")


def _routing(get: _Meta, hf: dict, router_bias: bool) -> dict[str, Any]:
    """scoring_func, n_group, topk_group, topk_method, with the fallbacks of the module docstring."""
    gating = get("expert_gating_func", None)
    if gating is not None:
        if gating not in GATING:
            raise ConfigError(f"expert_gating_func {gating} is not supported (1 softmax, 2 sigmoid)", get.source)
        scoring = GATING[gating]
    elif "scoring_func" in hf:
        scoring = hf["scoring_func"]
    else:
        scoring = "sigmoid" if router_bias else "softmax"
        log.warning("%s: no expert_gating_func in the metadata; using %s (%s)", get.source, scoring,
                    "the file has exp_probs_b router biases" if router_bias else "llama.cpp's default for such files")
    n_group, topk_group = get("expert_group_count", None), get("expert_group_used_count", None)
    if n_group is None or topk_group is None:
        if "n_group" in hf and "topk_group" in hf:
            n_group, topk_group = hf["n_group"], hf["topk_group"]
        else:
            n_group, topk_group = 1, 1
            log.warning("%s: no expert_group_count/expert_group_used_count in the metadata (file older than "
                        "Sep 2025) and no config.json given: routing over all experts without groups", get.source)
    method = "noaux_tc" if router_bias else "group_limited_greedy" if n_group > 1 else "greedy"
    return dict(scoring_func=scoring, n_group=int(n_group), topk_group=int(topk_group), topk_method=method)


def _rope_scaling(get: _Meta, hf: dict) -> dict | None:
    rope_type = get("rope.scaling.type", None)
    if rope_type in (None, "none"):
        return None
    if rope_type != "yarn":
        raise ConfigError(f"rope scaling {rope_type!r} is not supported (only yarn)", get.source)
    hf_rope = hf.get("rope_scaling") or {}
    mscale_all_dim = round(get("rope.scaling.yarn_log_multiplier", 0.0) / 0.1, 6)  # stored as 0.1 * mscale_all_dim
    return dict(type="yarn", factor=get("rope.scaling.factor"),
                original_max_position_embeddings=get("rope.scaling.original_context_length"),
                beta_fast=get("rope.scaling.yarn_beta_fast", hf_rope.get("beta_fast", 32.0)),
                beta_slow=get("rope.scaling.yarn_beta_slow", hf_rope.get("beta_slow", 1.0)),
                mscale=mscale_all_dim, mscale_all_dim=mscale_all_dim)


def _read_config_json(config_json: str | Path | dict | None) -> dict:
    if config_json is None or isinstance(config_json, dict):
        return dict(config_json or {})
    p = Path(config_json)
    p = p / "config.json" if p.is_dir() else p
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError("config.json not found", str(p)) from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"not valid JSON: {e}", str(p)) from None
    if not isinstance(d, dict):
        raise ConfigError("expected a JSON object", str(p))
    return d


# ---- metadata -> tokenizer -------------------------------------------------------------------
# DeepSeek-V3's pre-tokenizer (tokenizer.ggml.pre "deepseek-v3"), as its tokenizer.json states it.
DEEPSEEK_V3_SPLITS = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+|"
    " ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
)
TOKEN_CONTROL, TOKEN_USER_DEFINED = gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED


def tokenizer_from_metadata(meta: dict[str, Any], source: str | None = None):
    """hybrid_r1 Tokenizer from gpt2-BPE `tokenizer.*` metadata (pre-tokenizer deepseek-v3)."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    from ..tokenizer import Tokenizer

    model, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre")
    if model != "gpt2" or pre != "deepseek-v3":
        raise CheckpointError(f"tokenizer {model!r}/{pre!r} in the metadata is not supported (gpt2/deepseek-v3): "
                              "give a tokenizer.json", file=source)
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    added = [i for i, t in enumerate(types) if t in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
    vocab = {t: i for i, t in enumerate(tokens)}  # added tokens too: add_tokens() then keeps their ids
    tk = tokenizers.Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(tokenizers.Regex(r), behavior="isolated") for r in DEEPSEEK_V3_SPLITS]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    # added tokens are matched whole before BPE runs; CONTROL ones are special (skipped when decoding)
    tk.add_tokens([tokenizers.AddedToken(tokens[i], special=types[i] == TOKEN_CONTROL, normalized=False) for i in added])
    for i in added:
        if tk.token_to_id(tokens[i]) != i:
            raise CheckpointError(f"token {i} ({tokens[i]!r}) does not get its own id back", file=source)
    config: dict[str, Any] = {"add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False))}
    for key, name in (("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "padding")):
        i = meta.get(f"tokenizer.ggml.{name}_token_id")
        if i is not None and 0 <= i < len(tokens):
            config[key] = tokens[i]
    return Tokenizer(tk, config, chat_template=meta.get("tokenizer.chat_template"), source=source or "")
