"""kv_b_proj in the absorbed MLA decode path: what keeping W_UK / W_UV in BF16 costs, measured.

    python benchmarks/bench_kv_b_absorbed.py RESULT.md [--tokens 1 4 16 64]

The absorbed path (hybrid_r1/model.py, MLA.forward at decode) multiplies per head: q_nope [B, H, 128]
by W_UK [H, 128, 512] and the latent output [B, H, 512] by W_UV [H, 128, 512]. This times those two
einsums in BF16 exactly as the model runs them (weights rotated over copies of >= 3x L2, CUDA-graph
replays), against the bytes bound of BF16 and of an int8 copy (half the bytes) at the measured copy
bandwidth. The best any int8 kernel could save per layer is (BF16 time - int8 bound); times 61
layers, per decoded token, that is the budget to compare with the rest of a decode step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tune_int8 as T  # noqa: E402  (CUDA-graph timer, copy bandwidth)

H, NOPE, V, RANK, LAYERS = 128, 128, 128, 512, 61


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64])
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_kv_b_absorbed.py needs a CUDA GPU")
    dev = torch.device("cuda", torch.cuda.current_device())
    bw = T.copy_bandwidth(dev)
    wbytes = H * (NOPE + V) * RANK * 2  # BF16 W_UK + W_UV of one layer
    copies = T.n_copies(wbytes, dev)
    ws = [torch.randn(H, NOPE + V, RANK, device=dev).bfloat16() for _ in range(copies)]
    rows = []
    for B in args.tokens:
        q = torch.randn(B, 1, H, NOPE, device=dev).bfloat16()
        o = torch.randn(B, 1, H, RANK, device=dev).bfloat16()

        def step(w):
            w_uk, w_uv = w[:, :NOPE], w[:, NOPE:]
            torch.einsum("bthd,hdc->bthc", q, w_uk)
            torch.einsum("bthc,hvc->bthv", o, w_uv)

        us = T.time_calls([lambda w=w: step(w) for w in ws])
        b16, b8 = wbytes / bw / 1e3, wbytes / 2 / bw / 1e3
        rows.append((B, us, b16, b8, max(0.0, us - b8) * LAYERS / 1e3))
        print(f"B={B:3d} bf16 {us:7.1f} us  bound bf16 {b16:5.1f}  int8 {b8:5.1f} us", flush=True)
    gpu = torch.cuda.get_device_name(dev)
    L = [f"# kv_b_proj (W_UK, W_UV) in the absorbed decode path on {gpu}", "",
         f"- {gpu}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}; copy bandwidth {bw:.0f} GB/s",
         f"- one layer: W_UK + W_UV = {wbytes / 2**20:.1f} MiB in BF16; {copies} copies rotated",
         "- saving ceiling: what an int8 kernel at the bytes bound would save per decoded token over "
         f"{LAYERS} layers", "",
         "| tokens | BF16 einsums us/layer | BF16 bound us | int8 bound us | saving ceiling ms/token |",
         "|---|---|---|---|---|"]
    L += [f"| {B} | {us:.1f} | {b16:.1f} | {b8:.1f} | {save:.2f} |" for B, us, b16, b8, save in rows]
    T.write_report(args.out, "\n".join(L) + "\n", None, {})


if __name__ == "__main__":
    main()
