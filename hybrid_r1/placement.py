"""Placement rules: which operator and which device each module of the model gets.

A rule file is a YAML list; each rule may have
    name:   regex, searched in the dotted module name (`model.layers.3.mlp.experts`)
    class:  the module's class name (Linear, MLA, MoE, Experts, MLP, RMSNorm, Embedding, ...)
    op:     an operator name from hybrid_r1.ops.OPS; omitted = keep the module as it is
    device: where the module (and, unless a later rule says otherwise, its children) lives
    args:   the operator's arguments, checked against its typed Args (ops/base.py)
The module tree is walked depth-first from the root; for each module the first matching rule wins.
A rule with `op` replaces the module and the walk does not descend into it; a rule with only
`device` places the module and the walk goes on into its children, which inherit that device.

This is the only code that changes the module tree: it swaps in operators (`apply`), fuses sibling
projections after loading (`fuse`), and owns the one mechanism that moves activations between
devices: a module placed on another device than its parent is bridged (inputs moved in, output
moved back to where the input came from), unless it is an operator that declares `moves_inputs`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import model as M
from .errors import HybridR1Error
from .ops import OPS, LinearOperator, OpArgs, OpArgsError, Operator, op_class
from .quant import scheme_of, scheme_of_kind

log = logging.getLogger(__name__)
RULE_KEYS = {"name", "class", "op", "device", "args", "comment"}
# The module classes of the model a `class:` may name (rules match the tree before any swap).
MODULE_CLASSES = ("DeepseekV3", "Backbone", "Block", "MLA", "MLP", "MoE", "Gate", "Experts", "Linear",
                  "RMSNorm", "Embedding", "ModuleList")


class RuleError(HybridR1Error, ValueError):
    """A placement rule that is malformed, names an unknown operator, or cannot be applied."""


@dataclass
class Rule:
    where: str  # "file.yaml rule 3", for messages
    name: re.Pattern | None = None
    cls: str | None = None
    op: str | None = None
    device: str | None = None
    args: OpArgs | None = None  # the operator's typed arguments (None without op)

    def matches(self, path: str, module: nn.Module) -> bool:
        return (self.name is None or self.name.search(path) is not None) and (
            self.cls is None or type(module).__name__ == self.cls
        )


def parse_rules(items, where: str = "rules") -> list[Rule]:
    """Check every field of every rule (types, regex, operator, args, device) before anything is
    built; a RuleError names the file, the rule number and the field."""
    if not isinstance(items, list):
        raise RuleError(f"{where}: a rule file is a YAML list of rules")
    return [_parse_rule(item, f"{where} rule {i}") for i, item in enumerate(items, 1)]


def _parse_rule(item, at: str) -> Rule:
    if not isinstance(item, dict):
        raise RuleError(f"{at}: a rule is a mapping, got {item!r}")
    unknown = set(map(str, item)) - RULE_KEYS
    if unknown:
        raise RuleError(f"{at}: unknown key(s) {', '.join(sorted(unknown))} (allowed: {', '.join(sorted(RULE_KEYS))})")
    for key in ("name", "class", "op", "device"):
        if key in item and not isinstance(item[key], str):
            raise RuleError(f"{at}: `{key}` must be a string, got {item[key]!r}")
    if "name" not in item and "class" not in item:
        raise RuleError(f"{at}: needs `name` or `class` to match on")
    try:
        pattern = re.compile(item["name"]) if "name" in item else None
    except re.error as e:
        raise RuleError(f"{at}: bad regex {item['name']!r}: {e}") from None
    cls = item.get("class")
    if cls is not None and cls not in MODULE_CLASSES:
        raise RuleError(f"{at}: unknown class {cls!r} (the model's classes: {', '.join(MODULE_CLASSES)})")
    device = item.get("device")
    if device is not None:
        try:
            torch.device(device)
        except (RuntimeError, TypeError):
            raise RuleError(f"{at}: bad device {device!r} (cpu, cuda, cuda:N)") from None
    op, raw_args = item.get("op"), item.get("args")
    if raw_args is not None and not isinstance(raw_args, dict):
        raise RuleError(f"{at}: args must be a mapping, got {raw_args!r}")
    args = None
    if op is not None:
        if op not in OPS:
            raise RuleError(f"{at}: unknown op {op!r} (known: {', '.join(sorted(OPS))})")
        cls_ = op_class(op)
        if device is not None and torch.device(device).type not in cls_.devices:
            raise RuleError(f"{at}: {op} computes on {' or '.join(cls_.devices)}, but the rule says device: {device}")
        try:
            args = cls_.Args.parse(raw_args or {})
        except OpArgsError as e:
            raise RuleError(f"{at}: bad args for {op}: {e}") from None
    elif raw_args:
        raise RuleError(f"{at}: args without an op (args are an operator's arguments)")
    return Rule(at, pattern, cls, op, device, args)


def load_rules(path: str | Path) -> list[Rule]:
    import yaml

    path = Path(path)
    try:
        items = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RuleError(f"{path}: rule file not found") from None
    except IsADirectoryError:
        raise RuleError(f"{path}: is a folder, not a rule file") from None
    except UnicodeDecodeError:
        raise RuleError(f"{path}: not a text file") from None
    except yaml.YAMLError as e:
        raise RuleError(f"{path}: not valid YAML: {e}") from None
    return parse_rules(items, str(path))


def rules_from(rules) -> list[Rule]:
    """What the API accepts as `rules=`: a rule file path, a list of rule mappings, or parsed Rules."""
    if isinstance(rules, (str, Path)):
        return load_rules(rules)
    items = list(rules)
    if items and all(isinstance(r, Rule) for r in items):
        return items
    return parse_rules(items)


def check_devices(rules: list[Rule], default_device: torch.device) -> None:
    """Every device a rule (or the default) names must be present: a RuleError naming the rule and
    what this machine has, before any weight is read."""
    for where, dev in [("the default device", str(default_device))] + [(r.where, r.device) for r in rules if r.device]:
        problem = device_problem(torch.device(dev))
        if problem:
            raise RuleError(f"{where}: device {dev}: {problem}")


def device_problem(device: torch.device) -> str | None:
    """Why `device` cannot be used here, or None."""
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"{device.type} devices are not supported (cpu, cuda, cuda:N)"
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        return "this machine has no CUDA GPU (torch sees none)"
    if device.index is not None and device.index >= n:
        return f"this machine has {n} CUDA GPU(s): cuda:0..cuda:{n - 1}"
    return None


@dataclass
class Placement:
    path: str
    rule: Rule | None
    op: str | None
    device: torch.device


def apply(model: nn.Module, rules: list[Rule], default_device: torch.device, dtype: torch.dtype) -> list[Placement]:
    """Replace and place modules of a meta-device model; returns what went where (for `plan`)."""
    placed: list[Placement] = []

    def visit(module: nn.Module, path: str, device: torch.device, parent: nn.Module | None, attr: str) -> None:
        parent_device = device if parent is not None else None
        rule = next((r for r in rules if r.matches(path, module)), None)
        if rule is not None and rule.device is not None:
            device = torch.device(rule.device)
        if rule is not None and rule.op is not None:
            if parent is None:
                raise RuleError(f"{rule.where}: matches the whole model; an op replaces one module")
            cls = op_class(rule.op)
            if type(module).__name__ != cls.replaces:
                raise RuleError(f"{rule.where}: op {rule.op} replaces a {cls.replaces}, but {path} is a {type(module).__name__}")
            if device.type not in cls.devices:
                raise RuleError(f"{rule.where}: {rule.op} computes on {' or '.join(cls.devices)}, but {path} "
                                f"would be on {device} (give the rule a device)")
            new = cls.from_module(module, device, dtype, rule.args)
            new.placement_device = device  # where it keeps its weights (hybrid-r1 plan reads it)
            setattr(parent, attr, new)
            if not cls.moves_inputs:
                _bridge(new, device, parent_device)
            placed.append(Placement(path, rule, rule.op, device))
            return
        module.placement_device = device  # read by the loader for this module's own tensors
        _bridge(module, device, parent_device)
        if rule is not None:
            placed.append(Placement(path, rule, None, device))
        for cname, child in module.named_children():
            visit(child, f"{path}.{cname}" if path else cname, device, module, cname)

    visit(model, "", default_device, None, "")
    used = {id(p.rule) for p in placed if p.rule is not None}
    for r in rules:
        if id(r) not in used:
            log.warning("%s matches no module of the model (an earlier rule takes them, or the pattern is off)", r.where)
    return placed


def check_sources(placed: list[Placement], source) -> None:
    """Each operator a rule chose must be able to take what the checkpoint holds for its module
    (Operator.source_problem, from the headers): a RuleError naming the rule, before any weight is read."""
    seen = set()
    for p in placed:
        if p.op is None or id(p.rule) in seen:
            continue
        why = op_class(p.op).source_problem(source, p.path)
        if why:
            raise RuleError(f"{p.rule.where}: {p.op} cannot run {p.path}: {why}")
        seen.add(id(p.rule))  # one check per rule: the layers of a checkpoint are alike


def _bridge(module: nn.Module, device: torch.device, parent_device: torch.device | None) -> None:
    """A module placed on another device than its parent gets its tensor inputs moved there and its
    output moved back to where the input came from, so rules can split a block across devices."""
    if parent_device is None or device == parent_device:
        return

    def move_in(mod, args):
        mod._bridge_from = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)

    def move_out(mod, args, out):
        home = mod.__dict__.pop("_bridge_from", None)
        if home is None:
            return out
        if isinstance(out, tuple):
            return tuple(o.to(home) if isinstance(o, torch.Tensor) else o for o in out)
        return out.to(home) if isinstance(out, torch.Tensor) else out

    module.register_forward_pre_hook(move_in)
    module.register_forward_hook(move_out)


# (block class, the two sibling projections, the fused slot, silu(first) * second)
FUSIONS = (
    (M.MLA, ("q_a_proj", "kv_a_proj_with_mqa"), "qkv_a_proj", False),
    (M.MLP, ("gate_proj", "up_proj"), "gate_up_proj", True),
)


def fuse(model: nn.Module) -> int:
    """After loading: sibling projections that read the same input run as one GEMM where their
    operator can (`LinearOperator.fuse_rows`); one launch instead of two matters at decode.
    Returns how many pairs were fused."""
    n = 0
    for block in model.modules():
        for cls, (first, second), slot, glu in FUSIONS:
            if not isinstance(block, cls):
                continue
            a, b = getattr(block, first, None), getattr(block, second, None)
            if not (isinstance(a, LinearOperator) and isinstance(b, LinearOperator)):
                continue
            fused = a.fuse_rows(b, glu=glu)
            if fused is not None:
                setattr(block, slot, fused)
                setattr(block, first, None)
                setattr(block, second, None)
                n += 1
    return n


def int8_rules(scheme: str, device: torch.device | str) -> list[Rule]:
    """What `load` uses for an INT8 checkpoint (or quantize=...) when no rules are given: every
    Linear inside the layers as INT8, except kv_b_proj, which the absorbed attention reads as a
    dense matrix every decode step and so stays in the run dtype (dequantized once at load)."""
    return parse_rules([
        {"name": r"\.kv_b_proj$", "device": str(device)},
        {"name": r"^model\.layers\.\d+\.", "class": "Linear", "op": scheme_of(scheme).op, "device": str(device)},
    ], where=f"built-in int8 {scheme} rules")


def ggml_expert_rules() -> list[Rule]:
    """What `load` uses for a GGUF file when no rules are given: the routed experts as ggml
    computes them, on the CPU, on the file's bytes."""
    return parse_rules([{"name": r"^model\.layers\.\d+\.mlp\.experts$", "op": "experts.ggml_cpu", "device": "cpu"}],
                       where="built-in GGUF rules")


def default_rules(source, device: torch.device | str, quantize: str | None = None) -> list[Rule]:
    """The rules a load without `rules=` uses for `source` (also what `hybrid-r1 plan` explains):
    INT8 linears as stored (or as `quantize` asks), GGML routed experts on the CPU operator,
    everything else on `device` in the run dtype."""
    stored = scheme_of_kind(source.quantization())
    scheme = quantize or (stored.name if stored else None)
    rules = int8_rules(scheme, device) if scheme else []
    cfg = source.config
    moe = next((i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)), None)
    if moe is not None and source.ggml_experts(moe) is not None:
        rules = ggml_expert_rules() + rules
    return rules


def operators(model: nn.Module) -> list[tuple[str, Operator]]:
    """The operators in the tree, by module name (what the runtime reads capabilities from)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Operator)]
