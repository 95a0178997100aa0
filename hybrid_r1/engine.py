"""One model serving many clients: generations run one at a time (batch 1), in arrival order, on a
worker thread, from a bounded queue, each on the cached conversation it shares the longest prefix
with. No HTTP here (server.py); tokens go out through each job's `on_token` callback.

A job can be cancelled at any time (its client went away, a stop string was matched, the server
is shutting down): a queued job is skipped, a running one stops at its next token the way Ctrl-C
stops the chat (a KeyboardInterrupt raised in `on_token`), which leaves its cache consistent.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from .cache import KVCache
from .errors import HybridR1Error
from .generate import Generation, Stats


class QueueFull(HybridR1Error):
    """More requests than the queue holds; retry_after_s is an estimate of when a slot frees up."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineClosed(HybridR1Error):
    """The server is shutting down and takes no more work."""


def shared_prefix(a: list[int], b: list[int]) -> int:
    n, limit = 0, min(len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    return n


@dataclass(eq=False)  # slots compare by identity
class Slot:
    cache: KVCache
    prompt_len: int = 0  # the prompt it last served (what a next turn can share: not the answer's
                         # reasoning, which R1's template drops)


class PrefixCaches:
    """At most `slots` KV caches, each the tokens of one recent conversation, least recently used
    first. A prompt takes the cache it shares the longest prefix with, if that prefix covers at
    least half of the prompt the cache last served (llama-server's default slot similarity):
    otherwise it would throw away another conversation's cache for little gain, and a free slot or
    the least recently used cache is taken instead. Used from the worker thread only."""

    SIMILARITY = 0.5

    def __init__(self, new_cache: Callable[[], KVCache], slots: int):
        if slots < 1:
            raise ValueError(f"cache slots must be >= 1, got {slots}")
        self.new_cache = new_cache
        self.slots = slots
        self.entries: list[Slot] = []  # least recently used first

    def take(self, prompt: list[int]) -> KVCache:
        best, best_n = None, -1
        for slot in self.entries:  # later = more recent: wins ties
            n = shared_prefix(slot.cache.tokens, prompt)
            if n >= self.SIMILARITY * slot.prompt_len and n >= best_n:
                best, best_n = slot, n
        if best is None:
            best = Slot(self.new_cache()) if len(self.entries) < self.slots else self.entries[0]
        if best in self.entries:
            self.entries.remove(best)
        self.entries.append(best)
        best.prompt_len = len(prompt)
        return best.cache

    def drop(self, cache: KVCache) -> None:
        self.entries = [s for s in self.entries if s.cache is not cache]


class Job:
    """One generation: `future` resolves to its Generation; `cancel()` stops it."""

    def __init__(self, prompt: list[int], params: dict, on_token: Callable[[int], None]):
        self.prompt = prompt
        self.params = params  # Runtime.generate keyword arguments
        self.on_token = on_token
        self.cancelled = threading.Event()
        self.future: Future = Future()

    def cancel(self) -> None:
        self.cancelled.set()


class Engine:
    """Runs Jobs on `runtime`, in order, at most `max_queue` waiting behind the one running."""

    def __init__(self, runtime, *, context: int, max_queue: int = 16, cache_slots: int = 4):
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.runtime = runtime
        self.context = context
        self.max_queue = max_queue
        self.caches = PrefixCaches(lambda: runtime.new_cache(max_tokens=context), cache_slots)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hybrid-r1-generate")
        self._lock = threading.RLock()  # close() may run in a signal handler on a thread inside submit()
        self._jobs: set[Job] = set()  # queued or running
        self._closed = False
        self._mean_s = 1.0  # running mean of a job's wall time, for Retry-After

    @property
    def pending(self) -> int:
        return len(self._jobs)

    def submit(self, prompt: list[int], params: dict, on_token: Callable[[int], None]) -> Job:
        job = Job(prompt, params, on_token)
        with self._lock:
            if self._closed:
                raise EngineClosed("the server is shutting down")
            if len(self._jobs) > self.max_queue:  # one running + max_queue waiting
                wait = math.ceil(self._mean_s * len(self._jobs))
                raise QueueFull(f"the queue is full ({self.max_queue} waiting, --max-queue); retry later",
                                max(1, wait))
            self._jobs.add(job)
        self._executor.submit(self._run, job)
        return job

    def _run(self, job: Job) -> None:
        t0 = time.perf_counter()
        result = error = None
        try:
            result = self._generate(job)
        except BaseException as e:  # the future carries it to the request; the worker lives on
            error = e
        with self._lock:  # off the books before the client hears of it: `pending` is exact
            self._jobs.discard(job)
            self._mean_s = 0.8 * self._mean_s + 0.2 * (time.perf_counter() - t0)
        if error is None:
            job.future.set_result(result)
        else:
            job.future.set_exception(error)

    def _generate(self, job: Job) -> Generation:
        if job.cancelled.is_set():  # cancelled while queued
            return Generation(stats=Stats(prompt_tokens=len(job.prompt), stop_reason="interrupted"))

        def on_token(token: int) -> None:
            if job.cancelled.is_set():
                raise KeyboardInterrupt  # generate() stops cleanly, as at Ctrl-C in the chat
            job.on_token(token)

        cache = self.caches.take(job.prompt)
        try:
            return self.runtime.generate(job.prompt, cache=cache, on_token=on_token, **job.params)
        except BaseException:
            self.caches.drop(cache)  # whatever it holds now is not to be trusted
            raise

    def close(self) -> None:
        """Take no more jobs, stop the running one and skip the queued ones (SIGTERM, Ctrl-C)."""
        with self._lock:
            self._closed = True
            jobs = list(self._jobs)
        for job in jobs:
            job.cancel()
        self._executor.shutdown(wait=False)
