"""Prefill of GGML-quantized routed experts on a GPU: stream the used experts' raw blocks over PCIe,
expand them there (formats/ggml_dequant.py), multiply in BF16.

Why: at prefill a chunk of a few hundred tokens already routes to nearly every expert, and the CPU
is then compute-bound (ggml's K-quant dot products), while the same bytes cross PCIe in a fraction
of the time and the GPU multiplies them at tensor-core rate. llama.cpp does the same for big batches.
Below `min_tokens` (decode, short prompts) the CPU, which reads each byte once from RAM, stays faster.

The K-quants and Q8_0 are expanded by one Triton kernel (kernels/ggml_dequant.py); F16/BF16/F32 by a view.
Pipeline per expert, two slots deep: the host copies the expert's gate/up/down blocks from the mapped
file into a pinned slot (torch's copy runs on several threads), a side stream moves the slot to the
GPU, and the compute stream dequantizes and multiplies while the next expert is staged. The pinned
and device slots are shared by every layer on the same device (one layer runs at a time).
"""

from __future__ import annotations

import functools
import itertools
import warnings

import torch
import torch.nn.functional as F

from ..formats.ggml_dequant import SUPPORTED, dequantize
from ..formats.ggml_tensor import GGMLTensor
from ..model import group_by_expert

PARTS = ("gate", "up", "down")


def supported(tensors: dict[str, GGMLTensor]) -> bool:
    return all(tensors[p].ggml_type in SUPPORTED for p in PARTS)


@functools.lru_cache(maxsize=4)
def _slots(device: torch.device, nbytes: int):
    """Two (pinned host, device) byte buffers of one expert's blocks, and the copy stream."""
    host = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    dev = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(2)]
    return host, dev, torch.cuda.Stream(device)


class GPUExpertPrefill:
    """Computes an Experts call for many tokens on `device`. tensors: the layer's gate/up/down
    (GGMLTensor, [experts, rows, row_bytes] blocks); returns [T, hidden] float32 on the device."""

    def __init__(self, tensors: dict[str, GGMLTensor], device: str | torch.device):
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"GPU expert prefill needs a CUDA device, got {device}")
        self.tensors = tensors
        self.sizes = [tensors[p].expert(0).nbytes for p in PARTS]

    def _stage(self, e: int, host: torch.Tensor) -> None:
        off = 0
        with warnings.catch_warnings():  # the mapped file is read-only, and only read here
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            for part, size in zip(PARTS, self.sizes):
                host[off:off + size].copy_(torch.from_numpy(self.tensors[part].expert(e).reshape(-1)))
                off += size

    def _weights(self, raw: torch.Tensor) -> list[torch.Tensor]:
        from hybrid_r1_kernels import ggml_dequant as triton_dequant  # Triton: only when used

        out, off = [], 0
        for part, size in zip(PARTS, self.sizes):
            t = self.tensors[part]
            rows = t.ne[1]
            blocks = raw[off:off + size].view(rows, -1)
            if t.ggml_type in triton_dequant.BLOCKS:  # one fused pass (the torch version: ~10)
                out.append(triton_dequant.dequantize(blocks, t.ggml_type, t.ne[0]))
            else:
                out.append(dequantize(blocks, t.ggml_type, t.ne[0]))
            off += size
        return out  # gate [I, H], up [I, H], down [H, I], bf16

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # Grouped on the host: which experts to stream is decided there (the CPU stages their bytes).
        order, token, counts = group_by_expert(idx.to("cpu", torch.int64), self.tensors["gate"].ne[2])
        counts = counts.tolist()
        dev = self.device
        x_g = x.to(dev, torch.bfloat16)
        tok_g = token.to(dev)
        w_g = w.reshape(-1).to("cpu", torch.float32)[order].to(dev)
        out = torch.zeros(idx.shape[0], x.shape[1], dtype=torch.float32, device=dev)
        used = [e for e, c in enumerate(counts) if c]
        starts = [0, *itertools.accumulate(counts)]
        host, slot, side = _slots(dev, sum(self.sizes))
        main = torch.cuda.current_stream(dev)
        copied = [None, None]  # event: the slot's host -> device copy is done
        consumed = [None, None]  # event: the compute that read the device slot is done

        def issue(i: int) -> None:
            s = i % 2
            if copied[s] is not None:
                copied[s].synchronize()  # the pinned slot is free again
            self._stage(used[i], host[s])
            with torch.cuda.stream(side):
                if consumed[s] is not None:
                    side.wait_event(consumed[s])
                slot[s].copy_(host[s], non_blocking=True)
                copied[s] = torch.cuda.Event()
                copied[s].record(side)

        if used:
            issue(0)
        for i, e in enumerate(used):
            s = i % 2
            main.wait_event(copied[s])
            gate, up, down = self._weights(slot[s])
            consumed[s] = torch.cuda.Event()
            consumed[s].record(main)  # dequantized copies made: the slot may be refilled
            sl = slice(starts[e], starts[e + 1])
            tok = tok_g[sl]
            xe = x_g[tok]
            h = F.silu(xe @ gate.T) * (xe @ up.T)
            out.index_add_(0, tok, (h @ down.T).float() * w_g[sl, None])
            if i + 1 < len(used):
                issue(i + 1)  # stage the next expert on the host while the GPU works on this one
        return out
