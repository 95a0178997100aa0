"""Prefill chunks chosen from the memory (prefill_chunk.py), and long chunks through the blocked
naive attention, against one pass (fp32, CPU, tiny model).

Every path shares the weights and differs only in summation order (query blocks, keys cut at the
causal end, the cached latents expanded per chunk), so they agree to ~1e-6: the bound is
test_attention.py's 1e-5 relative L2."""

from __future__ import annotations

import pytest
import torch

from conftest import random_ids, rel_err
from hybrid_r1 import model as model_math
from hybrid_r1 import prefill_chunk
from hybrid_r1.generate import prefill
from hybrid_r1.synth import preset_config


def test_chunk_size_from_memory():
    cfg = preset_config("full-slice", num_hidden_layers=61)
    new, context = prefill_chunk.per_token_bytes(cfg)
    # An 8K prompt is one pass with the ~60 GB an 80 GB GPU keeps free next to the non-expert weights.
    assert prefill_chunk.chunk_size(cfg, 8192, 60 << 30) == 8192
    for tokens, free in ((32768, 20 << 30), (20000, 8 << 30), (5000, 3 << 30)):
        chunk = prefill_chunk.chunk_size(cfg, tokens, free)
        passes = -(-tokens // chunk)
        fit = prefill_chunk.fitting_tokens(cfg, free, tokens, tokens)
        assert passes > 1 and chunk <= fit  # split, each pass fits ...
        assert -(-tokens // fit) == passes  # ... in no more passes than needed, of equal size
        assert tokens - (passes - 1) * chunk > chunk - passes  # the last is not a sliver
        needed = prefill_chunk.SAFETY * (new * chunk + context * tokens + model_math._NAIVE_SCORE_BYTES)
        assert needed <= free or fit == prefill_chunk.MIN_CHUNK  # too tight: the smallest chunk
    assert prefill_chunk.chunk_size(cfg, 100, 1 << 20) == 100  # short prompts: one pass even when tight
    with pytest.raises(ValueError, match="at least one token"):
        prefill_chunk.chunk_size(cfg, 0, 1 << 30)


def test_prefill_picks_one_pass_and_matches_chunks(tiny_model):
    ids = random_ids(300, seed=11)
    module = tiny_model.module
    one = tiny_model.logits(ids)[-1]
    cache = tiny_model.new_cache()
    calls = []
    forward = module.forward
    module.forward = lambda tokens, *a, **k: calls.append(tokens.shape[1]) or forward(tokens, *a, **k)
    try:
        auto = prefill(module, ids, cache)
    finally:
        del module.forward
    assert calls == [300] and cache.length == 300  # the tiny model's 300 tokens fit in one pass
    assert rel_err(auto, one) <= 1e-5
    # chunks of 150 (>= NAIVE_MIN_TOKENS: naive over the cache too) and of 100 (absorbed after the first)
    assert 100 < model_math.NAIVE_MIN_TOKENS <= 150
    for chunk in (150, 100):
        assert rel_err(prefill(module, ids, tiny_model.new_cache(), chunk), one) <= 1e-5


def test_naive_attention_in_query_blocks(tiny_model, monkeypatch):
    ids = random_ids(200, seed=12)
    whole = tiny_model.logits(ids, mode="naive")
    cfg = tiny_model.config
    # blocks of 7 query rows: the keys of each block end at its last query's slot
    monkeypatch.setattr(model_math, "_NAIVE_SCORE_BYTES", 4 * cfg.num_attention_heads * 200 * 7)
    blocked = tiny_model.logits(ids, mode="naive")
    chunked = tiny_model.logits(ids, chunk=130, mode="naive")  # blocks attending to a cache
    assert rel_err(blocked, whole) <= 1e-5 and rel_err(chunked, whole) <= 1e-5
    assert not torch.equal(blocked, whole)  # the blocked path ran (another summation order)
