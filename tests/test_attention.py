"""The cached and chunked paths compute the same function as one full pass (fp32, CPU); the long-
prompt attention (values padded for the flash kernel) against explicit scores.

All paths share the weights and differ only in summation order, so they agree to ~1e-6; the bound
1e-5 relative L2 is the same as against the transformers reference."""

from __future__ import annotations

import pytest
import torch

from conftest import needs_cuda, random_ids, rel_err
from hybrid_r1 import model as model_math
from hybrid_r1.cache import KVCache
from hybrid_r1.generate import forward_tokens


def test_absorbed_equals_naive(tiny_model):
    ids = random_ids(40, seed=5)
    naive = tiny_model.logits(ids, mode="naive")
    absorbed = tiny_model.logits(ids, mode="absorb")
    assert rel_err(absorbed, naive) <= 1e-5


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_chunked_prefill_equals_one_shot(tiny_model, chunk):
    ids = random_ids(37, seed=6)
    one = tiny_model.logits(ids)
    assert rel_err(tiny_model.logits(ids, chunk=chunk), one) <= 1e-5
    assert rel_err(tiny_model.logits(ids, chunk=chunk, mode="naive"), one) <= 1e-5


def test_cached_decode_step_equals_full_recompute(tiny_model):
    ids = random_ids(30, seed=7)
    cache = tiny_model.new_cache()
    forward_tokens(tiny_model.module, ids[:20], cache)
    steps = [forward_tokens(tiny_model.module, [t], cache)[-1] for t in ids[20:]]
    full = tiny_model.logits(ids)[20:]
    assert cache.length == 30 and cache.tokens == ids
    assert rel_err(torch.stack(steps), full) <= 1e-5
    # the compressed cache holds kv_lora_rank + rope dims per token per layer, nothing more
    cfg = tiny_model.config
    per_token = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert cache.nbytes() == per_token * 256  # capacity grows in steps of 256 tokens


def test_left_padded_batch_equals_single_sequences(tiny_model):
    a, b = random_ids(17, seed=8), random_ids(9, seed=9)
    pad = len(a) - len(b)
    tokens = torch.tensor([a, [3] * pad + b])
    valid = torch.ones(tokens.shape, dtype=torch.bool)
    valid[1, :pad] = False
    for mode in ("naive", "absorb"):
        with torch.inference_mode():
            out = tiny_model.module(tokens, KVCache(tiny_model.config.num_hidden_layers, batch=2), valid, mode=mode)
        assert torch.isfinite(out).all()
        assert rel_err(out[0], tiny_model.logits(a)) <= 1e-5
        assert rel_err(out[1, pad:], tiny_model.logits(b)) <= 1e-5


def test_padded_batch_decode_continues_each_row(tiny_model):
    a, b = random_ids(11, seed=10), random_ids(6, seed=11)
    pad = len(a) - len(b)
    cache = KVCache(tiny_model.config.num_hidden_layers, batch=2)
    valid = torch.ones(2, len(a), dtype=torch.bool)
    valid[1, :pad] = False
    nxt = [5, 7]
    with torch.inference_mode():
        tiny_model.module(torch.tensor([a, [0] * pad + b]), cache, valid)
        step = tiny_model.module(torch.tensor([[nxt[0]], [nxt[1]]]), cache)
    assert rel_err(step[0, 0], tiny_model.logits(a + [nxt[0]])[-1]) <= 1e-5
    assert rel_err(step[1, 0], tiny_model.logits(b + [nxt[1]])[-1]) <= 1e-5



def _causal_reference(q, k, v, scale):
    """fp32 attention with the causal mask aligned to the last key (explicit scores)."""
    t, s = q.shape[2], k.shape[2]
    scores = torch.einsum("bhtd,bhsd->bhts", q.float(), k.float()) * scale
    seen = torch.arange(s)[None, :] <= torch.arange(t)[:, None] + (s - t)
    scores = scores.masked_fill(~seen.to(q.device), float("-inf"))
    return torch.einsum("bhts,bhsd->bhtd", scores.softmax(-1), v.float())


def _mla_like(t, s, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, 4, n, 192, generator=g) for n in (t, s))
    v = torch.randn(1, 4, s, 128, generator=g)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


@pytest.mark.parametrize("t,s", [(37, 37), (37, 100)])
def test_padded_causal_attention_equals_masked_scores(t, s):
    # fp32 on the CPU: padding v with zeros and the lower-right alignment change nothing but
    # summation order (~1e-7); 1e-5 relative L2 as elsewhere in this file.
    q, k, v = _mla_like(t, s, torch.float32, "cpu", seed=t + s)
    out = model_math.causal_attention(q, k, v, 192**-0.5)
    assert out.shape == (1, 4, t, 128)
    assert rel_err(out, _causal_reference(q, k, v, 192**-0.5)) <= 1e-5


def test_naive_flash_branch_equals_query_blocks(tiny_model, monkeypatch):
    # MLA._naive's flash branch (one causal_attention call over the keys up to the chunk's last
    # query) against its query blocks with the explicit mask, in fp32 on the CPU: forcing
    # padded_flash lets the CPU's SDPA run the branch; chunks of 16 attend after a cached prefix.
    ids = random_ids(40, seed=12)
    blocks = tiny_model.logits(ids, chunk=16, mode="naive")
    calls = []
    plain = model_math.causal_attention

    def counted(q, k, v, scale):
        calls.append((q.shape[2], k.shape[2]))
        return plain(q, k, v, scale)

    monkeypatch.setattr(model_math, "padded_flash", lambda q, k: True)
    monkeypatch.setattr(model_math, "causal_attention", counted)
    flash = tiny_model.logits(ids, chunk=16, mode="naive")
    layers = tiny_model.config.num_hidden_layers
    assert calls == [(16, 16)] * layers + [(16, 32)] * layers + [(8, 40)] * layers
    assert rel_err(flash, blocks) <= 1e-5


@needs_cuda
@pytest.mark.parametrize("t,s", [(300, 300), (300, 1000)])
def test_padded_flash_attention_on_cuda(t, s):
    # bf16 on the GPU's flash kernel: it rounds the probabilities to bf16 before P @ V and the output
    # to bf16 (unit roundoff u = 2^-8 each, fp32 sums), so |out - fp32 reference| <= 2u max|v|.
    q, k, v = _mla_like(t, s, torch.bfloat16, "cuda", seed=t + s)
    assert model_math.padded_flash(q, k)  # the path the long-prompt prefill takes is the one tested
    out = model_math.causal_attention(q, k, v, 192**-0.5)
    err = (out.float() - _causal_reference(q, k, v, 192**-0.5)).abs().max()
    assert err <= 2 * 2**-8 * v.float().abs().max()
