"""Synthetic DeepSeek-V3 checkpoints in the real layout: test data and benchmark input.

`SyntheticWeights` is a WeightSource whose tensors are drawn on demand from a seed and the tensor's
name, so any subset can be regenerated identically (the GGUF and INT8 writers start from the same
numbers). `write_checkpoint` streams it into a Hugging Face folder: config.json with the real keys,
the real DeepSeek-R1 tokenizer files, safetensors shards with an index, in BF16 or in the FP8
release format (128x128 block scales, zero-padded tails), plus the MTP layer the loader must skip.
It streams one tensor at a time into a staging folder published at the end (hybrid_r1.staging).

    hybrid-r1 synth OUT --preset tiny [--format fp8] [--layers N] [--set key=value]
    hybrid-r1 synth OUT.gguf --format gguf [--gguf-type Q4_K_M]    (the R1 tokenizer in its metadata)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import zlib
from pathlib import Path
from typing import Callable

import torch

from .config import ModelConfig
from .errors import CheckpointError, HybridR1Error
from .formats.ggml_tensor import GGMLTensor
from .formats.safetensors_writer import SafetensorsWriter, TensorSpec, plan_shards, shard_name, write_index
from .quant import BLOCK, FP8_QUANT_CONFIG, FP8_SCALE_SUFFIX, quantize_fp8_block
from .staging import staged_file, staged_output

log = logging.getLogger(__name__)

_ROPE_671B = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
              "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
_COMMON = dict(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], hidden_act="silu",
               scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True, rms_norm_eps=1e-6,
               rope_theta=10000, rope_scaling=_ROPE_671B, max_position_embeddings=163840, bos_token_id=0,
               eos_token_id=1, tie_word_embeddings=False, attention_bias=False, num_nextn_predict_layers=1,
               routed_scaling_factor=2.5, n_shared_experts=1, moe_layer_freq=1, torch_dtype="bfloat16")
PRESETS = {
    # Seconds on 2 cores, the real vocabulary (so the real tokenizer works). Dims are multiples of
    # 256 where llama.cpp's K-quants need it; kv_a has 80 rows, a partial 128-row FP8 block.
    "tiny": dict(_COMMON, vocab_size=129280, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                 num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
                 q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                 n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2),
    # The 671B model's widths with fewer layers (choose with --layers / --set), for benchmarks.
    "full-slice": dict(_COMMON, vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                       moe_intermediate_size=2048, num_hidden_layers=4, first_k_dense_replace=1,
                       num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                       qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256,
                       num_experts_per_tok=8, n_group=8, topk_group=4),
}


def preset_config(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return ModelConfig.from_hf_dict({**PRESETS[name], **overrides}, source=f"preset {name}")


def tensor_specs(cfg: ModelConfig, mtp: bool = True) -> list[tuple[str, tuple[int, ...], str]]:
    """(HF name, shape, kind) of every tensor of the release, in file order. kind is one of
    embed, head, norm, linear, gate, bias; `linear` tensors are the ones FP8 quantizes."""
    h = cfg.hidden_size
    specs = [("model.embed_tokens.weight", (cfg.vocab_size, h), "embed")]
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp else 0)
    for i in range(layers):
        p = f"model.layers.{i}."
        if i >= cfg.num_hidden_layers:  # MTP module: its own projections around a normal block
            specs += [(p + "enorm.weight", (h,), "norm"), (p + "hnorm.weight", (h,), "norm"),
                      (p + "eh_proj.weight", (h, 2 * h), "linear"), (p + "shared_head.norm.weight", (h,), "norm")]
        specs += [(p + "input_layernorm.weight", (h,), "norm"), (p + "post_attention_layernorm.weight", (h,), "norm")]
        a = p + "self_attn."
        qk = cfg.num_attention_heads * cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            specs.append((a + "q_proj.weight", (qk, h), "linear"))
        else:
            specs += [(a + "q_a_proj.weight", (cfg.q_lora_rank, h), "linear"),
                      (a + "q_a_layernorm.weight", (cfg.q_lora_rank,), "norm"),
                      (a + "q_b_proj.weight", (qk, cfg.q_lora_rank), "linear")]
        specs += [(a + "kv_a_proj_with_mqa.weight", (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h), "linear"),
                  (a + "kv_a_layernorm.weight", (cfg.kv_lora_rank,), "norm"),
                  (a + "kv_b_proj.weight", (cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                                            cfg.kv_lora_rank), "linear"),
                  (a + "o_proj.weight", (h, cfg.num_attention_heads * cfg.v_head_dim), "linear")]
        m = p + "mlp."
        if i >= cfg.num_hidden_layers or cfg.is_moe_layer(i):
            specs += [(m + "gate.weight", (cfg.n_routed_experts, h), "gate"),
                      (m + "gate.e_score_correction_bias", (cfg.n_routed_experts,), "bias")]
            for e in range(cfg.n_routed_experts):
                specs += _mlp_specs(f"{m}experts.{e}.", h, cfg.moe_intermediate_size)
            if cfg.n_shared_experts:
                specs += _mlp_specs(m + "shared_experts.", h, cfg.moe_intermediate_size * cfg.n_shared_experts)
        else:
            specs += _mlp_specs(m, h, cfg.intermediate_size)
    specs += [("model.norm.weight", (h,), "norm"), ("lm_head.weight", (cfg.vocab_size, h), "head")]
    return specs


def _mlp_specs(p: str, h: int, inter: int) -> list[tuple[str, tuple[int, ...], str]]:
    return [(p + "gate_proj.weight", (inter, h), "linear"), (p + "up_proj.weight", (inter, h), "linear"),
            (p + "down_proj.weight", (h, inter), "linear")]


class SyntheticWeights:
    """A WeightSource of seeded random weights at realistic scale (fp32, HF names and shapes)."""

    def __init__(self, config: ModelConfig, seed: int = 0, mtp: bool = True):
        self.config = config
        self.seed = seed
        self.path = f"<synthetic seed={seed}>"
        self.metadata: dict = {}
        self.specs = {name: (shape, kind) for name, shape, kind in tensor_specs(config, mtp)}

    def names(self) -> list[str]:
        return list(self.specs)

    def has(self, name: str) -> bool:
        return name in self.specs

    def shape(self, name: str) -> tuple[int, ...]:
        return self._spec(name)[0]

    def kind(self, name: str) -> str:
        return self._spec(name)[1]

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        shape, kind = self._spec(name)
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()) * 1000003 + self.seed)
        if kind == "norm":  # RMSNorm gains near 1, not all equal
            t = 1.0 + 0.2 * torch.randn(shape, generator=g)
        elif kind == "bias":  # selection bias: moves routing, comparable to score gaps
            t = 0.05 * torch.randn(shape, generator=g)
        elif kind == "embed":
            t = torch.randn(shape, generator=g)
        elif kind == "gate":  # logits ~N(0,1): sigmoid is steepest there, so score gaps are widest
            t = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        else:  # linear, head: unit-variance outputs for unit-variance inputs
            t = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        return t.to(dtype)

    def raw(self, name: str):
        return self.tensor(name), {}

    def ggml_experts(self, layer: int) -> dict[str, GGMLTensor] | None:
        return None

    def file_of(self, name: str) -> str:
        return self.path

    def quantization(self) -> None:
        return None

    def tokenizer(self) -> None:
        return None

    def _spec(self, name: str):
        try:
            return self.specs[name]
        except KeyError:
            raise CheckpointError("tensor not in the synthetic model", file=self.path, tensor=name) from None


def write_checkpoint(out: str | Path, weights: SyntheticWeights, *, fmt: str = "bf16", shard_mb: int = 512,
                     tokenizer: bool = True, force: bool = False,
                     keep_existing: Callable[[Path], bool] | None = None) -> Path:
    """Stream `weights` into a checkpoint folder at `out`, staged and published at the end
    (hybrid_r1.staging: an existing `out` is replaced only with force, atomically; keep_existing
    as there)."""
    if fmt not in ("bf16", "fp8"):
        raise ValueError(f"format must be bf16 or fp8, got {fmt!r}")
    out = Path(out)
    shards = plan_shards((_stored_specs(weights, name, fmt) for name in weights.names()), shard_mb << 20)
    total = sum(s.nbytes for shard in shards for s in shard)
    with staged_output(out, force=force, needed_bytes=total, keep_existing=keep_existing) as tmp:
        cfg = weights.config.to_hf_dict()
        if fmt == "fp8":
            cfg["quantization_config"] = FP8_QUANT_CONFIG
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        if tokenizer:
            from .tokenizer import write_r1_tokenizer_files

            write_r1_tokenizer_files(tmp)
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = shard_name(i, len(shards))
            _write_shard(tmp / fname, shard, weights, fmt)
            weight_map.update({s.name: fname for s in shard})
            log.info("wrote shard %d/%d (%.0f MB)", i + 1, len(shards), sum(s.nbytes for s in shard) / 2**20)
        write_index(tmp, weight_map, total)
    return out


def _stored_specs(weights: SyntheticWeights, name: str, fmt: str) -> list[TensorSpec]:
    """What the file holds for `name`: the router bias in fp32, FP8 linears with their block scale,
    everything else bf16."""
    shape, kind = weights.shape(name), weights.kind(name)
    if kind == "bias":
        return [TensorSpec(name, torch.float32, shape)]
    if kind == "linear" and fmt == "fp8":
        blocks = (-(-shape[0] // BLOCK), -(-shape[1] // BLOCK))
        return [TensorSpec(name, torch.float8_e4m3fn, shape),
                TensorSpec(name[: -len("weight")] + FP8_SCALE_SUFFIX, torch.float32, blocks)]
    return [TensorSpec(name, torch.bfloat16, shape)]


def _write_shard(path: Path, specs: list[TensorSpec], weights: SyntheticWeights, fmt: str) -> None:
    with SafetensorsWriter(path, specs, {"format": "pt"}) as f:
        for spec in specs:
            if not weights.has(spec.name):
                continue  # a scale, written with its weight
            w = weights.tensor(spec.name)
            if spec.dtype == torch.float8_e4m3fn:
                q, scale = quantize_fp8_block(w)
                f.write(spec.name, q)
                f.write(spec.name[: -len("weight")] + FP8_SCALE_SUFFIX, scale)
            else:
                f.write(spec.name, w.to(spec.dtype))


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


GGUF_TYPE_MIXES = ("Q8_0", "Q4_K_M", "Q4_0", "BF16", "F16", "F32")


def write_gguf(out: str | Path, weights: SyntheticWeights, *, type_mix: str = "Q8_0", tokenizer: bool = True,
               force: bool = False) -> Path:
    """`weights` as one deepseek2 GGUF file (formats/gguf_writer.py), with the R1 tokenizer in its
    metadata unless tokenizer=False; written beside `out` under a temporary name, renamed at the end."""
    from .formats.gguf_writer import write_gguf_from_checkpoint

    out = Path(out)
    if out.suffix != ".gguf":
        raise ValueError(f"a GGUF output must end in .gguf, got {out}")
    with staged_file(out, force=force) as path:  # a kill leaves the old file or none, and a stale folder the next run removes
        tok_dir = None
        if tokenizer:
            from .tokenizer import write_r1_tokenizer_files

            tok_dir = write_r1_tokenizer_files(path.parent / "tokenizer")
        (written,) = write_gguf_from_checkpoint(weights, path, type_mix=type_mix, tokenizer_dir=tok_dir)
        os.chmod(written, 0o644)
    return out


def build_parser(prog: str = "hybrid-r1 synth") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0] + " Also a GGUF file (--format gguf).")
    ap.add_argument("output", help="folder to write, or a .gguf file with --format gguf (must not exist unless --force)")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                    help="tiny: seconds on 2 cores; full-slice: the 671B widths (default tiny)")
    ap.add_argument("--format", default="bf16", choices=["bf16", "fp8", "gguf"],
                    help="bf16 safetensors, the DeepSeek FP8 release format, or one GGUF file (default bf16)")
    ap.add_argument("--gguf-type", default="Q8_0", choices=GGUF_TYPE_MIXES,
                    help="with --format gguf: the type mix, as llama-quantize names it (default Q8_0)")
    ap.add_argument("--layers", type=int, metavar="N", help="num_hidden_layers (default: the preset's, 4)")
    ap.add_argument("--dense-layers", type=int, metavar="N", help="first_k_dense_replace (default: the preset's, 1)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override any config.json key; VALUE is JSON or else a string (repeatable; default none)")
    ap.add_argument("--seed", type=int, default=0, help="weights' seed (default 0)")
    ap.add_argument("--shard-mb", type=int, default=512, metavar="MB",
                    help="safetensors shard size; 0: one tensor (and its scale) per shard (default 512)")
    ap.add_argument("--no-tokenizer", action="store_true",
                    help="leave out the DeepSeek-R1 tokenizer (files, or GGUF metadata) (default: included)")
    ap.add_argument("--no-mtp", action="store_true", help="leave out the MTP layer's tensors (default: included)")
    ap.add_argument("--force", action="store_true", help="replace OUTPUT if it exists (default: refuse)")
    return ap


def main(argv: list[str] | None = None, prog: str = "hybrid-r1 synth") -> int:
    ap = build_parser(prog)
    args = ap.parse_args(argv)
    try:
        overrides = _parse_set(args.set)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.layers is not None:
        overrides["num_hidden_layers"] = args.layers
    if args.dense_layers is not None:
        overrides["first_k_dense_replace"] = args.dense_layers
    if args.no_mtp:
        overrides["num_nextn_predict_layers"] = 0
    if args.shard_mb < 0:
        ap.error(f"--shard-mb must be >= 0 (0: one tensor per shard), got {args.shard_mb}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = preset_config(args.preset, **overrides)
        weights = SyntheticWeights(cfg, args.seed)
        if args.format == "gguf":
            write_gguf(args.output, weights, type_mix=args.gguf_type, tokenizer=not args.no_tokenizer, force=args.force)
        else:
            write_checkpoint(args.output, weights, fmt=args.format, shard_mb=args.shard_mb,
                             tokenizer=not args.no_tokenizer, force=args.force)
    except (FileExistsError, ValueError, HybridR1Error) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write {args.output}: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    from .cli_support import quiet_broken_pipe

    sys.exit(quiet_broken_pipe(main)(prog="python -m hybrid_r1.synth"))
