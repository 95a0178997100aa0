"""`merge_tools`: checkpoint conversion and inspection.

    merge_tools merge --safetensor DIR --gguf PATH --output DIR [--force] [--no-resume]
    merge_tools verify DIR
    merge_tools quantize --input DIR --output DIR --scheme block|channel [--force]
    merge_tools inspect PATH
    merge_tools synth OUT [--preset tiny] [--format fp8|gguf] ...   (hybrid-r1 synth)
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from hybrid_r1.cli_support import plural, quiet_broken_pipe
from hybrid_r1.errors import HybridR1Error


@quiet_broken_pipe
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["synth"]:  # synth owns its options; argparse would reject them here
        from hybrid_r1.synth import main as synth_main

        return synth_main(argv[1:], prog="merge_tools synth")
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        if args.command == "quantize":
            return _quantize(args)
        if args.command == "merge":
            return _merge(args)
        if args.command == "verify":
            return _verify(args.path)
        return _inspect(args.path)
    except (HybridR1Error, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="merge_tools", description="Convert and inspect DeepSeek-V3/R1 checkpoints.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    m = sub.add_parser("merge", help="INT8/FP8/BF16 safetensors + a GGUF's routed experts -> one merged folder")
    m.add_argument("--safetensor", type=Path, metavar="DIR",
                   help="Hugging Face DeepSeek-V3/R1 folder: Block-/Channel-INT8, the FP8 release or BF16 "
                        "(required, unless --ktransformers)")
    m.add_argument("--gguf", type=Path, metavar="PATH",
                   help="GGUF file, the first file of a split set, or a folder holding one set "
                        "(required, unless --ktransformers)")
    m.add_argument("--ktransformers", type=Path, metavar="KT_DIR",
                   help="convert a KTransformers merged folder instead (default: none)")
    m.add_argument("--config", type=Path, metavar="DIR",
                   help="with --ktransformers: the folder holding the model's config.json (default: KT_DIR)")
    m.add_argument("--output", required=True, type=Path, metavar="DIR",
                   help="folder to write (must not exist unless --force) (required)")
    m.add_argument("--force", action="store_true", help="replace OUTPUT if it exists (default: refuse)")
    m.add_argument("--no-resume", action="store_true",
                   help="rewrite every file even where an interrupted merge of the same inputs finished it "
                        "(default: take those over)")
    m.add_argument("--shard-gb", type=float, default=4.0, metavar="GB",
                   help="size of the non-expert shards (default 4); each MoE layer's experts are one file")
    v = sub.add_parser("verify", help="check a merged folder against its manifest (sizes, sha256, index)")
    v.add_argument("path", type=Path, metavar="DIR", help="merged folder")
    q = sub.add_parser("quantize", help="FP8 release or BF16 folder -> Meituan-compatible INT8 folder")
    q.add_argument("--input", required=True, type=Path, help="checkpoint folder (FP8 release or BF16) (required)")
    q.add_argument("--output", required=True, type=Path,
                   help="folder to write (must not exist unless --force) (required)")
    q.add_argument("--scheme", required=True, choices=["block", "channel"],
                   help="block: 128x128 tiles (Block-INT8); channel: one scale per output row (Channel-INT8) (required)")
    q.add_argument("--force", action="store_true", help="replace OUTPUT if it exists (default: refuse)")
    i = sub.add_parser("inspect", help="config summary and tensor table of a checkpoint")
    i.add_argument("path", type=Path, help="safetensors folder, merged folder, or a .gguf file")
    sub.add_parser("synth", help="write a synthetic checkpoint (merge_tools synth --help, as hybrid-r1 synth)")
    return ap


def _quantize(args) -> int:
    from .quantize import quantize_checkpoint

    def progress(r) -> None:
        mb = r.bytes_out / 2**20
        print(f"[{r.number}/{r.total}] {r.file}: {r.quantized} quantized, {r.copied} copied, "
              f"{_mb(mb)} MB in {r.seconds:.1f} s ({_mb(mb / max(r.seconds, 1e-9))} MB/s)", file=sys.stderr, flush=True)

    rep = quantize_checkpoint(args.input, args.output, args.scheme, force=args.force, progress=progress)
    print(f"wrote {rep.output}: {rep.source} -> int8 {rep.scheme}, {rep.quantized} tensors quantized, "
          f"{rep.copied} copied, {rep.shards} shards, {rep.bytes_out / 2**30:.2f} GiB in {rep.seconds:.0f} s")
    return 0


def _bytes_bar(desc: str):
    """A tqdm bar of bytes with rate and ETA on stderr, only on a terminal; returns (callback, close)."""
    if not sys.stderr.isatty():
        return (lambda done, total: None), (lambda: None)
    from tqdm import tqdm

    bar = tqdm(total=None, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr,
               dynamic_ncols=True, leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    return update, bar.close


def _merge(args) -> int:
    from .merge import convert_ktransformers, merge

    if not (args.shard_gb > 0):
        print(f"error: --shard-gb must be > 0, got {args.shard_gb}", file=sys.stderr)
        return 2
    if args.ktransformers is not None and (args.safetensor or args.gguf):
        print("error: give --ktransformers KT_DIR, or --safetensor DIR with --gguf PATH, not both", file=sys.stderr)
        return 2
    if args.ktransformers is None and not (args.safetensor and args.gguf):
        print("error: merge needs --safetensor DIR and --gguf PATH (or --ktransformers KT_DIR)", file=sys.stderr)
        return 2
    update, close = _bytes_bar("merging")
    kw = dict(force=args.force, resume=not args.no_resume, shard_bytes=int(args.shard_gb * 2**30), progress=update)
    try:
        if args.ktransformers is not None:
            rep = convert_ktransformers(args.ktransformers, args.config, args.output, **kw)
        else:
            rep = merge(args.safetensor, args.gguf, args.output, **kw)
    finally:
        close()
    types = Counter(t for layer in rep.expert_types.values() for t in layer.values())
    resumed = f" ({rep.resumed} taken over from an interrupted run)" if rep.resumed else ""
    print(f"wrote {rep.output}: {plural(rep.files, 'file')}{resumed}, {rep.bytes_out / 2**30:.2f} GiB in "
          f"{rep.seconds:.0f} s; experts of {plural(len(rep.expert_types), 'layer')}: "
          + ", ".join(f"{n} {t}" for t, n in types.most_common()))
    return 0


def _verify(path: Path) -> int:
    from .merge import verify

    update, close = _bytes_bar("verifying")
    try:
        problems = verify(path, progress=update)
    finally:
        close()
    for line in problems:
        print(line)
    if problems:
        print(f"{path}: {plural(len(problems), 'problem')}", file=sys.stderr)
        return 1
    print(f"{path}: intact")
    return 0


def _inspect_merged(path: Path) -> int:
    import json

    from hybrid_r1.formats import merged as M

    src = _open(path)
    manifest = json.loads((path / M.MANIFEST).read_text())
    cfg = src.config
    print(f"{path}: merged folder ({manifest.get('tool')}, {manifest.get('date')}), "
          f"{plural(cfg.num_hidden_layers, 'layer')}, hidden {cfg.hidden_size}, {cfg.n_routed_experts} routed experts, "
          f"linears: {src.quantization() or 'unquantized'}")
    for role, info in manifest.get("sources", {}).items():
        size = sum(f.get("size", 0) for f in info.get("files", []))
        print(f"  source {role}: {info.get('path')} ({plural(len(info.get('files', [])), 'file')}, {_size(size)})")
    runs: list[tuple[int, int, str]] = []  # layers first..last with the same gate/up/down types
    for layer, parts in sorted((int(k), v) for k, v in manifest.get("expert_types", {}).items()):
        kinds = "/".join(parts[p] for p in M.PARTS)
        if runs and runs[-1][2] == kinds and runs[-1][1] == layer - 1:
            runs[-1] = (runs[-1][0], layer, kinds)
        else:
            runs.append((layer, layer, kinds))
    print("  routed experts (gate/up/down):")
    for a, b, kinds in runs:
        print(f"    layers {a}-{b}: {kinds}" if a != b else f"    layer {a}: {kinds}")
    files = manifest.get("files", {})
    experts = sum(v["size"] for k, v in files.items() if k.startswith("experts-"))
    rest = sum(v["size"] for k, v in files.items() if k.endswith(".safetensors") and not k.startswith("experts-"))
    print(f"  sizes: {_size(rest)} for the GPU side (attention, shared experts, dense layers, embeddings), "
          f"{_size(experts)} of routed experts for CPU RAM")
    return 0


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _mb(x: float) -> str:
    """Three significant digits below 100 (a small shard is not "0 MB/s"), whole numbers above."""
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _open(path: Path):
    from hybrid_r1.loading import open_checkpoint  # the one entry from a path to a reader

    return open_checkpoint(path)


def _inspect(path: Path) -> int:
    from hybrid_r1.formats.merged import is_merged

    if path.is_dir() and is_merged(path):
        return _inspect_merged(path)
    src = _open(path)
    cfg = src.config
    quant = src.quantization() or ("ggml types below" if _is_gguf(src) else "unquantized")
    print(f"{path}: {cfg.extra.get('model_type', 'deepseek')}, {plural(cfg.num_hidden_layers, 'layer')} "
          f"(+{cfg.num_nextn_predict_layers} MTP, {cfg.first_k_dense_replace} dense), hidden {cfg.hidden_size}, "
          f"{cfg.n_routed_experts} routed experts (top {cfg.num_experts_per_tok}), vocab {cfg.vocab_size}, "
          f"weights: {quant}")
    rows = _tensor_rows(src)
    width = max((len(r[0]) for r in rows), default=6)
    print(f"{'tensor':<{width}}  {'dtype':<14} {'shape':<16} file")
    for name, dtype, shape, file in rows:
        print(f"{name:<{width}}  {dtype:<14} {shape:<16} {file}")
    counts = Counter(r[1] for r in rows)
    print(f"{len(rows)} tensors: " + ", ".join(f"{n} {d}" for d, n in counts.most_common()))
    return 0


def _is_gguf(src) -> bool:
    from hybrid_r1.formats.gguf import GGUFCheckpoint

    return isinstance(src, GGUFCheckpoint)


def _tensor_rows(src) -> list[tuple[str, str, str, str]]:
    """(name, dtype, shape, file) of each stored tensor: a GGUF lists its own tensors, with ggml
    types and shapes in ggml `ne` order; a safetensors folder its HF tensors."""
    if _is_gguf(src):
        from gguf import GGMLQuantizationType

        return [(t.name, GGMLQuantizationType(t.ggml_type).name, "x".join(map(str, t.ne)), Path(t.file).name)
                for t in map(src.ggml_tensor, src.gguf_names())]
    return [(n, str(src.dtype(n)).removeprefix("torch."), "x".join(map(str, src.shape(n))), Path(src.file_of(n)).name)
            for n in src.names()]


if __name__ == "__main__":
    sys.exit(main())
