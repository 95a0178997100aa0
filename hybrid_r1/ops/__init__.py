"""Operators that placement rules may put in place of a module, by short name.

Every operator implements the contract in `ops/base.py` (`Operator`, `LinearOperator`): typed rule
args, declared devices and CUDA-graph behaviour, `from_module`, `load_weights(source, prefix,
shard)`. Rules name operators by these keys, never by import path. Adding an operator is one file
(its class) plus one line here; modules are imported only when a rule names them.
"""

from __future__ import annotations

import importlib

from .base import LinearOperator, NoArgs, OpArgs, OpArgsError, Operator, Shard

# name -> "module:Class"
OPS = {
    "linear.int8_block": "hybrid_r1.ops.linear_int8:Int8BlockLinear",
    "linear.int8_channel": "hybrid_r1.ops.linear_int8:Int8ChannelLinear",
    "experts.ggml_cpu": "hybrid_r1.ops.experts_ggml:GGMLExperts",
    "experts.dequant": "hybrid_r1.ops.experts_reference:DequantExperts",
    "experts.int8_gpu": "hybrid_r1.ops.experts_int8:Int8GPUExperts",
}


def op_class(name: str) -> type[Operator]:
    module, cls = OPS[name].split(":")
    op = getattr(importlib.import_module(module), cls)
    assert issubclass(op, Operator) and op.name == name, f"{OPS[name]} does not declare name {name!r}"
    return op


__all__ = ["OPS", "op_class", "Operator", "LinearOperator", "OpArgs", "OpArgsError", "NoArgs", "Shard"]
