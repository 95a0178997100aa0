"""Tile-config tuner for the INT8 linears: writes kernels/configs/int8_<scheme>_<arch>.json.

    python benchmarks/tune_int8.py [--out kernels/configs] [--m 1 4 16 64 256 1024 4096]
                                   [--schemes block channel] [--workers 14] [--budget-s 600]

For each DeepSeek linear shape (plus the fused q_a+kv_a and gate_up+SiLU variants), M bucket and
candidate config, it times the whole linear (activation quant included, fused or not: that choice is
part of the config) and keeps the fastest. All candidates are compiled first in parallel worker
processes (Triton's disk cache), then timed one by one with CUDA graph replays that rotate through
enough weight copies to overflow L2. The timer and shape table are shared with bench_int8_linear.py.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import torch

# name -> (N, K, glu). N is the output width; glu weights are [2N, K] (gate then up).
SHAPES = {
    "q_a": (1536, 7168, False),
    "q_b": (24576, 1536, False),
    "kv_a": (576, 7168, False),
    "kv_b": (32768, 512, False),
    "o": (7168, 16384, False),
    "shexp_gate_up": (4096, 7168, False),
    "shexp_down": (7168, 2048, False),
    "dense_gate_up": (36864, 7168, False),
    "dense_down": (7168, 18432, False),
    "qkv_a (fused q_a+kv_a)": (2112, 7168, False),
    "shexp gate_up+SiLU": (2048, 7168, True),
    "dense gate_up+SiLU": (18432, 7168, True),
}
M_LIST = (1, 4, 16, 64, 256, 1024, 4096)


# ---------------------------------------------------------------- timing helpers (shared) -----

def n_copies(weight_bytes: int, device) -> int:
    """Weight copies to rotate through so that one pass moves at least 3x the L2 size."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return max(2, min(64, math.ceil(3 * l2 / max(weight_bytes, 1))))


def time_calls(fns, replays: int = 7) -> float:
    """Microseconds per call: capture one CUDA graph calling every fn once (each fn uses its own
    weight copy), replay it, take the median replay. Graphs remove Python launch overhead, which
    would otherwise dominate decode-sized kernels."""
    for f in fns[:2]:
        f()  # compile / load outside the capture
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times) * 1000.0 / len(fns)


def copy_bandwidth(device) -> float:
    """GB/s of a 256 MiB device-to-device copy (read + write counted): the achievable HBM rate,
    the denominator of every 'bound' column."""
    x = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    us = time_calls([lambda: y.copy_(x)], replays=9)
    return 2 * x.numel() / us / 1e3


