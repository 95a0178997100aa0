"""merge_tools merge at the 671B widths: throughput and peak RSS against a plain copy of the same
bytes on the same disk, measured in one run, and the load time of the merged folder vs the pair.

    python benchmarks/bench_merge.py OUT.md [--work DIR] [--experts 64] [--layers 2]

Inputs are synthetic at full width (hidden 7168, 2048-wide experts, the real vocabulary): a Meituan
block-INT8 folder (written BF16, then merge_tools quantize) and a Q4_K_M GGUF of the same weights
(ggml's quantizer), `--layers` layers of which the first is dense. Each timed step runs in a fresh
process (os.wait4 gives its peak RSS). The plain copy is `cp -r` of the merged folder: the same
files and bytes, read from the page cache as the merge's inputs are (all were just written, and the
box has RAM enough to cache them), written to the same disk; so the ratio is the merge's overhead
over moving its bytes, not over the disk.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _child(code: str) -> tuple[float, int]:
    """Run `code` in a fresh Python; (seconds, peak RSS bytes)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONUNBUFFERED": "1"})
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"child failed ({status}): {code[:200]}")
    return time.perf_counter() - t0, usage.ru_maxrss * 1024


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def make_inputs(work: Path, layers: int, experts: int) -> tuple[Path, Path]:
    int8, gguf = work / "int8", work / "q4km.gguf"
    if int8.is_dir() and gguf.is_file():
        return int8, gguf
    work.mkdir(parents=True, exist_ok=True)
    code = f"""
import shutil
from pathlib import Path
from hybrid_r1.synth import SyntheticWeights, preset_config, write_checkpoint
from hybrid_r1.formats.gguf_writer import write_gguf_from_checkpoint
from hybrid_r1_merge_tools.quantize import quantize_checkpoint
work = Path({str(work)!r})
cfg = preset_config("full-slice", num_hidden_layers={layers}, first_k_dense_replace=1, n_routed_experts={experts},
                    n_group=8, topk_group=4)
w = SyntheticWeights(cfg, seed=0, mtp=False)
bf16 = write_checkpoint(work / "bf16", w, tokenizer=False, force=True)
quantize_checkpoint(bf16, work / "int8", "block", force=True)
shutil.rmtree(bf16)
write_gguf_from_checkpoint(w, work / "q4km.gguf", type_mix="Q4_K_M")
"""
    secs, _ = _child(code)
    print(f"inputs written in {secs:.0f} s", file=sys.stderr)
    return int8, gguf


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--work", default="/tmp/bench_merge")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=64)
    args = ap.parse_args(argv)
    work = Path(args.work)
    int8, gguf = make_inputs(work, args.layers, args.experts)
    merged, copy = work / "merged", work / "copy"
    for p in (merged, copy):
        shutil.rmtree(p, ignore_errors=True)
    merge_s, merge_rss = _child(f"""
from hybrid_r1_merge_tools.merge import merge
merge({str(int8)!r}, {str(gguf)!r}, {str(merged)!r}, resume=False)
""")
    total = _size(merged)
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", str(merged), str(copy)], check=True)
    subprocess.run(["sync"], check=True)
    copy_s = time.perf_counter() - t0
    shutil.rmtree(copy)
    verify_s, _ = _child(f"""
from hybrid_r1_merge_tools.merge import verify
assert verify({str(merged)!r}) == []
""")
    load = "import hybrid_r1, time; t = time.perf_counter(); m = hybrid_r1.load({}, device='cpu'); print(time.perf_counter() - t)"
    merged_load_s, merged_load_rss = _child(load.format(repr(str(merged))))
    pair_load_s, pair_load_rss = _child(load.replace("device='cpu'", f"gguf={str(gguf)!r}, device='cpu'").format(repr(str(int8))))
    gib = 2**30
    lines = [
        f"# merge_tools merge at the 671B widths ({args.layers} layers, 1 dense; {args.experts} routed experts per MoE layer)",
        "",
        f"- machine: {platform.node()}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / gib:.0f} GiB RAM; {time.strftime('%Y-%m-%d')}",
        f"- inputs: block-INT8 folder {_size(int8) / gib:.2f} GiB (its routed experts are not copied), "
        f"Q4_K_M GGUF {gguf.stat().st_size / gib:.2f} GiB; merged output {total / gib:.2f} GiB",
        "- plain copy: `cp -r` of the merged folder + sync, same disk, same page-cache state (the bound a merge can reach)",
        "",
        "| step | seconds | GB/s | vs plain copy | peak RSS |",
        "|---|---|---|---|---|",
        f"| plain copy | {copy_s:.1f} | {total / copy_s / 1e9:.2f} | 1.00x | - |",
        f"| merge (incl. sha256 of every byte, fsync) | {merge_s:.1f} | {total / merge_s / 1e9:.2f} | "
        f"{merge_s / copy_s:.2f}x | {merge_rss / gib:.2f} GiB |",
        f"| verify (sha256 of every file) | {verify_s:.1f} | {total / verify_s / 1e9:.2f} | - | - |",
        f"| load merged folder (CPU, float32) | {merged_load_s:.1f} | - | - | {merged_load_rss / gib:.2f} GiB |",
        f"| load the pair (CPU, float32) | {pair_load_s:.1f} | - | - | {pair_load_rss / gib:.2f} GiB |",
        "",
        "Targets: merge within 1.5x of the plain copy, RSS under 2 GB. Load times include the interpreter and",
        "torch start-up (a fresh process each) and the float32 expansion of the BF16 embeddings; the peak RSS",
        "of a load counts the memory-mapped pages it touched.",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
