"""Placement rules: parsing, first match wins, device inheritance, operator replacement, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from hybrid_r1.loading import build
from hybrid_r1.ops.linear_int8 import Int8BlockLinear
from hybrid_r1.placement import RuleError, apply, load_rules, parse_rules
from hybrid_r1.synth import preset_config

RULES = Path(__file__).resolve().parent.parent / "rules"


def meta_model():
    return build(preset_config("tiny", vocab_size=64))


def test_first_match_wins_and_devices_inherit():
    model = meta_model()
    rules = parse_rules([
        {"name": r"\.kv_b_proj$", "device": "cpu:1"},
        {"name": r"^model\.layers\.\d+\.", "class": "Linear", "op": "linear.int8_block"},
        {"name": r"^model\.layers\.[23]\.", "device": "cpu:2"},
    ])
    placed = apply(model, rules, torch.device("cpu"), torch.float32)
    attn = model.model.layers[2].self_attn
    assert isinstance(attn.q_a_proj, Int8BlockLinear) and attn.q_a_proj.device == torch.device("cpu:2")
    assert isinstance(model.model.layers[0].self_attn.o_proj, Int8BlockLinear)
    assert model.model.layers[0].self_attn.o_proj.device == torch.device("cpu")
    assert isinstance(attn.kv_b_proj, nn.Linear) and attn.kv_b_proj.placement_device == torch.device("cpu:1")
    assert isinstance(model.lm_head, nn.Linear)  # outside the layers: untouched
    assert model.model.layers[3].mlp.gate.placement_device == torch.device("cpu:2")
    ops = {p.path: p.op for p in placed if p.op}
    assert ops["model.layers.1.mlp.experts.7.down_proj"] == "linear.int8_block"
    assert "model.layers.1.self_attn.kv_b_proj" not in ops


def test_class_only_rule_and_op_type_check():
    model = meta_model()
    apply(model, parse_rules([{"class": "Experts", "device": "cpu:3"}]), torch.device("cpu"), torch.float32)
    assert model.model.layers[1].mlp.experts[0].gate_proj.placement_device == torch.device("cpu:3")
    with pytest.raises(RuleError, match=r"rules rule 1: op linear.int8_block replaces a Linear, but model.layers.0.mlp is a MLP"):
        apply(meta_model(), parse_rules([{"name": r"mlp$", "op": "linear.int8_block"}]), torch.device("cpu"), torch.float32)
    with pytest.raises(RuleError, match="bad args for linear.int8_block"):
        apply(meta_model(), parse_rules([{"class": "Linear", "name": "o_proj", "op": "linear.int8_block",
                                          "args": {"nonsense": 1}}]), torch.device("cpu"), torch.float32)
    with pytest.raises(RuleError, match="rules rule 1: bad args for experts.ggml_cpu: prefill_device must be a CUDA"):
        apply(meta_model(), parse_rules([{"class": "Experts", "op": "experts.ggml_cpu", "device": "cpu",
                                          "args": {"prefill_device": "cpu"}}]), torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("rule, message", [
    ({"name": "(", "op": "linear.int8_block"}, "bad regex"),
    ({"name": "x", "op": "linear.fp4"}, "unknown op 'linear.fp4'"),
    ({"name": "x", "devise": "cpu"}, "unknown key"),
    ({"op": "linear.int8_block"}, "needs `name` or `class`"),
    ({"name": "x", "device": "tpu:9"}, "bad device"),
    ({"name": "x", "args": [1]}, "args must be a mapping"),
])
def test_bad_rules_name_the_rule(rule, message):
    with pytest.raises(RuleError, match=f"my.yaml rule 2: .*{message}"):
        parse_rules([{"name": "ok"}, rule], where="my.yaml")


def test_rule_files(tmp_path):
    for f in RULES.glob("*.yaml"):
        assert load_rules(f)  # every shipped rule file parses
    bad = tmp_path / "bad.yaml"
    bad.write_text("- name: [unclosed\n")
    with pytest.raises(RuleError, match="bad.yaml: not valid YAML"):
        load_rules(bad)
    with pytest.raises(RuleError, match="rule file not found"):
        load_rules(tmp_path / "missing.yaml")
    (tmp_path / "map.yaml").write_text("name: x\n")
    with pytest.raises(RuleError, match="a YAML list"):
        load_rules(tmp_path / "map.yaml")


def test_default_rule_file_places_experts_on_cpu_and_rest_on_gpu():
    model = meta_model()
    placed = apply(model, load_rules(RULES / "int8-gpu-ggml-experts.yaml"), torch.device("cpu"), torch.bfloat16)
    by_path = {p.path: p for p in placed}
    assert by_path["model.layers.1.mlp.experts"].op == "experts.ggml_cpu"
    assert by_path["model.layers.1.mlp.experts"].device == torch.device("cpu")
    assert by_path["model.layers.0.mlp.gate_proj"].op == "linear.int8_block"
    assert by_path["model.layers.0.mlp.gate_proj"].device == torch.device("cuda")
    assert by_path["model.layers.2.self_attn.kv_b_proj"].op is None
    assert model.lm_head.placement_device == torch.device("cuda")


def test_rules_on_a_gguf_model_run_on_the_cpu(tmp_path):
    """ggml experts plus INT8 linears, all on the CPU, from a GGUF file: runs and stays finite."""
    import hybrid_r1
    from hybrid_r1.formats.gguf_writer import write_gguf_from_checkpoint
    from hybrid_r1.synth import SyntheticWeights

    cfg = preset_config("tiny", vocab_size=64, num_hidden_layers=2)
    (gguf,) = write_gguf_from_checkpoint(SyntheticWeights(cfg, seed=4), tmp_path / "m.gguf", type_mix="Q8_0")
    rules = [{"name": r"^model\.layers\.\d+\.mlp\.experts$", "op": "experts.ggml_cpu", "device": "cpu"}]
    model = hybrid_r1.load(gguf, device="cpu", rules=rules + [{"name": r"^model\.layers\.", "class": "Linear",
                                                 "op": "linear.int8_channel", "device": "cpu"}])
    ops = {p.op for p in model.placements}
    assert {"experts.ggml_cpu", "linear.int8_channel"} <= ops
    assert torch.isfinite(model.logits([1, 2, 3, 4])).all()


@pytest.mark.parametrize("file, linear", [("int8-gpu-ggml-experts.yaml", "linear.int8_block"),
                                          ("int8-channel-gpu-ggml-experts.yaml", "linear.int8_channel"),
                                          ("bf16-gpu-ggml-experts.yaml", None)])
def test_shipped_gpu_rule_files(file, linear):
    model = meta_model()
    by_path = {p.path: p for p in apply(model, load_rules(RULES / file), torch.device("cpu"), torch.bfloat16)}
    assert by_path["model.layers.1.mlp.experts"].op == "experts.ggml_cpu"
    assert by_path["model.layers.1.mlp.experts"].device == torch.device("cpu")
    attn = model.model.layers[2].self_attn
    if linear:
        assert by_path["model.layers.2.self_attn.o_proj"].op == linear
        assert by_path["model.layers.0.mlp.down_proj"].op == linear
        assert isinstance(attn.kv_b_proj, nn.Linear)  # dense: read as a matrix by the absorbed attention
    else:
        assert isinstance(attn.o_proj, nn.Linear) and attn.o_proj.placement_device == torch.device("cuda")
    assert model.lm_head.placement_device == torch.device("cuda")


def test_cpu_rule_file_runs_a_gguf(tmp_path):
    import hybrid_r1
    from hybrid_r1.formats.gguf_writer import write_gguf_from_checkpoint
    from hybrid_r1.synth import SyntheticWeights

    cfg = preset_config("tiny", vocab_size=64, num_hidden_layers=2)
    (gguf,) = write_gguf_from_checkpoint(SyntheticWeights(cfg, seed=5), tmp_path / "m.gguf", type_mix="Q8_0")
    model = hybrid_r1.load(gguf, rules=RULES / "cpu-ggml-experts.yaml")
    assert {p.op for p in model.placements if p.op} == {"experts.ggml_cpu", "linear.int8_block"}
    assert torch.isfinite(model.logits([1, 2, 3, 4])).all()


def test_rules_checked_against_the_checkpoint(tiny_dir, tmp_path, caplog):
    import hybrid_r1
    from hybrid_r1_merge_tools.quantize import quantize_checkpoint

    experts = [{"name": r"\.mlp\.experts$", "op": "experts.ggml_cpu", "device": "cpu"}]
    with pytest.raises(RuleError, match=r"rules rule 1: experts.ggml_cpu cannot run model.layers.1.mlp.experts: "
                                        "the checkpoint holds no GGML-quantized routed experts"):
        hybrid_r1.load(tiny_dir, device="cpu", rules=experts)
    channel = quantize_checkpoint(tiny_dir, tmp_path / "ch", "channel").output
    with pytest.raises(RuleError, match="stores this linear as INT8 with weight_scale .*use linear.int8_channel"):
        hybrid_r1.load(channel, device="cpu", rules=[{"class": "Linear", "name": "o_proj", "op": "linear.int8_block"}])
    with caplog.at_level("WARNING"):
        hybrid_r1.load(tiny_dir, device="cpu", rules=[{"name": "^model", "device": "cpu"}, {"name": "nothing"}])
    assert "rules rule 2 matches no module" in caplog.text
