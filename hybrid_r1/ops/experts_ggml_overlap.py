"""experts.ggml_cpu with `overlap: true`: decode calls from a GPU hand their inputs to the process's
CPU worker inside the stream (hybrid_r1/handoff.py) instead of syncing, so the GPU runs the shared
expert meanwhile and the whole decode step stays one CUDA graph. Every other call (CPU inputs,
prompts, GPU prefill) takes experts.ggml_cpu's serial path, and the result is the same bits: the
same ggml graph on the same pinned inputs, the same bf16 rounding of the output, the same sum.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import handoff
from .experts_ggml import GGMLExperts
from .experts_reference import check_call

MAX_TOKENS = 8  # calls of up to this many tokens hand over (pinned room per layer: 2 x 14 KB a token)


class OverlappedGGMLExperts(GGMLExperts):
    """GGMLExperts whose GPU decode calls run on the CPU worker, beside the stream. Declares
    `runs_beside` (model.MoE passes the shared expert) and `host_work` (the graph runner checks
    the worker after each step); graph-safe, no host sync."""

    graph_safe = True
    host_sync = False
    runs_beside = True
    host_work = True

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.module_name = "experts"
        self.worker: handoff.HostWorker | None = None  # the process's (handoff.worker()) unless set
        self._slot: handoff.Slot | None = None

    def load_weights(self, source, prefix: str, shard=None) -> None:
        super().load_weights(source, prefix, shard)
        self.module_name = prefix  # errors from the worker name the layer

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
        return self.hands_over(x) and 1 <= n <= MAX_TOKENS and not streamed

    @staticmethod
    def hands_over(x: torch.Tensor) -> bool:
        """Calls from a GPU hand over (CPU inputs gain nothing: they take the serial path)."""
        return x.is_cuda

    def _handoff(self, k: int, dtype: torch.dtype, device: torch.device) -> tuple[handoff.HostWorker, handoff.Slot]:
        if self.worker is None:
            self.worker = handoff.worker()
        worker, slot = self.worker, self._slot
        if slot is None or slot.idx.shape[1] != k or slot.x.dtype != dtype:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():  # a graph would bake in buffers made now
                raise handoff.HandoffError(f"{self.module_name}: the first overlapped call must run eagerly")
            slot = self._slot = worker.add_slot(self.module_name, self._host_compute, self.hidden_size, k, dtype,
                                                torch.int64, MAX_TOKENS)
        return worker, slot

    def _host_compute(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
        """On the worker thread: the serial path's compute on the pinned inputs (ids checked here
        unless the engine refuses bad ones itself: ggml would write out of bounds)."""
        ex = self._executor()  # the serial path's pool and lock (pinned or not)
        with ex.lock:
            ids = not self._engine_for(idx.shape[1]).checks_ids(idx.shape[0])
            check_call(x, idx, w, self.n_experts, self.hidden_size, ids=ids)
            self._run_into(ex, x, idx, w, out)

    def host_check(self) -> None:
        if self.worker is not None:
            self.worker.raise_if_failed()

    def extra_repr(self) -> str:
        return super().extra_repr() + ", overlapped"
