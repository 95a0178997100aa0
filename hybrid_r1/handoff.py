"""Hand-over of one call at a time from a CUDA stream to a host thread and back, with no host sync:
the routed experts of a decode step run on the CPU while the GPU goes on (the shared expert), and
the whole step stays one CUDA graph.

The stream side (kernels/handoff.py) copies the call's inputs into a slot's pinned buffers, writes
the slot and token count into the control words and publishes a request number (the next value of
a counter in device memory); later in the stream it spins until the done word equals that number
and reads the slot's output back. The host side is one worker thread per process (`worker()`),
shared by every slot: it polls the request word (a short spin, then sleep(0), then sleeps that
back off while nothing comes), runs the slot's `compute(x, idx, w, out)` on the pinned buffers
(ggml releases the GIL meanwhile) and publishes done. Requests come one at a time, in stream
order: the stream waits for each before it can publish the next. Layers whose engine is this
project's native kernel hand over to `native_worker(pool)` instead (NativeWorker): the same
protocol, served by the kernel's own C thread, so no Python runs between the request and the
kernel (a Python worker's own share was 70-80 us a request on the device host). Each worker has
its own control words and device counter.

Failures surface as errors, never as a hang: a compute that raises, a request number out of
sequence or a slot unknown to the worker poisons the output (NaN), publishes done and records a
HandoffError, which `raise_if_failed()` raises on the caller's thread (the graph runner calls it
after each step, the operator before each eager call); a stream that waits longer than
`timeout_s` (a worker that died or hangs) stops waiting, writes NaN and sets the error word,
which `raise_if_failed()` reports too. `stop()` (also at interpreter exit) ends the thread and
answers a request in flight with an error.

The control words sit on two cache lines: the stream writes the first (request, slot, tokens),
the worker the second (done, error), so neither side's polling shares a line with the other's
writes. Without a GPU (tests), `HostWorker(pinned=False)` keeps them in ordinary memory and a test
thread plays the stream through `post()` and `answer()`.
"""

from __future__ import annotations

import atexit
import math
import os
import threading
import time
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import HybridR1Error

LAYOUT = {"req": 0, "slot": 1, "ntok": 2, "done": 8, "err": 9}  # int64 words of the control block
SPIN_S = 20e-6  # pure spin after the last look found nothing new, then sleep(0)
HOT_S = 0.05  # sleep(0) polling this long after the last request (a decode step's layers come ~ms apart)
IDLE_SLEEP_S = 200e-6  # then sleeps of this length: a first layer after a pause waits at most this
# what a worker (Python or C) says of a request it refuses, by the kind of refusal
REFUSED = {"sequence": "request {req} arrived after {last} (one at a time, in order)",
           "slot": "request {req} names slot {index}, which no live caller holds",
           "tokens": "request {req} for {name} has {n} tokens (1..{room})"}


class HandoffError(HybridR1Error, RuntimeError):
    """The host side of an overlapped call failed, or the stream gave up waiting for it."""


Compute = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass
class Slot:
    """One caller's pinned buffers (room for `max_tokens` tokens) and its compute function, which
    reads x [n, hidden], idx [n, k], w [n, k] and writes out [n, hidden] in place."""

    index: int
    name: str
    x: torch.Tensor
    idx: torch.Tensor
    w: torch.Tensor
    out: torch.Tensor
    compute: Callable[[], Compute | None]  # a weak reference: a dropped model frees its slot

    @property
    def max_tokens(self) -> int:
        return self.x.shape[0]


