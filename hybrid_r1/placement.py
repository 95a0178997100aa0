"""Placement rules: which operator and which device each module of the model gets.

A rule file is a YAML list; each rule may have
    name:   regex, searched in the dotted module name (`model.layers.3.mlp.experts`)
    class:  the module's class name (Linear, MLA, MoE, Experts, MLP, RMSNorm, Embedding, ...)
    op:     an operator name from hybrid_r1.ops.OPS; omitted = keep the module as it is
    device: where the module (and, unless a later rule says otherwise, its children) lives
    args:   keyword arguments for the operator
The module tree is walked depth-first from the root; for each module the first matching rule wins.
A rule with `op` replaces the module and the walk does not descend into it; a rule with only
`device` places the module and the walk goes on into its children, which inherit that device.
This is the only code that changes the module tree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import HybridR1Error
from .ops import OPS, op_class

RULE_KEYS = {"name", "class", "op", "device", "args", "comment"}


class RuleError(HybridR1Error, ValueError):
    """A placement rule that is malformed, names an unknown operator, or cannot be applied."""


@dataclass
class Rule:
    where: str  # "file.yaml rule 3", for messages
    name: re.Pattern | None = None
    cls: str | None = None
    op: str | None = None
    device: str | None = None
    args: dict = field(default_factory=dict)

    def matches(self, path: str, module: nn.Module) -> bool:
        return (self.name is None or self.name.search(path) is not None) and (
            self.cls is None or type(module).__name__ == self.cls
        )


def parse_rules(items, where: str = "rules") -> list[Rule]:
    if not isinstance(items, list):
        raise RuleError(f"{where}: a rule file is a YAML list of rules")
    rules = []
    for i, item in enumerate(items, 1):
        at = f"{where} rule {i}"
        if not isinstance(item, dict):
            raise RuleError(f"{at}: a rule is a mapping, got {item!r}")
        unknown = set(item) - RULE_KEYS
        if unknown:
            raise RuleError(f"{at}: unknown key(s) {', '.join(sorted(unknown))} (allowed: {', '.join(sorted(RULE_KEYS))})")
        if "name" not in item and "class" not in item:
            raise RuleError(f"{at}: needs `name` or `class` to match on")
        try:
            pattern = re.compile(item["name"]) if "name" in item else None
        except re.error as e:
            raise RuleError(f"{at}: bad regex {item['name']!r}: {e}") from None
        op = item.get("op")
        if op is not None and op not in OPS:
            raise RuleError(f"{at}: unknown op {op!r} (known: {', '.join(sorted(OPS))})")
        device = item.get("device")
        if device is not None:
            try:
                torch.device(device)
            except (RuntimeError, TypeError):
                raise RuleError(f"{at}: bad device {device!r}") from None
        args = item.get("args") or {}
        if not isinstance(args, dict):
            raise RuleError(f"{at}: args must be a mapping")
        rules.append(Rule(at, pattern, item.get("class"), op, device, args))
    return rules


def load_rules(path: str | Path) -> list[Rule]:
    import yaml

    path = Path(path)
    try:
        items = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RuleError(f"{path}: rule file not found") from None
    except yaml.YAMLError as e:
        raise RuleError(f"{path}: not valid YAML: {e}") from None
    return parse_rules(items, str(path))


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
            _, _, replaces = OPS[rule.op]
            if type(module).__name__ != replaces:
                raise RuleError(f"{rule.where}: op {rule.op} replaces a {replaces}, but {path} is a {type(module).__name__}")
            try:
                new = op_class(rule.op).from_module(module, device=device, dtype=dtype, **rule.args)
            except (TypeError, ValueError) as e:  # unknown or out-of-range args, wrong device
                raise RuleError(f"{rule.where}: bad args for {rule.op}: {e}") from None
            setattr(parent, attr, new)  # operators return on the caller's device themselves
            placed.append(Placement(path, rule, rule.op, device))
            return
        module.placement_device = device  # read by the loader for this module's own tensors
        _bridge(module, device, parent_device)
        if rule is not None:
            placed.append(Placement(path, rule, None, device))
        for cname, child in module.named_children():
            visit(child, f"{path}.{cname}" if path else cname, device, module, cname)

    visit(model, "", default_device, None, "")
    return placed


def _bridge(module: nn.Module, device: torch.device, parent_device: torch.device | None) -> None:
    """A kept module placed on another device than its parent gets its tensor inputs moved there and
    its output moved back to where the input came from, so rules can split a block across devices.
    (Operators need no hooks: they do the same in their forward, fused ones included.)"""
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


def int8_rules(scheme: str, device: torch.device | str) -> list[Rule]:
    """What `load` uses for an INT8 checkpoint (or quantize=...) when no rules are given: every
    Linear inside the layers as INT8, except kv_b_proj, which the absorbed attention reads as a
    dense matrix every decode step and so stays in the run dtype (dequantized once at load)."""
    return parse_rules([
        {"name": r"\.kv_b_proj$", "device": str(device)},
        {"name": r"^model\.layers\.\d+\.", "class": "Linear", "op": f"linear.int8_{scheme}", "device": str(device)},
    ], where=f"built-in int8 {scheme} rules")


def ggml_expert_rules() -> list[Rule]:
    """What `load` uses for a GGUF file when no rules are given: the routed experts as ggml
    computes them, on the CPU, on the file's bytes."""
    return parse_rules([{"name": r"^model\.layers\.\d+\.mlp\.experts$", "op": "experts.ggml_cpu", "device": "cpu"}],
                       where="built-in GGUF rules")
