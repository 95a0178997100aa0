"""Decode speed of the GPU-resident part of DeepSeek-V3 at full width: BF16 vs INT8 block vs channel.

Builds a model with the 671B model's widths and a few layers straight from seeded synthetic weights
(no files), all on one GPU, and times decode steps at a given context, eagerly and replayed from
CUDA graphs (hybrid_r1/graphs.py). The routed experts live on the CPU in the hybrid setup; here each
layer's experts module is replaced by a stand-in that returns zeros, so the time is what the GPU
does per token in the real deployment (attention, dense MLP, shared expert, router, lm_head, and
the graph breaks where the CPU experts go), without the CPU's share. Reports ms per token and the
bound: weight bytes read per token / measured HBM bandwidth.

    python benchmarks/bench_decode_gpu.py OUT.md [--layers 4] [--context 1024] [--steps 32]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tune_int8 as T  # noqa: E402  (copy_bandwidth, shared by the GPU benchmarks)

from hybrid_r1 import placement
from hybrid_r1.graphs import DecodeGraphs
from hybrid_r1.loading import build, load_weights
from hybrid_r1.model import MoE
from hybrid_r1.ops import Operator
from hybrid_r1.placement import fuse
from hybrid_r1.runtime import Runtime
from hybrid_r1.synth import SyntheticWeights, preset_config


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def module_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor `module` holds, each once: parameters, buffers and the plain
    tensors operators keep (the INT8 linears' weights and scales are attributes, not parameters)."""
    seen, out = set(), []
    for prefix, sub in module.named_modules():
        own = [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False),
               *((k, v) for k, v in vars(sub).items() if isinstance(v, torch.Tensor))]
        for k, t in own:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                out.append((f"{prefix}.{k}" if prefix else k, t))
    return out


def weight_bytes(module: torch.nn.Module, skip_experts: bool) -> int:
    return sum(t.numel() * t.element_size() for name, t in module_tensors(module)
               if not (skip_experts and ".experts." in name) and "embed_tokens" not in name)  # one row a token


class ZeroExperts(Operator):
    """Where the hybrid placement runs the routed experts on the CPU: contributes nothing here, but
    breaks the decode graph as the CPU experts do (host_sync), so the step has their shape."""

    name, replaces, host_sync, moves_inputs = "bench.zero_experts", "Experts", True, True

    def load_weights(self, source, prefix, shard=None):
        pass  # no weights

    def forward(self, x, idx, w):
        return torch.zeros_like(x)


def run(cfg, scheme: str | None, context: int, steps: int, device) -> dict:
    module = build(cfg)
    for block in module.model.layers:
        if isinstance(block.mlp, MoE):
            block.mlp.experts = ZeroExperts()
    rules = placement.int8_rules(scheme, device) if scheme else []
    placement.apply(module, rules, device, torch.bfloat16)
    t0 = time.perf_counter()
    load_weights(module, SyntheticWeights(cfg, seed=0), device, torch.bfloat16)
    fuse(module)
    load_s = time.perf_counter() - t0
    rt = Runtime(module, None)
    cache = rt.new_cache()
    prompt = torch.randint(0, cfg.vocab_size, (context,)).tolist()
    with torch.inference_mode():
        for i in range(0, context, 512):
            module(torch.tensor([prompt[i : i + 512]]), cache, last_only=True)
        tok = torch.tensor([[1]])
        for _ in range(3):
            module(tok, cache, last_only=True)
        _sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            module(tok, cache, last_only=True)
        _sync(device)
        ms = (time.perf_counter() - t) / steps * 1e3
        runner = DecodeGraphs(module, cache)
        for _ in range(3):  # the first step captures
            runner.step(1)
        _sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            runner.step(1)
        _sync(device)
        ms_graphs = (time.perf_counter() - t) / steps * 1e3
        assert runner.use_graphs, "capture failed"
    out = {"ms": ms, "ms_graphs": ms_graphs, "load_s": load_s, "bytes": weight_bytes(module, skip_experts=True)}
    del module, rt, cache, runner
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dense-layers", type=int, default=1)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    cfg = preset_config("full-slice", num_hidden_layers=args.layers, first_k_dense_replace=args.dense_layers,
                        n_routed_experts=8, num_experts_per_tok=8, n_group=1, topk_group=1)
    bw = T.copy_bandwidth(device) * 1e9  # bytes/s
    rows = {name: run(cfg, scheme, args.context, args.steps, device)
            for name, scheme in (("bf16", None), ("int8 block", "block"), ("int8 channel", "channel"))}
    gpu = torch.cuda.get_device_name()
    lines = [
        f"# Decode step at full width, {args.layers} layers ({args.dense_layers} dense), context {args.context}",
        "",
        f"- GPU: {gpu}; torch {torch.__version__}; measured copy bandwidth {bw / 1e9:.0f} GB/s (read + write)",
        "- batch 1, one token per step; routed experts replaced by a zero stand-in (on the CPU in the hybrid "
        "setup; their graph breaks are kept)",
        "- bound = non-expert weight bytes read per token / measured bandwidth",
        "",
        "| weights | eager ms / token | CUDA graphs ms / token | graphs speed-up | weight GB | bound ms "
        "| graphs share of bound | graphs vs bf16 graphs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = rows["bf16"]["ms_graphs"]
    for name, r in rows.items():
        bound = r["bytes"] / bw * 1e3
        lines.append(f"| {name} | {r['ms']:.2f} | {r['ms_graphs']:.2f} | {r['ms'] / r['ms_graphs']:.1f}x | "
                     f"{r['bytes'] / 1e9:.2f} | {bound:.2f} | {bound / r['ms_graphs']:.0%} | "
                     f"{base / r['ms_graphs']:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
