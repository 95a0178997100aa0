"""What a load will put where, and the memory each device needs, without reading any weight.

`memory_plan(module, placements, ...)` walks a placed meta-device model (placement.apply) and adds
up, per device, the bytes each tensor will take as it will be stored: operators say so themselves
(`Operator.planned_bytes`: INT8 + scales, GGML blocks), kept modules hold their tensors in the run
dtype (the router in fp32); plus the MLA cache for `context` tokens (kv_lora_rank + qk_rope_head_dim
values per token per layer, on each layer's attention device). Under tensor parallelism
(parallel.shard on the meta model) the bytes are one rank's: split modules hold 1/world of theirs,
the rest (and the latent cache) are replicated. Activations, CUDA-graph pools and the
allocator's slack come on top: a GPU is said to fit only with 10% left over.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from .model import MLA, fp32_params
from .ops import Operator

HEADROOM = 0.10  # share of a device kept free for activations, graphs and fragmentation


@dataclass
class MemoryPlan:
    weights: dict[str, int] = field(default_factory=dict)  # device -> bytes of weights
    cache: dict[str, int] = field(default_factory=dict)  # device -> bytes of the MLA cache
    by_kind: dict[tuple[str, str], int] = field(default_factory=dict)  # (device, what) -> bytes
    context: int = 0

    def total(self, device: str) -> int:
        return self.weights.get(device, 0) + self.cache.get(device, 0)

    @property
    def devices(self) -> list[str]:
        return sorted(set(self.weights) | set(self.cache))


def memory_plan(module: nn.Module, source, dtype: torch.dtype, context: int, cache_dtype: torch.dtype | None = None) -> MemoryPlan:
    """Bytes per device for `module` (placed, on meta) loaded from `source` (a WeightSource, or
    None: operators then estimate from the config) with a cache of `context` tokens."""
    plan = MemoryPlan(context=context)
    config = module.config
    weights: dict[str, int] = defaultdict(int)
    kinds: dict[tuple[str, str], int] = defaultdict(int)

    def visit(mod: nn.Module, prefix: str, device: torch.device) -> None:
        device = mod.__dict__.get("placement_device", device)  # set by placement.apply
        split = mod.__dict__.get("placement_shard")  # tensor parallelism: a rank holds 1/world
        ways = split.world if split is not None else 1
        if isinstance(mod, Operator):
            for dev, n in mod.planned_bytes_on(source, prefix.rstrip("."), config, device).items():
                weights[dev] += n // ways
                kinds[dev, type(mod).name] += n // ways
            return
        keep32 = fp32_params(mod)
        for name, t in [*mod._parameters.items(), *((n, b) for n, b in mod._buffers.items()
                                                      if n not in mod._non_persistent_buffers_set)]:
            if t is None:
                continue
            size = t.numel() * (4 if name in keep32 else dtype.itemsize) // ways
            weights[str(device)] += size
            kinds[str(device), f"{type(mod).__name__} ({'float32' if name in keep32 else str(dtype).removeprefix('torch.')})"] += size
        for cname, child in mod.named_children():
            visit(child, f"{prefix}{cname}.", device)

    visit(module, "", torch.device("cpu"))
    cache_dtype = cache_dtype or dtype
    cache: dict[str, int] = defaultdict(int)
    for m in module.modules():
        if isinstance(m, MLA):
            dev = str(m.kv_a_layernorm.__dict__.get("placement_device", "cpu"))
            cache[dev] += context * (m.rank + m.rope) * cache_dtype.itemsize
    plan.weights, plan.cache, plan.by_kind = dict(weights), dict(cache), dict(kinds)
    return plan


@dataclass
class Row:
    what: str  # operator name, or the class of a kept module and its dtype
    device: str
    count: int
    layers: str  # "0-60", "3-60", or "" outside the layers
    rule: str  # the rule that placed it ("" = none: the default device)


def placement_table(module: nn.Module, placements, dtype: torch.dtype) -> list[Row]:
    """Every kind of module that holds weights, by what computes it and where, with its layer
    range and the rule responsible (modules no rule matched included: they sit on the default device)."""
    by_path = {p.path: p for p in placements}
    rows: dict[tuple[str, str, str], list] = {}

    def visit(mod: nn.Module, path: str, device: torch.device, rule: str) -> None:
        p = by_path.get(path)
        if p is not None:
            rule = p.rule.where if p.rule else rule
        device = mod.__dict__.get("placement_device", device)
        if isinstance(mod, Operator):
            key = (mod.name, str(device), rule)
        else:
            own = [n for n, t in [*mod._parameters.items(), *mod._buffers.items()] if t is not None]
            keep32 = fp32_params(mod)
            kinds = {"float32" if n in keep32 else str(dtype).removeprefix("torch.") for n in own}
            key = (f"{type(mod).__name__} ({'/'.join(sorted(kinds))})", str(device), rule) if own else None
        if key is not None:
            entry = rows.setdefault(key, [0, set()])
            entry[0] += 1
            parts = path.split(".")
            if len(parts) > 2 and parts[1] == "layers":
                entry[1].add(int(parts[2]))
        if not isinstance(mod, Operator):
            for cname, child in mod.named_children():
                visit(child, f"{path}.{cname}" if path else cname, device, rule)

    visit(module, "", torch.device("cpu"), "")
    return [Row(what, dev, n, _ranges(sorted(layers)), rule) for (what, dev, rule), (n, layers) in rows.items()]


def _ranges(layers: list[int]) -> str:
    out, start = [], None
    for i, x in enumerate(layers):
        if start is None:
            start = x
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            out.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ",".join(out)


def available(device: str) -> int | None:
    """Bytes free on `device` now (CUDA: free memory; CPU: MemAvailable), None if unknown."""
    d = torch.device(device)
    if d.type == "cuda":
        if not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count():
            return None
        return torch.cuda.mem_get_info(d.index or 0)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def fits(plan: MemoryPlan, device: str, free: int | None) -> bool | None:
    """Whether the plan's share of `device` fits `free` bytes with HEADROOM left over (None: unknown)."""
    if free is None:
        return None
    return plan.total(device) <= free * (1 - HEADROOM)


