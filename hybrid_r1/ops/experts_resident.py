"""experts.ggml_cpu with `gpu_experts: N`: the layer's N most-used routed experts (by a routing-count
file from `hybrid-r1 calibrate`, else the first N) also live on the GPU as INT8 (requantized from
their GGML blocks with the converter's formulas, experts.int8_gpu's fused kernel), so a decode step
reads them from HBM instead of DRAM.

A decode call from the GPU splits each token's chosen experts: the resident ones run on the GPU, the
others on the CPU through ggml as before, at the same time (the GPU kernels are launched after the
one host sync, then ggml computes with the GIL released), and the two sums are added on the GPU. The
shared expert runs beside them too (`runs_beside`). A slot whose expert is resident reaches ggml with
weight 0 and the id of one of the token's CPU experts (its bytes are read anyway: no extra DRAM
traffic), or, when all of a token's experts are resident, the layer's coldest expert. Every call from
the GPU of up to `chunk_tokens` tokens that the prefill stream does not take splits so (decode and
short prompts); streamed prompts and CPU inputs take experts.ggml_cpu's path over all experts (the
GGUF keeps every expert in CPU RAM).

With `overlap: true` as well (OverlappedResidentGGMLExperts), a decode call's CPU slots go to the
hand-over worker inside the stream (experts_ggml_overlap.py) while the resident experts' fused MoE
and the shared expert run on the GPU: the step stays one CUDA graph, with no eager launches
between ggml and the GPU work.
"""

from __future__ import annotations

import torch

from .. import handoff
from .experts_ggml import GGMLExperts
from .experts_ggml_overlap import OverlappedGGMLExperts
from .experts_int8 import Int8GPUExperts


def split_slots(idx: torch.Tensor, w: torch.Tensor, slot_of: torch.Tensor, cold: int):
    """(cpu_idx, cpu_w, gpu_idx, gpu_w), each [T, k], from a step's routing: a slot whose expert is
    resident (slot_of[e] >= 0) keeps its weight on the GPU side (its resident index) and is weight 0
    on the CPU side, where it carries one of the token's CPU experts (its bytes are read anyway) or
    `cold` when the token has none; the other slots the other way round (GPU side: resident 0,
    weight 0). sum over both sides of w * expert == the layer's output. No host sync."""
    n = slot_of.numel()
    loc = slot_of[idx]
    on_gpu = loc >= 0
    first_cpu = torch.where(on_gpu, idx.new_full((), n), idx).amin(1, keepdim=True)
    filler = torch.where(first_cpu < n, first_cpu, idx.new_full((), cold))
    return (torch.where(on_gpu, filler, idx), w.masked_fill(on_gpu, 0),
            loc.clamp(min=0), w.float().masked_fill(~on_gpu, 0))


class ResidentGGMLExperts(GGMLExperts):
    runs_beside = True

    def __init__(self, *a, gpu_experts: int = 0, hot_experts: str | None = None, gpu_device: str = "cuda",
                 gpu_scheme: str = "block", **kw):
        super().__init__(*a, **kw)
        self.gpu_count, self.hot_file = gpu_experts, hot_experts
        self.gpu_device, self.gpu_scheme = torch.device(gpu_device), gpu_scheme
        self.resident: Int8GPUExperts | None = None
        self._slot_of: torch.Tensor | None = None  # [E] int32 on the GPU: resident index, or -1
        self._cold = 0  # a CPU expert for tokens whose experts are all resident

    def chosen(self, layer: int) -> tuple[int, ...]:
        """The experts of `layer` kept on the GPU."""
        n = min(self.gpu_count, self.n_experts)
        if self.hot_file is None:
            return tuple(range(n))
        from ..calibration import CalibrationError, RoutingCounts

        counts = RoutingCounts.load(self.hot_file)
        if counts.n_experts != self.n_experts:
            raise CalibrationError(f"{self.hot_file}: counts for {counts.n_experts} experts, the model has "
                                   f"{self.n_experts}")
        return counts.hottest(layer, n)

    def load_weights(self, source, prefix: str, shard=None) -> None:
        from .experts_reference import layer_of

        super().load_weights(source, prefix, shard)
        ids = self.chosen(layer_of(prefix))
        gpu = Int8GPUExperts(len(ids), self.hidden_size, self.intermediate_size, self.gpu_device,
                             self.gpu_scheme, expert_ids=ids)
        gpu.load_weights(source, prefix)
        slot = torch.full((self.n_experts,), -1, dtype=torch.int32)
        slot[list(ids)] = torch.arange(len(ids), dtype=torch.int32)
        rest = [e for e in range(self.n_experts) if slot[e] < 0]
        self.resident, self._slot_of = gpu, slot.to(self.gpu_device)
        self._cold = rest[-1] if rest else 0

    def planned_bytes_on(self, source, prefix: str, config, device) -> dict[str, int]:
        n = min(self.gpu_count, self.n_experts)
        gpu = Int8GPUExperts(n, self.hidden_size, self.intermediate_size, self.gpu_device, self.gpu_scheme)
        return {str(device): self.planned_bytes(source, prefix, config),
                str(self.gpu_device): gpu.planned_bytes(source, prefix, config)}

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor, beside=None) -> torch.Tensor:
        streamed = self.prefill is not None and self.use_gpu(x.shape[0], topk_idx.shape[1])
        if not (x.is_cuda and x.shape[0] <= self.chunk_tokens and self.resident is not None) or streamed:
            y = super().forward(x, topk_idx, topk_w)
            return y if beside is None else y + beside()
        cpu_idx, cpu_w, gpu_part = self._split(x, topk_idx, topk_w, beside)
        return self._from_gpu(x, cpu_idx, cpu_w, gpu_part)

    def _split(self, x, topk_idx, topk_w, beside):
        """(cpu_idx, cpu_w, gpu_part): the CPU side's routing and the GPU side's work, whose fp32
        result (resident experts, plus `beside`) is launched while the CPU computes."""
        cpu_idx, cpu_w, gpu_idx, gpu_w = split_slots(topk_idx, topk_w, self._slot_of, self._cold)

        def gpu_part() -> torch.Tensor:
            y = self.resident(x, gpu_idx, gpu_w).float()
            return y if beside is None else y + beside().float()

        return cpu_idx, cpu_w, gpu_part

    def extra_repr(self) -> str:
        n = self.resident.n_experts if self.resident is not None else min(self.gpu_count, self.n_experts)
        return super().extra_repr() + f", {n} experts also on {self.gpu_device} ({self.gpu_scheme} INT8)"


class OverlappedResidentGGMLExperts(ResidentGGMLExperts, OverlappedGGMLExperts):
    """gpu_experts with overlap: the split of ResidentGGMLExperts, the CPU side handed over inside
    the stream (graph-safe, no host sync). Calls the hand-over does not take (prompts, CPU inputs)
    run as ResidentGGMLExperts."""

    graph_safe = True
    host_sync = False
    runs_beside = True
    host_work = True
    serial_kind = ResidentGGMLExperts

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor, beside=None) -> torch.Tensor:
        if self.resident is None or not self.takes_handoff(x, topk_idx):
            return ResidentGGMLExperts.forward(self, x, topk_idx, topk_w, beside)
        cpu_idx, cpu_w, gpu_part = self._split(x, topk_idx, topk_w, beside)  # queued after the submit
        worker, slot = self._handoff(topk_idx.shape[1], x.dtype, x.device)
        return handoff.overlapped(worker, slot, x, cpu_idx, cpu_w, gpu_part, self.overlap_timeout_s)
