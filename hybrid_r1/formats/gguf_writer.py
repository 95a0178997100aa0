"""For tests and synthetic files: write deepseek2 GGUF files the way llama.cpp's converter +
quantizer would, from an HF-layout checkpoint. Not a converter for real models (use llama.cpp's).

    write_gguf_from_checkpoint(checkpoint_dir_or_source, "out/model.gguf", layout="new", split=3,
                               type_mix="Q4_K_M")

Metadata keys, tensor names and `ne` shapes, 32-byte alignment and the split metadata
(`split.no/count/tensors.count`; all other metadata only in shard 1) follow llama.cpp. The source is
read one tensor at a time through the WeightSource protocol (`tensor(name, torch.float32)`; routed
experts one expert at a time), so only one quantized tensor is ever held in memory.

Type mixes (tensors of 1 dim, and the router `ffn_gate_inp`, always stay F32, as the converter
writes them):
    F32, F16, BF16  every other tensor in that type
    Q8_0            every other tensor Q8_0
    Q4_0            Q4_0; output.weight Q6_K
    Q4_K_M          Q4_K; output.weight Q6_K; every ffn_down* (dense, exps, shexp) Q6_K on the layers
                    llama.cpp's use_more_bits picks (i < n/8, i >= 7n/8, (i - n/8) % 3 == 2)
In quantized mixes attn_k_b (ne0 = qk_nope, too short for K-quant blocks) is Q8_0; where a tensor's ne0
is not a whole number of blocks the type falls back as llama.cpp's does (Q4_K -> Q5_0, Q6_K -> Q8_0,
...; F16 last). `tensor_types` then overrides per tensor: {regex on the GGUF name: type name}, last
match wins (llama-quantize --tensor-type), for tensors the mix quantizes.

Quantizing: F32/F16/BF16 in numpy; other types by `quantize_fn` if given, else
`hybrid_r1.ggml_lib.quantize` (ggml's own quantizers: K-quants, IQ types) if importable, else gguf-py
for the types it can quantize (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0); any other type is a ValueError before
anything is written. quantize_fn(x float32 [rows, ne0], ggml_type) -> uint8 [rows, row_bytes].
"""

from __future__ import annotations

import importlib
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from ..config import ModelConfig
from ..errors import CheckpointError
from . import names as N
from .gguf import ARCH

log = logging.getLogger(__name__)

QuantizeFn = Callable[[np.ndarray, int], np.ndarray]

TYPE_MIXES = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
              "BF16": gguf.LlamaFileType.MOSTLY_BF16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_K_M": gguf.LlamaFileType.MOSTLY_Q4_K_M}
GGUFPY_QUANTIZES = {QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0}
NEEDS_IMATRIX = {QT.IQ2_XXS, QT.IQ2_XS, QT.IQ1_S}  # ggml aborts the process when quantizing these without one
NUMPY_TYPES = {QT.F32: np.float32, QT.F16: np.float16}
# llama.cpp's replacement when ne0 is not a whole number of blocks of the chosen type
FALLBACK = {QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0, QT.Q2_K: QT.IQ4_NL, QT.Q3_K: QT.IQ4_NL,
            QT.IQ4_XS: QT.IQ4_NL, QT.IQ2_XXS: QT.IQ4_NL, QT.IQ2_XS: QT.IQ4_NL, QT.IQ2_S: QT.IQ4_NL,
            QT.IQ3_XXS: QT.IQ4_NL, QT.IQ3_S: QT.IQ4_NL, QT.IQ1_S: QT.IQ4_NL, QT.IQ1_M: QT.IQ4_NL}
METADATA_KEYS_OMITTABLE = ("expert_group_count", "expert_group_used_count", "expert_gating_func",
                           "expert_weights_norm", "attention.key_length_mla", "attention.value_length_mla",
                           "rope.scaling.yarn_beta_fast", "rope.scaling.yarn_beta_slow", "vocab_size")


