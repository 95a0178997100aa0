"""Operators that placement rules may put in place of a module, by short name.

Each operator class has `from_module(module, device, dtype, **args)` (build the replacement of
`module`, weights not loaded) and `load_weights(source, prefix)` (fetch its tensors from a
WeightSource). forward takes inputs on any device and returns on the input's device, so a rule
can put an operator elsewhere than its block. Rules name operators by these keys, never by import path.
"""

from __future__ import annotations

import importlib

# name -> (module, class, what it replaces)
OPS = {
    "linear.int8_block": ("hybrid_r1.ops.linear_int8", "Int8BlockLinear", "Linear"),
    "linear.int8_channel": ("hybrid_r1.ops.linear_int8", "Int8ChannelLinear", "Linear"),
    "experts.ggml_cpu": ("hybrid_r1.ops.experts_ggml", "GGMLExperts", "Experts"),
    "experts.dequant": ("hybrid_r1.ops.experts_reference", "DequantExperts", "Experts"),
}


def op_class(name: str):
    module, cls, _ = OPS[name]
    return getattr(importlib.import_module(module), cls)
