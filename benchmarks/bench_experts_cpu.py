"""One MoE layer of routed experts at 671B width on the CPU, through GGMLExperts.

Per layer: 256 experts (--experts), hidden 7168, intermediate 2048, Q4_K gate/up and Q6_K down
(--down q4_k for the other Q4_K_M layers): 7.3 GB. A few experts are really quantized by ggml and
tiled to fill the layer (valid blocks, no hours of quantizing); --layers 2 rotates through more bytes
than any cache. Random routing, 8 experts a token. For each token count it reports:
  ms per layer call through GGMLExperts.forward (torch in, torch out),
  ms of ggml's graph alone (the same three mul_mat_id + SwiGLU graph llama.cpp builds, inputs already
  in place: the floor of our overhead),
  GB/s of expert bytes read (each used expert's gate+up+down once) and its share of the host's DRAM
  read bandwidth, measured in the same run as a multi-threaded torch sum over > 4 GB,
and decode on one thread: if decode at N threads reaches N times that, the CPU's dot products (not
memory) set the pace. --backing file maps the weights from a file, as a GGUF is.

  python benchmarks/bench_experts_cpu.py benchmarks/results/experts_cpu_local.md --experts 64 --layers 2
  python benchmarks/bench_experts_cpu.py benchmarks/results/experts_cpu_h100.md --threads 16 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from importlib.metadata import version

import numpy as np
import torch

from hybrid_r1 import ggml_lib
from hybrid_r1.formats.ggml_tensor import GGMLTensor
from hybrid_r1.ops.experts_ggml import GGMLExperts

H, I, K = 7168, 2048, 8
Q4_K, Q6_K = 12, 14


class TiledSource:
    """A WeightSource whose layers are built from a few ggml-quantized experts, tiled."""

    path = "synthetic"

    def __init__(self, n_experts: int, n_layers: int, down_type: int, distinct: int, backing: str = "anon",
                 folder: str = "/tmp", inter: int = I, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.files = []
        self.layers = {}
        parts = (("gate", Q4_K, inter, H), ("up", Q4_K, inter, H), ("down", down_type, H, inter))
        blocks = {}
        for part, t, rows, ne0 in parts:  # `distinct` real experts per part
            w = (rng.standard_normal((distinct * rows, ne0)) / np.sqrt(ne0)).astype(np.float32)
            blocks[part] = ggml_lib.quantize(w, t, threads=ggml_lib.physical_cores()).reshape(distinct, rows, -1)
        for layer in range(n_layers):
            tensors = {}
            for part, t, rows, ne0 in parts:
                shape = (n_experts, rows, blocks[part].shape[2])
                if backing == "file":  # a memory-mapped file, like a GGUF (page cache)
                    f = tempfile.NamedTemporaryFile(dir=folder, suffix=".experts")
                    self.files.append(f)
                    for e in range(n_experts):  # written through the page cache, no msync
                        f.write(blocks[part][(e + layer) % distinct].tobytes())
                    f.flush()
                    data = np.memmap(f.name, np.uint8, "r", shape=shape)
                    # map every page now, as a warm GGUF would be
                    torch.from_numpy(np.frombuffer(data, np.uint8, data.size // 8 * 8).view(np.int64)).sum()
                else:  # anonymous memory (numpy asks for transparent huge pages)
                    data = np.empty(shape, np.uint8)
                    for e in range(n_experts):
                        data[e] = blocks[part][(e + layer) % distinct]
                tensors[part] = GGMLTensor(f"blk.{layer}.ffn_{part}_exps.weight", self.path, t, (ne0, rows, n_experts), data)
            self.layers[layer] = tensors

    def ggml_experts(self, layer: int):
        return self.layers[layer]


def dram_read_gbs(threads: int, gb: float = 4.3, reps: int = 3) -> float:
    """Best of `reps` multi-threaded torch sums over a `gb` GB float32 tensor."""
    torch.set_num_threads(threads)
    a = torch.ones(int(gb * 1e9) // 4, dtype=torch.float32)
    a.sum()  # fault the pages in
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        a.sum()
        best = max(best, a.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    del a
    return best


def huge_pages_mb() -> float:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def bench(ops: list[GGMLExperts], n_experts: int, tokens: int, seconds: float, min_reps: int, seed: int):
    """(median ms through forward, median ms of the graph alone, bytes read per call on average)."""
    gen = torch.Generator().manual_seed(seed)
    per_expert = sum(getattr(ops[0].weights, p)[0].nbytes for p in ("gate", "up", "down"))
    ex = ggml_lib.executor(ops[0].threads, ops[0].poll)
    fwd, alone, nbytes = [], [], []
    deadline = time.perf_counter() + seconds
    i = 0
    while i < min_reps * 2 or (time.perf_counter() < deadline and i < 2000):
        op = ops[i % len(ops)]
        x = torch.randn(tokens, H, generator=gen, dtype=torch.bfloat16)
        idx = torch.stack([torch.randperm(n_experts, generator=gen)[:K] for _ in range(tokens)])
        w = torch.rand(tokens, K, generator=gen)
        if i % 2 == 0:
            t0 = time.perf_counter()
            op(x, idx, w)
            fwd.append(time.perf_counter() - t0)
        else:  # the same graph, inputs written beforehand: ggml alone
            spent = 0.0
            with ex.lock:
                for s in range(0, tokens, op.chunk_tokens):
                    e = min(tokens, s + op.chunk_tokens)
                    g = ex.moe_graph(op.weights, e - s, K)
                    torch.from_numpy(g.x).copy_(x[s:e])
                    torch.from_numpy(g.ids).copy_(idx[s:e])
                    torch.from_numpy(g.w).copy_(w[s:e])
                    t0 = time.perf_counter()
                    ex.compute(g)
                    spent += time.perf_counter() - t0
            alone.append(spent)
        nbytes.append(len(idx.unique()) * per_expert)
        i += 1
    return statistics.median(fwd) * 1e3, statistics.median(alone) * 1e3, statistics.mean(nbytes)


def read_gbs(arrays, threads: int, reps: int = 3) -> float:
    """Best of `reps` multi-threaded int64 sums over `arrays` themselves: the read bound of the memory
    the experts live in (page-cache mmap or anonymous huge pages), not of a fresh buffer."""
    torch.set_num_threads(threads)
    views = [torch.from_numpy(np.frombuffer(a, np.uint8, a.size // 8 * 8).view(np.int64)) for a in arrays]
    total = sum(v.numel() * 8 for v in views)
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        for v in views:
            v.sum()
        best = max(best, total / (time.perf_counter() - t0) / 1e9)
    return best


def bench_forward(ops, n_experts: int, tokens: int, seconds: float, min_reps: int, seed: int):
    """(median ms per forward call, mean expert bytes read per call): fresh random routing and
    activations every call, layers taken in turn."""
    gen = torch.Generator().manual_seed(seed)
    per_expert = sum(getattr(ops[0].weights, p)[0].nbytes for p in ("gate", "up", "down"))
    times, nbytes = [], []
    deadline = time.perf_counter() + seconds
    i = 0
    while i < min_reps or (time.perf_counter() < deadline and i < 1000):
        x = torch.randn(tokens, H, generator=gen, dtype=torch.bfloat16)
        idx = torch.rand(tokens, n_experts, generator=gen).argsort(1)[:, :K]  # K distinct experts a token
        w = torch.rand(tokens, K, generator=gen)
        t0 = time.perf_counter()
        ops[i % len(ops)](x, idx, w)
        times.append(time.perf_counter() - t0)
        nbytes.append(len(idx.unique()) * per_expert)
        i += 1
    return statistics.median(times) * 1e3, statistics.mean(nbytes)


def thread_masks() -> dict[str, int]:
    """Cpus_allowed_list of this process's threads -> how many threads have it."""
    out: dict[str, int] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/status") as f:
                mask = next(line.split(":", 1)[1].strip() for line in f if line.startswith("Cpus_allowed_list"))
        except (OSError, StopIteration):
            continue
        out[mask] = out.get(mask, 0) + 1
    return out


