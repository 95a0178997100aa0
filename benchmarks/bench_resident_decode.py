"""Hybrid decode with part of each layer's experts resident on the GPU (experts.ggml_cpu
`gpu_experts`), tok/s against the resident share, at 671B width, side by side in one run.

Built as bench_decode_overlap.py builds its model (`--layers` layers, the first dense, rules/int8-gpu-
ggml-experts.yaml, each MoE layer's 256 experts tiled from Q4_K/Q6_K blocks in anonymous memory, a
real prompt through the R1 tokenizer, greedy steps feeding the argmax back, CUDA graphs), with every
gate's expert ids replaced by a fresh uniform random top-8 drawn inside the graph each step. Uniform
routing is the worst case for residency: a share s of the experts takes a share s of the slots
(a calibrated placement of the hottest experts takes more). The resident experts hold random INT8
weights of the real size (the time does not depend on their values; tests/test_experts_resident.py
checks the results); share 0 is the plain serial operator.

    python benchmarks/bench_resident_decode.py OUT.md [--layers 4] [--steps 48] [--shares 0 0.125 0.25 0.5 0.75]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode_overlap import PROMPT, build_model, tokenizer  # noqa: E402
from bench_experts_cpu import cpu_model, dram_read_gbs  # noqa: E402
from bench_hybrid_decode import FULL_DENSE, FULL_MOE  # noqa: E402
from tune_fused_moe import make_experts  # noqa: E402

from hybrid_r1 import ggml_lib  # noqa: E402
from hybrid_r1.generate import prefill  # noqa: E402
from hybrid_r1.graphs import DecodeGraphs  # noqa: E402
from hybrid_r1.ops.experts_int8 import Int8GPUExperts  # noqa: E402
from hybrid_r1.ops.experts_ggml_overlap import OverlappedGGMLExperts  # noqa: E402
from hybrid_r1.ops.experts_resident import OverlappedResidentGGMLExperts, ResidentGGMLExperts  # noqa: E402


def resident_twin(op, n: int, device, overlap: bool = False) -> ResidentGGMLExperts:
    """op's loaded GGML bytes, with its first n experts also on the GPU (random INT8 weights); with
    `overlap`, the kind whose CPU slots hand over inside the decode graph."""
    cls = OverlappedResidentGGMLExperts if overlap else ResidentGGMLExperts
    r = cls(op.n_experts, op.hidden_size, op.intermediate_size, threads=op.threads, poll=op.poll,
            gpu_experts=n, overlap_timeout_s=5.0)
    r.share_loaded(op)
    gpu = Int8GPUExperts(n, op.hidden_size, op.intermediate_size, device, "block", expert_ids=tuple(range(n)))
    w13, s13, w2, s2 = make_experts(n, "block", device)
    gpu.w13, gpu.w13_s, gpu.w2, gpu.w2_s = w13 // 8, s13, w2 // 8, s2  # small values: finite outputs
    slot = torch.full((op.n_experts,), -1, dtype=torch.int32)
    slot[:n] = torch.arange(n, dtype=torch.int32)
    r.resident, r._slot_of, r._cold = gpu, slot.to(device), op.n_experts - 1
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--shares", type=float, nargs="+", default=[0, 0.125, 0.25, 0.5, 0.75])
    ap.add_argument("--tokenizer")
    ap.add_argument("--modes", nargs="+", choices=["serial", "overlapped"], default=["serial"],
                    help="serial: the CPU experts break the graph; overlapped: overlap: true as well (one graph)")
    ap.add_argument("--engine", default="ggml", help="the experts' CPU engine (cpu_engines.ENGINES)")
    ap.add_argument("--threads", type=int, default=0, help="the CPU engine's threads (0: one per physical core)")
    ap.add_argument("--native-spin-us", type=int, default=None,
                    help="engine native: how long idle workers spin before they sleep (cpu_kernels.SPIN_NS)")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    prompt = tokenizer(args.tokenizer).encode_chat([{"role": "user", "content": PROMPT}])
    if args.native_spin_us is not None:
        from hybrid_r1 import cpu_kernels

        cpu_kernels.SPIN_NS = args.native_spin_us * 1000
    threads = ggml_lib.physical_cores()
    dram = dram_read_gbs(threads)
    torch.set_num_threads(threads)
    cfg, module, rt, moes, build_s = build_model(args.layers, device, {"engine": args.engine, "threads": args.threads or None})
    n_moe = args.layers - 1
    plain = [moe.experts for moe in moes]
    t = plain[0].tensors
    expert_bytes = sum(t[p].data.nbytes for p in ("gate", "up", "down")) // cfg.n_routed_experts

    rows = []
    with torch.inference_mode():
        for share, mode in [(s, m) for s in args.shares for m in args.modes]:
            n = round(share * cfg.n_routed_experts)
            over = mode == "overlapped"
            for moe, op in zip(moes, plain):
                if n:
                    moe.experts = resident_twin(op, n, device, over)
                elif over:
                    moe.experts = OverlappedGGMLExperts(op.n_experts, op.hidden_size, op.intermediate_size,
                                                        threads=op.threads, poll=op.poll, overlap_timeout_s=5.0)
                    moe.experts.share_loaded(op)
                else:
                    moe.experts = op
            cache = rt.new_cache()
            nxt = int(prefill(module, prompt, cache, 512).argmax())
            runner = DecodeGraphs(module, cache)
            for _ in range(3):
                nxt = int(runner.step(nxt).argmax())
            times = []
            for _ in range(args.steps):
                t1 = time.perf_counter()
                nxt = int(runner.step(nxt).argmax())
                times.append(time.perf_counter() - t1)
            step = statistics.median(times) * 1e3
            # every layer of the full model as one of this run's MoE layers, each carrying an equal share
            # of the dense layer's time too: an upper bound on time (step / layers would count the cheap
            # dense layer as an average one, 1 in 4 here against 3 in 61 there, and flatter the figure)
            full_ms = (FULL_DENSE + FULL_MOE) * step / n_moe
            dram_ms = n_moe * cfg.num_experts_per_tok * (1 - n / cfg.n_routed_experts) * expert_bytes / dram / 1e6
            rows.append(f"| {share:.1%} ({n} a layer) | {mode} ({len(runner.segments)} segments, {runner.breaks} CPU calls) | {step:.2f} "
                        f"| {dram_ms:.2f} | {1e3 / full_ms:.2f} |")
            print(rows[-1], flush=True)
            del runner, cache
            torch.cuda.empty_cache()
    lines = [f"# Hybrid decode against the share of experts resident on the GPU: {args.layers} layers at 671B width "
             f"({n_moe} MoE), {torch.cuda.get_device_name()}, {cpu_model()}, {time.strftime('%Y-%m-%d')}", "",
             f"- CPU engine {plain[0].engine_class.name}, {plain[0].threads} threads; DRAM read {dram:.1f} GB/s in this run; an expert's GGML bytes {expert_bytes / 1e6:.1f} MB; built in {build_s:.0f} s",
             f"- {args.steps} greedy steps after 3 warm-ups, CUDA graphs around the CPU experts, fresh uniform random routing each step",
             "- DRAM bound = the non-resident slots' expert bytes a step / that bandwidth; full model = 61 x (step / "
             f"{n_moe} MoE layers): every layer as a MoE layer carrying a share of the dense one, an upper bound on time",
             "",
             "| resident share | mode | step ms (median) | DRAM bound of the CPU part ms | full model tok/s, extrapolated |",
             "|---|---|---|---|---|", *rows, ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
