"""GPU-resident experts (experts.ggml_cpu `gpu_experts`, ops/experts_resident.py) and the routing
counts that choose them (hybrid_r1/calibration.py, `hybrid-r1 calibrate`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SMALL_VOCAB, needs_cuda, random_ids, rel_err

import hybrid_r1
from hybrid_r1.calibration import CalibrationError, RoutingCounts, count_routing
from hybrid_r1.ops.experts_resident import split_slots
from hybrid_r1.placement import RuleError, rules_from
from hybrid_r1.synth import SyntheticWeights, preset_config

RULES = Path(__file__).resolve().parent.parent / "rules" / "int8-gpu-ggml-experts.yaml"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from hybrid_r1.formats.gguf_writer import write_gguf_from_checkpoint

    cfg = preset_config("tiny", vocab_size=SMALL_VOCAB, q_lora_rank=128)
    (gguf,) = write_gguf_from_checkpoint(SyntheticWeights(cfg, seed=3), tmp_path_factory.mktemp("g") / "m.gguf",
                                         type_mix="Q8_0")
    return gguf


def test_split_slots_add_up_to_the_routing():
    g = torch.Generator().manual_seed(1)
    E, T, k = 16, 40, 4
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=g)
    resident = [1, 4, 5, 9, 12, 13, 14]
    slot_of = torch.full((E,), -1, dtype=torch.int32)
    slot_of[resident] = torch.arange(len(resident), dtype=torch.int32)
    idx[0] = torch.tensor([4, 5, 9, 12])  # a token whose experts are all resident
    cpu_idx, cpu_w, gpu_idx, gpu_w = split_slots(idx, w, slot_of, cold=15)
    res = torch.isin(idx, torch.tensor(resident))
    assert torch.equal(cpu_w, w.masked_fill(res, 0)) and torch.equal(gpu_w, w.masked_fill(~res, 0))
    assert torch.equal(torch.tensor(resident)[gpu_idx][res], idx[res])  # the resident index of each
    assert not torch.isin(cpu_idx, torch.tensor(resident)).any()  # the CPU side never names a resident
    assert torch.equal(cpu_idx[0], torch.full((k,), 15))  # no CPU expert: the cold one, weight 0
    for t in range(1, T):  # otherwise a filler is one of the token's own CPU experts
        own = set(idx[t][~res[t]].tolist())
        assert set(cpu_idx[t].tolist()) <= own | {15} and (not own or set(cpu_idx[t].tolist()) <= own)
    # the two sides weight every (token, expert) exactly as the routing does
    dense = torch.zeros(T, E).scatter_add_(1, idx, w)
    split = torch.zeros(T, E).scatter_add_(1, cpu_idx, cpu_w)
    split[:, resident] += torch.zeros(T, len(resident)).scatter_add_(1, gpu_idx.long(), gpu_w)
    assert torch.equal(dense, split)


def test_calibration_counts_every_choice_deterministically(tiny_gguf, tmp_path):
    rt = hybrid_r1.load(tiny_gguf, device="cpu")
    ids = random_ids(48, seed=2)
    a, b = count_routing(rt, ids, chunk=16), count_routing(rt, ids)
    cfg = rt.config
    moe = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    assert sorted(a.layers) == moe and a.tokens == 48
    assert all(sum(c) == 48 * cfg.num_experts_per_tok for c in a.layers.values())
    assert a.layers == b.layers  # chunking changes nothing (each chunk's routing is the full pass's)
    path = a.save(tmp_path / "hot.json")
    back = RoutingCounts.load(path)
    assert back == a
    top = back.hottest(moe[0], 5)
    counts = a.layers[moe[0]]
    assert len(top) == 5 and min(counts[e] for e in top) >= max(counts[e] for e in range(cfg.n_routed_experts)
                                                             if e not in top)
    with pytest.raises(Exception, match="exists"):
        a.save(path)


def test_calibration_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"tokens": 3, "n_experts": 4, "layers": {"1": [1, 2]}}))
    with pytest.raises(CalibrationError, match="bad.json: expected"):
        RoutingCounts.load(bad)
    bad.write_text("{not json")
    with pytest.raises(CalibrationError, match="bad.json: not a routing-count file"):
        RoutingCounts.load(bad)
    with pytest.raises(CalibrationError, match="no layer 7"):
        RoutingCounts(1, 2, {1: [1, 0]}).hottest(7, 1)


def test_resident_rule_arguments_are_checked(tmp_path):
    def rule(args):
        return rules_from([{"name": r"mlp\.experts$", "op": "experts.ggml_cpu", "device": "cpu", "args": args}])

    with pytest.raises(RuleError, match="gpu_experts"):
        rule({"gpu_experts": -1})
    with pytest.raises(RuleError, match="hot_experts.*no such file"):
        rule({"gpu_experts": 4, "hot_experts": str(tmp_path / "missing.json")})
    with pytest.raises(RuleError, match="gpu_device"):
        rule({"gpu_experts": 4, "gpu_device": "cpu"})
    assert rule({"gpu_experts": 4, "overlap": True})  # resident and overlapped go together


def test_resident_with_overlap_picks_the_graph_safe_operator():
    from hybrid_r1.loading import build
    from hybrid_r1.ops.experts_ggml import GGMLArgs, GGMLExperts
    from hybrid_r1.ops.experts_resident import OverlappedResidentGGMLExperts, ResidentGGMLExperts

    cfg = preset_config("tiny", vocab_size=SMALL_VOCAB)
    experts = build(cfg).model.layers[1].mlp.experts
    op = GGMLExperts.from_module(experts, args=GGMLArgs(gpu_experts=4, overlap=True))
    assert type(op) is OverlappedResidentGGMLExperts
    assert op.graph_safe and not op.host_sync and op.host_work and op.runs_beside and op.gpu_count == 4
    plain = GGMLExperts.from_module(experts, args=GGMLArgs(gpu_experts=4))
    assert type(plain) is ResidentGGMLExperts and not plain.graph_safe


def test_calibrate_command(tmp_path, capsys):
    from hybrid_r1.cli import main
    from hybrid_r1.formats.gguf_writer import write_gguf_from_checkpoint
    from hybrid_r1.tokenizer import write_r1_tokenizer_files

    cfg = preset_config("tiny", q_lora_rank=128)  # the real vocabulary, and the R1 tokenizer in the GGUF
    (gguf,) = write_gguf_from_checkpoint(SyntheticWeights(cfg, seed=3), tmp_path / "m.gguf", type_mix="Q8_0",
                                         tokenizer_dir=write_r1_tokenizer_files(tmp_path / "tok"))
    text = tmp_path / "sample.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    out = tmp_path / "hot.json"
    assert main(["calibrate", "--model", str(gguf), "--device", "cpu", "--text", str(text), "--out", str(out)]) == 0
    counts = RoutingCounts.load(out)
    assert counts.tokens > 40 and sum(counts.layers[1]) == counts.tokens * cfg.num_experts_per_tok
    assert main(["calibrate", "--model", str(gguf), "--text", str(text), "--out", str(out)]) == 2  # no --force
    assert "exists" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert main(["calibrate", "--model", str(gguf), "--text", str(empty), "--out", str(out), "--force"]) == 2
    assert "empty" in capsys.readouterr().err


@needs_cuda
def test_resident_experts_match_the_cpu_placement(tiny_gguf, tmp_path):
    """Half of each layer's experts on the GPU (the hottest by a calibration on another text) against
    all on the CPU. Both compute the same Q8_0 weights: ggml with Q8_0 activations, the GPU with the
    weights requantized to block INT8 and int8 activations per 128-group; each rounding is ~0.5-1%
    rms of a row (half a step of amax/127 on Gaussian-like values), so an expert's output differs by
    ~1-2%; 5e-2 on the logits' relative L2 leaves room for three layers of that, a wrong split or a
    lost slot is O(1)."""
    cpu_rt = hybrid_r1.load(tiny_gguf, rules=RULES)
    counts = count_routing(cpu_rt, random_ids(64, seed=9))
    hot = counts.save(tmp_path / "hot.json")
    ids = random_ids(20, seed=4)
    want = cpu_rt.logits(ids).cpu()
    want_gen = list(cpu_rt.generate(ids, max_new_tokens=12, stop=[]))
    del cpu_rt
    rules = [{"name": r"^model\.layers\.\d+\.mlp\.experts$", "op": "experts.ggml_cpu", "device": "cpu",
              "args": {"gpu_experts": 8, "hot_experts": str(hot)}},
             *[r for r in __import__("yaml").safe_load(RULES.read_text()) if "experts" not in r["name"]]]
    rt = hybrid_r1.load(tiny_gguf, rules=rules)
    op = rt.module.model.layers[1].mlp.experts
    assert op.resident is not None and op.resident.expert_ids == counts.hottest(1, 8)
    got_decode = []
    cache = rt.new_cache()
    gen = rt.generate(ids, max_new_tokens=12, stop=[], cache=cache)
    got = rt.logits(ids).cpu()
    assert rel_err(got, want) < 5e-2
    # decode goes through the split path: its tokens follow the CPU placement's while the logits
    # agree (a random model's near-ties may part them later: compare the first few)
    got_decode = list(gen)
    assert got_decode[:4] == want_gen[:4]


@needs_cuda
@torch.inference_mode()
def test_overlapped_resident_decode_is_one_graph_and_follows_the_serial_split(tiny_gguf):
    """gpu_experts with overlap: true against gpu_experts alone, on the same 8 resident experts: the
    same split and the same kernels; the overlapped side rounds the GPU part (resident + shared) to
    bf16 once more before adding the CPU's, one bf16 rounding (2^-8 relative) per MoE layer, so
    2^-6 on the logits' relative L2 (three layers, with room); a lost slot or a wrong split is O(1)."""
    import yaml

    from hybrid_r1.generate import prefill
    from hybrid_r1.graphs import DecodeGraphs
    from hybrid_r1.ops.experts_resident import OverlappedResidentGGMLExperts

    base = [r for r in yaml.safe_load(RULES.read_text()) if "experts" not in r["name"]]
    runs = {}
    for overlap in (False, True):
        rules = [{"name": r"^model\.layers\.\d+\.mlp\.experts$", "op": "experts.ggml_cpu", "device": "cpu",
                  "args": {"gpu_experts": 8, "overlap": overlap, "overlap_timeout_s": 10.0}}, *base]
        rt = hybrid_r1.load(tiny_gguf, rules=rules)
        ops = [m for m in rt.module.modules() if isinstance(m, OverlappedResidentGGMLExperts)]
        assert bool(ops) == overlap
        cache = rt.new_cache()
        runner = DecodeGraphs(rt.module, cache)
        logits = prefill(rt.module, random_ids(12, seed=6), cache)
        toks, seen = [], []
        for _ in range(16):
            toks.append(int(logits.argmax()))
            logits = runner.step(toks[-1]).clone()
            seen.append(logits)
        runs[overlap] = (toks, torch.stack(seen), runner.breaks)
        del rt, runner, cache
    (toks0, logits0, segs0), (toks1, logits1, segs1) = runs[False], runs[True]
    assert segs1 == 0 and segs0 > 0  # overlapped: no break at the experts
    assert not logits1.isnan().any()
    assert toks1[:4] == toks0[:4]  # later, a random model's near-ties may part the two runs' tokens
    assert rel_err(logits1[:4], logits0[:4]) <= 2**-6