def compare_engines(args, src: TiledSource, layer_gb: float) -> str:
    """--compare: each engine configuration on the same bytes, page-cache mmap and a huge-page copy,
    with the read bound of each memory measured in the same run."""
    from hybrid_r1 import cpu_engines, hugepages
    from hybrid_r1.formats.ggml_tensor import GGMLTensor as T_

    threads = (args.threads or [ggml_lib.physical_cores()])[0]
    mem = {"mmap": src}
    if "hp" in " ".join(args.compare):
        t0 = time.perf_counter()
        hp = TiledSource.__new__(TiledSource)
        hp.files, hp.layers = [], {}
        for layer, ts in src.layers.items():
            hp.layers[layer] = {p: T_(t.name, t.file, t.ggml_type, t.ne, hugepages.anonymous_copy(t.data))
                                for p, t in ts.items()}
        mem["hp"] = hp
        print(f"huge-page copy of {len(src.layers)} layers in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    arrays = {m: [t.data for ts in s_.layers.values() for t in ts.values()] for m, s_ in mem.items()}
    huge = {m: sum(hugepages.huge_page_bytes(a) for a in arrs) / 2**20 for m, arrs in arrays.items()}
    bound = {m: read_gbs(arrs, threads) for m, arrs in arrays.items()}
    notes = [f"- read bound, {threads} threads (int64 sum over the {len(src.layers)} layers' expert bytes "
             f"themselves, best of 3): " + ", ".join(f"{m} **{bw:.1f} GB/s** ({huge[m]:.0f} MiB in huge pages)"
                                                  for m, bw in bound.items()),
             f"- fresh buffer (torch sum over 4.3 GB of new anonymous memory): {dram_read_gbs(threads):.1f} GB/s",
             f"- THP mode: {hugepages.thp_mode()}; engines installed: {', '.join(cpu_engines.installed())}"]
    print("\n".join(notes), file=sys.stderr)
    rows = []
    from hybrid_r1 import cpu_kernels

    prefetch = cpu_kernels.PREFETCH  # the default, for configs without +pfN
    for spec in args.compare:
        parts = spec.split("+")
        engine, pin, where = parts[0], "pin" in parts, "hp" if "hp" in parts else "mmap"
        poll = 50 if "poll" in parts else args.poll
        cpu_kernels.PREFETCH = next((int(p[2:]) for p in parts if p.startswith("pf")), prefetch)  # native's
        cpu_kernels.VARIANT = "avx2" if "avx2" in parts else "native"
        ops = []
        for layer in range(args.layers):
            op = GGMLExperts(args.experts, H, I, threads=threads, chunk_tokens=args.chunk_tokens, poll=poll,
                             engine=engine, pin=pin)
            op.load_weights(mem[where], f"model.layers.{layer}.mlp.experts")
            ops.append(op)
        done = []
        before = read_gbs(arrays[where], threads)  # the bound drifts within a run: measured beside each config
        for T in args.tokens:
            ms, nbytes = bench_forward(ops, args.experts, T, args.seconds, args.min_reps, seed=T)
            done.append((T, ms, nbytes))
        after = read_gbs(arrays[where], threads)
        bw = max(before, after)  # the higher of the two: the share is not flattered by a slow moment
        for T, ms, nbytes in done:
            gbs = nbytes / (ms / 1e3) / 1e9
            rows.append(f"| {spec} | {where} | {T} | {ms:.2f} | {nbytes / 1e9:.3f} | {gbs:.1f} | "
                        f"{before:.0f} / {after:.0f} | {gbs / bw:.0%} | {T / ms * 1e3:.0f} |")
            print(rows[-1], file=sys.stderr)
        if engine == "kt_llamafile" and not any("kt_llamafile ran" in n for n in notes):
            notes.append(f"- kt_llamafile ran {cpu_engines.kt_worker_threads(threads)} workers; thread CPU masks "
                         f"after its first call (mask: threads): {thread_masks()}")
        del ops
        time.sleep(0.3)  # ggml workers at poll 50 spin ~0.1 s after a graph: let them sleep first
    if "mmap" in mem and args.madvise:
        import mmap as mm

        for a in arrays["mmap"]:
            m_ = a._mmap  # np.memmap's mmap object
            m_.madvise(mm.MADV_HUGEPAGE)
            try:
                m_.madvise(25)  # MADV_COLLAPSE (Linux 6.1): collapse into huge pages now, if the kernel can
                collapsed = "MADV_COLLAPSE accepted"
            except OSError as e:
                collapsed = f"MADV_COLLAPSE refused ({e.strerror})"
        after = sum(hugepages.huge_page_bytes(a) for a in arrays["mmap"]) / 2**20
        notes.append(f"- page-cache mmap after madvise(MADV_HUGEPAGE) and MADV_COLLAPSE: {collapsed}; "
                     f"{after:.0f} MiB mapped huge; read bound then {read_gbs(arrays['mmap'], threads):.1f} GB/s")
        print(notes[-1], file=sys.stderr)
    fs = os.popen(f"df -T {args.dir} | tail -1").read().split()
    return "\n".join([
        "# CPU expert engines side by side: one MoE layer at 671B width, the same GGUF bytes",
        "",
        f"- CPU: {cpu_model()} ({len(os.sched_getaffinity(0))} logical CPUs usable, {ggml_lib.physical_cores()} "
        f"physical cores); ggml-python {version('ggml-python')}, SIMD used: {' '.join(ggml_lib.cpu_features())}",
        f"- layer: {args.experts} experts x (gate, up [{I} x {H}] Q4_K, down [{H} x {I}] Q6_K) = {layer_gb:.2f} GB; "
        f"{args.layers} layers rotated; {K} experts a token, fresh random routing and activations every call; "
        "bf16 in and out through GGMLExperts.forward",
        f"- mmap: the experts in a memory-mapped file on {fs[1] if len(fs) > 1 else '?'} ({args.dir}), "
        "read through the page cache as a GGUF is; hp: an anonymous copy advised MADV_HUGEPAGE (hugepages.py)",
        *notes,
        f"- `python benchmarks/bench_experts_cpu.py {' '.join(argv_shown())}`",
        "",
        "| engine config | memory | tokens | ms / layer | GB expert bytes read | GB/s | read bound GB/s before / after "
        "| % of the higher bound | tok/s per layer |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "engine config: engine[+pin: threads pinned one per physical core][+poll: ggml workers spin "
        "(poll 50, as the GPU rules set)][+pfN: native's dot products prefetch N bytes ahead][+avx2: native's "
        "AVX2 build (-march=haswell) on this host]; GB read: the used experts' gate+up+down, each once; "
        "ms: median over calls; read bound: int64 sum over that memory's expert bytes just before and just after "
        "the config's rows.",
        "",
    ])


def argv_shown() -> list[str]:
    return sys.argv[1:]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="markdown file to write the results table to")
    p.add_argument("--experts", type=int, default=256, help="experts per layer (256 in the 671B model)")
    p.add_argument("--layers", type=int, default=2, help="layers to rotate through (more bytes than any cache)")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 128, 512, 2048])
    p.add_argument("--threads", type=int, nargs="+", default=None, help="ggml thread counts (default: physical cores)")
    p.add_argument("--down", choices=["q6_k", "q4_k"], default="q6_k")
    p.add_argument("--distinct", type=int, default=2, help="really quantized experts, tiled to fill a layer")
    p.add_argument("--seconds", type=float, default=3.0, help="time per row (at least --min-reps calls of each kind)")
    p.add_argument("--min-reps", type=int, default=2)
    p.add_argument("--chunk-tokens", type=int, default=1024)
    p.add_argument("--poll", type=int, default=0, help="ggml workers' spin before sleeping between graphs (0-100)")
    p.add_argument("--backing", choices=["anon", "file"], default="anon",
                   help="anon: numpy memory (transparent huge pages if the kernel gives them); "
                        "file: a memory-mapped temporary file, as a GGUF is read")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where --backing file writes (deleted at exit)")
    p.add_argument("--compare", nargs="+", metavar="CONFIG",
                   help="compare engine configs instead (e.g. ggml ggml+pin kt_llamafile ggml+hp): "
                        "engine[+pin][+poll][+pfN][+avx2][+hp], on --backing file bytes and their huge-page copy (+hp)")
    p.add_argument("--madvise", action="store_true", help="with --compare: then try MADV_HUGEPAGE/COLLAPSE on the mmap")
    args = p.parse_args(argv)

    thread_counts = args.threads or [ggml_lib.physical_cores()]
    down = Q6_K if args.down == "q6_k" else Q4_K
    t0 = time.perf_counter()
    src = TiledSource(args.experts, args.layers, down, args.distinct, args.backing, args.dir)
    layer_gb = sum(t.data.nbytes for t in src.layers[0].values()) / 1e9
    print(f"built {args.layers} layers of {layer_gb:.2f} GB in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    huge = huge_pages_mb()
    if args.compare:
        text = compare_engines(args, src, layer_gb)
        with open(args.out, "w") as f:
            f.write(text)
        print(text)
        return

    def layers(threads: int) -> list[GGMLExperts]:
        ops = []
        for layer in range(args.layers):
            op = GGMLExperts(args.experts, H, I, threads=threads, chunk_tokens=args.chunk_tokens, poll=args.poll)
            op.load_weights(src, f"model.layers.{layer}.mlp.experts")
            ops.append(op)
        return ops

    # one core's decode speed: the dot products' pace when memory is far from busy
    ms1, _, nbytes1 = bench(layers(1), args.experts, 1, args.seconds, args.min_reps, seed=0)
    per_core = nbytes1 / (ms1 / 1e3) / 1e9
    rows, notes = [], [f"- decode on 1 thread: {per_core:.1f} GB/s of weights (ggml's dot products on one core)"]
    print(notes[-1], file=sys.stderr)
    for threads in thread_counts:
        ops = layers(threads)
        bw = dram_read_gbs(threads)
        notes.append(f"- {threads} threads (poll {args.poll}): DRAM read (torch sum over 4.3 GB) **{bw:.1f} GB/s**; "
                     f"{threads} x one core's decode speed: {threads * per_core:.1f} GB/s")
        print(notes[-1], file=sys.stderr)
        for T in args.tokens:
            ms, ms_alone, nbytes = bench(ops, args.experts, T, args.seconds, args.min_reps, seed=T)
            gbs = nbytes / (ms / 1e3) / 1e9
            flops = 2 * T * K * 3 * H * I
            rows.append(f"| {T} | {threads} | {ms:.2f} | {ms_alone:.2f} | {nbytes / 1e9:.3f} | {gbs:.1f} | {gbs / bw:.0%} | "
                        f"{nbytes / (ms_alone / 1e3) / 1e9 / bw:.0%} | {flops / (ms / 1e3) / 1e9:.0f} |")
            print(rows[-1], file=sys.stderr)
            if T == 1:
                bound = ("compute-bound: it scales with cores" if gbs > 0.8 * threads * per_core
                         else "memory-bound: more cores would not help much")
                notes.append(f"  - decode at {threads} threads: {gbs:.1f} GB/s = {gbs / (threads * per_core):.0%} of "
                             f"{threads} x one core, {gbs / bw:.0%} of DRAM read: {bound}")

    backing = ("a memory-mapped file (page cache, 4 KB pages, as a GGUF is read)" if args.backing == "file"
               else "anonymous memory (numpy)")
    text = "\n".join([
        "# Routed experts on the CPU: one MoE layer at 671B width (GGMLExperts, ggml mul_mat_id)",
        "",
        f"- CPU: {cpu_model()} ({len(os.sched_getaffinity(0))} logical CPUs usable); "
        f"ggml-python {version('ggml-python')}, SIMD used: {' '.join(ggml_lib.cpu_features())}",
        f"- layer: {args.experts} experts x (gate, up [{I} x {H}] Q4_K, down [{H} x {I}] "
        f"{'Q6_K' if down == Q6_K else 'Q4_K'}) = {layer_gb:.2f} GB; {args.layers} layers rotated; {K} experts a token, "
        "random routing; bf16 activations in and out",
        f"- weights in {backing}; transparent huge pages in this process: {huge:.0f} MB "
        f"(of {layer_gb * args.layers * 1e3:.0f} MB of weights)",
        *notes,
        f"- `python benchmarks/bench_experts_cpu.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        "| tokens | threads | ms / layer | ms, ggml graph alone | GB expert bytes read | GB/s | share of DRAM bw "
        "| share, graph alone | GFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "GB read: the used experts' gate+up+down, each once (decode: 8 experts); ms: median over calls; "
        "'graph alone': the same ggml graph with its inputs already written (the floor of GGMLExperts' overhead); "
        "share: of the DRAM read bandwidth at the same thread count.",
        "",
    ])
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
