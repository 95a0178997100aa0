"""The loaded model as users and tests drive it: logits, generate, tokenizer."""

from __future__ import annotations

import logging
import weakref
from typing import Callable

import torch

from . import graphs as G
from .cache import KVCache
from .config import ModelConfig
from .generate import Generation, Sampling, forward_tokens, generate
from .model import DeepseekV3

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self, module: DeepseekV3, source, tokenizer=None, placements=()):
        self.module = module
        self.source = source
        self.tokenizer = tokenizer
        self.placements = list(placements)  # what the rules put where (hybrid_r1.placement.Placement)
        # The CUDA-graph decoder of each cache (bound to its buffers), made on first use; it
        # lives as long as the cache, so a chat's next turn replays the same graphs.
        self._graphs: weakref.WeakKeyDictionary[KVCache, G.DecodeGraphs] = weakref.WeakKeyDictionary()

    @property
    def config(self) -> ModelConfig:
        return self.module.config

    def new_cache(self, batch: int = 1, max_tokens: int | None = None) -> KVCache:
        return KVCache(self.config.num_hidden_layers, batch, max_tokens)

    def decode_graphs(self, cache: KVCache, create: bool = False) -> G.DecodeGraphs | None:
        """The CUDA-graph decoder bound to `cache` (made with create=True where the model can
        decode under graphs: batch 1, graphs.unsupported says nothing), else None."""
        runner = self._graphs.get(cache)
        if runner is None and create and cache.batch == 1:
            why = G.unsupported(self.module)
            if why is None:
                runner = self._graphs[cache] = G.DecodeGraphs(self.module, cache)
            elif self.module.input_device.type == "cuda":
                log.info("decoding without CUDA graphs: %s", why)
        return runner

    @torch.inference_mode()
    def logits(self, token_ids, *, chunk: int | None = None, mode: str = "auto") -> torch.Tensor:
        """float32 logits [len, vocab] at every position, with a fresh cache.

        chunk: feed the tokens in chunks of this size (chunked prefill); mode: auto|naive|absorb."""
        ids = [int(t) for t in token_ids]
        if not ids:
            raise ValueError("logits needs at least one token")
        cache = self.new_cache()
        step = chunk or len(ids)
        return torch.cat([forward_tokens(self.module, ids[i : i + step], cache, mode=mode)
                          for i in range(0, len(ids), step)])

    def generate(
        self,
        token_ids,
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: list[int] | None = None,
        on_token: Callable[[int], None] | None = None,
        cache: KVCache | None = None,
        prefill_chunk: int = 2048,
        cuda_graphs: bool = True,
    ) -> Generation:
        """New token ids after `token_ids` (a list with `.stats`). stop defaults to the model's EOS
        and the tokenizer's stop tokens; pass a cache to reuse it across calls (multi-turn chat).
        cuda_graphs: on a GPU, decode steps replay CUDA graphs (hybrid_r1/graphs.py)."""
        if stop is None:
            stop = list(self.config.eos_token_ids)
            if self.tokenizer is not None:
                stop += [t for t in self.tokenizer.stop_ids if t not in stop]
        cache = cache if cache is not None else self.new_cache()
        return generate(
            self.module, [int(t) for t in token_ids], cache,
            max_new_tokens=max_new_tokens, sampling=Sampling(temperature, top_p, top_k, seed),
            stop_ids=stop, on_token=on_token, prefill_chunk=prefill_chunk,
            graphs=self.decode_graphs(cache, create=True) if cuda_graphs else None,
        )
