"""Fused MoE benchmark at DeepSeek-V3/R1 width (E = 256, H = 7168, I = 2048, top-8): the fused INT8
MoE (block and channel W8A8) vs the same fused kernel on BF16 weights (a Triton grouped GEMM: same
routing sort, same tiling, bf16 dots), plus a full-size correctness check, in one run.

    python benchmarks/bench_fused_moe.py RESULT.md [--m 1 4 16 ...] [--configs DIR] [--json RAW.json]

Each timed call is the whole MoE step (activation quant, routing sort, gate_up+SiLU, quant, down
with routing weights, sum over k) as a model would call it. Times are medians of CUDA-graph replays;
each graph holds --routings calls, each on its own fresh random routing (top-8 of 256 random scores
per token), so consecutive calls touch different experts, as consecutive layers would. Bound: the
weight bytes of the experts the routings touch / the HBM copy bandwidth measured in the same run.
--configs DIR: use the moe_*_<arch>.json tables in DIR (e.g. fresh from tune_fused_moe.py).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tune_fused_moe as TM  # noqa: E402  (shapes, weight and routing makers)
import tune_int8 as T  # noqa: E402  (timer, copy bandwidth, report writer)

SCHEMES = ("bf16", "block", "channel")


def expert_bytes(scheme: str, inter: int = TM.I) -> int:
    """Bytes of one expert's gate_up + down weights (and scales); `inter`: its intermediate size
    (a tensor-parallel rank's part: I / ranks)."""
    n = 3 * TM.H * inter
    if scheme == "bf16":
        return 2 * n
    if scheme == "block":
        return n + 4 * 3 * (TM.H // 128) * (inter // 128)
    return n + 4 * (2 * inter + TM.H)


def correctness(dev, m_list, seed=0):
    """Mean relative error vs the per-expert fp64 reference at full size (a fresh routing per M)."""
    from hybrid_r1_kernels import reference as R
    from hybrid_r1_kernels.fused_moe import fused_moe
    rows = []
    gen = torch.Generator(device=dev).manual_seed(seed)
    for scheme in ("block", "channel"):
        w13, s13, w2, s2 = TM.make_experts(TM.E, scheme, dev, gen)
        for M in m_list:
            ids, wts = TM.routings(M, TM.E, 1, dev, seed=seed)[0]
            x = torch.randn(M, TM.H, device=dev, generator=gen).bfloat16()
            out = fused_moe(x, w13, s13, w2, s2, wts, ids, scheme=scheme)
            want = R.fused_moe_ref(x, w13, s13, w2, s2, wts, ids, scheme)
            rel = ((out.double() - want).abs().mean() / want.abs().mean()).item()
            rows.append(dict(scheme=scheme, M=M, mean_rel=rel, nan=bool(out.isnan().any())))
            print(f"check {scheme:7s} M={M:5d} mean rel {rel:.2e}", flush=True)
        w13 = s13 = w2 = s2 = None  # free before the next scheme's weights
        torch.cuda.empty_cache()
    return rows


def _time_scheme(scheme, dev, m_list, n_routings, res):
    from hybrid_r1_kernels.configs import get_moe_config
    from hybrid_r1_kernels.fused_moe import fused_moe, moe_align
    w13, s13, w2, s2 = TM.make_experts(TM.E, scheme, dev)
    for M in m_list:
        routes = TM.routings(M, TM.E, n_routings, dev)
        x = torch.randn(M, TM.H, device=dev).bfloat16()
        fns = [lambda ids=ids, wts=wts: fused_moe(x, w13, s13, w2, s2, wts, ids, scheme=scheme)
               for ids, wts in routes]
        res[M][scheme] = T.time_calls(fns)
        if scheme == "block":  # the routing sort alone, at the gate_up config's BLOCK_M
            bm = get_moe_config(scheme, TM.E, TM.I, TM.H, M, TM.TOP_K, True, dev).BLOCK_M
            res[M]["align"] = T.time_calls([lambda ids=ids: moe_align(ids, TM.E, bm) for ids, _ in routes])
        print(f"time  {scheme:7s} M={M:5d} {res[M][scheme]:9.1f} us", flush=True)


def speed(dev, m_list, n_routings: int):
    res = {M: dict(M=M) for M in m_list}
    for M in m_list:  # experts touched per call, averaged over the routings (same seeds as timed)
        routes = TM.routings(M, TM.E, n_routings, dev)
        res[M]["experts"] = sum(torch.unique(ids).numel() for ids, _ in routes) / n_routings
    for scheme in SCHEMES:
        _time_scheme(scheme, dev, m_list, n_routings, res)  # its weights are freed on return
        torch.cuda.empty_cache()
    return [res[M] for M in m_list]


def _geo(xs):
    xs = [x for x in xs if x == x and x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


def report(header, checks, rows) -> str:
    bw = header["bw"]
    L = [f"# Fused MoE INT8 vs BF16 on {header['gpu']}", "",
         f"- GPU: {header['gpu']} (sm{header['cc']}, {header['sms']} SMs); torch {header['torch']}, "
         f"triton {header['triton']}, CUDA {header['cuda']}; {header['date']}",
         f"- shapes: DeepSeek-V3/R1 routed experts, E={TM.E}, H={TM.H}, I={TM.I}, top-{TM.TOP_K}; "
         f"tile configs: {header['configs']}",
         f"- time: median CUDA-graph replay per MoE step (activation quant, routing sort, gate_up+SiLU, "
         f"quant, down x routing weight, sum over k), {header['routings']} fresh random routings per graph. "
         "bf16 = the same fused kernel on BF16 weights (bf16 dots, fp32 accumulation). x = BF16 time / "
         "INT8 time (> 1: INT8 faster).",
         f"- bound: weight bytes of the experts touched (mean over the routings) / {bw:.0f} GB/s (a 256 MiB "
         "device copy, read + write, measured in the same run); GB/s = those bytes / time. `align` = the "
         "routing sort alone.", ""]
    if checks:
        L += ["## Correctness at full size", "",
              "mean |out - ref| / mean |ref| vs the per-expert fp64 reference (kernels/reference.py: "
              "x's int8 quantization reproduced exactly, h's up to one-step differences where fp32 and "
              "fp64 straddle a rounding boundary; the rest is fp32 accumulation and the bf16 output "
              "rounding, 2**-8 at most; issue bar 1e-2 block, 2e-2 channel).", "",
              "| scheme | M | mean rel err | NaN |", "|---|---|---|---|"]
        L += [f"| {c['scheme']} | {c['M']} | {c['mean_rel']:.2e} | {'YES' if c['nan'] else 'no'} |" for c in checks]
        L.append("")
    L += ["## Speed", "",
          "| M | experts touched | bf16 us | block us | block x | channel us | channel x | block GB/s "
          "| channel GB/s | bf16 GB/s | int8 bound us | bf16 bound us | align us |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b8, b16 = r["experts"] * expert_bytes("block"), r["experts"] * expert_bytes("bf16")
        bc = r["experts"] * expert_bytes("channel")
        L.append(f"| {r['M']} | {r['experts']:.1f} | {r['bf16']:.1f} | {r['block']:.1f} | "
                 f"{r['bf16'] / r['block']:.2f} | {r['channel']:.1f} | {r['bf16'] / r['channel']:.2f} | "
                 f"{b8 / r['block'] / 1e3:.0f} | {bc / r['channel'] / 1e3:.0f} | {b16 / r['bf16'] / 1e3:.0f} | "
                 f"{b8 / bw / 1e3:.1f} | {b16 / bw / 1e3:.1f} | {r['align']:.1f} |")
    L += ["", "## Against the issue's targets", ""]
    for scheme in ("block", "channel"):
        dec = [r["bf16"] / r[scheme] for r in rows if r["M"] <= 16]
        big = [r["bf16"] / r[scheme] for r in rows if r["M"] >= 1024]
        if dec:
            L.append(f"- {scheme}, M <= 16: geomean {_geo(dec):.2f}x BF16, min {min(dec):.2f}x (target >= 1.5x)")
        if big:
            L.append(f"- {scheme}, M >= 1024: geomean {_geo(big):.2f}x BF16, min {min(big):.2f}x (target >= 1.0x)")
    return "\n".join(L) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="markdown file to write (e.g. benchmarks/results/fused_moe_h200.md)")
    p.add_argument("--m", type=int, nargs="+", default=list(TM.M_LIST))
    p.add_argument("--configs", type=Path, default=None, help="folder of moe_<scheme>_<arch>.json")
    p.add_argument("--check-m", type=int, nargs="*", default=[1, 64], help="token counts checked vs fp64")
    p.add_argument("--routings", type=int, default=8, help="fresh routings (calls) per timed graph")
    p.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_fused_moe.py needs a CUDA GPU")
    import triton
    from hybrid_r1_kernels.configs import CONFIG_DIR, arch_of, register_configs
    dev = torch.device("cuda", torch.cuda.current_device())
    arch = arch_of(dev)
    source = f"shipped {CONFIG_DIR.name}/moe_*_{arch}.json (default heuristic where absent)"
    if args.configs:
        for scheme in SCHEMES:
            f = args.configs / f"moe_{scheme}_{arch}.json"
            if f.is_file():
                register_configs(scheme, arch, json.loads(f.read_text()), family="moe")
        source = f"tables from {args.configs}"
    props = torch.cuda.get_device_properties(dev)
    header = dict(gpu=torch.cuda.get_device_name(dev), cc=f"{props.major}{props.minor}",
                  sms=props.multi_processor_count, torch=torch.__version__, triton=triton.__version__,
                  cuda=torch.version.cuda, date=time.strftime("%Y-%m-%d"), configs=source,
                  bw=T.copy_bandwidth(dev), routings=args.routings)
    checks = correctness(dev, args.check_m) if args.check_m else []
    rows = speed(dev, args.m, args.routings)
    T.write_report(args.out, report(header, checks, rows), args.json, dict(header=header, checks=checks, rows=rows))


if __name__ == "__main__":
    main()
