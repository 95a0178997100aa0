"""Activation quantizer benchmark: per-token-group (block W8A8) and per-token (channel W8A8) on the
DeepSeek-V3 linear input widths, the shipped launch settings vs a sweep of alternatives, against
the physical bound (bytes read + written / measured copy bandwidth), in one run.

    python benchmarks/bench_act_quant.py RESULT.md [--json RAW.json] [--m 1 16 1024 4096]

The sweep is how kernels/act_quant.py's launch heuristics were chosen; rerun it on a new GPU.
Times are medians of CUDA-graph replays of 8 calls that rotate through distinct inputs of >= 3x L2
in total, so every call reads from HBM as in a forward pass.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tune_int8 as T  # noqa: E402  (CUDA-graph timer)

WIDTHS = (512, 1536, 2048, 7168, 16384, 18432)  # kv_b, q_b, shexp down, hidden, o, dense down


def _inputs(M, K, dev):
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20)
    n = max(2, min(64, math.ceil(3 * l2 / (M * K * 2))))
    return [torch.randn(M, K, device=dev).bfloat16() for _ in range(n)]


def token_variants(M, K):
    from hybrid_r1_kernels.act_quant import _ONE_PASS_MAX_K
    out = []
    bk_full = triton.next_power_of_2(max(K, 16))
    if K <= _ONE_PASS_MAX_K:
        for br in (1, 2, 4):
            for warps in (4, 8, 16, 32):
                if br * bk_full <= 32768 and br <= max(1, M):
                    out.append(dict(BLOCK_R=br, BLOCK_K=bk_full, ONE_PASS=True, num_warps=warps))
    for br in (1, 4):
        for bk in (1024, 2048, 4096):
            for warps in (4, 8):
                if bk < bk_full and br <= max(1, M):
                    out.append(dict(BLOCK_R=br, BLOCK_K=bk, ONE_PASS=False, num_warps=warps))
    return out


def group_variants(M, K):
    return [dict(BLOCK_P=bp, num_warps=w) for bp in (4, 8, 16, 32, 64) for w in (1, 2, 4, 8)
            if bp * 128 // (32 * w) >= 4]


def run_token(xs, qs, ss, v):
    from hybrid_r1_kernels.act_quant import _token_quant_kernel
    M, K = xs[0].shape
    fns = [lambda x=x, q=q, s=s: _token_quant_kernel[(triton.cdiv(M, v["BLOCK_R"]),)](
        x, q, s, M, K, x.stride(0), BLOCK_R=v["BLOCK_R"], BLOCK_K=v["BLOCK_K"], TRUNC=False,
        ONE_PASS=v["ONE_PASS"], num_warps=v["num_warps"]) for x, q, s in zip(xs, qs, ss)]
    return T.time_calls(fns)


def run_group(xs, qs, ss, v):
    from hybrid_r1_kernels.act_quant import _group_quant_kernel
    M, K = xs[0].shape
    n_groups = triton.cdiv(K, 128)
    pairs = M * n_groups
    fns = [lambda x=x, q=q, s=s: _group_quant_kernel[(triton.cdiv(pairs, v["BLOCK_P"]),)](
        x, q, s, pairs, K, n_groups, x.stride(0), GROUP=128, BLOCK_P=v["BLOCK_P"], TRUNC=False,
        num_warps=v["num_warps"]) for x, q, s in zip(xs, qs, ss)]
    return T.time_calls(fns)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--m", type=int, nargs="+", default=[1, 4, 16, 256, 1024, 4096])
    p.add_argument("--k", type=int, nargs="+", default=list(WIDTHS))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_act_quant.py needs a CUDA GPU")
    from hybrid_r1_kernels.act_quant import per_token_group_quant, per_token_quant
    dev = torch.device("cuda", torch.cuda.current_device())
    bw = T.copy_bandwidth(dev)
    gpu = torch.cuda.get_device_name(dev)
    rows = []
    for K in args.k:
        for M in args.m:
            xs = _inputs(M, K, dev)
            qs = [torch.empty(M, K, dtype=torch.int8, device=dev) for _ in xs]
            for kind in ("group", "token"):
                n_s = triton.cdiv(K, 128) if kind == "group" else 1
                ss = [torch.empty(M, n_s, device=dev) for _ in xs]
                shipped_fn = per_token_group_quant if kind == "group" else per_token_quant
                shipped = T.time_calls([lambda x=x, q=q, s=s: shipped_fn(x, out=(q, s))
                                        for x, q, s in zip(xs, qs, ss)])
                best = (shipped, "shipped")
                variants = group_variants(M, K) if kind == "group" else token_variants(M, K)
                for v in variants:
                    try:
                        us = (run_group if kind == "group" else run_token)(xs, qs, ss, v)
                    except Exception as e:  # a variant can exceed resources
                        print(f"  {kind} M={M} K={K} {v}: {type(e).__name__}: {str(e)[:100]}")
                        continue
                    if us < best[0]:
                        best = (us, v)
                bound = (3 * M * K + 4 * M * n_s) / bw / 1e3
                rows.append(dict(kind=kind, M=M, K=K, shipped=shipped, best=best[0], best_cfg=best[1],
                                 bound=bound))
                print(f"{kind:5s} M={M:5d} K={K:5d} shipped {shipped:7.1f} best {best[0]:7.1f} "
                      f"bound {bound:6.1f} us  {best[1]}", flush=True)
            del xs, qs
    L = [f"# INT8 activation quantizers on {gpu}", "",
         f"- {gpu}; torch {torch.__version__}, triton {triton.__version__}; {time.strftime('%Y-%m-%d')}",
         f"- copy bandwidth (read + write): {bw:.0f} GB/s; bound = (2 B read + 1 B written per element "
         "+ scales) / that bandwidth; at small M every kernel is latency-bound (a launch and a few "
         "dependent memory round trips, ~1.5 us), far above the bytes bound",
         "- shipped: the launch settings in kernels/act_quant.py; best: the fastest of the sweep", "",
         "| quantizer | M | K | shipped us | best us | bound us | shipped / bound | best settings |",
         "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        L.append(f"| {r['kind']} | {r['M']} | {r['K']} | {r['shipped']:.1f} | {r['best']:.1f} | "
                 f"{r['bound']:.2f} | {r['shipped'] / r['bound']:.1f}x | {r['best_cfg']} |")
    T.write_report(args.out, "\n".join(L) + "\n", args.json, dict(gpu=gpu, bw=bw, rows=rows))


if __name__ == "__main__":
    main()