def write_gguf_from_checkpoint(src, out_path: str | Path, *, layout: str = N.NEW, split: int | None = None,
                               type_mix: str = "Q8_0", tensor_types: Mapping[str, str] | None = None,
                               quantize_fn: QuantizeFn | None = None, tokenizer_dir: str | Path | None = None,
                               omit_keys: Iterable[str] = (), name: str = "DeepSeek-V3") -> list[Path]:
    """Write `src` (a WeightSource with `.config`, or a safetensors checkpoint folder) to `out_path`,
    or to `<stem>-0000i-of-0000N.gguf` beside it when split=N > 1. Returns the files written.

    omit_keys: `deepseek2.` metadata keys to leave out (from METADATA_KEYS_OMITTABLE), to make files
    like older converters wrote; old layout files never carry the `_mla` keys."""
    source = _as_source(src)
    cfg: ModelConfig = source.config
    plan = N.expected_tensors(cfg, layout)
    types = {g: tensor_type(g, ne, type_mix, cfg.num_hidden_layers, tensor_types) for g, ne in plan}
    quantizers = {t: _quantizer(t, quantize_fn) for t in set(types.values())}  # fail before writing anything
    _check_source(source, cfg, plan)
    sizes = _shard_sizes(len(plan), split or 1)

    out = Path(out_path)
    w = gguf.GGUFWriter(out, ARCH)
    _add_metadata(w, cfg, layout, type_mix, name, set(omit_keys))
    _add_tokenizer(w, cfg, tokenizer_dir)
    for g, ne in plan:
        w.split_max_tensors = sizes[len(w.tensors) - 1] if len(sizes) > 1 else 0  # GGUFWriter starts a shard when full
        t = types[g]
        block, type_size = GGML_QUANT_SIZES[t]
        nbytes = int(np.prod(ne[1:], dtype=np.int64)) * (ne[0] // block) * type_size
        w.add_tensor_info(g, ne[::-1], np.dtype(np.float32), nbytes, raw_dtype=t)
    files = w.format_shard_names(out)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    try:
        for g, ne in plan:
            w.write_tensor_data(_tensor_bytes(source, cfg, g, ne, types[g], quantizers[types[g]]))
    finally:
        w.close()
    log.info("wrote %d tensors to %s", len(plan), ", ".join(map(str, files)))
    return files


def tensor_type(gguf_name: str, ne: tuple[int, ...], type_mix: str, n_layers: int,
                tensor_types: Mapping[str, str] | None = None) -> QT:
    """The ggml type `type_mix` gives tensor `gguf_name` of shape `ne` (see the module docstring)."""
    if type_mix not in TYPE_MIXES:
        raise ValueError(f"type_mix {type_mix!r} is not one of {', '.join(TYPE_MIXES)}")
    if len(ne) == 1 or ".ffn_gate_inp." in gguf_name:
        return QT.F32
    if type_mix in ("F32", "F16", "BF16", "Q8_0"):
        t = QT[type_mix]
    elif gguf_name == "output.weight":
        t = QT.Q6_K
    elif ".attn_k_b." in gguf_name:
        t = QT.Q8_0
    elif type_mix == "Q4_K_M" and ".ffn_down" in gguf_name and _use_more_bits(_layer(gguf_name), n_layers):
        t = QT.Q6_K
    else:
        t = QT.Q4_K if type_mix == "Q4_K_M" else QT.Q4_0
    if ne[0] % GGML_QUANT_SIZES[t][0]:
        t = FALLBACK.get(t, QT.F16)
        if ne[0] % GGML_QUANT_SIZES[t][0]:
            t = QT.F16
    for pattern, type_name in (tensor_types or {}).items():
        if re.search(pattern, gguf_name):
            try:
                t = QT[type_name.upper()]
            except KeyError:
                raise ValueError(f"tensor_types: {type_name!r} is not a ggml type") from None
    if ne[0] % GGML_QUANT_SIZES[t][0]:
        raise ValueError(f"{gguf_name}: ne0 {ne[0]} is not a whole number of {t.name} blocks ({GGML_QUANT_SIZES[t][0]})")
    return t


def _use_more_bits(layer: int, n_layers: int) -> bool:
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def _layer(gguf_name: str) -> int:
    return int(gguf_name.split(".")[1])


def _as_source(src):
    if isinstance(src, (str, Path)):
        from .safetensors import SafetensorsCheckpoint

        return SafetensorsCheckpoint(src)
    if not isinstance(getattr(src, "config", None), ModelConfig):
        raise TypeError("the source must be a WeightSource with a `config` (ModelConfig) or a checkpoint folder")
    return src


def _quantizer(t: QT, quantize_fn: QuantizeFn | None) -> QuantizeFn | None:
    if t in NUMPY_TYPES or t == QT.BF16:
        return None
    if quantize_fn is not None:
        return quantize_fn
    if t in NEEDS_IMATRIX:
        raise ValueError(f"{t.name} needs an importance matrix, which this writer does not compute: pass a "
                         "quantize_fn that brings one")
    try:
        return importlib.import_module("hybrid_r1.ggml_lib").quantize
    except (ImportError, OSError) as e:  # no ggml_lib, or ggml-python's library failed to load
        why = e
    if t in GGUFPY_QUANTIZES:
        return gguf.quants.quantize
    raise ValueError(f"{t.name} needs ggml's quantizer (hybrid_r1.ggml_lib, from ggml-python), which is not "
                     f"importable ({why}); gguf-py quantizes only {', '.join(x.name for x in GGUFPY_QUANTIZES)}")


def _check_source(source, cfg: ModelConfig, plan) -> None:
    want: dict[str, tuple[int, ...]] = {}
    for g, ne in plan:
        m = N.match_gguf(g)
        if m.kind == N.EXPERTS:
            want.update({m.hf(e): ne[1::-1] for e in range(ne[2])})
        elif m.kind in (N.K_B, N.V_B):
            h = cfg.num_attention_heads
            want[m.hf()] = (h * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
        else:
            want[m.hf()] = ne[::-1]
    for hf, shape in want.items():
        if not source.has(hf):
            raise CheckpointError("tensor missing from the source checkpoint", file=source.path, tensor=hf)
        if tuple(source.shape(hf)) != shape:
            raise CheckpointError(f"shape {list(source.shape(hf))} does not match the config's {list(shape)}",
                                  file=source.path, tensor=hf)


def _shard_sizes(n_tensors: int, n_shards: int) -> list[int]:
    """Tensors per shard, as even as counts allow (like gguf-split --split-max-tensors)."""
    if not 1 <= n_shards <= n_tensors:
        raise ValueError(f"split must be between 1 and the number of tensors ({n_tensors}), got {n_shards}")
    return [n_tensors // n_shards + (i < n_tensors % n_shards) for i in range(n_shards)]


def _tensor_bytes(source, cfg: ModelConfig, g: str, ne: tuple[int, ...], t: QT, quantize: QuantizeFn | None) -> np.ndarray:
    m = N.match_gguf(g)

    def f32(hf: str) -> np.ndarray:
        return source.tensor(hf, torch.float32).contiguous().numpy()

    if m.kind == N.EXPERTS:  # one expert at a time into the stacked result
        first = _encode(f32(m.hf(0)), t, quantize, g)
        out = np.empty((ne[2], *first.shape), first.dtype)
        out[0] = first
        for e in range(1, ne[2]):
            out[e] = _encode(f32(m.hf(e)), t, quantize, g)
        return out
    if m.kind in (N.K_B, N.V_B):
        nope, kvr = cfg.qk_nope_head_dim, cfg.kv_lora_rank
        kv = f32(m.hf()).reshape(cfg.num_attention_heads, -1, kvr)  # [H, nope + v, kv_lora]
        x = kv[:, :nope].transpose(0, 2, 1) if m.kind == N.K_B else kv[:, nope:]
        return _encode(np.ascontiguousarray(x), t, quantize, g)
    return _encode(f32(m.hf()), t, quantize, g)


def _encode(x: np.ndarray, t: QT, quantize: QuantizeFn | None, g: str) -> np.ndarray:
    if t in NUMPY_TYPES:
        return x.astype(NUMPY_TYPES[t])
    if t == QT.BF16:
        return gguf.quants.quantize(x, QT.BF16)
    block, type_size = GGML_QUANT_SIZES[t]
    rows = x.reshape(-1, x.shape[-1])
    q = np.asarray(quantize(rows, t))
    want = (rows.shape[0], rows.shape[1] // block * type_size)
    if q.dtype != np.uint8 or q.shape != want:
        raise ValueError(f"{g}: the quantizer returned {q.dtype} {q.shape} for {t.name}, expected uint8 {want}")
    return q.reshape(*x.shape[:-1], want[1])


def _add_metadata(w: gguf.GGUFWriter, cfg: ModelConfig, layout: str, type_mix: str, name: str, omit: set[str]) -> None:
    unknown = omit - set(METADATA_KEYS_OMITTABLE)
    if unknown:
        raise ValueError(f"omit_keys: {', '.join(sorted(unknown))} not in {METADATA_KEYS_OMITTABLE}")
    heads, rope = cfg.num_attention_heads, cfg.qk_rope_head_dim
    w.add_type("model")
    w.add_name(name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(heads if layout == N.OLD else 1)  # the new layout runs MLA as MQA over the latent
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_group_count(cfg.n_group)
    w.add_expert_group_used_count(cfg.topk_group)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if cfg.scoring_func == "sigmoid"
                             else gguf.ExpertGatingFuncType.SOFTMAX)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.q_lora_rank is not None:
        w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    if layout == N.OLD:
        w.add_key_length(cfg.qk_head_dim)
        w.add_value_length(cfg.v_head_dim)
    else:
        w.add_key_length(cfg.kv_lora_rank + rope)
        w.add_value_length(cfg.kv_lora_rank)
        w.add_key_length_mla(cfg.qk_head_dim)
        w.add_value_length_mla(cfg.v_head_dim)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    if cfg.norm_topk_prob:  # the converter writes it only when true
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(rope)
    rs = cfg.rope_scaling
    if rs is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rs.factor)
        w.add_rope_scaling_orig_ctx_len(rs.original_max_position_embeddings)
        w.add_rope_scaling_yarn_beta_fast(rs.beta_fast)
        w.add_rope_scaling_yarn_beta_slow(rs.beta_slow)
        w.add_rope_scaling_yarn_log_mul(0.1 * rs.mscale_all_dim)  # llama.cpp's deepseek2 convention
    w.add_file_type(TYPE_MIXES[type_mix])
    if type_mix not in ("F32", "F16", "BF16"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key in omit:
        w.kv_data[0].pop(f"{ARCH}.{key}", None)


def _add_tokenizer(w: gguf.GGUFWriter, cfg: ModelConfig, folder: str | Path | None) -> None:
    """gpt2-BPE vocabulary from tokenizer.json (+ tokenizer_config.json), padded to vocab_size with
    [PAD{i}] as llama.cpp's converter does; without a folder, tokenizer model "none"."""
    if folder is None:
        w.add_tokenizer_model("none")
        if cfg.bos_token_id is not None:
            w.add_bos_token_id(cfg.bos_token_id)
        if cfg.eos_token_ids:
            w.add_eos_token_id(cfg.eos_token_ids[0])
        return
    folder = Path(folder)
    try:
        tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        cfg_file = folder / "tokenizer_config.json"
        tc = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"unreadable tokenizer files: {e}", file=str(folder)) from None
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise CheckpointError(f"tokenizer model {model.get('type')!r} is not BPE", file=str(folder / "tokenizer.json"))
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(cfg.vocab_size):
        if i in added:
            text = added[i]["content"]
            # llama.cpp's converter makes CONTROL tokens of the special ones and of any that look special
            special = added[i]["special"] or (text[:2] in ("<|", "<｜") and text[-2:] in ("|>", "｜>"))
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("deepseek-v3")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    ids = {t: i for i, t in enumerate(tokens)}
    for key, add in (("bos_token", w.add_bos_token_id), ("eos_token", w.add_eos_token_id),
                     ("pad_token", w.add_pad_token_id)):
        tok = tc.get(key)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if tok in ids:
            add(ids[tok])
    w.add_add_bos_token(bool(tc.get("add_bos_token", False)))
    w.add_add_eos_token(bool(tc.get("add_eos_token", False)))
    if isinstance(tc.get("chat_template"), str):
        w.add_chat_template(tc["chat_template"])
