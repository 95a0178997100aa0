"""Prefill at 671B width: routed experts streamed to the GPU against the PCIe bound, the CPU path
against it, and a 4-layer model end to end, in one run.

Part 1, one MoE layer (256 experts, Q4_K gate/up, Q6_K down = 7.3 GB, bench_experts_cpu.py's tiled
blocks; `--layers` of them rotated so no call finds the last one's bytes in a cache; fresh random
routing every call, 8 experts a token): for each prompt length, ms per layer of
  the GPU stream from page-locked pages ("register"), its copy engine time, compute time, overlap,
  and the bound = used-expert bytes / pinned host-to-GPU bandwidth measured in this run;
  the GPU stream through a pinned bounce buffer ("bounce"), at a few lengths;
  ggml on the CPU (at the shorter lengths: 2K tokens already take ~2 s a layer);
and the cost model's choice (ops/prefill_cost.py, with the profile measured here) beside the two.
Part 2, the product's placement (rules/int8-gpu-ggml-experts.yaml: INT8 GPU linears, the cost model
choosing each MoE layer's path) on a model of 1 dense + `--layers` MoE layers at full width,
prefill of each length with the chunk chosen from the memory: ms, and the full model (3 dense + 58
MoE layers) extrapolated as 58 / layers x the measured time (the dense layer counted 58 / layers
times instead of 3: an upper bound on the time).

  python benchmarks/bench_prefill.py OUT.md [--tokens 128 512 1024 2048 8192 32768] [--profile P.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_experts_cpu import H, I, K, Q6_K, TiledSource, cpu_model  # noqa: E402
from bench_experts_prefill import h2d_gbs, staging_gbs  # noqa: E402
from bench_hybrid_decode import RULES, HybridSource  # noqa: E402

from hybrid_r1 import ggml_lib, placement  # noqa: E402
from hybrid_r1.generate import prefill  # noqa: E402
from hybrid_r1.loading import build, load_weights  # noqa: E402
from hybrid_r1.ops import experts_gpu_prefill as egp  # noqa: E402
from hybrid_r1.ops import prefill_cost  # noqa: E402
from hybrid_r1.ops.experts_ggml import GGMLExperts  # noqa: E402
from hybrid_r1.prefill_chunk import chunk_size, free_bytes  # noqa: E402
from hybrid_r1.runtime import Runtime  # noqa: E402
from hybrid_r1.synth import preset_config  # noqa: E402

FULL_DENSE, FULL_MOE = 3, 58
E = 256


def routing(tokens: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(tokens, H, generator=gen, dtype=torch.bfloat16)
    idx = torch.rand(tokens, E, generator=gen).argsort(1)[:, :K]  # K distinct experts a token, uniform
    return x, idx, torch.rand(tokens, K, generator=gen)


def run(ops, tokens: int, reps: int, seed: int, device) -> tuple[float, float, list]:
    """(median ms, mean used-expert bytes, stream stats of each call) over `reps` calls, layers rotated."""
    gen = torch.Generator().manual_seed(seed)
    per_expert = sum(ops[0].tensors[p].expert(0).nbytes for p in ("gate", "up", "down"))
    times, nbytes, stats = [], [], []
    for i in range(reps):
        op = ops[i % len(ops)]
        x, idx, w = (t.to(device) for t in routing(tokens, gen))  # on the GPU, as the model hands them
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        op(x, idx, w)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        nbytes.append(len(idx.unique()) * per_expert)
        if op.prefill is not None and op.prefill.timing:
            stats.append(op.prefill.last_stats())
    return statistics.median(times) * 1e3, statistics.mean(nbytes), stats


def layer_ops(src, n_layers: int, device: str | None, pinning: str = "register", min_tokens: int = 1):
    ops = []
    for layer in range(n_layers):
        op = GGMLExperts(E, H, I, threads=ggml_lib.physical_cores(), chunk_tokens=4096, prefill_device=device,
                         prefill_min_tokens=min_tokens if device else None, prefill_pinning=pinning)
        op.load_weights(src, f"model.layers.{layer}.mlp.experts")
        if op.prefill is not None:  # one layer alone: nothing copied ahead by a previous layer
            op.prefill.timing, op.prefill.prefetch = True, False
        ops.append(op)
    return ops


def registered_gbs(op, device) -> float:
    """Host-to-GPU rate of the locked pages of one tensor (the gate blocks of a layer) read in place
    (its first and last pages may stay unlocked: a copy may not span both kinds)."""
    src = op.prefill._source(0, 0, E)
    lo, hi = max(((a, b) for a, b, locked in op.prefill.pinned.split(src.data_ptr(), src.numel()) if locked),
                 key=lambda r: r[1] - r[0])
    src = src[lo:hi]
    dst = torch.empty(src.numel(), dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    return src.numel() / (time.perf_counter() - t0) / 1e9


def median_stats(stats):
    return sorted(stats, key=lambda s: s.wall_ms)[len(stats) // 2] if stats else None


def part1(args, src, device, h2d):
    t0 = time.perf_counter()
    gpu = layer_ops(src, args.layers, args.device)
    reg_s = time.perf_counter() - t0
    pinning = gpu[0].prefill.pinning
    reg_gbs = registered_gbs(gpu[0], device) if pinning == "register" else float("nan")
    bounce = layer_ops(src, args.layers, args.device, "bounce")
    cpu = layer_ops(src, args.layers, None)
    per_expert = gpu[0].prefill.per_expert
    engine = cpu[0].engine_class.name  # the CPU column's engine (auto: kt-kernel where installed)
    for ops in (gpu, bounce):  # untimed: Triton compiles the expander on the first call
        run(ops, 256, 1, 0, device)
    rows, measured = [], {}
    for T in args.tokens:
        ms_g, nbytes, st = run(gpu, T, args.reps, T, device)
        s = median_stats(st)
        bound = nbytes / h2d / 1e6
        ms_b = run(bounce, T, max(2, args.reps // 2), T + 1, device)[0] if T in args.bounce_tokens else None
        ms_c = run(cpu, T, max(2, args.reps // 2), T + 2, device)[0] if T in args.cpu_tokens else None
        measured[T] = (ms_g, ms_c, bound, nbytes, s)
        rows.append((T, ms_g, s, bound, nbytes, ms_b, ms_c))
        print(T, f"{ms_g:.0f} ms GPU, bound {bound:.0f}", s, ms_b, ms_c, flush=True)
    for op in gpu:
        if op.prefill.pinned is not None:
            op.prefill.pinned.close()  # before part 2 locks the same pages again
    del gpu, bounce, cpu
    gc.collect()
    # The profile measured here: the stream's share of the bound at 2K+ tokens, the CPU table.
    long = [measured[T] for T in measured if T >= 2048]
    share = statistics.median(b / g for g, _, b, _, _ in long) if long else prefill_cost.PrefillProfile().stream_share
    fixed = min((g - b / share for g, _, b, _, _ in measured.values()), default=3.0)
    cpu_table = tuple((T, m[1]) for T, m in sorted(measured.items()) if m[1] is not None)
    profile = replace(prefill_cost.PrefillProfile(), h2d_gbs=round(h2d, 1), stream_share=round(min(share, 1.0), 3),
                      gpu_fixed_ms=round(max(fixed, 0.0), 1), layer_bytes=per_expert * E,
                      cpu_ms={**prefill_cost.PrefillProfile().cpu_ms, **({engine: cpu_table} if len(cpu_table) >= 2 else {})})
    return rows, profile, {"register_s": reg_s, "pinning": pinning, "registered_gbs": reg_gbs, "per_expert": per_expert,
                           "engine": engine}


def part2(args, src, device, profile_path):
    cfg = preset_config("full-slice", num_hidden_layers=args.layers + 1, first_k_dense_replace=1)
    rules = placement.load_rules(RULES)
    if profile_path:
        for r in rules:
            if r.op == "experts.ggml_cpu":
                r.args = replace(r.args, prefill_profile=str(profile_path))
    t0 = time.perf_counter()
    module = build(cfg)
    placements = placement.apply(module, rules, device, torch.bfloat16)
    load_weights(module, HybridSource(cfg, src, 1), device, torch.bfloat16)
    placement.fuse(module)
    rt = Runtime(module, None, placements=placements)
    build_s = time.perf_counter() - t0
    experts = module.model.layers[1].mlp.experts
    out = []
    with torch.inference_mode():
        for T in args.model_tokens:
            prompt = torch.randint(0, cfg.vocab_size, (T,)).tolist()
            chunk = chunk_size(cfg, T, free_bytes(device))
            times = []
            for i in range(1 + args.model_reps):  # the first: Triton compiles for new row counts
                torch.cuda.synchronize(device)
                t1 = time.perf_counter()
                prefill(module, prompt, rt.new_cache())
                torch.cuda.synchronize(device)
                if i:
                    times.append(time.perf_counter() - t1)
            ms = statistics.median(times) * 1e3
            path = "GPU" if experts.use_gpu(chunk, cfg.num_experts_per_tok) else "CPU"
            out.append((T, chunk, path, ms, ""))
            print("model", T, chunk, path, f"{ms:.0f} ms", flush=True)
        moe = [b.mlp.experts for b in module.model.layers if cfg.is_moe_layer(b.self_attn.layer)]
        for T in [t for t in args.model_tokens if t >= 2048][-1:]:  # the longest again, nothing copied ahead
            for e in moe:
                e.prefill.prefetch = False
            prompt = torch.randint(0, cfg.vocab_size, (T,)).tolist()
            torch.cuda.synchronize(device)
            t1 = time.perf_counter()
            prefill(module, prompt, rt.new_cache())
            torch.cuda.synchronize(device)
            out.append((T, chunk_size(cfg, T, free_bytes(device)), "GPU", (time.perf_counter() - t1) * 1e3,
                        ", next layer not copied ahead"))
    return out, build_s, experts.prefill.pinning if experts.prefill else "none"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--layers", type=int, default=3, help="MoE layers (tiled, rotated)")
    p.add_argument("--tokens", type=int, nargs="+", default=[128, 512, 1024, 2048, 8192, 32768])
    p.add_argument("--cpu-tokens", type=int, nargs="+", default=[128, 512, 1024, 2048])
    p.add_argument("--bounce-tokens", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--model-tokens", type=int, nargs="+", default=[128, 512, 1024, 2048, 8192, 32768])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--model-reps", type=int, default=1)
    p.add_argument("--profile", help="write the measured machine profile here (JSON, for prefill_profile)")
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_prefill.py needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    t0 = time.perf_counter()
    src = TiledSource(E, args.layers, Q6_K, 2)
    tiled_s = time.perf_counter() - t0
    h2d, stage = h2d_gbs(device), staging_gbs(src)
    rows, profile, info = part1(args, src, device, h2d)
    if args.profile:
        Path(args.profile).write_text(json.dumps(asdict(profile), indent=1) + "\n")
    per_expert = info["per_expert"]

    engine = info["engine"]

    def choice(T):
        return "GPU" if prefill_cost.use_gpu(profile, engine, T, E, K, per_expert) else "CPU"

    gpu = torch.cuda.get_device_name(device)
    cross = prefill_cost.crossover(profile, engine, E, K, per_expert)
    lines = [
        "# Prefill at 671B width: experts streamed to the GPU vs the PCIe bound, the CPU path, a 4-layer model",
        "",
        f"- GPU: {gpu}; CPU: {cpu_model()} ({len(os.sched_getaffinity(0))} logical CPUs, CPU "
        f"engine {engine}, {ggml_lib.physical_cores()} threads); torch {torch.__version__}; {time.strftime('%Y-%m-%d')}",
        f"- layer: {E} experts, Q4_K gate/up, Q6_K down = {per_expert * E / 1e9:.2f} GB; {args.layers} layers rotated; "
        f"{K} experts a token, fresh uniform random routing each call; tiled in {tiled_s:.0f} s",
        f"- pinned host -> GPU (torch pinned buffer, 1 GiB): {h2d:.1f} GB/s; a registered (page-locked in place) "
        f"layer tensor -> GPU: {info['registered_gbs']:.1f} GB/s; mapped blocks -> pinned by CPU threads "
        f"(the bounce path's first leg): {stage:.1f} GB/s",
        f"- page-locking {args.layers} layers ({args.layers * per_expert * E / 1e9:.1f} GB, cuMemHostRegister "
        f"read-only): {info['register_s']:.1f} s, once at load; pinning used: {info['pinning']}",
        "- bound = used-expert bytes / pinned host -> GPU bandwidth; copy = the copy engine busy (CUDA events "
        "per group), compute = expansion + products busy, overlap = share of the shorter hidden under the longer; "
        "copy waits = the copy engine idle for a buffer's compute or for the host's next copy; host = the call's "
        f"host time; {E // max(1, egp.GROUP_BYTES // per_expert) + 1} groups of up to {egp.GROUP_BYTES >> 20} MiB",
        f"- cost model (ops/prefill_cost.py) with the profile measured here: stream share {profile.stream_share:.2f}, "
        f"fixed {profile.gpu_fixed_ms} ms a call; GPU chosen from {cross} tokens",
        f"- `python benchmarks/bench_prefill.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        "## One MoE layer",
        "",
        "| tokens | GPU ms / layer | bound ms | share of bound | copy ms | compute ms | overlap | copy waits "
        "on compute / host ms | host ms | bounce ms | CPU ms | chosen | chosen vs best |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for T, ms_g, s, bound, nbytes, ms_b, ms_c in rows:
        ch = choice(T)
        best = min(m for m in (ms_g, ms_c) if m is not None)
        took = ms_g if ch == "GPU" or ms_c is None else ms_c
        lines.append(
            f"| {T} | {ms_g:.0f} | {bound:.0f} | {bound / ms_g:.0%} | {s.copy_ms:.0f} | {s.compute_ms:.0f} | "
            f"{s.overlap:.0%} | {s.copy_wait_compute_ms:.0f} / {s.copy_wait_host_ms:.0f} | {s.host_ms:.0f} | "
            f"{'' if ms_b is None else f'{ms_b:.0f}'} | "
            f"{'' if ms_c is None else f'{ms_c:.0f}'} | {ch} | {took / best - 1:+.0%} |")
    Path(args.out).write_text("\n".join(lines + [""]))  # part 1 kept if part 2 fails
    model_rows, build_s, model_pinning = part2(args, src, device, args.profile) if args.model_tokens else ([], 0, "")
    if model_rows:
        lines += [
            "", f"## Model: 1 dense + {args.layers} MoE layers, rules/int8-gpu-ggml-experts.yaml "
            f"(built in {build_s:.0f} s; experts pinning: {model_pinning})", "",
            "| tokens | chunk | experts on | ms (measured) | ms / MoE layer | full model s (extrapolated) "
            "| tok/s full model | streaming bound tok/s |",
            "|---|---|---|---|---|---|---|---|"]
        for T, chunk, path, ms, note in model_rows:
            full_s = ms * FULL_MOE / args.layers / 1e3
            passes = -(-T // chunk)
            used = prefill_cost.used_experts(chunk, E, K) * per_expert
            bound_s = passes * FULL_MOE * used / h2d / 1e9
            lines.append(f"| {T}{note} | {chunk} | {path} | {ms:.0f} | {ms / args.layers:.0f} | {full_s:.1f} | "
                         f"{T / full_s:.0f} | {T / bound_s:.0f} |")
    lines.append("")
    text = "\n".join(lines)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
