"""experts.ggml_cpu with `overlap: true`: decode calls from a GPU hand their inputs to a host
worker inside the stream (hybrid_r1/handoff.py) instead of syncing, so the GPU runs the shared
expert meanwhile and the decode step has no host sync. Layers on the native kernel hand over to
its own C thread (handoff.NativeWorker), the others to the Python worker. `overlap: auto` hands
over only in the first case and runs the layer serially otherwise (decided at load, when the
engine is known). Every other call (CPU inputs,
prompts, GPU prefill) takes experts.ggml_cpu's serial path, and the result is the same bits: the
same engine on the same pinned inputs, the same bf16 rounding of the output, the same sum. (One
exception: where `engine: auto` gives native only 1-token calls (AVX2 hosts), the C thread still
computes the hand-over's 2-8-token calls with the native kernel, which serially go to ggml or
kt-kernel: the same tolerance, not the same bits.) A run dtype the kernel does not read (fp16)
hands over through the Python worker.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import cpu_kernels, handoff
from .experts_ggml import GGMLExperts

MAX_TOKENS = 8  # calls of up to this many tokens hand over (pinned room per layer: 2 x 14 KB a token)


class OverlappedGGMLExperts(GGMLExperts):
    """GGMLExperts whose GPU decode calls run on the CPU worker, beside the stream. Declares
    `runs_beside` (model.MoE passes the shared expert) and `host_work` (the graph runner checks
    the worker after each step); graph-safe, no host sync."""

    graph_safe = True
    host_sync = False
    runs_beside = True
    host_work = True

    serial_kind = GGMLExperts  # what `overlap: auto` falls back to (its declarations, its calls)

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.hands_off = True  # False: `overlap: auto` on an engine the C thread does not serve
        self.module_name = "experts"
        self.worker: handoff.HostWorker | None = None  # the process's (_default_worker) unless set
        self._slot: handoff.Slot | None = None

    def load_weights(self, source, prefix: str, shard=None) -> None:
        super().load_weights(source, prefix, shard)
        self.module_name = prefix  # errors from the worker name the layer
        self._decide()

    def share_loaded(self, other: GGMLExperts) -> None:
        super().share_loaded(other)
        self._decide()

    def _decide(self) -> None:
        # `overlap: auto` decides once the engine is known (it depends on the layer's types): the
        # native kernel's C thread hands over in ~10-30 us a layer, faster than serial; through the
        # Python worker ggml's layers were slower than serial (benchmarks/results/decode_overlap_*.md),
        # so those run serially, declaring what the serial kind declares
        self.hands_off = self._hands_off_to(self.engine_class)
        for attr in ("graph_safe", "host_sync", "runs_beside", "host_work"):
            setattr(self, attr, getattr(type(self) if self.hands_off else self.serial_kind, attr))

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor,
                beside: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        if self.weights is None:
            raise RuntimeError("GGMLExperts: load_weights first")
        if self.takes_handoff(x, topk_idx):
            worker, slot = self._handoff(topk_idx.shape[1], x.dtype, x.device)
            return handoff.overlapped(worker, slot, x, topk_idx, topk_w, beside, self.overlap_timeout_s)
        y = super().forward(x, topk_idx, topk_w)
        return y if beside is None else y + beside()

    def takes_handoff(self, x: torch.Tensor, topk_idx: torch.Tensor) -> bool:
        """Whether this call hands over: from a GPU, 1..MAX_TOKENS tokens, not streamed for prefill."""
        n = x.shape[0]
        streamed = self.prefill is not None and self.use_gpu(n, topk_idx.shape[1])
        return self.hands_off and self.hands_over(x) and 1 <= n <= MAX_TOKENS and not streamed

    @staticmethod
    def hands_over(x: torch.Tensor) -> bool:
        """Calls from a GPU hand over (CPU inputs gain nothing: they take the serial path)."""
        return x.is_cuda

    def _handoff(self, k: int, dtype: torch.dtype, device: torch.device) -> tuple[handoff.HostWorker, handoff.Slot]:
        worker, slot = self.worker, self._slot
        if slot is None or slot.idx.shape[1] != k or slot.x.dtype != dtype:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():  # a graph would bake in buffers made now
                raise handoff.HandoffError(f"{self.module_name}: the first overlapped call must run eagerly")
            if worker is None:
                worker = self.worker = self._default_worker(dtype)
            if isinstance(worker, handoff.NativeWorker):
                slot = worker.add_kernel_slot(self.module_name, self, self.weights, k, dtype, MAX_TOKENS)
            else:
                slot = worker.add_slot(self.module_name, self._host_compute, self.hidden_size, k, dtype,
                                       torch.int64, MAX_TOKENS)
            self._slot = slot
        return worker, slot

    def _default_worker(self, dtype: torch.dtype) -> handoff.HostWorker:
        """The native kernel's C poller where this layer's engine is that kernel and it reads the
        run dtype (no Python between the stream's request and the kernel), else the Python worker
        (which runs _host_compute)."""
        if self.engine_class.c_handoff() and dtype in cpu_kernels.FLOATS:
            ex = self._executor()
            return handoff.native_worker(cpu_kernels.pool(ex.n_threads, ex.cpus))
        return handoff.worker()

    def _host_compute(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
        """On the Python worker's thread: the serial path's compute on the pinned inputs."""
        self._checked_run_into(x, idx, w, out)

    def host_check(self) -> None:
        if self.worker is not None:
            self.worker.raise_if_failed()

    def _hands_off_to(self, engine) -> bool:
        return self.overlap != "auto" or engine.c_handoff()

    def decode_path(self, engine) -> str:
        """How this layer's decode calls reach `engine` (a cpu_engines class): what _decide makes of
        it, as plan, the startup line and the module's repr say."""
        if not self._hands_off_to(engine):
            return "decode serial (overlap auto: this engine is called from Python)"
        return "decode overlapped, handed over " + ("in C" if engine.c_handoff() else "to the Python worker")

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + (self.decode_path(self.engine_class) if self.engine_class else "overlapped")
