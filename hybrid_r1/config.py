"""Model configuration: a frozen dataclass built from a Hugging Face config.json (or GGUF metadata).

Field names are the HF keys, so `config.json` maps one to one. Unknown keys are kept aside (the HF
file carries many that do not change the math); missing required keys and inconsistent values are
`ConfigError`s naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from . import checks
from .errors import ConfigError


# Type and range of every key (generous for real models, small enough that a typo such as 10**5
# layers or 2**20 experts is refused before the model is built): key -> (type, min, max).
LIMITS: dict[str, tuple[type, float | None, float | None]] = {
    "vocab_size": (int, 1, 2**21), "hidden_size": (int, 1, 2**16), "intermediate_size": (int, 0, 2**20),
    "moe_intermediate_size": (int, 0, 2**18), "num_hidden_layers": (int, 1, 1024),
    "num_attention_heads": (int, 1, 1024), "kv_lora_rank": (int, 1, 2**16), "qk_nope_head_dim": (int, 1, 4096),
    "qk_rope_head_dim": (int, 1, 4096), "v_head_dim": (int, 1, 4096), "n_routed_experts": (int, 0, 4096),
    "num_experts_per_tok": (int, 0, 4096), "q_lora_rank": (int, 0, 2**16), "num_key_value_heads": (int, 1, 1024),
    "n_shared_experts": (int, 0, 64), "n_group": (int, 1, 4096), "topk_group": (int, 1, 4096),
    "routed_scaling_factor": (float, 0, 1e6), "scoring_func": (str, None, None), "topk_method": (str, None, None),
    "norm_topk_prob": (bool, None, None), "first_k_dense_replace": (int, 0, 1024), "moe_layer_freq": (int, 1, 1024),
    "hidden_act": (str, None, None), "rms_norm_eps": (float, 0, 1), "rope_theta": (float, 0, 1e12),
    "max_position_embeddings": (int, 1, 2**24), "num_nextn_predict_layers": (int, 0, 16),
    "bos_token_id": (int, 0, None), "tie_word_embeddings": (bool, None, None), "attention_bias": (bool, None, None),
}
OPTIONAL = {"q_lora_rank", "num_key_value_heads", "bos_token_id"}  # null allowed
OPEN_BELOW = {"routed_scaling_factor", "rms_norm_eps", "rope_theta"}  # must be > min
MAX_EXPERT_MODULES = 2**17  # routed experts over all layers (671B: 58 x 256); each is a module to build


@dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters (`rope_scaling` in config.json)."""

    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    type: str = "yarn"


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    num_experts_per_tok: int
    q_lora_rank: int | None = None
    num_key_value_heads: int | None = None
    n_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    quantization_config: dict | None = None
    # Keys of config.json this runtime does not interpret (kept for round trips).
    extra: dict = field(default_factory=dict, compare=False, repr=False)
    source: str | None = field(default=None, compare=False, repr=False)

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """`qk_head_dim^-0.5`, times mscale^2 under YaRN (as transformers does, at any length)."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs is not None and rs.mscale_all_dim:
            m = yarn_mscale(rs.factor, rs.mscale_all_dim)
            scale *= m * m
        return scale

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str | None = None) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"expected a JSON object of KEY: VALUE, got {type(d).__name__}", source)
        known = {f.name for f in fields(cls)} - {"extra", "source", "rope_scaling"}
        required = [f.name for f in fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if d.get(k) is None]
        if missing:
            raise ConfigError(f"missing required key(s): {', '.join(missing)}", source)
        kwargs = {k: d[k] for k in known if k in d}
        rope = d.get("rope_scaling") or d.get("rope_parameters")
        if rope:
            if not isinstance(rope, dict):
                raise ConfigError(f"rope_scaling must be an object or null, got {rope!r}", source)
            rope = dict(rope)
            rope_type = rope.pop("type", None) or rope.pop("rope_type", "default")
            rope.pop("rope_theta", None)
            if rope_type == "default":
                rope = None
            elif rope_type != "yarn":
                raise ConfigError(f"rope_scaling type {rope_type!r} is not supported (only yarn)", source)
            else:
                allowed = {f.name for f in fields(RopeScaling)}
                unknown = set(rope) - allowed
                if unknown:
                    raise ConfigError(f"unknown rope_scaling key(s): {', '.join(sorted(unknown))}", source)
                for key, value in rope.items():
                    if key == "type":
                        continue
                    kind = checks.integer if key == "original_max_position_embeddings" else checks.number
                    kind(f"rope_scaling.{key}", value, error=lambda m: ConfigError(m, source))
                rope = RopeScaling(**rope)
        kwargs["rope_scaling"] = rope or None
        extra = {k: v for k, v in d.items() if k not in known and k not in ("rope_scaling", "rope_parameters")}
        cfg = cls(**kwargs, extra=extra, source=source)
        cfg.validate()
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError("config.json not found", str(path))
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"not valid JSON: {e}", str(path)) from None
        return cls.from_hf_dict(d, source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("extra", "source")}
        d["rope_scaling"] = None if self.rope_scaling is None else dataclasses.asdict(self.rope_scaling)
        if d["quantization_config"] is None:
            del d["quantization_config"]
        return {**self.extra, **d}

    def replace(self, **changes) -> "ModelConfig":
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    # ---- validation ----------------------------------------------------------------------
    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ConfigError(msg, self.source)

        self._check_types()
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            bad(f"q_lora_rank must be positive or null, got {self.q_lora_rank}")
        moe_layers = sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))
        if moe_layers * self.n_routed_experts > MAX_EXPERT_MODULES:
            bad(f"{moe_layers} MoE layers (num_hidden_layers) x n_routed_experts {self.n_routed_experts} = "
                f"{moe_layers * self.n_routed_experts} experts, more than {MAX_EXPERT_MODULES} (the 671B model has 14848)")
        if self.qk_rope_head_dim % 2:
            bad(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.num_key_value_heads not in (None, self.num_attention_heads):
            bad("MLA needs num_key_value_heads == num_attention_heads")
        if self.hidden_act != "silu":
            bad(f"hidden_act {self.hidden_act!r} is not supported (only silu)")
        if self.attention_bias:
            bad("attention_bias true is not supported (DeepSeek-V3 has no attention biases)")
        if self.n_routed_experts:
            e, k, g, tg = self.n_routed_experts, self.num_experts_per_tok, self.n_group, self.topk_group
            if self.scoring_func not in ("sigmoid", "softmax"):
                bad(f"scoring_func {self.scoring_func!r} is not supported (sigmoid or softmax)")
            if self.topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"):
                bad(f"topk_method {self.topk_method!r} is not supported")
            if g <= 0 or e % g:
                bad(f"n_group ({g}) must divide n_routed_experts ({e})")
            if self.topk_method == "noaux_tc" and e // g < 2:
                bad(f"each expert group needs at least 2 experts (n_routed_experts {e} / n_group {g})")
            if not 1 <= tg <= g:
                bad(f"topk_group ({tg}) must be between 1 and n_group ({g})")
            if not 1 <= k <= tg * (e // g):
                bad(f"num_experts_per_tok ({k}) must be between 1 and topk_group * group size ({tg * (e // g)})")
            if self.moe_intermediate_size <= 0:
                bad("moe_intermediate_size must be positive")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            bad(f"first_k_dense_replace ({self.first_k_dense_replace}) out of range")
        if self.first_k_dense_replace and self.intermediate_size <= 0:
            bad("intermediate_size must be positive when there are dense layers")
        rs = self.rope_scaling
        if rs is not None and (rs.factor <= 0 or rs.beta_fast <= rs.beta_slow or rs.original_max_position_embeddings < 1):
            bad("rope_scaling needs factor > 0, beta_fast > beta_slow and original_max_position_embeddings >= 1")

    def _check_types(self) -> None:
        """Every key's type and range (LIMITS); a value in a string ("256", "false") is refused."""
        def err(msg: str) -> ConfigError:
            return ConfigError(msg, self.source)

        for name, (kind, lo, hi) in LIMITS.items():
            value = getattr(self, name)
            if value is None and name in OPTIONAL:
                continue
            if kind is int:
                checks.integer(name, value, lo, hi, error=err)
            elif kind is float:
                checks.number(name, value, lo, hi, lo_open=name in OPEN_BELOW, error=err)
            elif kind is bool:
                checks.boolean(name, value, error=err)
            elif not isinstance(value, str):
                raise err(f"{name} must be a string, got {value!r}")
        eos = self.eos_token_id
        for e in eos if isinstance(eos, list) else [] if eos is None else [eos]:
            checks.integer("eos_token_id", e, 0, error=err)
        if self.quantization_config is not None and not isinstance(self.quantization_config, dict):
            raise err(f"quantization_config must be an object or null, got {self.quantization_config!r}")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0
