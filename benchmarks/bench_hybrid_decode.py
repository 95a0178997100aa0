"""The product's hybrid placement end to end at 671B width, a few layers: decode and prefill speed.

Builds a model with DeepSeek-V3's widths and `--layers` layers (the first dense), places it with
rules/int8-gpu-ggml-experts.yaml (INT8 Triton linears on the GPU, routed experts GGML Q4_K/Q6_K in
CPU RAM, GPU expert prefill from 256 tokens), fills the non-expert weights from seeded synthetic
tensors and each MoE layer's 256 experts from bench_experts_cpu.py's tiled ggml blocks (7.3 GB a
layer), then times, after a prompt of --context tokens:
  decode ms per token, eager and with CUDA graphs (the CPU experts run between graphs),
  the CPU experts' own share (GGMLExperts alone, one token),
  prefill tokens/s at two chunk sizes,
and extrapolates to the full model (3 dense + 58 MoE layers) from the per-layer costs.

  python benchmarks/bench_hybrid_decode.py OUT.md [--layers 4] [--context 1024] [--steps 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_experts_cpu import Q6_K, TiledSource, cpu_model  # noqa: E402

from hybrid_r1 import placement  # noqa: E402
from hybrid_r1.generate import forward_tokens, prefill  # noqa: E402
from hybrid_r1.graphs import DecodeGraphs, is_replay  # noqa: E402
from hybrid_r1.loading import build, load_weights
from hybrid_r1.placement import fuse  # noqa: E402
from hybrid_r1.runtime import Runtime  # noqa: E402
from hybrid_r1.synth import SyntheticWeights, preset_config  # noqa: E402

RULES = Path(__file__).resolve().parents[1] / "rules" / "int8-gpu-ggml-experts.yaml"
FULL_DENSE, FULL_MOE = 3, 58


class HybridSource:
    """Synthetic dense weights; routed experts from tiled ggml blocks (model layer -> tiled layer)."""

    def __init__(self, cfg, experts: TiledSource, first_moe: int):
        self.synth, self.experts, self.first_moe = SyntheticWeights(cfg, seed=0), experts, first_moe
        self.path = "synthetic"

    def ggml_experts(self, layer: int):
        return self.experts.ggml_experts(layer - self.first_moe)

    def __getattr__(self, name):
        return getattr(self.synth, name)


def timed(fn, reps: int) -> float:
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prefill", type=int, default=2048, help="prompt length for the prefill timing")
    ap.add_argument("--poll", type=int, nargs="+", default=[0],
                    help="ggml workers' spin between calls (0-100; the rule file's default first): decode is "
                         "timed for each")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    cfg = preset_config("full-slice", num_hidden_layers=args.layers, first_k_dense_replace=1)
    n_moe = args.layers - 1
    t0 = time.perf_counter()
    tiled = TiledSource(cfg.n_routed_experts, n_moe, Q6_K, 2)
    module = build(cfg)
    placements = placement.apply(module, placement.load_rules(RULES), device, torch.bfloat16)
    load_weights(module, HybridSource(cfg, tiled, 1), device, torch.bfloat16)
    fuse(module)
    rt = Runtime(module, None, placements=placements)
    build_s = time.perf_counter() - t0
    prompt = torch.randint(0, cfg.vocab_size, (max(args.context, args.prefill),)).tolist()

    with torch.inference_mode():
        # prefill at two chunk sizes (fresh cache each), then decode after --context tokens
        pre = {}
        for chunk in (512, 2048):  # one untimed run each first: Triton compiles per M bucket
            prefill(module, prompt[: args.prefill], rt.new_cache(), chunk)
        for chunk in (512, 2048):
            pre[chunk] = timed(lambda: prefill(module, prompt[: args.prefill], rt.new_cache(), chunk), 3)
        cache = rt.new_cache()
        logits = prefill(module, prompt[: args.context], cache, 512)
        tok = int(logits.argmax())
        for _ in range(2):
            logits = forward_tokens(module, [tok], cache)[-1]
        eager = timed(lambda: forward_tokens(module, [tok], cache), args.steps)
        runner = DecodeGraphs(module, cache)
        runner.step(tok)  # captures
        assert runner.use_graphs, "capture failed"
        replays = [seg for seg in runner.segments if is_replay(seg)]
        gpu_only = timed(lambda: [r() for r in replays], args.steps)  # the graphs back to back, no experts
        experts = module.model.layers[1].mlp.experts
        x = torch.randn(1, cfg.hidden_size, dtype=torch.bfloat16)
        idx = torch.randperm(cfg.n_routed_experts)[: cfg.num_experts_per_tok][None]
        w = torch.rand(1, cfg.num_experts_per_tok)
        cpu_ms = timed(lambda: experts(x, idx, w), args.steps)
        by_poll = {}
        moe_experts = [b.mlp.experts for b in module.model.layers if cfg.is_moe_layer(b.self_attn.layer)]
        for poll in args.poll:  # last: each poll value starts its own ggml thread pool
            for e in moe_experts:
                e.poll = poll
            by_poll[poll] = timed(lambda: runner.step(tok), args.steps)
        graphs = by_poll[args.poll[0]]

    # Per-layer split: the CPU experts' share is cpu_ms per MoE layer; the rest is the GPU's.
    gpu_share = (graphs - n_moe * cpu_ms) / args.layers
    full_ms = (FULL_DENSE + FULL_MOE) * gpu_share + FULL_MOE * cpu_ms
    pre_full = {c: args.prefill / (ms / args.layers * (FULL_DENSE + FULL_MOE) / 1e3) for c, ms in pre.items()}
    gpu = torch.cuda.get_device_name()
    lines = [
        f"# Hybrid placement end to end at 671B width: {args.layers} layers (1 dense), rules/int8-gpu-ggml-experts.yaml",
        "",
        f"- GPU: {gpu}; CPU: {cpu_model()} ({len(os.sched_getaffinity(0))} logical CPUs); torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d')}; built and loaded in {build_s:.0f} s",
        "- non-expert weights synthetic, INT8 block on the GPU; routed experts 256 x (Q4_K gate/up, Q6_K down) "
        "in CPU RAM, tiled from ggml-quantized blocks; random routing from the synthetic router",
        f"- decode after {args.context} tokens, batch 1, median of {args.steps} steps; prefill of {args.prefill} "
        "tokens, fresh cache, median of 3 after one untimed run",
        "- full model, an upper bound: 61 layers x the GPU share per layer (the 4-layer average, which counts "
        "the dense layer's big MLP once in 4) + 58 x the CPU experts per token",
        "",
        "| what | measured | per layer | full model (extrapolated) |",
        "|---|---|---|---|",
        f"| decode, eager | {eager:.1f} ms / token | {eager / args.layers:.2f} ms | |",
        f"| decode, CUDA graphs | {graphs:.1f} ms / token | {graphs / args.layers:.2f} ms | "
        f"<= {full_ms:.0f} ms / token, >= {1e3 / full_ms:.1f} tok/s |",
        *[f"| decode, CUDA graphs, ggml poll {p} | {ms:.1f} ms / token | {ms / args.layers:.2f} ms | |"
          for p, ms in by_poll.items() if p != args.poll[0]],
        f"| of which CPU experts (one token, one layer) | {cpu_ms:.2f} ms | | {FULL_MOE * cpu_ms:.0f} ms / token |",
        f"| of which GPU, per layer (graphs - experts) | | {gpu_share:.2f} ms | "
        f"{(FULL_DENSE + FULL_MOE) * gpu_share:.0f} ms / token |",
        f"| the graphs alone, replayed back to back | {gpu_only:.2f} ms / token | {gpu_only / args.layers:.2f} ms | |",
        f"| remainder: hand-over to and from the CPU experts (copies, syncs, waking ggml's threads) "
        f"| {graphs - gpu_only - n_moe * cpu_ms:.2f} ms / token "
        f"| {(graphs - gpu_only - n_moe * cpu_ms) / max(n_moe, 1):.2f} ms a MoE layer | |",
        *[f"| prefill {args.prefill} tokens, chunk {c} | {ms:.0f} ms | {ms / args.layers:.0f} ms | "
          f"{pre_full[c]:.0f} tok/s |" for c, ms in pre.items()],
        "",
    ]
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
