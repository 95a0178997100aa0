"""Routing counts: how often each routed expert of each MoE layer is chosen on a calibration text,
so the most-used ones can be kept on the GPU (experts.ggml_cpu's `gpu_experts`, experts_resident.py).

    hybrid-r1 calibrate --model DIR --text FILE --out hot-experts.json

Counts come from the model's own router (a forward hook on each Gate: no second code path), over
the text's tokens fed in chunks. The file is JSON {"tokens": N, "n_experts": E, "layers": {"3": [c0,
..., c255], ...}}; `hottest` orders a layer's experts by count, ties by expert id, so the choice is a
pure function of the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import HybridR1Error
from .staging import staged_file


class CalibrationError(HybridR1Error, ValueError):
    """A routing-count file that cannot be read or does not fit the model."""


@dataclass
class RoutingCounts:
    tokens: int
    n_experts: int
    layers: dict[int, list[int]]

    def hottest(self, layer: int, n: int) -> tuple[int, ...]:
        """The `n` most-chosen experts of `layer` (ties: lower id first), in ascending id order."""
        counts = self.layers.get(layer)
        if counts is None:
            raise CalibrationError(f"the routing counts hold no layer {layer} (layers {self._span()})")
        order = sorted(range(self.n_experts), key=lambda e: (-counts[e], e))
        return tuple(sorted(order[:n]))

    def _span(self) -> str:
        return ", ".join(map(str, sorted(self.layers))) or "none"

    def save(self, path: str | Path, force: bool = False) -> Path:
        data = {"tokens": self.tokens, "n_experts": self.n_experts,
                "layers": {str(k): v for k, v in sorted(self.layers.items())}}
        with staged_file(Path(path), force=force) as tmp:
            tmp.write_text(json.dumps(data) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> RoutingCounts:
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CalibrationError(f"{p}: not a routing-count file ({e})") from None
        try:
            n = data["n_experts"]
            layers = {int(k): v for k, v in data["layers"].items()}
            tokens = data["tokens"]
            ok = (isinstance(n, int) and n > 0 and isinstance(tokens, int)
                  and all(isinstance(v, list) and len(v) == n and all(isinstance(c, int) and c >= 0 for c in v)
                          for v in layers.values()))
        except (KeyError, TypeError, ValueError, AttributeError):
            ok = False
        if not ok:
            raise CalibrationError(f"{p}: expected {{\"tokens\": N, \"n_experts\": E, \"layers\": {{layer: [E counts]}}}} "
                                   "(hybrid-r1 calibrate writes it)")
        return cls(tokens, n, layers)


@torch.inference_mode()
def count_routing(runtime, token_ids: list[int], chunk: int = 2048) -> RoutingCounts:
    """Feed `token_ids` through the loaded model (fresh cache, chunks of `chunk`) and count the
    router's choices per MoE layer."""
    from .generate import forward_tokens
    from .model import MoE

    cfg = runtime.config
    ids = runtime.check_ids(token_ids)
    counts: dict[int, torch.Tensor] = {}
    hooks = []
    for i, block in enumerate(runtime.module.model.layers):
        if isinstance(block.mlp, MoE):
            gate = block.mlp.gate
            counts[i] = torch.zeros(cfg.n_routed_experts, dtype=torch.int64)

            def hook(mod, args, out, layer=i):
                counts[layer] += torch.bincount(out[0].flatten().cpu(), minlength=cfg.n_routed_experts)

            hooks.append(gate.register_forward_hook(hook))
    try:
        cache = runtime.new_cache()
        for s in range(0, len(ids), chunk):
            forward_tokens(runtime.module, ids[s:s + chunk], cache, last_only=True)
    finally:
        for h in hooks:
            h.remove()
    return RoutingCounts(len(ids), cfg.n_routed_experts, {k: v.tolist() for k, v in counts.items()})
