"""Batch-1 decode steps replayed from CUDA graphs: launch overhead paid once, not per kernel.

An eager decode step launches a few dozen small kernels per layer from Python; for one token they
take longer to launch than to run. Here the first decode step runs eagerly on fixed ("static")
inputs and is then captured; later steps only write the new token, its position and its cache slot
into those inputs and replay. The cache is reserved ahead (`headroom` tokens) so its buffers stay
put; the attention reads the whole reservation under a mask that the runner keeps up to date.

Operators that declare `host_sync` (ops/base.py: the CPU experts of the hybrid placement) and the
model's reference Experts (it loops over the used experts, which it learns from the host) break the
capture: the graph ends before such a module, it runs eagerly, and the next graph starts after
it, reading its output from a fixed buffer. So a hybrid step is one replay per layer plus the CPU
experts, in order, on the current stream. Operators that hand their host work over inside the
stream instead (`host_work`: experts.ggml_cpu with `overlap: true`) are graph-safe: the step is one
graph, and after each step the runner waits for it and calls their
`host_check()`, so a failure on the host thread raises here rather than leaving NaN logits.

Graphs are used only when everything but the modules that break them sits on one GPU and no
operator declares itself unsafe to capture (`graph_safe = False` without `host_sync`):
`unsupported(module)` says why not, and the caller decodes eagerly. A capture that still fails
logs a warning and falls back to eager (a best effort: a failed capture can leave the CUDA context
unusable, which is why operators declare what they are instead of being tried).

The runner does not record tokens: generate.forward_tokens, the one way tokens enter the model,
does that once the step has completed.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from .cache import KVCache, Step
from .model import DeepseekV3, Experts
from .ops import Operator

log = logging.getLogger(__name__)

HEADROOM = 1024  # tokens reserved past the current length when (re)capturing
# How a step whose CPU work is handed over inside the stream waits for its logits: "blocking"
# sleeps in the driver until the GPU is done (a spinning wait would take a core from the CPU
# experts for the whole step), "yield" looks at the step's event and yields the CPU between looks.
HOST_WORK_WAIT = "blocking"


def is_replay(segment) -> bool:
    """Whether a step's segment (DecodeGraphs.segments) is a graph replay, not an eager call."""
    return isinstance(getattr(segment, "__self__", None), torch.cuda.CUDAGraph)


def breaks_graph(module: nn.Module) -> bool:
    """Runs eagerly between graphs: an operator declaring host_sync, or the reference Experts."""
    return (isinstance(module, Operator) and module.host_sync) or isinstance(module, Experts)


