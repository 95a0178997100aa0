"""How to split the routed experts across N tensor-parallel GPUs, measured on one GPU: each rank's
work under the two choices, at DeepSeek-V3/R1 width (256 experts, H 7168, I 2048, top-8), block INT8.

- TP inside each expert (what hybrid_r1/parallel.py does): every rank runs all 256 experts with
  I / N of each one's intermediate dimension; every rank does the same work, whatever the routing.
- Expert parallel: rank r owns experts [r E/N, (r+1) E/N) whole and runs only the (token, expert)
  pairs routed to them; the step waits for the busiest rank. Its token exchange (an all-to-all or
  all-gather per layer) is not counted here: this favours expert parallelism.

Times are medians of CUDA-graph replays over fresh random routings (tune_int8.time_calls); one
rank's work runs alone on the GPU, as it would on its own GPU. Bound: the weight bytes a rank reads
(the chosen experts' slices, or the busiest rank's experts) / the HBM copy bandwidth of this run.

    python benchmarks/bench_tp_experts.py RESULT.md [--ranks 2 4 8] [--m 1 4 16 64 256 1024]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tune_fused_moe as TM  # noqa: E402  (shapes, weight and routing makers)
import tune_int8 as T  # noqa: E402  (timer, copy bandwidth, report writer)
from bench_fused_moe import expert_bytes  # noqa: E402  (an expert's weight and scale bytes)

SCHEME = "block"


def tp_rank(n: int, m: int, routes, dev) -> tuple[float, float]:
    """(us, bytes read) for one TP rank: all experts, I / n each."""
    from hybrid_r1_kernels.fused_moe import fused_moe

    inter = TM.I // n
    w13, s13, w2, s2 = TM.make_experts(TM.E, SCHEME, dev, inter=inter)
    x = torch.randn(m, TM.H, device=dev).bfloat16()
    fns = [lambda ids=ids, w=w: fused_moe(x, w13, s13, w2, s2, w, ids, scheme=SCHEME, out_dtype=torch.float32)
           for ids, w in routes]
    us = T.time_calls(fns)
    touched = sum(torch.unique(ids).numel() for ids, _ in routes) / len(routes)
    return us, touched * expert_bytes(SCHEME, inter)


def ep_busiest(n: int, m: int, routes, dev) -> tuple[float, float]:
    """(us, bytes read) of the busiest expert-parallel rank: per routing, the rank with the most
    pairs runs them (each pair as a one-expert token), full-size experts."""
    from hybrid_r1_kernels.fused_moe import fused_moe

    local = TM.E // n
    w13, s13, w2, s2 = TM.make_experts(local, SCHEME, dev)
    x = torch.randn(m, TM.H, device=dev).bfloat16()
    fns, touched = [], 0
    for ids, w in routes:
        owner = ids.long() // local
        busiest = torch.bincount(owner.flatten(), minlength=n).argmax()
        tok, slot = (owner == busiest).nonzero(as_tuple=True)
        xr = x[tok].contiguous()
        ir = (ids[tok, slot] - busiest * local).to(torch.int32)[:, None].contiguous()
        wr = w[tok, slot][:, None].contiguous()
        touched += torch.unique(ir).numel()
        fns.append(lambda xr=xr, ir=ir, wr=wr: fused_moe(xr, w13, s13, w2, s2, wr, ir, scheme=SCHEME,
                                                         out_dtype=torch.float32))
    us = T.time_calls(fns)
    return us, touched / len(routes) * expert_bytes(SCHEME)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="markdown file to write")
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--m", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024])
    p.add_argument("--routings", type=int, default=8, help="fresh routings per timed graph")
    a = p.parse_args(argv)
    dev = torch.device("cuda")
    bw = T.copy_bandwidth(dev)
    lines = [f"# Splitting the routed experts across tensor-parallel ranks: one rank's work, {torch.cuda.get_device_name()}",
             "", ("Block INT8 fused MoE at 671B width (256 x [7168 x 2048], top-8), fresh routing per call; "
                  f"HBM copy bandwidth {bw:.0f} GB/s in this run. Bound = bytes the rank reads / that bandwidth. "
                  "EP: the busiest rank, its token exchange not counted."), "",
             "| ranks | tokens | TP rank us | TP bound us | EP busiest rank us | EP bound us | EP / TP |",
             "|---|---|---|---|---|---|---|"]
    for n in a.ranks:
        for m in a.m:
            routes = TM.routings(m, TM.E, a.routings, dev)
            tp_us, tp_b = tp_rank(n, m, routes, dev)
            torch.cuda.empty_cache()  # the rank's weights went with its timing closures
            ep_us, ep_b = ep_busiest(n, m, routes, dev)
            torch.cuda.empty_cache()
            lines.append(f"| {n} | {m} | {tp_us:.1f} | {tp_b / bw / 1e3:.1f} | {ep_us:.1f} | {ep_b / bw / 1e3:.1f} "
                         f"| {ep_us / tp_us:.2f} |")
            print(lines[-1], flush=True)
    a.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
