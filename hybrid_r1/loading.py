"""Open a checkpoint, build the model without weights, place it, and load each module's tensors.

The model is built on the `meta` device (no memory). Each module then receives its own tensors,
one at a time, from the memory-mapped checkpoint, on its own device: a module that defines
`load_weights(source, prefix)` (an operator chosen by a rule) loads itself; plain torch modules get
their parameters by name. So the whole model never sits in RAM twice.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError
from .formats.safetensors import SafetensorsCheckpoint
from .formats.source import WeightSource, check_tensor
from . import placement
from .model import DeepseekV3

log = logging.getLogger(__name__)


def open_checkpoint(path: str | Path) -> WeightSource:
    """A reader for `path`: a folder of safetensors (with config.json)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError("does not exist", file=str(path))
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
    device = torch.device(device)
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
        if mod is not module and hasattr(mod, "load_weights"):
            mod.load_weights(source, prefix.rstrip("."))
            done += 1
            return
        device = getattr(mod, "placement_device", device)  # set by placement rules
        fp32 = getattr(mod, "fp32_params", ())
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

    rules: a rule file path, or a list of rule mappings (see hybrid_r1.placement). Without rules
    every module runs on one device in one dtype (CPU float32, or CUDA bfloat16), except that an
    INT8 checkpoint runs its INT8 linears as stored; quantize="block"|"channel" quantizes a BF16 or
    FP8 checkpoint's linears to INT8 while loading."""
    from .runtime import Runtime

    source = open_checkpoint(path)
    device, dtype = default_device_dtype(device, dtype)
    module = build(source.config)
    if quantize not in (None, "block", "channel"):
        raise ValueError(f"quantize must be None, 'block' or 'channel', got {quantize!r}")
    if rules is None:
        scheme = quantize or int8_scheme(source)
        rule_list = placement.int8_rules(scheme, device) if scheme else []
        if has_ggml_experts(source):  # a GGUF's routed experts stay quantized, computed on the CPU
            rule_list = placement.ggml_expert_rules() + rule_list
    elif quantize is not None:
        raise ValueError("pass either rules or quantize: with rules, the rules choose the operators")
    elif isinstance(rules, (str, Path)):
        rule_list = placement.load_rules(rules)
    else:
        rule_list = placement.parse_rules(list(rules))
    placements = placement.apply(module, rule_list, device, dtype)
    load_weights(module, source, device, dtype, progress)
    fuse(module)
    return Runtime(module, source, _tokenizer_for(source), placements)


def fuse(module: nn.Module) -> None:
    """Let attention and MLP blocks fuse sibling projections their operators can run as one."""
    for m in list(module.modules()):
        if hasattr(m, "fuse"):
            m.fuse()


def has_ggml_experts(source: WeightSource) -> bool:
    cfg = source.config
    moe = next((i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)), None)
    return moe is not None and source.ggml_experts(moe) is not None


def int8_scheme(source: WeightSource) -> str | None:
    """'block' or 'channel' for an INT8 checkpoint, else None."""
    detect = getattr(source, "quantization", None)
    kind = detect() if detect else None
    return {"int8_block": "block", "int8_channel": "channel"}.get(kind)


def _tokenizer_for(source: WeightSource):
    root = Path(source.path)
    folder = root if root.is_dir() else root.parent
    if (folder / "tokenizer.json").is_file():
        from .tokenizer import Tokenizer

        return Tokenizer.from_dir(folder)
    meta = getattr(source, "tokenizer_metadata", None)  # a GGUF may carry its tokenizer in the metadata
    if meta is not None and meta().get("tokenizer.ggml.tokens") is not None:
        return source.tokenizer()
    return None
