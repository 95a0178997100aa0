"""Open a checkpoint, build the model without weights, place it, and load each module's tensors.

The model is built on the `meta` device (no memory). Placement swaps in the operators the rules
choose; then each module receives its own tensors, one at a time, from the memory-mapped
checkpoint, on its own device: an operator (ops/base.py) loads itself through `load_weights`;
plain torch modules get their parameters by name. So the whole model never sits in RAM twice.
After loading, placement fuses sibling projections where their operators can.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn

from . import placement
from .errors import CheckpointError, HybridR1Error
from .formats.safetensors import SafetensorsCheckpoint
from .formats.source import WeightSource, check_tensor
from .model import DeepseekV3, fp32_params
from .ops import Operator

log = logging.getLogger(__name__)


class LoadError(HybridR1Error, ValueError):
    """Arguments of `load` that do not fit together or name what this machine lacks."""


def open_checkpoint(path: str | Path) -> WeightSource:
    """The one entry from what a user passes to a reader: a folder of safetensors (with
    config.json) or a GGUF file (any shard of a split set)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError("not a checkpoint folder or a .gguf file: the path does not exist", file=str(path))
    if p.is_dir():
        return SafetensorsCheckpoint(p)
    if p.suffix == ".gguf":
        from .formats.gguf import GGUFCheckpoint  # imported here: needs only gguf-py

        # Older GGUFs lack some router keys (expert groups): a config.json beside the file fills them.
        beside = p.parent / "config.json"
        return GGUFCheckpoint(p, config_json=beside if beside.is_file() else None)
    raise CheckpointError("not a checkpoint folder or a .gguf file", file=str(path))


def default_device_dtype(device: str | torch.device | None, dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise LoadError(f"device {device!r} is not a device (cpu, cuda, cuda:N)") from None
    problem = placement.device_problem(device)
    if problem:
        raise LoadError(f"device {device}: {problem}")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype


def build(config) -> DeepseekV3:
    with torch.device("meta"):
        return DeepseekV3(config)


def load_weights(module: nn.Module, source: WeightSource, device: torch.device, dtype: torch.dtype,
                 progress=None) -> None:
    """Fill every meta parameter and persistent buffer of `module` from `source`."""
    done = 0
    t0 = time.perf_counter()

    def fetch(name: str, like: torch.Tensor, want: torch.dtype, device: torch.device) -> torch.Tensor:
        check_tensor(source, name, like.shape)
        return source.tensor(name, want).to(device)

    def visit(mod: nn.Module, prefix: str, device: torch.device) -> None:
        nonlocal done
        if isinstance(mod, Operator):
            mod.load_weights(source, prefix.rstrip("."))
            done += 1
            return
        device = mod.__dict__.get("placement_device", device)  # set by placement.apply
        fp32 = fp32_params(mod)
        for pname, p in list(mod._parameters.items()):
            if p is not None:
                t = fetch(prefix + pname, p, torch.float32 if pname in fp32 else dtype, device)
                mod._parameters[pname] = nn.Parameter(t, requires_grad=False)
                done += 1
        for bname, b in list(mod._buffers.items()):
            if b is not None and bname not in mod._non_persistent_buffers_set:
                mod._buffers[bname] = fetch(prefix + bname, b, torch.float32 if bname in fp32 else dtype, device)
                done += 1
        if progress is not None:
            progress(done)
        for cname, child in mod.named_children():
            visit(child, f"{prefix}{cname}.", device)

    visit(module, "", device)
    log.info("loaded %d tensors from %s in %.1f s", done, source.path, time.perf_counter() - t0)


def load(path: str | Path, *, rules=None, dtype: torch.dtype | None = None,
         device: str | torch.device | None = None, quantize: str | None = None, progress=None):
    """Load a checkpoint and return a `Runtime` (see hybrid_r1.runtime).

    rules: a rule file path, or a list of rule mappings (see hybrid_r1.placement). Without rules,
    placement.default_rules(source): every module on one device in one dtype (CPU float32, or CUDA
    bfloat16), INT8 linears as stored, GGML routed experts on the CPU operator; quantize="block"|
    "channel" quantizes a BF16 or FP8 checkpoint's linears to INT8 while loading."""
    from .runtime import Runtime

    if quantize not in (None, "block", "channel"):
        raise LoadError(f"quantize must be None, 'block' or 'channel', got {quantize!r}")
    if rules is not None and quantize is not None:
        raise LoadError("pass either rules or quantize: with rules, the rules choose the operators")
    rule_list = placement.rules_from(rules) if rules is not None else None
    device, dtype = default_device_dtype(device, dtype)
    source = open_checkpoint(path)
    if rule_list is None:
        rule_list = placement.default_rules(source, device, quantize)
    placement.check_devices(rule_list, device)
    module = build(source.config)
    placements = placement.apply(module, rule_list, device, dtype)
    load_weights(module, source, device, dtype, progress)
    placement.fuse(module)
    return Runtime(module, source, source.tokenizer(), placements)
