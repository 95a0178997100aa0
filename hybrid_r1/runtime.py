"""The loaded model as users and tests drive it: logits, generate, tokenizer."""

from __future__ import annotations

import logging
import numbers
import weakref
from typing import Callable

import torch

from . import checks
from . import graphs as G
from .cache import KVCache
from .config import ModelConfig
from .errors import InputError
from .generate import Generation, Sampling, check_max_new_tokens, forward_tokens, generate
from .model import DeepseekV3

log = logging.getLogger(__name__)
MODES = ("auto", "naive", "absorb")


class Runtime:
    def __init__(self, module: DeepseekV3, source, tokenizer=None, placements=(), world=None):
        self.module = module
        # Tensor parallelism (hybrid_r1.parallel.World), or None on one device. Rank 0 drives:
        # its caches mirror each step to the other ranks, which run follow().
        self.world = world
        self._leader = None
        if world is not None and world.leader:
            from .parallel import Leader

            self._leader = Leader(world)
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
        cache = KVCache(self.config.num_hidden_layers, batch, max_tokens)
        if self._leader is not None:
            self._leader.attach(cache)
        return cache

    def follow(self) -> int:
        """On a tensor-parallel rank other than 0: replay rank 0's steps until its Runtime ends;
        returns the exit code (hybrid_r1.parallel.follow)."""
        from .parallel import follow

        if self.world is None or self.world.leader:
            raise InputError("follow() is for tensor-parallel ranks other than 0")
        return follow(self)

    def close(self) -> None:
        """Rank 0 of a tensor-parallel run: tell the other ranks to stop (also done at exit)."""
        if self._leader is not None:
            self._leader.close()

    def decode_graphs(self, cache: KVCache, create: bool = False) -> G.DecodeGraphs | None:
        """The CUDA-graph decoder bound to `cache` (made with create=True where the model can
        decode under graphs: batch 1, graphs.unsupported says nothing), else None."""
        runner = self._graphs.get(cache)
        if runner is None and create and cache.batch == 1 and self.module.input_device.type == "cuda":
            why = G.unsupported(self.module)  # a walk of the tree: once per cache, on a GPU only
            if why is None and self.world is not None and not self.world.graph_safe:
                why = f"{self.world.backend} collectives cannot be captured (NCCL's can)"
            if why is None:
                runner = self._graphs[cache] = G.DecodeGraphs(self.module, cache)
            else:
                log.info("decoding without CUDA graphs: %s", why)
        return runner

    @torch.inference_mode()
    def logits(self, token_ids, *, chunk: int | None = None, mode: str = "auto") -> torch.Tensor:
        """float32 logits [len, vocab] at every position, with a fresh cache.

        chunk: feed the tokens in chunks of this size (chunked prefill); mode: auto|naive|absorb."""
        ids = self.check_ids(token_ids)
        if chunk is not None:
            checks.integer("chunk", chunk, 1)
        if mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
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
        prefill_chunk: int | None = None,
        cuda_graphs: bool = True,
    ) -> Generation:
        """New token ids after `token_ids` (a list with `.stats`). stop defaults to the model's EOS
        and the tokenizer's stop tokens; pass a cache to reuse it across calls (multi-turn chat).
        cuda_graphs: on a GPU, decode steps replay CUDA graphs (hybrid_r1/graphs.py). prefill_chunk:
        tokens per prefill pass; None takes as many as the memory allows (hybrid_r1/prefill_chunk.py)."""
        ids = self.check_ids(token_ids, max_new_tokens=check_max_new_tokens(max_new_tokens))
        sampling = Sampling(temperature, top_p, top_k, seed)
        if stop is None:
            stop = list(self.config.eos_token_ids)
            if self.tokenizer is not None:
                stop += [t for t in self.tokenizer.stop_ids if t not in stop]
        else:
            stop = [checks.integer("stop token id", t) for t in stop]
        if cache is not None and not isinstance(cache, KVCache):
            raise InputError(f"cache must be a KVCache (Runtime.new_cache()), got {type(cache).__name__}")
        if on_token is not None and not callable(on_token):
            raise InputError(f"on_token must be callable, got {type(on_token).__name__}")
        cache = cache if cache is not None else self.new_cache()
        return generate(
            self.module, ids, cache, max_new_tokens=max_new_tokens, sampling=sampling,
            stop_ids=stop, on_token=on_token, prefill_chunk=prefill_chunk,
            graphs=self.decode_graphs(cache, create=True) if cuda_graphs else None,
        )

    def check_ids(self, token_ids, max_new_tokens: int = 0) -> list[int]:
        """token_ids as a list of ints inside the vocabulary, short enough for the model's positions
        (the prompt plus the max_new_tokens - 1 generated tokens that are fed back); else InputError."""
        if isinstance(token_ids, torch.Tensor):
            if token_ids.dim() != 1 or token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool:
                raise InputError(f"token ids must be a 1-d integer tensor, got {token_ids.dtype} {list(token_ids.shape)}")
            token_ids = token_ids.tolist()
        elif isinstance(token_ids, (str, bytes)):
            raise InputError("token ids must be a list of ints; encode text with Runtime.tokenizer")
        try:
            items = list(token_ids)
        except TypeError:
            raise InputError(f"token ids must be a list of ints, got {type(token_ids).__name__}") from None
        if not items:
            raise InputError("token ids are empty: at least one token is needed")
        vocab = self.config.vocab_size
        ids = []
        for i, t in enumerate(items):
            if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                raise InputError(f"token id {i} must be an integer, got {t!r}")
            t = int(t)
            if not 0 <= t < vocab:
                raise InputError(f"token id {i} is {t}, outside the vocabulary (0..{vocab - 1})")
            ids.append(t)
        limit = self.config.max_position_embeddings
        if len(ids) + max(max_new_tokens - 1, 0) > limit:
            what = f"{len(ids)} prompt tokens" + (f" + max_new_tokens {max_new_tokens} - 1" if max_new_tokens > 1 else "")
            raise InputError(f"{what} exceed the model's max_position_embeddings ({limit})")
        return ids
