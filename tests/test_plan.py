"""hybrid-r1 plan: what runs where and the memory each device needs, checked against sizes computed
independently from the config (the 671B model) and against a real file's tensor sizes."""

from __future__ import annotations

from pathlib import Path

import torch

from hybrid_r1 import placement
from hybrid_r1.cli import main
from hybrid_r1.loading import build, open_checkpoint
from hybrid_r1.plan import memory_plan, placement_table
from hybrid_r1.synth import SyntheticWeights, preset_config

RULES = Path(__file__).resolve().parent.parent / "rules"


def _671b():
    return preset_config("full-slice", num_hidden_layers=61, first_k_dense_replace=3)


def test_671b_vram_under_the_default_rules_matches_the_parameter_count():
    cfg = _671b()
    module = build(cfg)
    placed = placement.apply(module, placement.load_rules(RULES / "int8-gpu-ggml-experts.yaml"),
                             torch.device("cuda"), torch.bfloat16)
    context = 32768
    plan = memory_plan(module, None, torch.bfloat16, context)

    # Independently, from the config: INT8 weight bytes + fp32 128x128 block scales of every Linear
    # in the layers (kv_b_proj excepted), BF16 for kv_b, embeddings, lm_head and norms, the router
    # in fp32; the cache holds kv_lora_rank + qk_rope_head_dim BF16 values per token per layer.
    def int8(n, k):
        return n * k + 4 * (-(-n // 128)) * (-(-k // 128))

    h, heads = cfg.hidden_size, cfg.num_attention_heads
    attn = (int8(cfg.q_lora_rank, h) + int8(heads * cfg.qk_head_dim, cfg.q_lora_rank)
            + int8(cfg.kv_lora_rank + cfg.qk_rope_head_dim, h) + int8(h, heads * cfg.v_head_dim))
    kv_b = cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim) * 2
    norms = (2 * h + cfg.q_lora_rank + cfg.kv_lora_rank) * 2
    dense = 2 * int8(cfg.intermediate_size, h) + int8(h, cfg.intermediate_size)
    shared_i = cfg.moe_intermediate_size * cfg.n_shared_experts
    shared = 2 * int8(shared_i, h) + int8(h, shared_i)
    router = (cfg.n_routed_experts * h + cfg.n_routed_experts) * 4
    n_moe = cfg.num_hidden_layers - cfg.first_k_dense_replace
    want = (cfg.num_hidden_layers * (attn + kv_b + norms) + cfg.first_k_dense_replace * dense
            + n_moe * (shared + router) + 2 * cfg.vocab_size * h * 2 + h * 2)
    assert plan.weights["cuda"] == want
    assert plan.cache["cuda"] == context * 576 * 2 * 61  # 2.15 GiB
    assert 18.5 * 2**30 < want < 19.5 * 2**30  # 18.9 GiB: what a user's 24 GB+ GPU must hold
    # the routed experts stay in CPU RAM: Q4_K gate/up and Q4_K/Q6_K down, about 367 GiB
    assert 360 * 2**30 < plan.weights["cpu"] < 375 * 2**30 and "cpu" not in plan.cache
    rows = {(r.what, r.device): r for r in placement_table(module, placed, torch.bfloat16)}
    assert rows["experts.ggml_cpu", "cpu"].count == 58 and rows["experts.ggml_cpu", "cpu"].layers == "3-60"
    assert rows["linear.int8_block", "cuda"].layers == "0-60"


def test_plan_reads_a_files_real_sizes(tmp_path):
    from hybrid_r1.formats.gguf_writer import write_gguf_from_checkpoint

    cfg = preset_config("tiny", vocab_size=1024, num_hidden_layers=3)
    (gguf,) = write_gguf_from_checkpoint(SyntheticWeights(cfg, seed=2), tmp_path / "m.gguf", type_mix="Q4_K_M")
    source = open_checkpoint(gguf)
    module = build(source.config)
    placement.apply(module, placement.default_rules(source, "cpu"), torch.device("cpu"), torch.float32)
    plan = memory_plan(module, source, torch.float32, 100)
    experts = sum(t.data.nbytes for layer in (1, 2) for t in source.ggml_experts(layer).values())
    assert plan.by_kind["cpu", "experts.ggml_cpu"] == experts
    assert plan.cache["cpu"] == 100 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4 * 3


def test_plan_command(tiny_dir, capsys):
    assert main(["plan", "--model", str(tiny_dir), "--context", "1000"]) == 0
    out = capsys.readouterr().out
    assert "the rules a load without --rules uses" in out and "memory" in out and "cache" in out
    assert main(["plan", "--rules", str(RULES / "int8-gpu-ggml-experts.yaml")]) == 0
    out = capsys.readouterr().out
    assert "the 671B config" in out and "experts.ggml_cpu" in out and "linear.int8_block" in out
