"""Prefill of GGML-quantized routed experts on a GPU: stream the used experts' raw blocks over PCIe,
expand them there (kernels/ggml_dequant.py), multiply in BF16.

Why: at prefill a chunk of a few hundred tokens already routes to nearly every expert, and the CPU
is then compute-bound (ggml's K-quant dot products), while the same bytes cross PCIe in a fraction
of the time and the GPU multiplies them at tensor-core rate. llama.cpp does the same for big batches.
When a call runs here is the cost model's choice (prefill_cost.py).

Pipeline: the used experts are cut into groups of about GROUP_BYTES; a copy stream moves group g+1
into one of two device staging buffers while the compute stream expands and multiplies group g from
the other, so the copy engine never waits for the compute (which is the shorter of the two from a
few hundred tokens up). The source is pinned one of two ways (`pinning`):
- "register": the layer's mapped GGUF pages are page-locked once (host_pinning.py) and the copy
  engine reads them in place: one DRAM read per byte, the full PCIe rate;
- "bounce": CPU threads copy each group into a pinned host buffer first (torch's multi-threaded
  copy), then the engine moves that: three DRAM passes per byte, below the PCIe rate on hosts whose
  DRAM is not ~3x faster; the fallback where the driver refuses to lock the pages.
The staging buffers and the copy stream are shared by every layer on the device (one layer runs at a
time); events order each buffer's refill after the compute that read it. Across layers: a call that
streamed every expert (a long chunk: 2K tokens use all 256 with certainty) ends by copying the next
layer's first two groups, so the copy engine works on while attention and the router of the next
layer run; that layer's call uses them if its first groups are the same experts, else drops them.
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..formats.ggml_dequant import SUPPORTED, dequantize
from ..formats.ggml_tensor import GGMLTensor
from ..host_pinning import Pinning, PinningError
from ..model import group_by_expert

log = logging.getLogger(__name__)

PARTS = ("gate", "up", "down")
PINNINGS = ("register", "bounce")
# Raw bytes a group stages: ~4.6 ms of PCIe at 55 GB/s, so per-copy and per-event costs vanish, while
# the first copy (nothing to overlap) and the last compute stay a few percent of a 7.3 GB layer.
GROUP_BYTES = 256 << 20


def supported(tensors: dict[str, GGMLTensor]) -> bool:
    return all(tensors[p].ggml_type in SUPPORTED for p in PARTS)


def expert_groups(used: list[int], per_expert: int, budget: int | None = None) -> list[list[int]]:
    """Consecutive slices of `used` (sorted expert ids) of at most `budget` (GROUP_BYTES) bytes, one
    expert at least."""
    n = max(1, (GROUP_BYTES if budget is None else budget) // per_expert)
    return [used[i:i + n] for i in range(0, len(used), n)]


def runs(experts: list[int]) -> list[tuple[int, int]]:
    """[first, last + 1) of each run of consecutive ids: one copy per run and part."""
    out: list[tuple[int, int]] = []
    for e in experts:
        if out and out[-1][1] == e:
            out[-1] = (out[-1][0], e + 1)
        else:
            out.append((e, e + 1))
    return out


def group_products(out: torch.Tensor, x: torch.Tensor, token: torch.Tensor, w: torch.Tensor, starts: list[int],
                   experts: list[int], weights: tuple[torch.Tensor, ...]) -> None:
    """out[t] += w * down(silu(gate x_t) * up x_t) for the assignments of `experts` (consecutive in
    the expert-sorted order: starts[e]..starts[e + 1]), weights as _weights gives them. One gather
    and one scatter-add for the group; per expert, two products (three unfused) and the SwiGLU."""
    lo, hi = starts[experts[0]], starts[experts[-1] + 1]
    if hi == lo:
        return
    tok = token[lo:hi]
    xg = x[tok]  # [m, H]
    hidden = weights[-1].shape[0] // len(experts)
    inter = weights[-1].shape[1]
    y = torch.empty(hi - lo, hidden, dtype=x.dtype, device=x.device)
    for j, e in enumerate(experts):
        a, z = starts[e] - lo, starts[e + 1] - lo
        xe = xg[a:z]
        if len(weights) == 2:
            gu = xe @ weights[0][2 * j * inter:2 * (j + 1) * inter].T
            h = F.silu(gu[:, :inter]) * gu[:, inter:]
        else:
            rows = slice(j * inter, (j + 1) * inter)
            h = F.silu(xe @ weights[0][rows].T) * (xe @ weights[1][rows].T)
        torch.mm(h, weights[-1][j * hidden:(j + 1) * hidden].T, out=y[a:z])
    out.index_add_(0, tok, y.float() * w[lo:hi, None])


class _Ring:
    """Two device staging buffers (and, for "bounce", two pinned host ones), the copy stream, and the
    events that say when each buffer was last read: shared by the layers of one device."""

    def __init__(self, device: torch.device):
        self.device, self.nbytes, self.bounce = device, 0, False
        self.copy = torch.cuda.Stream(device)
        self.dev: list[torch.Tensor] = []
        self.host: list[torch.Tensor] = []
        self.read = [None, None]  # event: the compute that read dev[b] is done
        self.sent = [None, None]  # event: the copy out of host[b] is done
        self.next = 0
        self.ahead: list[tuple] = []  # groups copied for the next layer: (owner, experts, b, copy events)
        self.layers: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # layer -> its prefill

    def reserve(self, nbytes: int, bounce: bool) -> None:
        if nbytes > self.nbytes or (bounce and not self.host):
            torch.cuda.synchronize(self.device)  # nothing may still read the old buffers
            self.nbytes = max(nbytes, self.nbytes)
            # Plain tensors: the ring outlives the call that made it, and an inference tensor could
            # not be written by a later call outside inference mode.
            with torch.inference_mode(False):
                self.dev = [torch.empty(self.nbytes, dtype=torch.uint8, device=self.device) for _ in range(2)]
                self.host = ([torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
                             if bounce or self.host else [])
            self.read, self.sent, self.ahead = [None, None], [None, None], []


@functools.lru_cache(maxsize=8)
def _ring(device: torch.device) -> _Ring:
    return _Ring(device)


@dataclass(frozen=True)
class StreamStats:
    """One call's timeline from CUDA events (GPUExpertPrefill(timing=True))."""

    experts: int  # experts streamed
    nbytes: int  # their GGUF bytes
    groups: int
    pinning: str  # "register" or "bounce"
    copy_ms: float  # the copy engine busy: sum over groups of copy start -> end
    compute_ms: float  # the compute stream busy on the groups (expansion and products)
    wall_ms: float  # the call's start (or its first copy's, if later) -> last compute end
    ahead: int = 0  # groups the previous layer copied ahead for this call
    host_ms: float = 0.0  # the host's time issuing the call (all of it asynchronous but the routing)
    copy_wait_compute_ms: float = 0.0  # the copy engine waiting for a buffer's compute to finish
    copy_wait_host_ms: float = 0.0  # ... for the host to issue the next copy (bounce: to stage it)

    @property
    def overlap(self) -> float:
        """Share of the shorter activity hidden under the longer one (1 = fully overlapped)."""
        short = min(self.copy_ms, self.compute_ms)
        return (self.copy_ms + self.compute_ms - self.wall_ms) / short if short > 0 else 1.0