Q4_K_M_TYPES = (12, 12, 14)  # Q4_K gate/up, Q6_K down: what a plan without a checkpoint assumes


def _decode_handoff(m, engine) -> str:
    """How an overlapped operator's decode calls reach `engine` (experts_ggml_overlap.py)."""
    from .ops.experts_ggml_overlap import OverlappedGGMLExperts

    return "; " + m.decode_path(engine) if isinstance(m, OverlappedGGMLExperts) else ""


def engine_lines(module: nn.Module, source=None) -> list[str]:
    """Which CPU engine computes the routed experts (cpu_engines.py), one line per distinct choice:
    as loaded (the operators chose at load) or, on a placed meta model, as a load from `source`
    would choose from its headers (None: Q4_K_M types)."""
    from . import cpu_engines
    from .ops.experts_ggml import GGMLExperts
    from .ops.experts_reference import layer_of

    groups: dict[str, list[int]] = defaultdict(list)
    for path, m in module.named_modules():
        if not isinstance(m, GGMLExperts):
            continue
        if m.engine_class is not None:
            line = f"{m.engine_class.name} ({m.engine_why})" + _decode_handoff(m, m.engine_class)
        else:
            found = source.ggml_experts(layer_of(path)) if source is not None else None
            types = tuple(found[p].ggml_type for p in ("gate", "up", "down")) if found else Q4_K_M_TYPES
            try:
                cls, why = cpu_engines.choose(m.engine, types)
                line = f"{cls.name} ({why})" + _decode_handoff(m, cls)
            except cpu_engines.EngineError as e:
                line = f"NONE: {e}"
        groups[line].append(layer_of(path))
    extra = cpu_engines.describe_missing()
    return [f"CPU experts engine: {line}, layers {_ranges(sorted(layers))}" + (f"; {extra}" if extra else "")
            for line, layers in groups.items()]
