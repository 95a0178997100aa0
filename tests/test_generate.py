"""Generation: greedy, seeded sampling, stop tokens, cache reuse across turns, interruption."""

from __future__ import annotations

import pytest
import torch

from conftest import random_ids
from hybrid_r1.generate import Sampling, sample


def test_greedy_is_argmax_of_logits(tiny_model):
    prompt = random_ids(10, seed=20)
    out = tiny_model.generate(prompt, max_new_tokens=6, stop=[])
    seq = list(prompt)
    for tok in out:
        assert tok == int(tiny_model.logits(seq)[-1].argmax())
        seq.append(tok)
    s = out.stats
    assert s.prompt_tokens == 10 and s.prefilled_tokens == 10 and s.new_tokens == 6
    assert s.prefill_tok_s > 0 and s.decode_tok_s > 0 and s.time_to_first_token_s > 0


def test_sampling_is_seeded_and_varied(tiny_model):
    prompt = random_ids(8, seed=21)
    kw = dict(max_new_tokens=12, temperature=1.5, stop=[])
    a = tiny_model.generate(prompt, seed=1, **kw)
    b = tiny_model.generate(prompt, seed=1, **kw)
    c = tiny_model.generate(prompt, seed=2, **kw)
    greedy = tiny_model.generate(prompt, max_new_tokens=12, stop=[])
    assert list(a) == list(b)
    assert list(a) != list(c) or list(a) != list(greedy)
    # top_k=1 and a vanishing top_p both collapse sampling onto the argmax.
    assert list(tiny_model.generate(prompt, seed=3, top_k=1, **kw)) == list(greedy)
    assert list(tiny_model.generate(prompt, seed=3, top_p=1e-6, **kw)) == list(greedy)


def test_sample_respects_top_k_and_top_p():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 2.8])
    g = torch.Generator().manual_seed(0)
    seen = {sample(logits, Sampling(temperature=1.0, top_k=2), g) for _ in range(200)}
    assert seen == {1, 2}
    p = logits.softmax(-1)
    # top_p just above p[1] keeps tokens 1 and 2 (2 crosses the threshold), never the others
    seen = {sample(logits, Sampling(temperature=1.0, top_p=float(p[1]) + 1e-3), g) for _ in range(200)}
    assert seen == {1, 2}
    with pytest.raises(ValueError):
        Sampling(temperature=-1)
    with pytest.raises(ValueError):
        Sampling(top_p=0)


def test_stop_tokens_and_max_new_tokens(tiny_model):
    prompt = random_ids(9, seed=22)
    free = tiny_model.generate(prompt, max_new_tokens=8, stop=[])
    stopped = tiny_model.generate(prompt, max_new_tokens=8, stop=[free[3]])
    first = list(free).index(free[3])
    assert list(stopped) == list(free[:first]) and stopped.stats.stop_reason == "stop"
    assert list(tiny_model.generate(prompt, max_new_tokens=0)) == []


def test_cache_reuse_across_turns_matches_fresh(tiny_model):
    turn1 = random_ids(12, seed=23)
    cache = tiny_model.new_cache()
    ans1 = tiny_model.generate(turn1, max_new_tokens=5, stop=[], cache=cache)
    turn2 = turn1 + list(ans1) + random_ids(6, seed=24)
    ans2 = tiny_model.generate(turn2, max_new_tokens=5, stop=[], cache=cache)
    # Everything before the new user text came from the cache (the last answer token was never fed).
    assert ans2.stats.prefilled_tokens == 6 + 1
    assert list(ans2) == list(tiny_model.generate(turn2, max_new_tokens=5, stop=[]))
    # An edited history is recomputed from the first differing token.
    turn2b = turn1[:4] + [7] + turn1[5:]
    ans3 = tiny_model.generate(turn2b, max_new_tokens=5, stop=[], cache=cache)
    assert ans3.stats.prefilled_tokens == len(turn2b) - 4
    assert list(ans3) == list(tiny_model.generate(turn2b, max_new_tokens=5, stop=[]))


def test_interrupt_keeps_cache_consistent(tiny_model):
    prompt = random_ids(10, seed=25)
    cache = tiny_model.new_cache()
    seen = []

    def on_token(tok):
        seen.append(tok)
        if len(seen) == 3:
            raise KeyboardInterrupt

    out = tiny_model.generate(prompt, max_new_tokens=20, stop=[], cache=cache, on_token=on_token)
    assert out.stats.stop_reason == "interrupted" and list(out) == seen
    assert cache.length == len(cache.tokens) == len(prompt) + 2
    nxt = prompt + list(out) + [11, 12]
    assert list(tiny_model.generate(nxt, max_new_tokens=4, stop=[], cache=cache)) == \
        list(tiny_model.generate(nxt, max_new_tokens=4, stop=[]))