def write_report(out: Path, text: str, json_path: Path | None, data: dict) -> None:
    """The markdown table to `out`, the raw numbers to `json_path` (optional), the table to stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if json_path:
        json_path.write_text(json.dumps(data, indent=1))
    print(text)


def make_weights(N: int, K: int, glu: bool, copies: int, device):
    """Random int8 weights and both scale layouts (values do not change the timing)."""
    rows = 2 * N if glu else N
    per = -(-N // 128)
    ws = [torch.randint(-127, 128, (rows, K), dtype=torch.int8, device=device) for _ in range(copies)]
    block_s = [torch.rand((2 * per if glu else per), -(-K // 128), device=device) * 1e-3 + 1e-4
               for _ in range(copies)]
    chan_s = [torch.rand(rows, 1, device=device) * 1e-3 + 1e-4 for _ in range(copies)]
    return ws, block_s, chan_s


def linear_fn(scheme: str, glu: bool):
    from hybrid_r1_kernels import int8_linear as L
    table = {("block", False): L.int8_block_linear, ("channel", False): L.int8_channel_linear,
             ("block", True): L.int8_block_gate_up, ("channel", True): L.int8_channel_gate_up}
    return table[(scheme, glu)]


# ------------------------------------------------------------------------ candidates ---------

def candidates(scheme: str, N: int, K: int, M: int, glu: bool, sms: int, smem: int):
    from hybrid_r1_kernels.configs import GemmConfig
    block = scheme == "block"
    out = []

    def add(bm, bn, bk, warps, stages, fused_opts, split_opts):
        a_bytes = 2 if True in fused_opts else 1
        if stages * (bm * bk * a_bytes + bn * bk * (2 if glu else 1)) > smem - 4096:
            stages = (smem - 4096) // (bm * bk * a_bytes + bn * bk * (2 if glu else 1))
            if stages < 2:
                return
        for fused in fused_opts:
            for split in split_opts:
                out.append(GemmConfig(bm, bn, bk, 8, split, warps, stages, fused))

    def splits(bm, bn, bk):
        tiles = -(-M // bm) * -(-N // bn)
        n_kt = -(-K // bk)
        base = max(1, min(-(-2 * sms // tiles), n_kt // 4))
        opts = {base, max(1, min(2 * base, n_kt // 2))}
        if tiles >= sms // 2:
            opts.add(1)
        if M <= 16:  # decode: how the split fills the waves decides the tail; try a wider range
            opts |= {s for s in (2, 3, 4, 6, 8, 12, 16) if n_kt // s >= 2}
        return sorted(opts)

    if M <= 16:
        for bn, bk in (((32, 128), (64, 128), (128, 128)) if block else ((32, 256), (64, 256), (128, 128))):
            add(16, bn, bk, 4, 4, (True, False) if block else (False,), splits(16, bn, bk))
    elif M <= 64:
        for bm, bn in ((32, 64), (64, 64), (32, 128), (64, 128)):
            add(bm, bn, 128, 4, 4, (True, False), splits(bm, bn, 128))
    elif M <= 256:
        for bm, bn, warps in ((64, 64, 4), (64, 128, 4), (128, 128, 4), (128, 128, 8), (64, 256, 8)):
            if block and bn == 256:
                continue  # 64x256 fp32 acc + int32 dot tile per thread: spills
            add(bm, bn, 128, warps, 4, (False,), splits(bm, bn, 128))
    else:
        tiles = ([(128, 128, 8, 3), (128, 128, 8, 4), (128, 128, 4, 4), (64, 128, 4, 4), (64, 128, 4, 5)]
                 if block else
                 [(128, 256, 8, 3), (128, 256, 8, 4), (256, 128, 8, 3), (256, 128, 8, 4), (128, 128, 8, 4),
                  (128, 128, 4, 4)])
        for bm, bn, warps, stages in tiles:
            add(bm, bn, 128, warps, stages, (False,), (1,))
        if block and not glu:  # two K tiles a step: twice the shared memory per stage
            for bm, bn, warps, stages in ((128, 128, 8, 2), (128, 128, 8, 3), (64, 128, 4, 3), (128, 64, 4, 3)):
                if stages * 2 * (bm + bn) * 128 <= smem - 4096:
                    out.append(GemmConfig(bm, bn, 128, 8, 1, warps, stages, False, True))
    return out


def compile_key(scheme, N, K, glu, cfg):
    # What Triton specializes on, near enough: constexprs, and 16-divisibility of the scale strides.
    d = dataclasses.asdict(cfg)
    d["SPLIT_K"] = cfg.SPLIT_K > 1
    return (scheme, glu, K % cfg.BLOCK_K == 0, (-(-K // 128)) % 16 == 0, N % 16 == 0, tuple(sorted(d.items())))


# ------------------------------------------------------------------------ precompile ---------

_worker_cache: dict = {}


def _compile_job(job):
    """Runs one candidate once in a worker process so its kernels land in Triton's disk cache."""
    scheme, name, M, cfg_dict = job
    from hybrid_r1_kernels.configs import GemmConfig
    N, K, glu = SHAPES[name]
    key = (name, scheme)
    if key not in _worker_cache:
        _worker_cache.clear()
        ws, bs, cs = make_weights(N, K, glu, 1, "cuda")
        _worker_cache[key] = (ws[0], bs[0] if scheme == "block" else cs[0])
    w, s = _worker_cache[key]
    x = torch.randn(M, K, device="cuda").bfloat16()
    try:
        linear_fn(scheme, glu)(x, w, s, config=GemmConfig(**cfg_dict))
        torch.cuda.synchronize()
        return None
    except Exception as e:  # reported and skipped: a config can exceed resources
        return f"{scheme} {name} M={M} {cfg_dict}: {type(e).__name__}: {str(e)[:200]}"


def precompile(jobs, workers: int):
    seen, unique = set(), []
    for scheme, name, M, cfg in jobs:
        N, K, glu = SHAPES[name]
        k = compile_key(scheme, N, K, glu, cfg)
        if k not in seen:
            seen.add(k)
            unique.append((scheme, name, M, dataclasses.asdict(cfg)))
    unique.sort(key=lambda j: (j[1], j[0]))  # group by shape: workers reuse their weights
    compile_in_workers(unique, _compile_job, workers)