class HostWorker:
    """The host thread and the control words (see the module docstring)."""

    def __init__(self, pinned: bool = True):
        self.pinned = pinned
        self.ctrl = torch.zeros(16, dtype=torch.int64, pin_memory=pinned)
        self._words = self.ctrl.numpy()  # the worker reads and writes through numpy: no torch dispatch per look
        self.slots: dict[int, Slot] = {}
        self._next_slot = 0
        self._seq: dict[torch.device, torch.Tensor] = {}  # the request counter, in device memory
        self._lock = threading.RLock()  # re-entrant: a slot's finalizer may run inside a locked section
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.failure: HandoffError | None = None
        self._stats = {"requests": 0, "compute_s": 0.0, "busy_s": 0.0}  # busy: request seen to done published

    @property
    def stats(self) -> dict:
        """requests served, seconds computing, seconds busy (request seen to done published)."""
        return self._stats

    # ---- registration (the caller's thread) ----------------------------------------------------
    def add_slot(self, name: str, compute: Compute, hidden: int, k: int, dtype: torch.dtype, idx_dtype: torch.dtype,
                 max_tokens: int) -> Slot:
        """Pinned buffers for calls of up to `max_tokens` tokens; `compute` is held weakly (a bound
        method's object may go away: its slot is then dropped)."""
        ref = weakref.WeakMethod(compute) if isinstance(compute, types.MethodType) else (lambda: compute)
        pin = self.pinned
        with self._lock, torch.inference_mode(False):  # plain tensors, writable by any thread in any mode
            index = self._next_slot
            self._next_slot += 1
            slot = Slot(index, name,
                        torch.empty(max_tokens, hidden, dtype=dtype, pin_memory=pin),
                        torch.empty(max_tokens, k, dtype=idx_dtype, pin_memory=pin),
                        torch.empty(max_tokens, k, dtype=torch.float32, pin_memory=pin),
                        torch.empty(max_tokens, hidden, dtype=dtype, pin_memory=pin), ref)
            self.slots[index] = slot
        return slot

    def seq(self, device: torch.device) -> torch.Tensor:
        """The device counter the stream numbers its requests with, then the word collect passes its
        verdict in (one device per worker)."""
        with self._lock:
            if device not in self._seq:
                if device.type == "cuda" and torch.cuda.is_current_stream_capturing():  # a graph would reset it
                    raise HandoffError("the first overlapped call must run eagerly, not under graph capture")
                if self._seq:
                    raise HandoffError(f"overlapped calls come from {next(iter(self._seq))} already; "
                                       f"a second device ({device}) would interleave its requests")
                # the counter, then the word kernels/handoff.collect passes its verdict in
                self._seq[device] = torch.tensor([int(self._words[LAYOUT["req"]]), 0], dtype=torch.int64, device=device)
            return self._seq[device]

    def start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="hybrid-r1-handoff", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread; a request it had not answered is answered with an error."""
        self._stopping = True
        t = self._thread
        if t is not None:
            t.join(timeout)
        self._thread = None
        self._answer_in_flight()

    def _answer_in_flight(self) -> None:
        req, done = int(self._words[LAYOUT["req"]]), int(self._words[LAYOUT["done"]])
        if req != done:
            slot = self.slots.get(int(self._words[LAYOUT["slot"]]))
            self._fail(req, slot, "the hand-over worker was stopped with a request in flight")

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def raise_if_failed(self) -> None:
        if self.failure is not None:
            raise self.failure
        err = int(self._words[LAYOUT["err"]])
        if err:
            self.failure = HandoffError(
                f"the stream waited too long for request {err} from the CPU experts' worker "
                f"({'alive' if self.alive else 'not running'}, done word {int(self._words[LAYOUT['done']])}, "
                f"{self.stats['requests']} requests served); its output is NaN")
            raise self.failure

    # ---- the worker thread -------------------------------------------------------------------
    def _loop(self) -> None:
        # The mode is per thread: a compute that makes tensors must not make them need autograd.
        with torch.inference_mode():
            self._poll()

    def _poll(self) -> None:
        words = self._words
        last = int(words[LAYOUT["done"]])
        idle_since = time.perf_counter()
        while not self._stopping:
            req = int(words[LAYOUT["req"]])
            if req == last:
                now = time.perf_counter()
                if now - idle_since < SPIN_S:
                    continue
                time.sleep(0 if now - idle_since < HOT_S else IDLE_SLEEP_S)
                continue
            t0 = time.perf_counter()
            try:
                self._serve(req, last)
            except BaseException as e:  # never die with the stream waiting: answer, then report
                self._fail(req, None, f"the hand-over worker failed: {type(e).__name__}: {e}", e)
                if not isinstance(e, Exception):
                    raise
            last = req
            idle_since = time.perf_counter()
            self._stats["busy_s"] += idle_since - t0
        # (stop() answers whatever is still pending once the thread has ended)

    def _serve(self, req: int, last: int) -> None:
        words = self._words
        index, n = int(words[LAYOUT["slot"]]), int(words[LAYOUT["ntok"]])
        slot = self.slots.get(index)
        if self.failure is not None:  # after a failure every request gets NaN at once: no compute on bad state
            return self._fail(req, slot, None)
        if req != last + 1:
            return self._fail(req, slot, REFUSED["sequence"].format(req=req, last=last))
        compute = slot.compute() if slot is not None else None
        if compute is None:
            return self._fail(req, slot, REFUSED["slot"].format(req=req, index=index))
        if not 1 <= n <= slot.max_tokens:
            return self._fail(req, slot, REFUSED["tokens"].format(req=req, name=slot.name, n=n, room=slot.max_tokens))
        t0 = time.perf_counter()
        try:
            compute(slot.x[:n], slot.idx[:n], slot.w[:n], slot.out[:n])
        except Exception as e:  # noqa: BLE001 - reported on the caller's thread, with the cause
            return self._fail(req, slot, f"{slot.name}: {type(e).__name__}: {e}", e)
        self._stats["compute_s"] += time.perf_counter() - t0
        self._stats["requests"] += 1
        words[LAYOUT["done"]] = req  # after the output: x86 keeps stores in order, the GPU acquires

    def _fail(self, req: int, slot: Slot | None, why: str | None, cause: BaseException | None = None) -> None:
        if why is not None and self.failure is None:
            self.failure = HandoffError(why)
            self.failure.__cause__ = cause
        try:
            if slot is not None:
                slot.out.fill_(math.nan)
        finally:
            self._words[LAYOUT["done"]] = req

    # ---- the stream's side, played by a thread (tests without a GPU) ----------------------------
    def post(self, slot: Slot, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, number: int | None = None) -> int:
        """What kernels/handoff.submit does on the GPU: inputs, slot, tokens, then the request
        number (the next one unless given)."""
        n = x.shape[0]
        slot.x[:n], slot.idx[:n], slot.w[:n] = x, idx, w
        words = self._words
        number = int(words[LAYOUT["req"]]) + 1 if number is None else number
        words[LAYOUT["slot"]], words[LAYOUT["ntok"]] = slot.index, n
        words[LAYOUT["req"]] = number
        return number

    def answer(self, slot: Slot, number: int, n: int, timeout_s: float) -> torch.Tensor | None:
        """What kernels/handoff.collect does: wait for done == number (None after timeout_s), then
        a copy of the output."""
        deadline = time.perf_counter() + timeout_s
        while int(self._words[LAYOUT["done"]]) != number:
            if time.perf_counter() > deadline:
                return None
            time.sleep(0)
        return slot.out[:n].clone()


def _served_in_c(x, idx, w, out) -> None:
    raise HandoffError("a kernel slot is served by the native poller, not by Python")


class NativeWorker(HostWorker):
    """A HostWorker whose thread is the native kernel's own (cpu_kernels.Poller, in C): for its
    slots (add_kernel_slot) no Python runs between the stream's request and the kernel, so the
    interpreter and its lock stay out of every MoE layer's hand-over. The protocol, the control
    words, the failures (NaN, done, a HandoffError on the caller's side), `post`/`answer` and the
    stream's side are HostWorker's; the poller spins HOT_S after a request, then looks every
    IDLE_SLEEP_S."""

    def __init__(self, pool, pinned: bool = True):
        super().__init__(pinned)
        self.pool = pool  # cpu_kernels.Pool: the threads that compute (the poller is their caller)
        self._poller = None
        self._kernel_slots: dict[int, tuple] = {}  # index -> (weights, k), set again by start()

    def add_kernel_slot(self, name: str, owner: object, weights, k: int, dtype: torch.dtype,
                        max_tokens: int) -> Slot:
        """Pinned buffers for calls of up to `max_tokens` tokens of `weights`' experts (top-k `k`),
        computed by the poller. The slot, and its hold on the weights' memory, goes with `owner`."""
        slot = self.add_slot(name, _served_in_c, weights.hidden, k, dtype, torch.int64, max_tokens)
        with self._lock:
            if self._poller is not None:
                try:
                    self._poller.set_slot(slot.index, weights, k, slot.x, slot.idx, slot.w, slot.out)
                except ValueError as e:
                    raise HandoffError(f"{name}: {e} (the process has registered {slot.index} overlapped "
                                       "layers: slots are not reused)") from None
            self._kernel_slots[slot.index] = (weights, k)
        weakref.finalize(owner, self._drop, slot.index)
        return slot

    def _drop(self, index: int) -> None:
        """The operator is gone: its weights are let go; the slot's buffers stay (a graph may still
        name them: the C thread answers its requests NaN there)."""
        with self._lock:
            if self._poller is not None:
                self._poller.drop_slot(index)  # waits for a call in flight on it
            self._kernel_slots.pop(index, None)

    def start(self) -> None:
        from .cpu_kernels import Poller

        with self._lock:
            if self._poller is not None and self._poller.state()["running"]:
                return
            self._poller = Poller(self.pool, self.ctrl, LAYOUT, int(HOT_S * 1e9), int(IDLE_SLEEP_S * 1e9))
            for index, (weights, k) in list(self._kernel_slots.items()):  # a finalizer may drop one meanwhile
                s = self.slots[index]
                self._poller.set_slot(index, weights, k, s.x, s.idx, s.w, s.out)

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            if self._poller is not None:
                self._poller.close()  # joins: a call in flight finishes first
                failure = self._poller.state()["failure"]
                if failure is not None and self.failure is None:  # kept past a restart
                    self.failure = HandoffError(self._why(*failure))
        self._answer_in_flight()

    @property
    def alive(self) -> bool:
        return self._poller is not None and self._poller.state()["running"]

    @property
    def stats(self) -> dict:
        if self._poller is None:
            return dict(self._stats)
        st = self._poller.state()
        return {"requests": st["requests"], "compute_s": st["compute_s"], "busy_s": st["busy_s"]}

    def raise_if_failed(self) -> None:
        failure = self._poller.state()["failure"] if self._poller is not None else None
        if failure is not None and self.failure is None:
            self.failure = HandoffError(self._why(*failure))
        super().raise_if_failed()

    def _why(self, kind: str, req: int, index: int, detail: int) -> str:
        from .cpu_kernels import ERRORS

        slot = self.slots.get(index)
        name = slot.name if slot is not None else f"slot {index}"
        if kind in REFUSED:  # the C thread's detail: the last request done, or the tokens asked
            return REFUSED[kind].format(req=req, last=detail, index=index, name=name, n=detail,
                                        room=slot.max_tokens if slot else "?")
        weights = self._kernel_slots.get(index, (None,))[0]
        if detail == -2 and weights is not None:
            return f"{name}: expert ids must lie in [0, {weights.n_experts})"
        return f"{name}: the native kernel failed: {ERRORS.get(detail, f'error {detail}')}"


_worker: HostWorker | None = None
_worker_lock = threading.Lock()


def worker() -> HostWorker:
    """The process's worker (pinned control words where CUDA is), started on first use, stopped at exit."""
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = HostWorker(pinned=torch.cuda.is_available())
            atexit.register(_worker.stop)
        _worker.start()
        return _worker


_native_workers: dict[int, NativeWorker] = {}
_fork_hook: list[bool] = []  # registered once, with the first native worker


def native_worker(pool) -> NativeWorker:
    """The process's worker for calls of the native kernel on `pool` (a cpu_kernels.Pool), started
    on first use, stopped at exit. Its requests are numbered apart from worker()'s: each worker has
    its own control words and device counter, and the stream waits for every call before the next."""
    with _worker_lock:
        if not _fork_hook and hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_forget_native_workers)
            _fork_hook.append(True)
        w = _native_workers.get(id(pool))
        if w is None:
            w = _native_workers[id(pool)] = NativeWorker(pool, pinned=torch.cuda.is_available())
            atexit.register(w.stop)
        w.start()
        return w


