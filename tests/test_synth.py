"""Synthetic checkpoints: the real layout, deterministic, written safely."""

from __future__ import annotations

import json

import pytest
import torch

from hybrid_r1.formats.safetensors import SafetensorsCheckpoint
from hybrid_r1.synth import SyntheticWeights, main, preset_config, tensor_specs, write_checkpoint


def test_layout_matches_the_release(tiny_fp8_dir):
    ckpt = SafetensorsCheckpoint(tiny_fp8_dir)
    cfg = json.loads((tiny_fp8_dir / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    assert cfg["model_type"] == "deepseek_v3" and cfg["rope_scaling"]["type"] == "yarn"
    index = json.loads((tiny_fp8_dir / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all(s.endswith(f"-of-{len(shards):06d}.safetensors") for s in shards)
    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
    assert ckpt.dtype(name) == torch.float8_e4m3fn and ckpt.shape(name) == (80, 256)
    assert ckpt.shape("model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv") == (1, 2)
    assert ckpt.dtype("model.layers.1.mlp.gate.weight") == torch.bfloat16
    assert ckpt.dtype("model.layers.1.mlp.gate.e_score_correction_bias") == torch.float32
    assert ckpt.dtype("model.norm.weight") == torch.bfloat16
    assert ckpt.has("model.layers.4.eh_proj.weight")  # the MTP layer is there, to be skipped


def test_seeded_and_name_addressed():
    cfg = preset_config("tiny", vocab_size=64)
    a, b, c = SyntheticWeights(cfg, 0), SyntheticWeights(cfg, 0), SyntheticWeights(cfg, 1)
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    assert torch.equal(a.tensor(name), b.tensor(name))
    assert not torch.equal(a.tensor(name), c.tensor(name))
    w = a.tensor(name)
    assert 0.8 < w.std().item() * 256 ** 0.5 < 1.2  # unit-variance outputs for unit-variance inputs


def test_routing_is_not_a_coin_toss():
    """Sigmoid router scores must separate the chosen experts from the rest by a clear margin."""
    cfg = preset_config("tiny", vocab_size=64)
    w = SyntheticWeights(cfg, 0)
    x = torch.randn(256, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    s = torch.sigmoid(x @ w.tensor("model.layers.1.mlp.gate.weight").T)
    top = s.topk(cfg.num_experts_per_tok + 1, -1).values
    gap = top[:, -2] - top[:, -1]  # between the last chosen and the first rejected expert
    assert gap.median() > 0.01


def test_full_slice_preset_has_671b_widths():
    cfg = preset_config("full-slice", num_hidden_layers=2)
    names = {n: s for n, s, _ in tensor_specs(cfg)}
    assert names["model.layers.1.mlp.experts.255.gate_proj.weight"] == (2048, 7168)
    assert names["model.layers.0.mlp.down_proj.weight"] == (7168, 18432)
    assert names["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] == (576, 7168)
    assert names["model.layers.0.self_attn.kv_b_proj.weight"] == (32768, 512)


def test_refuses_to_overwrite_and_leaves_no_temporary(tmp_path, capsys):
    out = tmp_path / "ck"
    args = [str(out), "--no-tokenizer", "--set", "vocab_size=64", "--layers", "1", "--no-mtp"]
    assert main(args) == 0
    before = sorted(p.name for p in out.iterdir())
    assert main(args) == 2 and "--force" in capsys.readouterr().err
    assert main(args + ["--force", "--seed", "3"]) == 0
    assert sorted(p.name for p in out.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import hybrid_r1.synth as synth

    calls, real = [], synth._write_shard

    def failing_shard(path, specs, weights, fmt):  # the third shard fails (after its file was opened)
        calls.append(path)
        if len(calls) == 3:
            path.write_bytes(b"partial")
            raise OSError("disk full")
        return real(path, specs, weights, fmt)

    monkeypatch.setattr(synth, "_write_shard", failing_shard)
    cfg = preset_config("tiny", vocab_size=64, num_hidden_layers=1)
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(tmp_path / "x", SyntheticWeights(cfg), tokenizer=False, shard_mb=0)
    assert len(calls) == 3 and list(tmp_path.iterdir()) == []


def test_gguf_output_is_staged_and_stale_staging_is_removed(tmp_path):
    """A single-file output stages like a folder: a killed run's staging folder (its writer gone,
    no lock held) is removed by the next run for the same file; --force replaces in one rename."""
    from hybrid_r1.staging import OutputExistsError
    from hybrid_r1.synth import write_gguf

    cfg = preset_config("tiny", vocab_size=64, num_hidden_layers=1, num_nextn_predict_layers=0)
    stale = tmp_path / ".m.gguf.staging-999999"
    stale.mkdir()
    (stale / "m.gguf").write_bytes(b"half")
    out = write_gguf(tmp_path / "m.gguf", SyntheticWeights(cfg), tokenizer=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    first = out.read_bytes()
    with pytest.raises(OutputExistsError):
        write_gguf(out, SyntheticWeights(cfg, seed=1), tokenizer=False)
    write_gguf(out, SyntheticWeights(cfg, seed=1), tokenizer=False, force=True)
    assert out.read_bytes() != first and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
