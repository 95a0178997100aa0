"""The long-prompt attention of one MLA layer at 671B width (128 heads, q/k head 192, v head 128, BF16)
on the GPU: the kernel prefill uses (model.causal_attention: values zero-padded to 192 so SDPA's
flash kernel takes them, one call) against the path it replaced (query blocks of at most 4 GiB of
fp32 scores, each an SDPA call with a lower-right causal mask: SDPA's memory-efficient kernel) and
one unblocked memory-efficient call; cuDNN's kernel where this torch lets it take 192 / 128 heads.

Per prompt (new tokens T after P cached ones): ms (median of `--reps` after a warm-up), TFLOP/s on
the causal products (2 x heads x (192 + 128) x the query-key pairs a causal mask keeps: the padded
values' zero columns are not counted) and the largest error on the last 256 queries against an fp32
reference (explicit scores), in units of max|v|: the flash kernel's bound is 2 x 2^-8 (bf16
probabilities and output).

    python benchmarks/bench_prefill_attention.py OUT.md [--tokens 2048 8192 32768] [--prefix 8192:24576]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_experts_cpu import cpu_model  # noqa: E402

from hybrid_r1 import model as model_math  # noqa: E402

HEADS, QK, V = 128, 192, 128
SCALE = QK**-0.5


def blocked(q, k, v, start):
    """The replaced path: query blocks bounded by _NAIVE_SCORE_BYTES, each sees keys to its last query."""
    b, h, t, _ = q.shape
    s = k.shape[2]
    rows = max(1, model_math._NAIVE_SCORE_BYTES // (4 * b * h * s))
    out = []
    for r0 in range(0, t, rows):
        r1 = min(t, r0 + rows)
        end = min(s, start + r1)
        out.append(F.scaled_dot_product_attention(q[:, :, r0:r1], k[:, :, :end], v[:, :, :end],
                                                  attn_mask=causal_lower_right(r1 - r0, end), scale=SCALE))
    return torch.cat(out, 2)


def efficient(q, k, v, start):
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]), scale=SCALE)


def cudnn(q, k, v, start):
    if q.shape[2] != k.shape[2]:
        raise RuntimeError("lower-right causal masks go to flash or memory-efficient only")
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE)


def padded(q, k, v, start):
    assert model_math.padded_flash(q, k), "flash does not take these inputs"
    return model_math.causal_attention(q, k, v, SCALE)


VARIANTS = {"padded v, flash, one call (now)": padded, "query blocks, memory-efficient (before)": blocked,
            "memory-efficient, one call": efficient, "cuDNN, unpadded": cudnn}


def reference_rows(q, k, v, rows: int = 256) -> torch.Tensor:
    t, s = q.shape[2], k.shape[2]
    qr = q[:, :, t - rows:].float()
    scores = torch.einsum("bhtd,bhsd->bhts", qr, k.float()) * SCALE
    seen = torch.arange(s, device=q.device)[None, :] <= torch.arange(t - rows, t, device=q.device)[:, None] + (s - t)
    p = scores.masked_fill(~seen, float("-inf")).softmax(-1)
    return torch.einsum("bhts,bhsd->bhtd", p, v.float())


def timed(fn, args, reps: int) -> tuple[float, torch.Tensor]:
    out = fn(*args)  # warm-up (and the output checked)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(*args)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--prefix", nargs="*", default=["8192:24576"], help="T:P, T new tokens after P cached")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    cases = [(t, 0) for t in args.tokens] + [tuple(int(x) for x in c.split(":")) for c in args.prefix]
    rows = []
    gen = torch.Generator(device=dev).manual_seed(0)
    with torch.inference_mode():
        for t, p in cases:
            s = t + p
            q = torch.randn(1, HEADS, t, QK, device=dev, dtype=torch.bfloat16, generator=gen)
            k = torch.randn(1, HEADS, s, QK, device=dev, dtype=torch.bfloat16, generator=gen)
            v = torch.randn(1, HEADS, s, V, device=dev, dtype=torch.bfloat16, generator=gen)
            pairs = t * p + t * (t + 1) / 2
            flop = 2 * HEADS * (QK + V) * pairs
            ref = reference_rows(q, k, v)
            vmax = float(v.float().abs().max())
            for name, fn in VARIANTS.items():
                try:
                    ms, out = timed(fn, (q, k, v, p), args.reps)
                    err = float((out[:, :, t - ref.shape[2]:].float() - ref).abs().max()) / vmax
                    rows.append(f"| {t} | {p} | {name} | {ms:.1f} | {flop / ms / 1e9:.0f} | {err / 2**-8:.2f} |")
                except Exception as e:  # noqa: BLE001 - a kernel this torch lacks is a row, not a crash
                    rows.append(f"| {t} | {p} | {name} | n/a | | {type(e).__name__}: {str(e).splitlines()[0][:120]} |")
                print(rows[-1], flush=True)
                torch.cuda.empty_cache()
            del q, k, v, ref
    lines = [f"# Prefill attention of one MLA layer at 671B width: {torch.cuda.get_device_name()}, {cpu_model()}, "
             f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}", "",
             f"- 128 heads, q/k head {QK}, v head {V}, BF16, batch 1; median of {args.reps} after a warm-up",
             "- TFLOP/s counts the causal pairs' products only (2 x heads x (192 + 128) per pair); error = max |out - fp32 "
             "reference| over the last 256 queries, in units of 2^-8 max|v| (the flash kernel's bound is 2)",
             f"- `python benchmarks/bench_prefill_attention.py OUT.md --tokens {' '.join(map(str, args.tokens))} "
             f"--prefix {' '.join(args.prefix)}`", "",
             "| new tokens | cached | kernel | ms | TFLOP/s | error / (2^-8 max abs v) |", "|---|---|---|---|---|---|", *rows, ""]
    Path(args.out).write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