def _forget_native_workers() -> None:
    """In a forked child: the C threads did not come along (joining them would wait forever), so
    the workers forget their pollers without freeing them, and the child makes its own."""
    global _worker_lock
    _worker_lock = threading.Lock()
    for w in _native_workers.values():
        if w._poller is not None:
            w._poller.handle = None
            w._poller = None
    _native_workers.clear()


def overlapped(w: HostWorker, slot: Slot, x: torch.Tensor, idx: torch.Tensor, topk_w: torch.Tensor,
               beside: Callable[[], torch.Tensor] | None, timeout_s: float) -> torch.Tensor:
    """On x's stream: hand x/idx/w to slot's compute on the host, run `beside()` on the GPU
    meanwhile, wait, and return the host's output (+ beside's) on x's device, in x's dtype."""
    from hybrid_r1_kernels import handoff as k  # Triton: only when a GPU call is made

    w.raise_if_failed()
    if not w.alive:
        raise HandoffError("the CPU experts' hand-over worker is not running (stopped at exit?)")
    seq = w.seq(x.device)
    k.submit(x.contiguous(), idx.to(slot.idx.dtype).contiguous(), topk_w.float().contiguous(), slot.x, slot.idx,
             slot.w, seq, w.ctrl, slot.index, LAYOUT)
    extra = beside() if beside is not None else None
    if extra is not None:
        extra = extra.to(x.dtype).reshape(x.shape).contiguous()
    return k.collect(slot.out, extra, seq, w.ctrl, tuple(x.shape), x.dtype, int(timeout_s * 1e9), LAYOUT)
