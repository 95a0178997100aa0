"""INT8 linear benchmark on the DeepSeek-V3 shapes: our block and channel W8A8 linears (activation
quant included) vs torch BF16 (cuBLAS) and torch._int_mm (cuBLASLt int8, GEMM only), plus a
full-size correctness check, in one run.

    python benchmarks/bench_int8_linear.py RESULT.md [--configs DIR] [--m 1 4 16 ...] [--json RAW.json]

--configs DIR: use the int8_*_<arch>.json tables in DIR (e.g. fresh from tune_int8.py) instead of
the shipped ones. Times are medians of CUDA-graph replays; each graph rotates through enough weight
copies to move >= 3x the L2 per pass, so weights come from HBM as in a real forward pass.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tune_int8 as T  # noqa: E402  (shape table, timer, weight maker)

BASE = list(T.SHAPES)[:9]  # the nine DeepSeek linears; the rest are fused variants
LARGE = {"q_b", "kv_b", "o", "shexp_gate_up", "shexp_down", "dense_gate_up", "dense_down"}


def _rel(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _quant_block_halves(dense, glu):
    from hybrid_r1.quant import quantize_block
    if not glu:
        return quantize_block(dense)
    g, u = dense.chunk(2, 0)
    (qg, sg), (qu, su) = quantize_block(g), quantize_block(u)
    return torch.cat([qg, qu]), torch.cat([sg, su])


def _dequant_block_halves(q, s, glu):
    from hybrid_r1.quant import dequant_block
    if not glu:
        return dequant_block(q, s)
    return torch.cat([dequant_block(a, b) for a, b in zip(q.chunk(2, 0), s.chunk(2, 0))])


def correctness(dev, names, m_list):
    """Relative error vs the fp32 product with the dequantized weight (what INT8 costs in accuracy),
    and vs the exact int8 math in fp64 (what the kernel adds: should be bf16 output rounding)."""
    from hybrid_r1 import quant
    from hybrid_r1_kernels import reference as R
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for name in names:
        N, K, glu = T.SHAPES[name]
        gen = torch.Generator(device=dev).manual_seed(N + K)
        dense = torch.randn(2 * N if glu else N, K, device=dev, generator=gen) * 0.02
        qb, sb = _quant_block_halves(dense, glu)
        qc, sc = quant.quantize_channel(dense)
        wb, wc = _dequant_block_halves(qb, sb, glu), qc.float() * sc
        for M in m_list:
            # Plain Gaussian activations, as the peer numbers in PEERS.md (outlier channels raise
            # every scheme's activation-quant error; that is for the model-level tests to judge).
            x = torch.randn(M, K, device=dev, generator=gen).bfloat16()

            def fp32_ref(w):
                y = x.float() @ w.T
                return R.silu_mul(*y.chunk(2, -1)) if glu else y

            rb, rc = fp32_ref(wb), fp32_ref(wc)
            lin_b, lin_c = T.linear_fn("block", glu), T.linear_fn("channel", glu)
            ob_t, ob_n = lin_b(x, qb, sb, "trunc"), lin_b(x, qb, sb, "nearest_even")
            oc = lin_c(x, qc, sc, "nearest_even")
            f64 = dict(out_dtype=torch.float64, compute_dtype=torch.float64, glu=glu)
            exact_b = R.block_linear_ref(x, qb, sb, "nearest_even", **f64)
            exact_c = R.channel_linear_ref(x, qc, sc, "nearest_even", **f64)
            nan = any(t.isnan().any().item() for t in (ob_t, ob_n, oc))
            rows.append(dict(shape=name, M=M, block_trunc=_rel(ob_t, rb), block_rne=_rel(ob_n, rb),
                             channel=_rel(oc, rc), block_exact=_rel(ob_n, exact_b),
                             channel_exact=_rel(oc, exact_c), nan=nan))
            print(f"check {name:24s} M={M:5d} " + " ".join(
                f"{k}={v:.2e}" for k, v in rows[-1].items() if isinstance(v, float)), flush=True)
        del dense, qb, sb, qc, sc, wb, wc
        torch.cuda.empty_cache()
    return rows


def speed(dev, names, m_list):
    res = []
    for name in names:
        N, K, glu = T.SHAPES[name]
        n_rows = 2 * N if glu else N
        copies = T.n_copies(n_rows * K, dev)
        ws, bs, cs = T.make_weights(N, K, glu, copies, dev)
        wbf = [torch.randn(n_rows, K, device=dev).bfloat16() for _ in range(copies)]
        lin_b, lin_c = T.linear_fn("block", glu), T.linear_fn("channel", glu)

        def bf16(x, w):
            y = F.linear(x, w)
            return F.silu(y[:, :N]) * y[:, N:] if glu else y

        for M in m_list:
            x = torch.randn(M, K, device=dev).bfloat16()
            row = dict(shape=name, M=M, N=N, K=K, glu=glu, copies=copies)
            row["bf16"] = T.time_calls([lambda w=w: bf16(x, w) for w in wbf])
            row["block"] = T.time_calls([lambda w=w, s=s: lin_b(x, w, s) for w, s in zip(ws, bs)])
            row["channel"] = T.time_calls([lambda w=w, s=s: lin_c(x, w, s) for w, s in zip(ws, cs)])
            # cuBLASLt int8 needs M > 16 and multiples of 8: pad M; GEMM only (no quant, no scales).
            mp = max(24, -(-M // 8) * 8)
            xq = torch.randint(-127, 128, (mp, K), dtype=torch.int8, device=dev)
            try:
                row["int_mm"] = T.time_calls([lambda w=w: torch._int_mm(xq, w.t()) for w in ws])
            except RuntimeError as e:
                row["int_mm"] = float("nan")
                print(f"_int_mm {name} M={M}: {str(e)[:120]}")
            row["int_mm_M"] = mp
            from hybrid_r1_kernels.act_quant import per_token_group_quant, per_token_quant
            row["quant_group"] = T.time_calls([lambda: per_token_group_quant(x)] * 4)
            row["quant_token"] = T.time_calls([lambda: per_token_quant(x)] * 4)
            res.append(row)
            print(f"time  {name:24s} M={M:5d} bf16 {row['bf16']:8.1f}  block {row['block']:8.1f}  "
                  f"channel {row['channel']:8.1f}  int_mm {row['int_mm']:8.1f} us", flush=True)
        del ws, bs, cs, wbf
        torch.cuda.empty_cache()
    return res


def _geo(xs):
    xs = [x for x in xs if x == x and x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


def report(header, checks, rows) -> str:
    L = [f"# INT8 W8A8 linears vs BF16 on {header['gpu']}", "",
         f"- GPU: {header['gpu']} (sm{header['cc']}, {header['sms']} SMs); torch {header['torch']}, "
         f"triton {header['triton']}, CUDA {header['cuda']}; {header['date']}",
         f"- tile configs: {header['configs']}",
         "- time: median of CUDA-graph replays, per call; weights rotated over copies so each pass "
         "moves >= 3x L2. block / channel include the activation quant (fused or separate, as the "
         "config says). `_int_mm` is the int8 GEMM alone (no quant, no scales), M padded to >= 24 "
         "and to a multiple of 8 (shown). Ratios: BF16 time / ours (> 1 = faster than BF16).",
         "- GB/s counts weight bytes only (int8 + scales, or bf16); TFLOP/s = 2MNK / time. The last "
         "column times the separate activation quantizers alone (part of block / channel time when the "
         "config does not fuse them).",
         f"- bound: weight bytes / {header['bw']:.0f} GB/s (a 256 MiB device copy, read + write, measured "
         "in the same run): the time no kernel can beat at decode; the int8 bound counts the int8 "
         "weight (scales add < 0.1%), the bf16 bound twice that.", ""]
    if checks:
        L += ["## Correctness at full size", "",
              "Relative error ||out - ref|| / ||ref||. vs fp32: reference = fp32 activation x fp32 "
              "dequantized weight (the cost of activation quantization). vs exact: reference = the "
              "same int8 math in fp64 (what the kernel adds: bf16 output rounding, ~1e-3).", "",
              "| shape | M | block trunc vs fp32 | block RNE vs fp32 | channel vs fp32 | block vs exact "
              "| channel vs exact | NaN |", "|---|---|---|---|---|---|---|---|"]
        for c in checks:
            L.append(f"| {c['shape']} | {c['M']} | {c['block_trunc']:.2e} | {c['block_rne']:.2e} | "
                     f"{c['channel']:.2e} | {c['block_exact']:.2e} | {c['channel_exact']:.2e} | "
                     f"{'YES' if c['nan'] else 'no'} |")
        L.append("")
    L += ["## Speed", "",
          "| shape (K->N) | M | bf16 us | block us | block x | channel us | channel x | _int_mm us (M) "
          "| _int_mm x | block TFLOP/s | block GB/s | channel TFLOP/s | channel GB/s | bf16 GB/s "
          "| act quant us (group / token) | int8 bound us | bf16 bound us |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rows_w = 2 * r["N"] if r["glu"] else r["N"]
        flop = 2 * r["M"] * rows_w * r["K"]
        b8 = rows_w * r["K"]
        label = f"{r['shape']} {r['K']}->{r['N']}"
        L.append(
            f"| {label} | {r['M']} | {r['bf16']:.1f} | {r['block']:.1f} | {r['bf16'] / r['block']:.2f} | "
            f"{r['channel']:.1f} | {r['bf16'] / r['channel']:.2f} | {r['int_mm']:.1f} ({r['int_mm_M']}) | "
            f"{r['bf16'] / r['int_mm']:.2f} | {flop / r['block'] / 1e6:.0f} | {b8 / r['block'] / 1e3:.0f} | "
            f"{flop / r['channel'] / 1e6:.0f} | {b8 / r['channel'] / 1e3:.0f} | "
            f"{2 * b8 / r['bf16'] / 1e3:.0f} | {r['quant_group']:.1f} / {r['quant_token']:.1f} | "
            f"{b8 / header['bw'] / 1e3:.1f} | {2 * b8 / header['bw'] / 1e3:.1f} |")
    L += ["", "## Against the issue's targets", ""]
    base = [r for r in rows if r["shape"] in BASE]
    for scheme in ("block", "channel"):
        dec = [r for r in base if r["M"] <= 16]
        if dec:
            worst = min(dec, key=lambda r: r["bf16"] / r[scheme])
            large = [r["bf16"] / r[scheme] for r in dec if r["shape"] in LARGE]
            L.append(f"- {scheme}, decode M <= 16: geomean {_geo([r['bf16'] / r[scheme] for r in dec]):.2f}x "
                     f"BF16; large shapes geomean {_geo(large):.2f}x, min {min(large, default=float('nan')):.2f}x "
                     f"(target >= 1.8x); slowest of all {worst['bf16'] / worst[scheme]:.2f}x "
                     f"({worst['shape']} M={worst['M']}; target >= 1.0x)")
        big = [r["bf16"] / r[scheme] for r in base if r["M"] >= 1024]
        if big:
            tgt = 1.3 if scheme == "block" else 1.4
            L.append(f"- {scheme}, M >= 1024: geomean {_geo(big):.2f}x BF16 (target >= {tgt}x), "
                     f"min {min(big):.2f}x")
    return "\n".join(L) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="markdown file to write")
    p.add_argument("--configs", type=Path, default=None, help="folder of int8_<scheme>_<arch>.json")
    p.add_argument("--m", type=int, nargs="+", default=list(T.M_LIST))
    p.add_argument("--shapes", nargs="+", default=list(T.SHAPES), choices=list(T.SHAPES))
    p.add_argument("--check-m", type=int, nargs="*", default=[1, 16, 1024])
    p.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_int8_linear.py needs a CUDA GPU")
    import triton
    from hybrid_r1_kernels.configs import CONFIG_DIR, arch_of, register_configs
    dev = torch.device("cuda", torch.cuda.current_device())
    arch = arch_of(dev)
    source = f"shipped {CONFIG_DIR.name}/int8_*_{arch}.json (default heuristic where absent)"
    if args.configs:
        for scheme in ("block", "channel"):
            f = args.configs / f"int8_{scheme}_{arch}.json"
            if f.is_file():
                register_configs(scheme, arch, json.loads(f.read_text()))
        source = f"tables from {args.configs}"
    props = torch.cuda.get_device_properties(dev)
    header = dict(gpu=torch.cuda.get_device_name(dev), cc=f"{props.major}{props.minor}",
                  sms=props.multi_processor_count, torch=torch.__version__, triton=triton.__version__,
                  cuda=torch.version.cuda, date=time.strftime("%Y-%m-%d"), configs=source,
                  bw=T.copy_bandwidth(dev))
    checks = correctness(dev, args.shapes, args.check_m) if args.check_m else []
    rows = speed(dev, args.shapes, args.m)
    T.write_report(args.out, report(header, checks, rows), args.json,
                   dict(header=header, checks=checks, rows=rows))


if __name__ == "__main__":
    main()
