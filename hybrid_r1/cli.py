"""`hybrid-r1`: run a prompt through a checkpoint, chat, or write a synthetic one.

    hybrid-r1 generate --model DIR --prompt "Why is the sky blue?"
    hybrid-r1 synth OUT --preset tiny
    hybrid-r1 chat [--model DIR]          (same as python -m hybrid_r1.chat)
"""

from __future__ import annotations

import argparse
import json
import sys

from .cli_support import check_threads_arg, quiet_broken_pipe, sampling_from_args
from .conversation import check_text
from .errors import HybridR1Error


def _generate(args, sampling) -> int:
    import torch

    from .chat_console import Console
    from .cli_support import load_model
    from .conversation import Reply, TextStream

    console = Console(sys.stdout, sys.stderr)  # the answer on stdout as the chat prints it, the rest on stderr
    model = load_model(args.model, info=console.info, threads=args.threads, device=args.device, rules=args.rules,
                       quantize=args.quantize, dtype=getattr(torch, args.dtype) if args.dtype else None)
    tok = model.tokenizer
    if tok is None:
        print(f"error: {args.model} has no tokenizer (no tokenizer.json beside it, none in its metadata)",
              file=sys.stderr)
        return 2
    if args.raw:
        ids = tok.encode(args.prompt, add_bos=True)
    else:
        ids = tok.encode_chat([{"role": "user", "content": args.prompt}])
    stream = TextStream(tok, tok.think_start_id in ids[-2:], None if args.json else console)
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, temperature=sampling.temperature,
                         top_p=sampling.top_p, top_k=sampling.top_k, seed=sampling.seed, on_token=stream.feed)
    stream.close()
    reply = Reply("".join(stream.answer), "".join(stream.reasoning), list(out), out.stats)
    if args.json:
        print(json.dumps(reply.to_json(), ensure_ascii=False))
    else:
        console.end_reply(reply)
    return 130 if out.stats.stop_reason == "interrupted" else 0


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


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The `hybrid-r1` parser and its subcommands' parsers by name."""
    ap = argparse.ArgumentParser(prog="hybrid-r1", description="DeepSeek-V3/R1 runtime",
                                 epilog="exit codes: 0 ok, 2 bad arguments or a model that cannot be loaded, "
                                        "130 interrupted")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="answer one prompt and exit",
                       description="Answer one prompt and exit: the answer on stdout as it comes, one line of "
                                   "statistics on stderr (or one JSON object with --json).")
    g.add_argument("--model", required=True, metavar="PATH", help="checkpoint folder or .gguf file (required)")
    g.add_argument("--prompt", required=True, metavar="TEXT", help="the user message (required)")
    g.add_argument("--raw", action="store_true", help="no chat template: continue the text as is (default: off)")
    g.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="at most N new tokens (default 256)")
    g.add_argument("--temperature", type=float, default=0.6, metavar="T", help="0 = greedy (default 0.6)")
    g.add_argument("--top-p", type=float, default=0.95, metavar="P", help="nucleus sampling, in (0, 1] (default 0.95)")
    g.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = no limit (default 0)")
    g.add_argument("--seed", type=int, metavar="S", help="sampling seed, 0..2**64-1 (default: random)")
    g.add_argument("--rules", metavar="FILE", help="placement rule file (YAML) (default: none, one device)")
    g.add_argument("--quantize", choices=["block", "channel"],
                   help="quantize a BF16/FP8 checkpoint's linears to INT8 while loading (default: as stored)")
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if present, else cpu)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on cuda, float32 on cpu")
    g.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch and ggml (default: chosen from the usable cores, printed at start)")
    g.add_argument("--json", action="store_true", help='print one JSON object {"text", "reasoning", "tokens", '
                                                       '"stats"}, as the chat\'s --json (default: off)')
    p = sub.add_parser("plan", help="show what runs where under a rule file (no weights loaded)")
    p.add_argument("--rules", required=True, metavar="FILE", help="placement rule file (YAML) (required)")
    p.add_argument("--model", metavar="PATH", help="checkpoint folder or config.json (default: the 671B config)")
    p.add_argument("--device", help="default device (default: cuda if present, else cpu)")
    sub.add_parser("synth", help="write a synthetic checkpoint (hybrid-r1 synth --help)", add_help=False)
    sub.add_parser("chat", help="chat in the terminal, or answer --prompt (hybrid-r1 chat --help)", add_help=False)
    return ap, {"generate": g, "plan": p}


@quiet_broken_pipe
def main(argv: list[str] | None = None) -> int:
    ap, subs = build_parser()
    g = subs["generate"]
    args, rest = ap.parse_known_args(argv)
    if args.command == "synth":
        from .synth import main as synth_main

        return synth_main(rest, prog="hybrid-r1 synth")
    if args.command == "chat":
        from .chat import main as chat_main

        return chat_main(rest, prog="hybrid-r1 chat")
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "generate":
        sampling = sampling_from_args(g, args)
        check_threads_arg(g, args.threads)
        try:
            check_text(args.prompt, "--prompt")
        except HybridR1Error as e:
            g.error(str(e))
        if args.rules and args.quantize:
            g.error("--rules and --quantize do not go together: with rules, the rules choose the operators")
    try:
        return _plan(args) if args.command == "plan" else _generate(args, sampling)
    except (HybridR1Error, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