def compile_in_workers(unique: list, compile_job, workers: int) -> None:
    """Run each job once in spawned worker processes, so its kernels land in Triton's disk cache
    before the timing starts; report the ones that failed (a config can exceed the GPU's resources)."""
    t = time.time()
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        errors = [e for e in pool.map(compile_job, unique, chunksize=max(1, len(unique) // (4 * workers))) if e]
    print(f"precompiled {len(unique)} variants in {time.time() - t:.0f}s, {len(errors)} failed", flush=True)
    for e in errors[:20]:
        print("  ", e, flush=True)


# ------------------------------------------------------------------------------ tune ---------

def tune(out_dir: Path, schemes, m_list, workers: int, budget_s: float, names=None, dev=None,
         verbose=False):
    from hybrid_r1_kernels.configs import arch_of, device_limits, m_bucket, shape_key
    dev = dev or torch.device("cuda", torch.cuda.current_device())
    sms, smem = device_limits(dev)
    arch = arch_of(dev)
    names = names or list(SHAPES)
    # Most valuable buckets first, in case the time budget runs out.
    order = [m for m in (1, 16, 4096, 1024, 4, 64, 256) if m in m_list] + \
            [m for m in m_list if m not in (1, 16, 4096, 1024, 4, 64, 256)]
    jobs = [(s, n, M, c) for M in order for n in names for s in schemes
            for c in candidates(s, SHAPES[n][0], SHAPES[n][1], M, SHAPES[n][2], sms, smem)]
    t0 = time.time()
    if workers > 1:
        precompile(jobs, workers)
    meta = {"gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "arch": arch, "torch": torch.__version__,
            "triton": __import__("triton").__version__, "date": time.strftime("%Y-%m-%d"),
            "method": "median CUDA-graph replay, weights rotated over >= 3x L2, activation quant included"}
    # Start from the shipped tables: a run over some M buckets replaces just those.
    tables = {}
    for s in schemes:
        f = out_dir / f"int8_{s}_{arch}.json"
        old = json.loads(f.read_text()) if f.is_file() else {}
        tables[s] = {"meta": meta, "configs": old.get("configs", {}), "timings_us": old.get("timings_us", {})}
    out_dir.mkdir(parents=True, exist_ok=True)
    for M in order:
        for name in names:
            N, K, glu = SHAPES[name]
            if time.time() - t0 > budget_s:
                print(f"budget spent: skipping M={M} {name}", flush=True)
                continue
            copies = n_copies((2 * N if glu else N) * K, dev)
            ws, bs, cs = make_weights(N, K, glu, copies, dev)
            x = torch.randn(M, K, device=dev).bfloat16()
            for scheme in schemes:
                fn = linear_fn(scheme, glu)
                scales = bs if scheme == "block" else cs
                best = (float("inf"), None)
                for cfg in candidates(scheme, N, K, M, glu, sms, smem):
                    try:
                        us = time_calls([lambda w=w, s=s, cfg=cfg: fn(x, w, s, config=cfg)
                                         for w, s in zip(ws, scales)])
                    except Exception as e:
                        print(f"  {scheme} {name} M={M} {cfg}: {type(e).__name__}: {str(e)[:160]}")
                        continue
                    if verbose:
                        print(f"    {us:9.1f} us  {cfg}")
                    if us < best[0]:
                        best = (us, cfg)
                if best[1] is None:
                    continue
                key, b = shape_key(N, K, glu), str(m_bucket(M))
                tables[scheme]["configs"].setdefault(key, {})[b] = dataclasses.asdict(best[1])
                tables[scheme]["timings_us"].setdefault(key, {})[b] = round(best[0], 2)
                print(f"{scheme:7s} {name:24s} M={M:5d} {best[0]:9.1f} us  {best[1]}", flush=True)
            del ws, bs, cs, x
            torch.cuda.empty_cache()
        for scheme in schemes:  # rewrite after each bucket: a cut-off run still leaves tables
            (out_dir / f"int8_{scheme}_{arch}.json").write_text(json.dumps(tables[scheme], indent=1))
    print(f"tuned in {time.time() - t0:.0f}s -> {out_dir}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "kernels" / "configs",
                   help="folder of int8_<scheme>_<arch>.json; existing tables there are updated")
    p.add_argument("--m", type=int, nargs="+", default=list(M_LIST))
    p.add_argument("--schemes", nargs="+", default=["block", "channel"], choices=["block", "channel"])
    p.add_argument("--shapes", nargs="+", default=None, choices=list(SHAPES))
    p.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    p.add_argument("--budget-s", type=float, default=1e9, help="stop starting new shapes after this")
    p.add_argument("--verbose", action="store_true", help="print every candidate's time")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("tune_int8.py needs a CUDA GPU")
    tune(args.out, args.schemes, args.m, args.workers, args.budget_s, args.shapes, verbose=args.verbose)


if __name__ == "__main__":
    main()