def _breaking(module: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) of every module that breaks the graph, outermost only."""
    found = []

    def visit(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if breaks_graph(child):
                found.append((parent, name, child))
            else:
                visit(child)

    visit(module)
    return found


def unsupported(module: DeepseekV3) -> str | None:
    """Why `module` cannot decode under CUDA graphs, or None if it can."""
    inside: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        for child in m.children():
            if not breaks_graph(child):
                inside.append(child)
                visit(child)

    visit(module)
    unsafe = [type(m).__name__ for m in inside if isinstance(m, Operator) and not m.graph_safe]
    if unsafe:
        return f"operator {unsafe[0]} is not graph-safe"
    devices = {t.device for m in [module, *inside] for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        return "the modules captured are not all on one GPU"
    return None


class _Break(nn.Module):
    """Stands in for a module that breaks the graph while capturing: ends the current graph,
    queues the real module to run eagerly at replay, starts the next graph. Its result goes to a
    fixed buffer shaped like its first input (as the experts' call returns)."""

    def __init__(self, runner: "DecodeGraphs", inner: nn.Module):
        super().__init__()
        self.runner, self.inner = runner, inner

    @property
    def runs_beside(self) -> bool:  # model.MoE reads it of whatever computes its experts
        return self.inner.runs_beside

    def forward(self, *args):
        if not self.runner.capturing:
            return self.inner(*args)
        inner = self.inner
        out = torch.empty_like(args[0])  # fixed: the next graph reads it (same shape as the input)
        self.runner._end_graph()
        self.runner.segments.append(lambda: out.copy_(inner(*args)))
        self.runner._begin_graph()
        return out


class DecodeGraphs:
    """Decode steps of `module` on `cache` (batch 1, one token a step). `use_graphs=False` runs the
    same static-input step eagerly (the CPU, tests); otherwise module and cache must be on one GPU."""

    def __init__(self, module: DeepseekV3, cache: KVCache, *, use_graphs: bool = True, headroom: int = HEADROOM):
        if cache.batch != 1:
            raise ValueError("CUDA-graph decode runs batch 1")
        self.module, self.cache = module, cache
        self.device = module.lm_head.weight.device
        self.use_graphs = use_graphs and self.device.type == "cuda"
        self.headroom = headroom
        self.capturing = self._open = False
        self.segments: list = []  # CUDA graph replays and eager expert calls, in order
        self.version = None  # cache.version the static step was built for
        self.synced = -1  # cache length the mask reflects
        self.logits: torch.Tensor | None = None
        self.host_work = [m for m in module.modules() if isinstance(m, Operator) and m.host_work]
        self._step_done: torch.cuda.Event | None = None

    # ---- the static step ---------------------------------------------------------------------
    def _build(self) -> None:
        """Reserve the cache and make the fixed inputs for capacity = length + headroom."""
        self.release()
        length = self.cache.length
        cap = length + max(self.headroom, length // 2)  # grows geometrically: few recaptures
        if self.cache.max_tokens is not None:
            cap = max(min(cap, self.cache.max_tokens), length + 1)
        self.cache.reserve(cap)
        dev = self.device
        self.tokens = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.positions = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.slots = torch.zeros(1, dtype=torch.long, device=dev)
        self.allowed = torch.zeros(1, 1, self.cache.capacity, dtype=torch.bool, device=dev)
        self.step_in = Step(positions=self.positions, start=-1, key_valid=self.cache.valid, mode="absorb",
                            slots=self.slots, allowed=self.allowed)
        self.version, self.synced = self.cache.version, -1

    @property
    def breaks(self) -> int:
        """The eager calls a step makes between its graphs (modules that break the graph)."""
        return sum(1 for seg in self.segments if not is_replay(seg))

    def release(self) -> None:
        """Drop the graphs (their memory pool goes with them)."""
        self.segments, self.logits = [], None

    def _set_inputs(self, token: int) -> None:
        cache = self.cache
        if cache.length != self.synced:  # a prefill or a truncation since the last step
            self.allowed.zero_()
            self.allowed[0, 0, : cache.length] = cache.valid[0].to(self.device)
        step = cache.begin(torch.ones(1, 1, dtype=torch.bool), "absorb")
        self.tokens.fill_(token)
        self.positions.fill_(int(step.positions[0, 0]))
        self.slots.fill_(step.start)
        self.allowed[0, 0, step.start] = True
        self.synced = cache.length

    # ---- capture -----------------------------------------------------------------------------
    def _begin_graph(self) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.graph.capture_begin(pool=self.pool)
        self._open = True

    def _end_graph(self) -> None:
        self._open = False
        self.graph.capture_end()
        self.segments.append(self.graph.replay)

    def _capture(self) -> None:
        breaking = _breaking(self.module)
        for parent, attr, inner in breaking:
            setattr(parent, attr, _Break(self, inner))
        self.pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(side):
                self.capturing = True
                self._begin_graph()
                self.logits = self.module.body(self.tokens, self.step_in, self.cache, last_only=True)[0, -1]
                self._end_graph()
        except BaseException:
            if self._open:  # leave the stream out of capture mode, or every later launch fails
                self._open = False
                try:
                    self.graph.capture_end()
                except Exception:
                    pass
            self.release()
            raise
        finally:
            self.capturing = False
            for parent, attr, inner in breaking:
                setattr(parent, attr, inner)
        torch.cuda.current_stream(self.device).wait_stream(side)

    # ---- one step ----------------------------------------------------------------------------
    def step(self, token: int) -> torch.Tensor:
        """Feed one token; its logits [vocab] float32 (valid until the next step)."""
        cache = self.cache
        if self.version != cache.version or cache.length + 1 > cache.capacity:
            self._build()
        fresh = not self.segments
        self._set_inputs(token)
        if fresh or not self.use_graphs:
            # Eager on the fixed inputs: this step's result, and the warm-up (Triton compiles,
            # cuBLAS workspaces, per-device constants) that a capture needs before it starts.
            out = self.module.body(self.tokens, self.step_in, cache, last_only=True)[0, -1]
            if self.use_graphs:
                try:
                    self._capture()
                except Exception as e:  # a module that cannot be captured: decode eagerly
                    log.warning("CUDA-graph capture failed (%s: %s); decoding without graphs",
                                type(e).__name__, str(e)[:200])
                    self.use_graphs = False
        else:
            for seg in self.segments:
                seg()
            out = self.logits
        if self.host_work:  # the caller reads the logits next anyway: the wait costs nothing extra
            if self.device.type == "cuda":
                if self._step_done is None:
                    self._step_done = torch.cuda.Event(blocking=True)
                self._step_done.record(torch.cuda.current_stream(self.device))
                if HOST_WORK_WAIT == "yield":
                    while not self._step_done.query():
                        time.sleep(0)
                else:
                    self._step_done.synchronize()
            for op in self.host_work:
                op.host_check()
        return out
