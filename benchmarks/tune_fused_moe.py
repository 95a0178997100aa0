"""Tile-config tuner for the fused MoE: writes kernels/configs/moe_<scheme>_<arch>.json.

    python benchmarks/tune_fused_moe.py [--out kernels/configs] [--m 1 4 16 64 256 1024 4096]
                                        [--schemes block channel] [--workers 14] [--budget-s 600]

For the DeepSeek-V3/R1 routed experts (E = 256, H = 7168, I = 2048, top-8), each M bucket (tokens),
scheme and projection (gate_up+SiLU, down with routing weights), it times one projection launch
(moe_gemm on pre-quantized activations: the quant does not depend on the config) for each candidate
and keeps the fastest. Candidates are compiled first in parallel worker processes on an 8-expert copy
of the shapes (the compiled kernel does not depend on E), then timed one by one with CUDA-graph
replays over several fresh routings (tune_int8.time_calls). Works on any CUDA GPU (sm80, sm90, ...):
the table is named after the GPU's arch, and existing tables in --out are updated bucket by bucket.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tune_int8 as T  # noqa: E402  (timer, copy bandwidth, report writer)

E, H, I, TOP_K = 256, 7168, 2048, 8  # DeepSeek-V3/R1 routed experts
# projection -> (N output columns, K inputs, glu, activation rows per pair)
PROJ = {"gate_up": (I, H, True, False), "down": (H, I, False, True)}
M_LIST = (1, 4, 16, 64, 256, 1024, 4096)
SCHEMES = ("block", "channel", "bf16")


def make_experts(n_experts: int, scheme: str, device, gen=None, inter: int = I):
    """Random expert weights in the release layouts (values do not change the timing); `inter`:
    the intermediate size each expert holds (a tensor-parallel rank's part: I / ranks)."""
    I = inter  # noqa: N806  (the layouts below, at this size)
    kw = dict(device=device, generator=gen)
    if scheme == "bf16":
        return (torch.randn(n_experts, 2 * I, H, dtype=torch.bfloat16, **kw) * 0.02, None,
                torch.randn(n_experts, H, I, dtype=torch.bfloat16, **kw) * 0.02, None)
    w13 = torch.randint(-127, 128, (n_experts, 2 * I, H), dtype=torch.int8, **kw)
    w2 = torch.randint(-127, 128, (n_experts, H, I), dtype=torch.int8, **kw)
    if scheme == "block":
        s13 = torch.rand(n_experts, 2 * I // 128, H // 128, **kw) * 1e-3 + 1e-4
        s2 = torch.rand(n_experts, H // 128, I // 128, **kw) * 1e-3 + 1e-4
    else:
        s13 = torch.rand(n_experts, 2 * I, 1, **kw) * 1e-3 + 1e-4
        s2 = torch.rand(n_experts, H, 1, **kw) * 1e-3 + 1e-4
    return w13, s13, w2, s2


def routings(M: int, n_experts: int, count: int, device, seed: int = 0):
    """`count` fresh top-k routings of M tokens: distinct experts per token, softmax-like weights."""
    gen = torch.Generator(device=device).manual_seed(seed + M)
    out = []
    for _ in range(count):
        scores = torch.rand(M, n_experts, device=device, generator=gen)
        w, ids = scores.topk(TOP_K, dim=1)
        out.append((ids.to(torch.int32), (w / w.sum(1, keepdim=True)).float()))
    return out


def proj_inputs(proj: str, scheme: str, M: int, device):
    """The projection's activation as fused_moe hands it over: x [M, H] or h [M * k, I], quantized."""
    from hybrid_r1_kernels.fused_moe import quantize_activation
    N, K, glu, per_pair = PROJ[proj]
    rows = M * TOP_K if per_pair else M
    a = torch.randn(rows, K, device=device, dtype=torch.bfloat16 if scheme == "bf16" or not per_pair else torch.float32)
    return quantize_activation(a, scheme)


def candidates(scheme: str, proj: str, M: int, smem: int):
    from hybrid_r1_kernels.configs import GemmConfig
    N, K, glu, _ = PROJ[proj]
    rows = -(-M * TOP_K // E)  # mean rows per expert
    elt = 2 if scheme == "bf16" else 1
    bks = (64, 128) if scheme == "bf16" else (128,) if scheme == "block" else (128, 256)
    if rows <= 16:
        tiles = [(16, bn, 4) for bn in (32, 64, 128)]
    elif rows <= 64:
        tiles = [(16, 64, 4), (32, 64, 4), (32, 128, 4), (64, 64, 4), (64, 128, 4)]
    else:
        tiles = [(64, 128, 4), (64, 128, 8), (128, 128, 8), (64, 256, 8), (128, 64, 4)]
    out = []
    for bm, bn, warps in tiles:
        if scheme == "block" and bm * bn > 64 * 128 and warps < 8:
            continue  # fp32 acc + int32 dot tile per thread spill
        for bk in bks:
            per_stage = (bm * bk + bn * bk * (2 if glu else 1)) * elt
            for stages in (2, 3, 4):
                if stages * per_stage > smem - 8192:
                    continue
                for group in ((1,) if rows <= 16 else (1, 8)):
                    out.append(GemmConfig(bm, bn, bk, group, 1, warps, stages, False))
                    if scheme == "block" and not glu and rows > 16:
                        out.append(GemmConfig(bm, bn, bk, group, 1, warps, stages, False, True))
    return out


def _timed_fn(scheme, proj, a, a_s, w, w_s, routing, weights, cfg):
    from hybrid_r1_kernels.fused_moe import moe_gemm
    N, K, glu, per_pair = PROJ[proj]
    out = torch.empty(routing.n_pairs, N, device=a.device,
                      dtype=torch.float32 if (per_pair or scheme != "bf16") else torch.bfloat16)
    return lambda: moe_gemm(a, a_s, w, w_s, routing, scheme=scheme, glu=glu, per_pair=per_pair,
                            topk_weights=weights if per_pair else None, config=cfg, out=out)


# ------------------------------------------------------------------------ precompile ---------

_worker: dict = {}


def _compile_job(job):
    scheme, proj, M, cfg_dict = job
    from hybrid_r1_kernels.configs import GemmConfig
    from hybrid_r1_kernels.fused_moe import moe_align
    if _worker.get("scheme") != scheme:
        _worker.clear()
        _worker.update(scheme=scheme, w=make_experts(8, scheme, "cuda"))
    w13, s13, w2, s2 = _worker["w"]
    cfg = GemmConfig(**cfg_dict)
    ids, wts = routings(M, 8, 1, "cuda")[0]
    a, a_s = proj_inputs(proj, scheme, M, "cuda")
    w, w_s = (w13, s13) if proj == "gate_up" else (w2, s2)
    try:
        _timed_fn(scheme, proj, a, a_s, w, w_s, moe_align(ids, 8, cfg.BLOCK_M), wts, cfg)()
        torch.cuda.synchronize()
        return None
    except Exception as e:  # reported and skipped: a config can exceed resources
        return f"{scheme} {proj} M={M} {cfg_dict}: {type(e).__name__}: {str(e)[:200]}"


def precompile(jobs, workers: int):
    seen, unique = set(), []
    for scheme, proj, M, cfg in jobs:
        key = (scheme, proj, dataclasses.astuple(cfg))
        if key not in seen:
            seen.add(key)
            unique.append((scheme, proj, M, dataclasses.asdict(cfg)))
    unique.sort(key=lambda j: j[0])  # workers keep one scheme's weights
    T.compile_in_workers(unique, _compile_job, workers)


# ------------------------------------------------------------------------------ tune ---------

def tune(out_dir: Path, schemes, m_list, workers: int, budget_s: float, n_routings: int = 4, verbose=False):
    from hybrid_r1_kernels.configs import arch_of, device_limits, m_bucket, moe_shape_key
    from hybrid_r1_kernels.fused_moe import moe_align
    dev = torch.device("cuda", torch.cuda.current_device())
    _, smem = device_limits(dev)
    arch = arch_of(dev)
    order = [m for m in (1, 16, 4096, 1024, 4, 64, 256) if m in m_list] + \
            [m for m in m_list if m not in (1, 16, 4096, 1024, 4, 64, 256)]
    jobs = [(s, p, M, c) for M in order for s in schemes for p in PROJ for c in candidates(s, p, M, smem)]
    t0 = time.time()
    if workers > 1:
        precompile(jobs, workers)
    meta = {"gpu": torch.cuda.get_device_name(dev), "arch": arch, "torch": torch.__version__,
            "triton": __import__("triton").__version__, "date": time.strftime("%Y-%m-%d"),
            "method": f"median CUDA-graph replay of one projection over {n_routings} fresh routings, "
                      f"E={E} H={H} I={I} top-{TOP_K}, activation pre-quantized"}
    tables = {}
    for s in schemes:
        f = out_dir / f"moe_{s}_{arch}.json"
        old = json.loads(f.read_text()) if f.is_file() else {}
        tables[s] = {"meta": meta, "configs": old.get("configs", {}), "timings_us": old.get("timings_us", {})}
    out_dir.mkdir(parents=True, exist_ok=True)
    for scheme in schemes:
        w13, s13, w2, s2 = make_experts(E, scheme, dev)
        for M in order:
            routes = routings(M, E, n_routings, dev)
            for proj in PROJ:
                if time.time() - t0 > budget_s:
                    print(f"budget spent: skipping {scheme} M={M} {proj}", flush=True)
                    continue
                N, K, glu, _ = PROJ[proj]
                w, w_s = (w13, s13) if proj == "gate_up" else (w2, s2)
                a, a_s = proj_inputs(proj, scheme, M, dev)
                aligned = {}
                best = (float("inf"), None)
                for cfg in candidates(scheme, proj, M, smem):
                    if cfg.BLOCK_M not in aligned:
                        aligned[cfg.BLOCK_M] = [(moe_align(ids, E, cfg.BLOCK_M), wts) for ids, wts in routes]
                    try:
                        us = T.time_calls([_timed_fn(scheme, proj, a, a_s, w, w_s, r, wts, cfg)
                                           for r, wts in aligned[cfg.BLOCK_M]])
                    except Exception as e:
                        print(f"  {scheme} {proj} M={M} {cfg}: {type(e).__name__}: {str(e)[:160]}")
                        continue
                    if verbose:
                        print(f"    {us:9.1f} us  {cfg}")
                    if us < best[0]:
                        best = (us, cfg)
                if best[1] is None:
                    continue
                key, b = moe_shape_key(E, N, K, glu), str(m_bucket(M))
                tables[scheme]["configs"].setdefault(key, {})[b] = dataclasses.asdict(best[1])
                tables[scheme]["timings_us"].setdefault(key, {})[b] = round(best[0], 2)
                print(f"{scheme:7s} {proj:8s} M={M:5d} {best[0]:9.1f} us  {best[1]}", flush=True)
            (out_dir / f"moe_{scheme}_{arch}.json").write_text(json.dumps(tables[scheme], indent=1))
        w13 = s13 = w2 = s2 = None  # free before the next scheme's weights
        torch.cuda.empty_cache()
    print(f"tuned in {time.time() - t0:.0f}s -> {out_dir}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "kernels" / "configs",
                   help="folder of moe_<scheme>_<arch>.json; existing tables there are updated")
    p.add_argument("--m", type=int, nargs="+", default=list(M_LIST))
    p.add_argument("--schemes", nargs="+", default=["block", "channel"], choices=list(SCHEMES))
    p.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    p.add_argument("--budget-s", type=float, default=1e9, help="stop starting new projections after this")
    p.add_argument("--routings", type=int, default=4, help="fresh routings per timed graph")
    p.add_argument("--verbose", action="store_true", help="print every candidate's time")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("tune_fused_moe.py needs a CUDA GPU")
    tune(args.out, args.schemes, args.m, args.workers, args.budget_s, args.routings, args.verbose)


if __name__ == "__main__":
    main()
