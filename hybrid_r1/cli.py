"""`hybrid-r1`: run a prompt through a checkpoint, chat, or write a synthetic one.

    hybrid-r1 generate --model DIR --prompt "Why is the sky blue?"
    hybrid-r1 synth OUT --preset tiny
    hybrid-r1 chat [--model DIR]          (same as python -m hybrid_r1.chat)
    hybrid-r1 serve [--model DIR]         (OpenAI-compatible HTTP API, see hybrid-r1 serve --help)
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import HybridR1Error


def _generate(args) -> int:
    import torch

    from . import load

    model = load(args.model, device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None)
    tok = model.tokenizer
    if tok is None:
        print(f"error: {args.model} has no tokenizer.json", file=sys.stderr)
        return 2
    ids = tok.encode_chat([{"role": "user", "content": args.prompt}]) if not args.raw else tok.encode(args.prompt, add_bos=True)
    from .tokenizer import StreamDecoder

    stream = StreamDecoder(tok)
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         top_k=args.top_k, seed=args.seed,
                         on_token=None if args.json else (lambda t: print(stream.feed(t), end="", flush=True)))
    s = out.stats
    if args.json:
        print(json.dumps({"text": tok.decode(list(out)), "tokens": list(out), "prompt_tokens": s.prompt_tokens,
                          "prefill_tok_s": s.prefill_tok_s, "decode_tok_s": s.decode_tok_s,
                          "stop_reason": s.stop_reason}))
    else:
        print(stream.flush())
        print(f"[{s.prompt_tokens} prompt tokens, prefill {s.prefill_tok_s:.1f} tok/s, "
              f"decode {s.decode_tok_s:.1f} tok/s, {s.stop_reason}]", file=sys.stderr)
    return 0


def _plan(args) -> int:
    """Print what runs where under a rule file, without loading any weight."""
    from .config import ModelConfig
    from .loading import build, default_device_dtype
    from .placement import apply, load_rules

    cfg = ModelConfig.from_file(args.model) if args.model else None
    if cfg is None:
        from .synth import preset_config

        cfg = preset_config("full-slice", num_hidden_layers=61, first_k_dense_replace=3)
    device, dtype = default_device_dtype(args.device, None)
    placed = apply(build(cfg), load_rules(args.rules), device, dtype)
    groups: dict[tuple, list[str]] = {}
    for p in placed:
        key = (p.op or "(kept)", str(p.device), p.rule.where if p.rule else "")
        groups.setdefault(key, []).append(p.path)
    print(f"{'op':<22} {'device':<8} {'modules':>7}  example / rule")
    for (op, dev, where), paths in groups.items():
        print(f"{op:<22} {dev:<8} {len(paths):>7}  {paths[0]}  [{where}]")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hybrid-r1", description="DeepSeek-V3/R1 runtime")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="answer one prompt and exit")
    g.add_argument("--model", required=True, help="checkpoint folder")
    g.add_argument("--prompt", required=True)
    g.add_argument("--raw", action="store_true", help="no chat template: continue the text as is")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.6)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int)
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if present)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--json", action="store_true", help="print one JSON object with the text and stats")
    p = sub.add_parser("plan", help="show what runs where under a rule file (no weights loaded)")
    p.add_argument("--rules", required=True)
    p.add_argument("--model", help="checkpoint folder or config.json (default: the 671B config)")
    p.add_argument("--device", help="default device (default: cuda if present)")
    sub.add_parser("synth", help="write a synthetic checkpoint (see python -m hybrid_r1.synth --help)", add_help=False)
    sub.add_parser("chat", help="chat in the terminal, or answer --prompt (see hybrid-r1 chat --help)", add_help=False)
    sub.add_parser("serve", help="serve the model over an OpenAI-compatible API (see hybrid-r1 serve --help)",
                   add_help=False)
    args, rest = ap.parse_known_args(argv)
    if args.command == "synth":
        from .synth import main as synth_main

        return synth_main(rest)
    if args.command == "chat":
        from .chat import main as chat_main

        return chat_main(rest, prog="hybrid-r1 chat")
    if args.command == "serve":
        from .server import main as serve_main

        return serve_main(rest)
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return _plan(args) if args.command == "plan" else _generate(args)
    except HybridR1Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
