"""CUDA-graph decode (hybrid_r1/graphs.py).

On the CPU the runner's static step (cache slots and mask from fixed tensors, attention over the
whole reservation) runs eagerly and must give the eager decode's logits: same math, the extra
reserved slots masked out; only the softmax's summation order differs (rel 1e-5, fp32). On a GPU
the captured graphs must give the same tokens as eager decoding, for a BF16 model, an INT8 (Triton)
model and the hybrid placement (CPU experts between graphs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import hybrid_r1
from conftest import needs_cuda, random_ids, rel_err
from hybrid_r1.generate import forward_tokens, prefill
from hybrid_r1.graphs import DecodeGraphs

CUDA = torch.cuda.is_available()


def _eager_and_static(model, prompt, steps, headroom):
    eager, static = model.new_cache(), model.new_cache()
    runner = DecodeGraphs(model.module, static, use_graphs=False, headroom=headroom)
    le, ls = prefill(model.module, prompt, eager), prefill(model.module, prompt, static)
    pairs = []
    for _ in range(steps):
        tok = int(le.argmax())
        assert tok == int(ls.argmax())
        pairs.append((le, ls))
        le, ls = forward_tokens(model.module, [tok], eager)[-1], forward_tokens(model.module, [tok], static, graphs=runner)[-1]
    return eager, static, runner, pairs


@torch.inference_mode()
def test_static_step_matches_eager_with_growth(tiny_model):
    # headroom 3: the reservation is outgrown, rebuilt and the mask resynced several times
    eager, static, runner, pairs = _eager_and_static(tiny_model, random_ids(10, seed=1), 12, headroom=3)
    for le, ls in pairs:
        assert rel_err(ls, le) < 1e-5
    assert static.tokens == eager.tokens and static.length == eager.length
    assert static.capacity >= static.length


@torch.inference_mode()
def test_static_step_after_a_new_turn(tiny_model):
    # A second turn truncates the cache to the shared prefix and prefills eagerly into the same
    # buffers: the runner must notice the length change and rebuild its mask.
    model = tiny_model
    _, static, runner, _ = _eager_and_static(model, random_ids(8, seed=2), 5, headroom=64)
    keep = 6
    static.truncate(keep)
    turn2 = random_ids(7, seed=3)
    ls = prefill(model.module, turn2, static)
    fresh = model.new_cache()
    le = prefill(model.module, static.tokens[:keep] + turn2, fresh)
    for _ in range(4):
        assert rel_err(ls, le) < 1e-5
        tok = int(le.argmax())
        ls, le = forward_tokens(model.module, [tok], static, graphs=runner)[-1], forward_tokens(model.module, [tok], fresh)[-1]


@needs_cuda
@pytest.mark.parametrize("kw", [{}, {"quantize": "block"}, {"quantize": "channel"}], ids=["bf16", "block", "channel"])
def test_cuda_graphs_same_tokens_as_eager(tiny_dir, kw):
    model = hybrid_r1.load(tiny_dir, device="cuda", **kw)
    prompt = random_ids(20, seed=4)
    runs = []
    for graphs in (False, True):  # two chat turns each; the second reuses the cache's prefix
        cache = model.new_cache()
        first = model.generate(prompt, max_new_tokens=24, stop=[], cuda_graphs=graphs, cache=cache)
        turn2 = prompt + list(first)[:3] + random_ids(5, seed=7)
        second = model.generate(turn2, max_new_tokens=8, stop=[], cuda_graphs=graphs, cache=cache)
        runs.append((list(first), list(second), cache))
    assert runs[1][:2] == runs[0][:2]
    graphs = model.decode_graphs(runs[1][2])
    assert graphs is not None and graphs.use_graphs and len(graphs.segments) > 1  # a graph per segment
    assert model.decode_graphs(runs[0][2]) is None


@needs_cuda
def test_cuda_graph_replay_equals_static_eager(tiny_dir):
    # Replaying must reproduce the eager run of the same static step bit for bit (same kernels).
    model = hybrid_r1.load(tiny_dir, device="cuda")
    prompt = random_ids(16, seed=5)
    outs = []
    for use in (False, True):
        cache = model.new_cache()
        runner = DecodeGraphs(model.module, cache, use_graphs=use)
        logits = prefill(model.module, prompt, cache)
        seq = []
        for _ in range(6):
            tok = int(logits.argmax())
            logits = runner.step(tok).clone()
            seq.append(logits)
        outs.append(torch.stack(seq))
    assert torch.equal(outs[0], outs[1])


@needs_cuda
def test_cuda_graphs_hybrid_rules(tmp_path):
    from conftest import SMALL_VOCAB
    from hybrid_r1.formats.gguf_writer import write_gguf_from_checkpoint
    from hybrid_r1.synth import SyntheticWeights, preset_config

    cfg = preset_config("tiny", vocab_size=SMALL_VOCAB, q_lora_rank=128)
    (gguf,) = write_gguf_from_checkpoint(SyntheticWeights(cfg, seed=3), tmp_path / "m.gguf", type_mix="Q8_0")
    rules = Path(__file__).resolve().parent.parent / "rules" / "int8-gpu-ggml-experts.yaml"
    model = hybrid_r1.load(gguf, rules=rules)
    prompt = random_ids(12, seed=6)
    cache = model.new_cache()
    graphed = model.generate(prompt, max_new_tokens=16, stop=[], cache=cache)
    eager = model.generate(prompt, max_new_tokens=16, stop=[], cuda_graphs=False)
    assert list(graphed) == list(eager)
    runner = model.decode_graphs(cache)
    n_moe = sum(1 for b in model.module.model.layers if model.config.is_moe_layer(b.self_attn.layer))
    assert runner.use_graphs and runner.breaks == n_moe and len(runner.segments) == 2 * n_moe + 1  # graph, CPU experts, ..., graph



def test_graphs_only_for_one_gpu(tiny_model):
    # CPU models, and models whose non-expert modules span devices, decode eagerly (no runner).
    from hybrid_r1.graphs import unsupported

    assert unsupported(tiny_model.module) == "the modules captured are not all on one GPU"
    assert tiny_model.decode_graphs(tiny_model.new_cache(), create=True) is None
