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

from . import parallel, placement
from .errors import CheckpointError, HybridR1Error
from .formats.safetensors import SafetensorsCheckpoint
from .formats.source import WeightSource, check_tensor
from .model import DeepseekV3, fp32_params
from .ops import Operator

log = logging.getLogger(__name__)


class LoadError(HybridR1Error, ValueError):
    """Arguments of `load` that do not fit together or name what this machine lacks."""


def open_checkpoint(path: str | Path, gguf: str | Path | None = None, config: str | Path | None = None) -> WeightSource:
    """The one entry from what a user passes to a reader: a folder of safetensors (with
    config.json), a merged folder (merge_tools merge), a GGUF file (any shard of a split set), or
    with `gguf` a safetensors folder whose routed experts come from that GGUF (file, first shard,
    or a folder holding one set). A KTransformers merged folder loads as is; `config`: the folder
    holding its config.json when it has none."""
    from .formats import ktransformers, merged

    p = Path(path)
    if not p.exists():
        raise CheckpointError("not a checkpoint folder or a .gguf file: the path does not exist", file=str(path))
    if gguf is not None:
        if not p.is_dir():
            raise CheckpointError("with a GGUF for the experts, the checkpoint must be a safetensors folder",
                                  file=str(path))
        return merged.open_pair(p, open_gguf(gguf_file(gguf)))
    if p.is_dir():
        if merged.is_merged(p):
            return merged.open_merged(p)
        if ktransformers.is_ktransformers(p):
            return ktransformers.open_ktransformers(p, config)
        return SafetensorsCheckpoint(p)
    if p.suffix == ".gguf":
        return open_gguf(p)
    raise CheckpointError("not a checkpoint folder or a .gguf file", file=str(path))


def gguf_file(path: str | Path) -> Path:
    """A GGUF given as a file, any shard of a split set, or a folder holding exactly one set: the
    file that opens it."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError("GGUF path does not exist", file=str(path))
    if p.is_file():
        if p.suffix != ".gguf":
            raise CheckpointError("not a .gguf file", file=str(path))
        return p
    files = sorted(p.glob("*.gguf"))
    firsts = [f for f in files if "-00001-of-" in f.name] or ([files[0]] if len(files) == 1 else [])
    if len(firsts) != 1:
        found = ", ".join(f.name for f in files[:6]) or "none"
        raise CheckpointError(f"the folder must hold one GGUF file or one split set (found: {found})", file=str(p))
    return firsts[0]


def open_gguf(p: Path):
    from .formats.gguf import GGUFCheckpoint  # imported here: needs only gguf-py

    # Older GGUFs lack some router keys (expert groups): a config.json beside the file fills them.
    beside = p.parent / "config.json"
    return GGUFCheckpoint(p, config_json=beside if beside.is_file() else None)


def default_device_dtype(device: str | torch.device | None, dtype: torch.dtype | None, *,
                         check: bool = True) -> tuple[torch.device, torch.dtype]:
    """The run's default device and dtype (CUDA bfloat16 if a GPU is present, else CPU float32);
    check: the device must be present (a plan may describe another machine)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise LoadError(f"device {device!r} is not a device (cpu, cuda, cuda:N)") from None
    problem = placement.device_problem(device) if check else None
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
    """Fill every meta parameter and persistent buffer of `module` from `source`; progress(done,
    total) after each module (an operator, which loads itself, counts as one tensor)."""
    done = 0
    total = _count(module, module)
    t0 = time.perf_counter()

    def fetch(name: str, like: torch.Tensor, want: torch.dtype, device: torch.device, shard=None) -> torch.Tensor:
        check_tensor(source, name, like.shape)
        t = source.tensor(name, want)
        if shard is not None:  # this rank's rows or columns only go to its device
            t = parallel.slice_param(t, shard, name)
        return t.to(device)

    def visit(mod: nn.Module, prefix: str, device: torch.device) -> None:
        nonlocal done
        shard = parallel.shard_of(mod)  # this rank's part (tensor parallelism), or None
        if isinstance(mod, Operator):
            mod.load_weights(source, prefix.rstrip("."), shard)
            done += 1
            if progress is not None:
                progress(done, total)
            return
        device = mod.__dict__.get("placement_device", device)  # set by placement.apply
        fp32 = fp32_params(mod)
        for pname, p in list(mod._parameters.items()):
            if p is not None:
                t = fetch(prefix + pname, p, torch.float32 if pname in fp32 else dtype, device, shard)
                mod._parameters[pname] = nn.Parameter(t, requires_grad=False)
                done += 1
        for bname, b in list(mod._buffers.items()):
            if b is not None and bname not in mod._non_persistent_buffers_set:
                mod._buffers[bname] = fetch(prefix + bname, b, torch.float32 if bname in fp32 else dtype, device)
                done += 1
        if progress is not None:
            progress(done, total)
        for cname, child in mod.named_children():
            visit(child, f"{prefix}{cname}.", device)

    visit(module, "", device)
    log.info("loaded %d tensors from %s in %.1f s", done, source.path, time.perf_counter() - t0)


