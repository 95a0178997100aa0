"""Bad input gets a clear error that names the file and the tensor (or config key) at fault."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import hybrid_r1
from hybrid_r1.config import ModelConfig
from hybrid_r1.errors import CheckpointError, ConfigError
from hybrid_r1.synth import PRESETS, SyntheticWeights, preset_config, write_checkpoint


@pytest.fixture
def small(tmp_path):
    """A one-layer dense checkpoint with a 64-token vocabulary, split into several shards."""
    cfg = preset_config("tiny", vocab_size=64, num_hidden_layers=1, first_k_dense_replace=1,
                        num_nextn_predict_layers=0)
    return write_checkpoint(tmp_path / "small", SyntheticWeights(cfg), tokenizer=False, shard_mb=0)


def shard_of(path, name):
    return path / json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][name]


def test_small_checkpoint_loads(small):
    assert torch.isfinite(hybrid_r1.load(small, device="cpu").logits([1, 2, 3])).all()


def test_missing_shard(small):
    name = "model.layers.0.self_attn.o_proj.weight"
    shard = shard_of(small, name)
    shard.unlink()
    with pytest.raises(CheckpointError, match="missing") as e:
        hybrid_r1.load(small)
    assert shard.name in str(e.value) and name in str(e.value)


def test_missing_tensor(small):
    index = small / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    name = "model.layers.0.mlp.up_proj.weight"
    shard = small / d["weight_map"].pop(name)
    index.write_text(json.dumps(d))
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match="missing") as e:
        hybrid_r1.load(small)
    assert name in str(e.value)


def test_index_points_at_a_shard_without_the_tensor(small):
    index = small / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    name = "model.norm.weight"
    d["weight_map"][name] = d["weight_map"]["model.embed_tokens.weight"]
    index.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="lacks it") as e:
        hybrid_r1.load(small)
    assert name in str(e.value)


def test_unexpected_shape(small):
    cfg = json.loads((small / "config.json").read_text())
    cfg["intermediate_size"] = 384  # the file's dense MLP has 512
    (small / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"shape \[512, 256\] does not match the model's \[384, 256\]") as e:
        hybrid_r1.load(small)
    assert "model.layers.0.mlp.gate_proj.weight" in str(e.value) and ".safetensors" in str(e.value)


def rewrite(small, name, value):
    shard = shard_of(small, name)
    tensors = load_file(shard)
    tensors[name] = value
    save_file(tensors, shard)
    return shard


def test_unexpected_dtype(small):
    name = "model.norm.weight"
    shard = rewrite(small, name, torch.ones(256, dtype=torch.int32))
    with pytest.raises(CheckpointError, match="unexpected dtype") as e:
        hybrid_r1.load(small)
    assert name in str(e.value) and shard.name in str(e.value)


def test_fp8_weight_without_scale(small):
    name = "model.layers.0.self_attn.o_proj.weight"
    rewrite(small, name, torch.zeros(256, 128).to(torch.float8_e4m3fn))
    with pytest.raises(CheckpointError, match="weight_scale_inv") as e:
        hybrid_r1.load(small)
    assert name in str(e.value)


def test_truncated_shard(small):
    name = "lm_head.weight"
    shard = shard_of(small, name)
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(CheckpointError, match="truncated") as e:
        hybrid_r1.load(small)
    assert shard.name in str(e.value)


def test_garbage_shard(small):
    shard = shard_of(small, "model.norm.weight")
    shard.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="header") as e:
        hybrid_r1.load(small)
    assert shard.name in str(e.value)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        hybrid_r1.load(tmp_path / "nothing.bin")
    (tmp_path / "nothing.bin").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        hybrid_r1.load(tmp_path / "nothing.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="config.json not found"):
        hybrid_r1.load(tmp_path / "empty")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"n_group": 3}, r"n_group \(3\) must divide n_routed_experts \(16\)"),
        ({"n_group": 16, "topk_group": 2}, "at least 2 experts"),
        ({"topk_group": 5}, r"topk_group \(5\) must be between 1 and n_group"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"qk_rope_head_dim": 15}, "even"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2}}, "dynamic"),
        ({"kv_lora_rank": None}, "missing required key.*kv_lora_rank"),
    ],
)
def test_config_validation(tmp_path, change, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**PRESETS["tiny"], **change}))
    with pytest.raises(ConfigError, match=message) as e:
        ModelConfig.from_file(path)
    assert str(path) in str(e.value)


def test_config_not_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON") as e:
        ModelConfig.from_file(path)
    assert str(path) in str(e.value)


def test_real_config_keys_accepted():
    cfg = ModelConfig.from_hf_dict({**PRESETS["full-slice"], "num_hidden_layers": 61, "first_k_dense_replace": 3})
    assert cfg.q_lora_rank == 1536 and cfg.is_moe_layer(3) and not cfg.is_moe_layer(2)
    assert abs(cfg.softmax_scale - 0.1352338) < 1e-6  # 192^-0.5 * mscale^2 (ARCHITECTURE.md)
    assert cfg.extra["model_type"] == "deepseek_v3"
