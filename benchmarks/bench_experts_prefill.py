"""Prefill of one MoE layer at 671B width: routed experts on the CPU (ggml) vs streamed to the GPU
(GGMLExperts with prefill_device), in one run, against the PCIe bound.

Per layer: 256 experts, Q4_K gate/up, Q6_K down (7.3 GB; bench_experts_cpu.py's tiled layer), random
routing, 8 experts a token. For each token count: ms per layer on each path (torch in, torch out),
GB of used-expert blocks, and the GPU path's bound = those bytes / the pinned host-to-device
bandwidth measured in the same run. Also: the host copy rate from the mapped blocks into pinned
memory (the GPU path stages every expert through it).

  python benchmarks/bench_experts_prefill.py RESULT.md [--tokens 128 512 2048 4096] [--layers 2]
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
from bench_experts_cpu import H, I, K, Q6_K, TiledSource, cpu_model  # noqa: E402

from hybrid_r1 import ggml_lib  # noqa: E402
from hybrid_r1.ops.experts_ggml import GGMLExperts  # noqa: E402


def h2d_gbs(device, mb: int = 1024) -> float:
    src = torch.empty(mb << 20, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(src, device=device)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(3):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    return 3 * src.numel() / (time.perf_counter() - t0) / 1e9


def staging_gbs(src: TiledSource) -> float:
    data = src.layers[0]["gate"].data
    pinned = torch.empty(data.nbytes, dtype=torch.uint8, pin_memory=True)
    view = torch.from_numpy(data.reshape(-1))
    pinned.copy_(view)
    t0 = time.perf_counter()
    pinned.copy_(view)
    return data.nbytes / (time.perf_counter() - t0) / 1e9


def run(ops, n_experts: int, tokens: int, reps: int, seed: int, device) -> tuple[float, float, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    times, nbytes, last = [], [], None
    per_expert = sum(ops[0].tensors[p].expert(0).nbytes for p in ("gate", "up", "down"))
    for i in range(reps):
        op = ops[i % len(ops)]
        x = torch.randn(tokens, H, generator=gen, dtype=torch.bfloat16)
        idx = torch.stack([torch.randperm(n_experts, generator=gen)[:K] for _ in range(tokens)])
        w = torch.rand(tokens, K, generator=gen)
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        last = op(x, idx, w)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        nbytes.append(len(idx.unique()) * per_expert)
    return statistics.median(times) * 1e3, statistics.mean(nbytes), last


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tokens", type=int, nargs="+", default=[128, 512, 2048, 4096])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_experts_prefill.py needs a CUDA GPU")
    device = torch.device(args.device)
    src = TiledSource(args.experts, args.layers, Q6_K, 2)
    layer_gb = sum(t.data.nbytes for t in src.layers[0].values()) / 1e9
    threads = ggml_lib.physical_cores()

    def layers(gpu: bool):
        ops = []
        for layer in range(args.layers):
            op = GGMLExperts(args.experts, H, I, threads=threads, chunk_tokens=4096,
                             prefill_device=args.device if gpu else None, prefill_min_tokens=1)
            op.load_weights(src, f"model.layers.{layer}.mlp.experts")
            ops.append(op)
        return ops

    cpu_ops, gpu_ops = layers(False), layers(True)
    h2d, stage = h2d_gbs(device), staging_gbs(src)
    rows = []
    for T in args.tokens:
        ms_c, nbytes, y_c = run(cpu_ops, args.experts, T, args.reps, T, device)
        ms_g, _, y_g = run(gpu_ops, args.experts, T, args.reps, T, device)
        diff = float((y_g.float() - y_c.float()).norm() / y_c.float().norm())
        bound = nbytes / h2d / 1e6
        rows.append(f"| {T} | {ms_c:.0f} | {ms_g:.0f} | {ms_c / ms_g:.2f}x | {nbytes / 1e9:.2f} | {bound:.0f} | "
                    f"{bound / ms_g:.0%} | {diff:.1e} |")
        print(rows[-1], flush=True)
    gpu = torch.cuda.get_device_name(device)
    text = "\n".join([
        "# Routed-expert prefill: CPU (ggml) vs GPU (streamed GGUF blocks), one MoE layer at 671B width", "",
        f"- CPU: {cpu_model()} ({len(os.sched_getaffinity(0))} logical CPUs, ggml {threads} threads); GPU: {gpu}; "
        f"torch {torch.__version__}; {time.strftime('%Y-%m-%d')}",
        f"- layer: {args.experts} experts, Q4_K gate/up, Q6_K down = {layer_gb:.2f} GB; {args.layers} layers rotated; "
        f"{K} experts a token, random routing; bf16 in and out",
        f"- pinned host -> GPU: {h2d:.1f} GB/s; mapped blocks -> pinned (torch copy, {torch.get_num_threads()} "
        f"threads): {stage:.1f} GB/s",
        "- GPU bound = used-expert bytes / host-to-GPU bandwidth; diff = ||gpu - cpu|| / ||cpu|| (the two "
        "round activations differently: Q8_K on the CPU, BF16 on the GPU)",
        f"- `python benchmarks/bench_experts_prefill.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
        "| tokens | CPU ms / layer | GPU ms / layer | GPU speed-up | GB of used experts | GPU bound ms "
        "| GPU share of bound | diff |",
        "|---|---|---|---|---|---|---|---|",
        *rows, ""])
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
