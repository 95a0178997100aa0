"""The operator contract: what every operator a rule may choose declares and implements.

An operator replaces one module of the model (a `Linear`, an `Experts`) with another way of
computing the same function. It declares, as class attributes, what the runtime reads instead of
guessing:
    name          its registry name (`linear.int8_block`), the one rules use
    replaces      the class name of the module it stands in for ("Linear", "Experts")
    Args          a frozen dataclass of its rule arguments, typed; `OpArgs.parse` checks a rule's
                  `args:` mapping against it before any weight is read
    devices       device types it computes on ("cpu", "cuda")
    graph_safe    may be captured inside a CUDA graph (no host sync, no host memory)
    host_sync     must run eagerly between CUDA graphs (computes on, or waits for, the host)
    moves_inputs  takes inputs on any device and returns on the input's device itself (placement
                  then adds no bridge: e.g. the CPU experts copy GPU inputs through pinned buffers)
    shardable     load_weights accepts a `Shard` (tensor parallelism: this rank's slice)
    runs_beside   (an Experts replacement) takes `forward(x, idx, w, beside)`: `beside` is a callable
                  (the shared expert) whose result it adds to its own, run while its own work is
                  in flight elsewhere (model.MoE passes it; without the flag MoE adds it after)
    host_work     part of its work runs on a host thread outside the stream, handed over inside it
                  (no host sync, capturable): `host_check()` raises what the host side hit; the
                  CUDA-graph runner calls it after each step
These are read once the weights are loaded: an operator whose kind depends on them
(experts.ggml_cpu with `overlap: auto`, which hands over only where its engine's C thread serves
the layer) sets them on the instance in load_weights, to the values of the kind it then is.
It implements `from_module(module, device, dtype, args)` (build it, weights not loaded),
`load_weights(source, prefix, shard=None)` (fetch its tensors from a WeightSource),
`planned_bytes(source, prefix, config)` (what its weights will take: `hybrid-r1 plan`) and, where it
cannot take every checkpoint, `source_problem(source, prefix)` (checked from the headers, before
any weight is read).

`LinearOperator` adds what the model and the fusion pass need of a linear: `dense_weight()` (the
absorbed attention reads kv_b_proj as a matrix) and `fuse_rows(other, glu)` (one GEMM for two
sibling projections that read the same input, or None).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from ..errors import HybridR1Error


class OpArgsError(HybridR1Error, ValueError):
    """A rule's `args:` that its operator cannot take; placement adds the file and rule number."""

    def __init__(self, arg: str | None, message: str):
        self.arg = arg
        super().__init__(f"{arg} {message}" if arg else message)


@dataclass(frozen=True)
class OpArgs:
    """Base of every operator's argument dataclass. Subclasses list typed fields with defaults and
    may override `check()` for ranges; values come from YAML, so only int/float/str/bool/None,
    Literal choices and optionals of those are allowed as field types."""

    def check(self) -> None:
        """Raise OpArgsError(arg, "must be ...") for a value out of range."""

    @classmethod
    def parse(cls, raw: dict) -> "OpArgs":
        if not isinstance(raw, dict):
            raise OpArgsError(None, f"args must be a mapping, got {type(raw).__name__}")
        hints = typing.get_type_hints(cls)
        known = [f.name for f in dataclasses.fields(cls)]
        for key, value in raw.items():
            if key not in known:
                allowed = ", ".join(known) or "none"
                raise OpArgsError(str(key), f"is not an argument of this operator (allowed: {allowed})")
            _check_type(key, value, hints[key])
        args = cls(**raw)
        args.check()
        return args


def _check_type(key: str, value, hint) -> None:
    """`value` (from YAML) must be of the declared type; bool is not an int, an int is a float."""
    origin = typing.get_origin(hint)
    options = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    for t in options:
        if t is type(None) and value is None:
            return
        if typing.get_origin(t) is Literal:
            if value in typing.get_args(t) and type(value) is type(typing.get_args(t)[0]):
                return
            continue
        if t is bool and isinstance(value, bool):
            return
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return
        if t is str and isinstance(value, str):
            return
    raise OpArgsError(key, f"must be {_describe(hint)}, got {value!r}")


def _describe(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(t) for t in typing.get_args(hint))
    return {int: "an integer", float: "a finite number", str: "a string", bool: "true or false",
            type(None): "null"}.get(hint, str(hint))


@dataclass(frozen=True)
class NoArgs(OpArgs):
    """For operators that take no rule arguments."""


@dataclass(frozen=True)
class Shard:
    """The slice of a tensor-parallel layer this rank owns: `dim` 0 splits the output rows
    (column parallel: q_b, gate/up), `dim` 1 the input columns (row parallel: o_proj, down)."""

    rank: int
    world: int
    dim: Literal[0, 1]

    def __post_init__(self):
        if not 0 <= self.rank < self.world or self.dim not in (0, 1):
            raise ValueError(f"bad shard {self}")

    def bounds(self, size: int, align: int = 1) -> tuple[int, int]:
        """[start, end) of this rank's part of `size`; parts are whole multiples of `align`."""
        if size % (self.world * align):
            raise ValueError(f"{size} does not split into {self.world} parts of whole {align}-blocks")
        part = size // self.world
        return self.rank * part, (self.rank + 1) * part


class Operator(nn.Module):
    name: ClassVar[str]
    replaces: ClassVar[str]
    Args: ClassVar[type[OpArgs]] = NoArgs
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    graph_safe: ClassVar[bool] = True
    host_sync: ClassVar[bool] = False
    moves_inputs: ClassVar[bool] = False
    shardable: ClassVar[bool] = False
    runs_beside: ClassVar[bool] = False
    host_work: ClassVar[bool] = False

    def host_check(self) -> None:
        """Raise the failure of work this operator left to a host thread (declared `host_work`)."""

    @classmethod
    def from_module(cls, module: nn.Module, device: torch.device, dtype: torch.dtype, args: OpArgs) -> "Operator":
        raise NotImplementedError

    def load_weights(self, source, prefix: str, shard: Shard | None = None) -> None:
        raise NotImplementedError

    def planned_bytes(self, source, prefix: str, config) -> int:
        """Bytes its weights will take once loaded from `source` (None: estimate from the model's
        `config`), for `hybrid-r1 plan`; read from headers only."""
        raise NotImplementedError

    def planned_bytes_on(self, source, prefix: str, config, device) -> dict[str, int]:
        """planned_bytes by device, for an operator that keeps weights on more than its own
        `device` (default: all of them there)."""
        return {str(device): self.planned_bytes(source, prefix, config)}

    @classmethod
    def source_problem(cls, source, prefix: str) -> str | None:
        """Why this operator cannot take what `source` holds for module `prefix` (checked from the
        headers before any weight is read), or None. Default: anything goes."""
        return None


class LinearOperator(Operator):
    replaces: ClassVar[str] = "Linear"
    in_features: int
    out_features: int

    def dense_weight(self) -> torch.Tensor:
        """The [out, in] weight in the run dtype (dequantized where the operator stores it so)."""
        raise NotImplementedError

    def fuse_rows(self, other: "LinearOperator", glu: bool = False) -> "LinearOperator | None":
        """One operator computing [self; other] (silu(self) * other with glu), or None if this pair
        cannot run as one GEMM. Default: no fusion."""
        return None
