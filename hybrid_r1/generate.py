"""Prefill, decode and sampling over a DeepseekV3 module and its cache. Prints nothing: callers get
tokens through `on_token` and timings in the returned `Generation`."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import torch

from . import checks
from .cache import KVCache
from .graphs import DecodeGraphs
from .model import DeepseekV3
from .prefill_chunk import chunk_size, free_bytes


SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits (negative ones wrap: refused here)
MAX_NEW_TOKENS_MAX = 2**24  # past any context a model has: a typo, not a request


@dataclass(frozen=True)
class Sampling:
    """Sampling options, checked once for every entry point (API, CLIs, chat settings): an
    InputError names the option, its type or range; nothing is coerced (2.5 is not a top_k)."""

    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    seed: int | None = None

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: store the checked values (a numpy int becomes an int)
        set_(self, "temperature", checks.number("temperature", self.temperature, 0))
        set_(self, "top_p", checks.number("top_p", self.top_p, 0, 1, lo_open=True))
        set_(self, "top_k", checks.integer("top_k", self.top_k, 0))
        if self.seed is not None:
            set_(self, "seed", checks.integer("seed", self.seed, 0, SEED_MAX))


def check_max_new_tokens(value, minimum: int = 0) -> int:
    """max_new_tokens as an int in [minimum, 2**24]; the CLIs ask for at least 1 (0 would print nothing)."""
    return checks.integer("max_new_tokens", value, minimum, MAX_NEW_TOKENS_MAX)


@dataclass
class Stats:
    prompt_tokens: int = 0  # tokens in the prompt
    prefilled_tokens: int = 0  # of which computed now (the rest came from a reused cache)
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stop_reason: str = ""  # "stop" (a stop token), "length" (max_new_tokens) or "interrupted"
    vram_bytes: int = 0  # GPU memory torch holds for tensors after the call, all GPUs
    ram_bytes: int = 0  # the process's resident memory after the call (mapped expert pages it touched included)

    @property
    def prefill_tok_s(self) -> float:
        return self.prefilled_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        # The first new token comes out of the prefill; decode time covers the others.
        return (self.new_tokens - 1) / self.decode_s if self.decode_s and self.new_tokens > 1 else 0.0

    @property
    def time_to_first_token_s(self) -> float | None:
        """None when no token came (interrupted during the prefill)."""
        if self.stop_reason == "interrupted" and not self.new_tokens:
            return None
        return self.prefill_s


class Generation(list):
    """The new token ids (a list), with `.stats` (a Stats) beside them."""

    def __init__(self, tokens=(), stats: Stats | None = None):
        super().__init__(tokens)
        self.stats = stats or Stats()


def memory_in_use() -> tuple[int, int]:
    """(bytes torch has allocated on every GPU it initialised, resident bytes of this process)."""
    vram = 0
    if torch.cuda.is_initialized():
        vram = sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count()))
    try:
        with open("/proc/self/statm") as f:
            ram = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        ram = 0
    return vram, ram


def sample(logits: torch.Tensor, params: Sampling, generator: torch.Generator | None) -> int:
    """logits [vocab] -> one token id."""
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits.float().cpu() / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = logits.topk(params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if params.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it included)
        drop = sorted_p.cumsum(0) - sorted_p >= params.top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def _sync(module: DeepseekV3) -> None:
    if module.lm_head.weight.device.type == "cuda":
        torch.cuda.synchronize(module.lm_head.weight.device)


def forward_tokens(module: DeepseekV3, tokens: list[int], cache: KVCache, mode: str = "auto",
                   last_only: bool = False, graphs: DecodeGraphs | None = None) -> torch.Tensor:
    """Feed batch-1 tokens through the model; logits [T or 1, vocab]. The one way tokens enter
    the model: one token with `graphs` replays the decode graphs, anything else runs the module;
    the tokens are recorded in cache.tokens here, once the step has completed (an interrupted step
    is not, so the caller can drop it). Under tensor parallelism rank 0 first tells the other ranks
    (cache.mirror), whose collectives this step then meets."""
    if cache.mirror is None:
        out = _step(module, tokens, cache, mode, last_only, graphs)
    else:
        cache.mirror("forward", list(tokens), mode, last_only, graphs is not None)
        try:
            out = _step(module, tokens, cache, mode, last_only, graphs)
        except BaseException as e:  # the others are inside this step's collectives: none can go on
            cache.mirror.abandon(e)
            raise
    cache.tokens.extend(tokens)
    return out


def _step(module, tokens, cache, mode, last_only, graphs) -> torch.Tensor:
    if graphs is not None and len(tokens) == 1:
        return graphs.step(tokens[0])[None]
    return module(torch.tensor([tokens], dtype=torch.long), cache, mode=mode, last_only=last_only)[0]


def prefill(module: DeepseekV3, tokens: list[int], cache: KVCache, chunk: int | None = None) -> torch.Tensor:
    """Run the prompt in chunks of `chunk` tokens (None: as many as fit, prefill_chunk.py);
    logits of its last token [vocab]."""
    if not tokens:
        raise ValueError("prefill needs at least one token")
    if chunk is None:
        chunk = chunk_size(module.config, len(tokens), free_bytes(module.input_device), cache.length)
    if chunk < 1:
        raise ValueError(f"prefill chunk must be >= 1, got {chunk}")
    for i in range(0, len(tokens), chunk):
        logits = forward_tokens(module, tokens[i : i + chunk], cache, last_only=True)
    return logits[-1]


def reuse_prefix(cache: KVCache, tokens: list[int]) -> int:
    """Keep the cached prefix shared with `tokens` (at least one token is left to compute, for
    its logits); return how many tokens are reused."""
    n = 0
    limit = min(len(cache.tokens), len(tokens) - 1)
    while n < limit and cache.tokens[n] == tokens[n]:
        n += 1
    cache.truncate(n)
    return n


@torch.inference_mode()
def generate(
    module: DeepseekV3,
    prompt: list[int],
    cache: KVCache,
    *,
    max_new_tokens: int = 256,
    sampling: Sampling = Sampling(),
    stop_ids: tuple[int, ...] | list[int] = (),
    on_token: Callable[[int], None] | None = None,
    prefill_chunk: int | None = None,
    graphs: DecodeGraphs | None = None,
) -> Generation:
    """Continue `prompt`; tokens already in `cache` (a previous turn) are reused, not recomputed.

    A KeyboardInterrupt from `on_token` (Ctrl-C) ends generation cleanly: the result holds the
    tokens so far, stop_reason is "interrupted", and the cache covers exactly the tokens fed.
    graphs: the CUDA-graph decoder bound to `cache` (graphs.py; the Runtime keeps one per cache),
    or None to decode eagerly. prefill_chunk: tokens per prefill pass, None: as many as memory allows."""
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    chunk = None if prefill_chunk is None else checks.integer("prefill_chunk", prefill_chunk, 1)
    stats = Stats(prompt_tokens=len(prompt))
    out = Generation(stats=stats)
    generator = None
    if sampling.temperature > 0:
        generator = torch.Generator()
        generator.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())
    stops = set(stop_ids)
    reused = reuse_prefix(cache, prompt)
    stats.prefilled_tokens = len(prompt) - reused
    t0 = t1 = time.perf_counter()
    stats.stop_reason = "length"
    try:
        logits = prefill(module, prompt[reused:], cache, chunk)
        _sync(module)
        t1 = time.perf_counter()
        stats.prefill_s = t1 - t0
        while len(out) < max_new_tokens:
            tok = sample(logits, sampling, generator)
            if tok in stops:
                stats.stop_reason = "stop"
                break
            out.append(tok)
            if on_token is not None:
                on_token(tok)
            if len(out) == max_new_tokens:
                break
            logits = forward_tokens(module, [tok], cache, graphs=graphs)[-1]
    except KeyboardInterrupt:
        stats.stop_reason = "interrupted"
        cache.truncate(len(cache.tokens))  # drop a step that was cut off half-way through the layers
        if not stats.prefill_s:
            stats.prefill_s = time.perf_counter() - t0
    _sync(module)
    stats.decode_s = time.perf_counter() - t1
    stats.new_tokens = len(out)
    stats.vram_bytes, stats.ram_bytes = memory_in_use()
    return out