def _count(mod: nn.Module, root: nn.Module) -> int:
    """What load_weights will fill: each operator once, each parameter and persistent buffer."""
    if mod is not root and isinstance(mod, Operator):
        return 1
    own = sum(p is not None for p in mod._parameters.values())
    own += sum(b is not None for n, b in mod._buffers.items() if n not in mod._non_persistent_buffers_set)
    return own + sum(_count(c, root) for c in mod.children())


def load(path: str | Path, *, gguf: str | Path | None = None, rules=None, dtype: torch.dtype | None = None,
         device: str | torch.device | None = None, quantize: str | None = None, progress=None):
    """Load a checkpoint and return a `Runtime` (see hybrid_r1.runtime).

    path: a safetensors folder, a merged folder or a GGUF file; gguf: a GGUF whose routed experts
    replace the folder's (the pair, no merge step: the same tensors as the merged folder).

    rules: a rule file path, or a list of rule mappings (see hybrid_r1.placement). Without rules,
    placement.default_rules(source): every module on one device in one dtype (CPU float32, or CUDA
    bfloat16), INT8 linears as stored, GGML routed experts on the CPU operator; quantize="block"|
    "channel" quantizes a BF16 or FP8 checkpoint's linears to INT8 while loading."""
    rule_list = _checked_rules(rules, quantize)  # bad rules and devices fail before any file is opened
    device, dtype = default_device_dtype(device, dtype)
    return load_source(open_checkpoint(path, gguf), rules=rule_list, dtype=dtype, device=device,
                       quantize=quantize, progress=progress)


def _checked_rules(rules, quantize: str | None):
    if quantize not in (None, "block", "channel"):
        raise LoadError(f"quantize must be None, 'block' or 'channel', got {quantize!r}")
    if rules is not None and quantize is not None:
        raise LoadError("pass either rules or quantize: with rules, the rules choose the operators")
    return placement.rules_from(rules) if rules is not None else None


def load_source(source: WeightSource, *, rules=None, dtype: torch.dtype | None = None,
                device: str | torch.device | None = None, quantize: str | None = None, progress=None):
    """`load` for a reader already opened (open_checkpoint): the same steps, nothing read twice."""
    from .runtime import Runtime

    rule_list = _checked_rules(rules, quantize)
    device, dtype = default_device_dtype(device, dtype)
    world = parallel.from_env(device)  # inside torchrun: this rank's place, its GPU chosen
    if rule_list is None:
        rule_list = placement.default_rules(source, device, quantize)
    placement.check_devices(rule_list, device)
    module = build(source.config)
    placements = placement.apply(module, rule_list, device, dtype)
    placement.check_sources(placements, source)
    if world is not None:
        parallel.check_same_source(world, source)
        parallel.check_devices(placements, world)
        parallel.shard(module, world)
    load_weights(module, source, device, dtype, progress)
    placement.fuse(module)
    return Runtime(module, source, source.tokenizer(), placements, world)
