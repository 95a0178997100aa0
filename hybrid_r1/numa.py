"""NUMA: which CPUs sit on which memory node, and how one layer's routed experts split across
nodes so that each socket reads only the experts in its own memory (no duplicate of the weights;
KTransformers duplicates them per socket and users run out of RAM).

The split: node p owns the contiguous experts [lo_p, hi_p) (a contiguous slice of each of gate, up
and down: no copy, only the pages must live on node p: first touch from a thread on p, or a copy
made there). A call's routing is split per node by `split_routing`: node p computes its tokens'
local slots, with the expert ids made local (id - lo_p); a token with fewer local slots than k pads
with a local expert the call reads anyway, at weight 0 (no extra DRAM traffic, a little extra
compute), and a node no token routes to skips the call. The per-node outputs
sum to the full layer's (tests/test_cpu_engines.py checks this). Each node's part runs on a thread
pool pinned to that node's CPUs, all parts at once, then the sum.

`engine: ggml_numa` / `native_numa` (cpu_engines.NumaEngine over ggml or the native kernel) runs
it: one pinned pool per node, tested with two nodes faked on one (tests/test_cpu_engines.py). Not measured: the lent machine's host has
one NUMA node. Where the pages live is up to the kernel: a GGUF's page cache sits on the node that
read it first (its pages read from each node's threads, e.g. a warm-up call, or `numactl
--interleave` for none); placing each range's pages on its node at load (a per-node copy, or
mbind) is the step after this one.
"""

from __future__ import annotations

import os

import torch


def nodes() -> dict[int, tuple[int, ...]]:
    """NUMA node -> the CPUs of it this process may use (nodes without one left out); one node 0
    with every usable CPU where /sys does not say."""
    usable = os.sched_getaffinity(0)
    out: dict[int, tuple[int, ...]] = {}
    base = "/sys/devices/system/node"
    try:
        names = sorted(n for n in os.listdir(base) if n.startswith("node") and n[4:].isdigit())
    except OSError:
        names = []
    for name in names:
        try:
            with open(f"{base}/{name}/cpulist") as f:
                cpus = _parse_cpulist(f.read())
        except OSError:
            continue
        mine = tuple(sorted(set(cpus) & usable))
        if mine:
            out[int(name[4:])] = mine
    return out or {0: tuple(sorted(usable))}


def _parse_cpulist(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def expert_ranges(n_experts: int, n_parts: int) -> list[tuple[int, int]]:
    """[lo, hi) of each part, as equal as whole experts allow (the first parts one larger)."""
    if not 1 <= n_parts <= n_experts:
        raise ValueError(f"cannot split {n_experts} experts into {n_parts} parts")
    base, extra = divmod(n_experts, n_parts)
    out, lo = [], 0
    for p in range(n_parts):
        hi = lo + base + (p < extra)
        out.append((lo, hi))
        lo = hi
    return out


def split_routing(idx: torch.Tensor, w: torch.Tensor, ranges: list[tuple[int, int]]):
    """Per part: (local ids [T, k] in [0, hi - lo), weights [T, k]) for the part's experts, or None
    where no token routes there. Slots routed elsewhere take the token's first local expert at
    weight 0, or, for a token with no local slot, another token's local expert: a fixed k per graph
    without reading any expert the call does not use."""
    out = []
    for lo, hi in ranges:
        local = (idx >= lo) & (idx < hi)
        if not bool(local.any()):
            out.append(None)
            continue
        first = torch.where(local, idx - lo, torch.full_like(idx, hi - lo)).min(dim=1, keepdim=True).values
        some = (idx - lo)[local][0]  # an expert of this part the call reads anyway
        pad = torch.where(first == hi - lo, some, first)
        ids = torch.where(local, idx - lo, pad.expand_as(idx))
        out.append((ids, torch.where(local, w, torch.zeros_like(w))))
    return out