class GPUExpertPrefill:
    """Computes an Experts call for many tokens on `device`. tensors: the layer's gate/up/down
    (GGMLTensor, [experts, rows, row_bytes] blocks); returns [T, hidden] float32 on the device.
    pinning: "register" (falls back to "bounce", with a warning, if the driver refuses) or "bounce"."""

    def __init__(self, tensors: dict[str, GGMLTensor], device: str | torch.device, pinning: str = "register",
                 timing: bool = False, layer: int | None = None, prefetch: bool = True):
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"GPU expert prefill needs a CUDA device, got {device}")
        if pinning not in PINNINGS:
            raise ValueError(f"pinning must be one of {', '.join(PINNINGS)}, got {pinning!r}")
        self.tensors = tensors
        self.sizes = [tensors[p].expert(0).nbytes for p in PARTS]
        g, u = tensors["gate"], tensors["up"]
        self.fused = g.ggml_type == u.ggml_type and g.ne == u.ne  # Q4_K_M: both Q4_K
        self.per_expert = sum(self.sizes)
        self.timing, self.layer, self.prefetch = timing, layer, prefetch
        self._last: dict | None = None
        self.pinned: Pinning | None = None
        self.pin_error: str | None = None
        if pinning == "register":
            try:
                with torch.cuda.device(self.device):
                    torch.empty(1, device=self.device)  # the device's context, current on this thread
                    self.pinned = Pinning([tensors[p].data for p in PARTS])
            except PinningError as e:
                self.pin_error = str(e)
                log.warning("experts of %s: %s; staging through pinned host buffers instead",
                            tensors["gate"].name, e)
        self.pinning = "register" if self.pinned is not None else "bounce"
        if layer is not None:
            _ring(self.device).layers[layer] = self

    def _source(self, part: int, first: int, last: int) -> torch.Tensor:
        with warnings.catch_warnings():  # the mapped file is read-only, and only read here
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            return torch.from_numpy(self.tensors[PARTS[part]].data[first:last].reshape(-1))

    def _pieces(self, experts: list[int]) -> list[tuple[int, int, int, int]]:
        """(part, first expert, last + 1, offset in the buffer) of each copy of a group. Layout:
        [gate_0 up_0 gate_1 up_1 ... | down...] when gate and up share a type (one expansion and one
        product give both), else [gate... | up... | down...]; consecutive experts of a part in one copy."""
        out, off, g = [], 0, self.sizes[0]
        if self.fused:
            for j, e in enumerate(experts):
                out += [(0, e, e + 1, 2 * j * g), (1, e, e + 1, 2 * j * g + g)]
            off = 2 * len(experts) * g
        for p in (2,) if self.fused else (0, 1, 2):
            for first, last in runs(experts):
                out.append((p, first, last, off))
                off += (last - first) * self.sizes[p]
        return out

    def _copy(self, ring: _Ring, b: int, experts: list[int]) -> tuple:
        """Issue group `experts` into ring buffer b (layout: _pieces); returns (done event, timing
        start and end events or Nones)."""
        pieces = [(self._source(p, first, last), off) for p, first, last, off in self._pieces(experts)]
        stream = ring.copy
        queued = start = end = None
        if self.pinning == "bounce":
            if ring.sent[b] is not None:
                ring.sent[b].synchronize()  # the pinned buffer's last copy went out
            host = ring.host[b]
            for src, off in pieces:
                host[off:off + src.numel()].copy_(src)  # torch's copy runs on several threads
            pieces = [(host[off:off + src.numel()], off) for src, off in pieces]
        if self.timing:  # reached once the copy stream is done with what came before
            queued = torch.cuda.Event(enable_timing=True)
            queued.record(stream)
        if ring.read[b] is not None:
            stream.wait_event(ring.read[b])
        with torch.cuda.stream(stream):
            if self.timing:
                start = torch.cuda.Event(enable_timing=True)
                start.record(stream)
            dst = ring.dev[b]
            for src, off in pieces:
                if self.pinned is None:
                    dst[off:off + src.numel()].copy_(src, non_blocking=True)
                    continue
                # A tensor's first and last pages may hold other data and stay pageable: those few
                # bytes go through a small pinned copy (a pageable source could make the driver
                # wait for the copy stream, stalling the host's issue loop).
                for lo, hi, locked in self.pinned.split(src.data_ptr(), src.numel()):
                    part = src[lo:hi] if locked else \
                        torch.empty(hi - lo, dtype=torch.uint8, pin_memory=True).copy_(src[lo:hi])
                    dst[off + lo:off + hi].copy_(part, non_blocking=True)
            done = torch.cuda.Event(enable_timing=self.timing)
            done.record(stream)
            if self.pinning == "bounce":
                ring.sent[b] = done
            end = done if self.timing else None
        return done, (queued, start, end)

    def _weights(self, raw: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
        """The group's bf16 weights from its staged blocks: (gate_up [n * 2I, H], down [n * H, I])
        when fused, else (gate [n * I, H], up [n * I, H], down [n * H, I])."""
        from hybrid_r1_kernels import ggml_dequant as triton_dequant  # Triton: only when used

        def expand(part: str, rows: int, off: int, nbytes: int) -> torch.Tensor:
            t = self.tensors[part]
            blocks = raw[off:off + nbytes].view(rows, -1)
            if t.ggml_type in triton_dequant.BLOCKS:  # one fused pass (the torch version: ~10)
                return triton_dequant.dequantize(blocks, t.ggml_type, t.ne[0])
            return dequantize(blocks, t.ggml_type, t.ne[0])

        inter, hidden = self.tensors["gate"].ne[1], self.tensors["down"].ne[1]
        g, u, d = self.sizes
        if self.fused:
            return expand("gate", 2 * n * inter, 0, 2 * n * g), expand("down", n * hidden, 2 * n * g, n * d)
        return (expand("gate", n * inter, 0, n * g), expand("up", n * inter, n * g, n * u),
                expand("down", n * hidden, n * (g + u), n * d))

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        # Grouped on the host: which experts to stream is decided there.
        order, token, counts = group_by_expert(idx.to("cpu", torch.int64), self.tensors["gate"].ne[2])
        counts = counts.tolist()
        dev = self.device
        x_g = x.to(dev, torch.bfloat16)
        order_g = order.to(dev)
        tok_g = token.to(dev)
        w_g = w.reshape(-1).to(dev, torch.float32)[order_g]
        out = torch.zeros(idx.shape[0], x.shape[1], dtype=torch.float32, device=dev)
        used = [e for e, c in enumerate(counts) if c]
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        groups = expert_groups(used, self.per_expert)
        ring = _ring(dev)
        ahead, ring.ahead = ring.ahead, []
        if ring.nbytes < self.group_bytes or self.pinning == "bounce":
            ahead = []
            ring.reserve(self.group_bytes, self.pinning == "bounce")
        main = torch.cuda.current_stream(dev)
        begin = torch.cuda.Event(enable_timing=self.timing)
        begin.record(main)
        events, n_ahead = [], 0
        for g, experts in enumerate(groups):
            if g < len(ahead) and ahead[g][0] is self and ahead[g][1] == experts:
                _, _, b, (copied, cev) = ahead[g]  # copied during the previous layer
                n_ahead += 1
            else:
                b = ring.next
                ring.next ^= 1
                copied, cev = self._copy(ring, b, experts)
            main.wait_event(copied)
            k0 = k1 = None
            if self.timing:
                k0 = torch.cuda.Event(enable_timing=True)
                k0.record(main)
            group_products(out, x_g, tok_g, w_g, starts, experts, self._weights(ring.dev[b], len(experts)))
            # After the products, not the expansion: F16/BF16/F32 weights are views of the buffer.
            read = torch.cuda.Event(enable_timing=self.timing)
            read.record(main)
            ring.read[b] = read
            if self.timing:
                k1 = read
            events.append((*cev, k0, k1))
        self._last = {"experts": len(used), "nbytes": len(used) * self.per_expert, "events": events,
                      "begin": begin, "ahead": n_ahead, "host_ms": (time.perf_counter() - t0) * 1e3}
        if self.prefetch and len(used) == self.n_experts and self.layer is not None:
            self._copy_ahead(ring)
        return out

    @property
    def n_experts(self) -> int:
        return self.tensors["gate"].ne[2]

    @property
    def group_bytes(self) -> int:
        return len(expert_groups(list(range(self.n_experts)), self.per_expert)[0]) * self.per_expert

    def _copy_ahead(self, ring: _Ring) -> None:
        """Copy the next layer's first two groups (all its experts assumed used) into the ring."""
        nxt = ring.layers.get(self.layer + 1)
        if nxt is None or nxt.pinning != "register" or nxt.group_bytes > ring.nbytes:
            return
        for experts in expert_groups(list(range(nxt.n_experts)), nxt.per_expert)[:2]:
            b = ring.next
            ring.next ^= 1
            ring.ahead.append((nxt, experts, b, nxt._copy(ring, b, experts)))

    def last_stats(self) -> StreamStats | None:
        """The last call's timeline (waits for it); None without timing or before a call."""
        if not self.timing or self._last is None or not self._last["events"]:
            return None
        torch.cuda.synchronize(self.device)
        ev, begin = self._last["events"], self._last["begin"]
        if any(e is None for group in ev for e in group):  # groups copied ahead by an op without timing
            return None
        copy = sum(c0.elapsed_time(c1) for _, c0, c1, _, _ in ev)
        compute = sum(k0.elapsed_time(k1) for _, _, _, k0, k1 in ev)
        first = ev[0][1] if begin.elapsed_time(ev[0][1]) > 0 else begin  # a group copied ahead started earlier
        wall = first.elapsed_time(ev[-1][4])
        # Where the copy engine waited: on a buffer's compute (queued -> start), or for the host to
        # issue the next copy (the previous copy's end -> queued, when positive).
        on_compute = sum(q.elapsed_time(c0) for q, c0, _, _, _ in ev)
        on_host = sum(max(0.0, a[2].elapsed_time(b[0])) for a, b in zip(ev, ev[1:]))
        return StreamStats(self._last["experts"], self._last["nbytes"], len(ev), self.pinning, copy, compute, wall,
                           self._last["ahead"], self._last["host_ms"], on_compute, on_host)
