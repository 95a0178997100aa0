"""Where the GPU part of a decode step goes: the CUDA kernels of bench_decode_gpu.py's model (4
layers at 671B width, the first dense, INT8 block linears, routed experts replaced by a zero
stand-in), 5 eager steps and 5 steps replayed from CUDA graphs under torch.profiler, each kernel's
GPU time and count per step, largest first; the graphs' step time measured without the profiler.

    python benchmarks/profile_decode_gpu.py OUT_DIR
"""

import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from bench_decode_gpu import ZeroExperts
from hybrid_r1 import placement
from hybrid_r1.graphs import DecodeGraphs
from hybrid_r1.loading import build, load_weights
from hybrid_r1.model import MoE
from hybrid_r1.placement import fuse
from hybrid_r1.runtime import Runtime
from hybrid_r1.synth import SyntheticWeights, preset_config
from torch.profiler import profile, ProfilerActivity


def main() -> int:
    out = sys.argv[1]
    Path(out).mkdir(parents=True, exist_ok=True)
    cfg = preset_config(
        "full-slice",
        num_hidden_layers=4,
        first_k_dense_replace=1,
        n_routed_experts=8,
        num_experts_per_tok=8,
        n_group=1,
        topk_group=1,
    )
    dev = torch.device("cuda")
    module = build(cfg)
    for block in module.model.layers:
        if isinstance(block.mlp, MoE):
            block.mlp.experts = ZeroExperts()
    placement.apply(module, placement.int8_rules("block", dev), dev, torch.bfloat16)
    load_weights(module, SyntheticWeights(cfg, seed=0), dev, torch.bfloat16)
    fuse(module)
    rt = Runtime(module, None)
    cache = rt.new_cache()
    prompt = torch.randint(0, cfg.vocab_size, (1024,)).tolist()

    def table(prof, steps, fn):
        agg = collections.defaultdict(lambda: [0, 0.0])
        tot = 0.0
        n = 0
        evs = [
            e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
        ]
        for e in evs:
            agg[e.name][0] += 1
            agg[e.name][1] += e.device_time
            tot += e.device_time
            n += 1
        with open(fn, "w") as f:
            f.write(f"kernels/step {n / steps:.1f}  kernel us/step {tot / steps:.1f}\n")
            for k, (c, t) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
                f.write(f"{t / steps:9.1f} us {c / steps:6.1f}x  {k[:150]}\n")
        return n / steps, tot / steps

    with torch.inference_mode():
        for i in range(0, 1024, 512):
            module(torch.tensor([prompt[i : i + 512]]), cache, last_only=True)
        tok = torch.tensor([[1]])
        for _ in range(3):
            module(tok, cache, last_only=True)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(5):
                module(tok, cache, last_only=True)
            torch.cuda.synchronize()
        print("eager", table(p, 5, f"{out}/prof_eager.txt"))
        runner = DecodeGraphs(module, cache)
        for _ in range(3):
            runner.step(1)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(32):
            runner.step(1)
        torch.cuda.synchronize()
        print("graph ms/step", (time.perf_counter() - t) / 32 * 1e3)
        with profile(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(5):
                runner.step(1)
            torch.cuda.synchronize()
        print("graph", table(p, 5, f"{out}/prof_graph.txt"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
