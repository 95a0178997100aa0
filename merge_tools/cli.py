"""`merge_tools`: checkpoint conversion and inspection.

    merge_tools quantize --input DIR --output DIR --scheme block|channel [--force]
    merge_tools inspect PATH
    merge_tools synth OUT [--preset tiny] [--format fp8|gguf] ...   (hybrid-r1 synth)
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections import Counter
from pathlib import Path

from hybrid_r1.cli_support import plural, quiet_broken_pipe
from hybrid_r1.errors import CheckpointError, HybridR1Error


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
        return _inspect(args.path)
    except (HybridR1Error, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="merge_tools", description="Convert and inspect DeepSeek-V3/R1 checkpoints.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    q = sub.add_parser("quantize", help="FP8 release or BF16 folder -> Meituan-compatible INT8 folder")
    q.add_argument("--input", required=True, type=Path, help="checkpoint folder (FP8 release or BF16) (required)")
    q.add_argument("--output", required=True, type=Path,
                   help="folder to write (must not exist unless --force) (required)")
    q.add_argument("--scheme", required=True, choices=["block", "channel"],
                   help="block: 128x128 tiles (Block-INT8); channel: one scale per output row (Channel-INT8) (required)")
    q.add_argument("--force", action="store_true", help="replace OUTPUT if it exists (default: refuse)")
    i = sub.add_parser("inspect", help="config summary and tensor table of a checkpoint")
    i.add_argument("path", type=Path, help="safetensors folder, or a .gguf file")
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


def _mb(x: float) -> str:
    """Three significant digits below 100 (a small shard is not "0 MB/s"), whole numbers above."""
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _open(path: Path):
    """A reader for `path`. New formats plug in here: hybrid_r1.loading.open_checkpoint dispatches
    on the path (safetensors folder; .gguf file once hybrid_r1.formats.gguf exists)."""
    from hybrid_r1.loading import open_checkpoint

    if path.suffix == ".gguf" and importlib.util.find_spec("hybrid_r1.formats.gguf") is None:
        raise CheckpointError("reading GGUF needs hybrid_r1.formats.gguf, which this version lacks", file=str(path))
    return open_checkpoint(path)


def _inspect(path: Path) -> int:
    src = _open(path)
    cfg = src.config
    quant = (src.quantization() or "unquantized") if hasattr(src, "quantization") else "ggml types below"
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


def _tensor_rows(src) -> list[tuple[str, str, str, str]]:
    """(name, dtype, shape, file) of each stored tensor: a GGUF lists its own tensors, with ggml
    types and shapes in ggml `ne` order; a safetensors folder its HF tensors."""
    if hasattr(src, "gguf_names"):
        from gguf import GGMLQuantizationType

        return [(t.name, GGMLQuantizationType(t.ggml_type).name, "x".join(map(str, t.ne)), Path(t.file).name)
                for t in map(src.ggml_tensor, src.gguf_names())]
    return [(n, str(src.dtype(n)).removeprefix("torch."), "x".join(map(str, src.shape(n))), Path(src.file_of(n)).name)
            for n in src.names()]


if __name__ == "__main__":
    sys.exit(main())
