"""Thread counts: bounded by the CPUs this process may use, chosen for torch and ggml together."""

from __future__ import annotations

import os

import pytest
import torch

from hybrid_r1 import threads
from hybrid_r1.errors import InputError
from hybrid_r1.ops.experts_ggml import GGMLExperts


def test_usable_cpus_follow_the_affinity_mask():
    assert threads.usable_cpus() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("value, message", [(0, ">= 1"), (True, "integer"), (2.5, "integer"), ("4", "integer"),
                                            (100000, "more than"), (2**31, "more than")])
def test_bounds(value, message):
    with pytest.raises(InputError, match=message):
        threads.check_threads(value)
    with pytest.raises(ValueError, match=message):  # the operator refuses it before ggml sees it
        GGMLExperts(4, 256, 256, threads=value)


def test_bound_is_four_per_usable_cpu(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert threads.check_threads(12) == 12
    with pytest.raises(InputError, match="this process may use 3 CPUs"):
        threads.check_threads(13)


def test_choice(monkeypatch):
    monkeypatch.setattr(threads, "physical_cores", lambda: 6)
    monkeypatch.setattr(threads, "usable_cpus", lambda: 12)
    small, wide, asked = threads.choose(256), threads.choose(7168), threads.choose(7168, requested=3)
    assert (small.torch, small.ggml) == (1, 6) and (wide.torch, wide.ggml) == (6, 6) and (asked.torch, asked.ggml) == (3, 3)
    assert "torch 1, ggml 6" in small.describe() and "--threads" in asked.describe()


def test_apply_sets_torch_and_ggml_but_not_where_a_rule_did(tmp_path):
    import hybrid_r1
    from conftest import SMALL_VOCAB
    from hybrid_r1.synth import SyntheticWeights, preset_config, write_gguf

    cfg = preset_config("tiny", vocab_size=SMALL_VOCAB)
    path = write_gguf(tmp_path / "t.gguf", SyntheticWeights(cfg, seed=4), tokenizer=False)
    experts = "experts.ggml_cpu"
    model = hybrid_r1.load(path, device="cpu", rules=[
        {"name": r"^model\.layers\.1\.mlp\.experts$", "op": experts, "device": "cpu", "args": {"threads": 1}},
        {"name": r"\.mlp\.experts$", "op": experts, "device": "cpu"}])
    before = torch.get_num_threads()
    try:
        threads.apply(threads.ThreadChoice(1, 3, "test"), model)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    got = {p: m.threads for p, m in model.module.named_modules() if isinstance(m, GGMLExperts)}
    assert got == {f"model.layers.{i}.mlp.experts": 1 if i == 1 else 3 for i in range(1, cfg.num_hidden_layers)}
