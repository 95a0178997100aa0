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
from pathlib import Path

from .cli_support import check_threads_arg, quiet_broken_pipe, sampling_from_args
from .conversation import check_text
from .errors import HybridR1Error


def _generate(args, sampling) -> int:
    import torch

    from .chat_console import Console
    from .cli_support import load_model
    from .conversation import Reply, TextStream

    console = Console(sys.stdout, sys.stderr)  # the answer on stdout as the chat prints it, the rest on stderr
    pair = {"gguf": args.gguf} if args.gguf else {}
    model = load_model(args.model or args.safetensor, info=console.info, threads=args.threads, device=args.device,
                       rules=args.rules, quantize=args.quantize,
                       dtype=getattr(torch, args.dtype) if args.dtype else None, **pair)
    tok = model.tokenizer
    if tok is None:
        print(f"error: {args.model or args.safetensor} has no tokenizer (no tokenizer.json beside it, none in its metadata)",
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
    """Print what runs where under a rule file (or the rules a load would choose) and the memory each
    device needs, without loading any weight: a --model checkpoint's headers are read, nothing else."""
    from . import placement
    from .loading import build, default_device_dtype, open_checkpoint
    from .plan import HEADROOM, available, engine_lines, fits, memory_plan, placement_table

    rules = placement.load_rules(args.rules) if args.rules else None
    # A plan may describe the GPU machine a rule file is for: its run dtype is then bfloat16.
    gpu_rules = any(r.device and r.device.startswith("cuda") for r in rules or [])
    gpu_rules = gpu_rules or args.tp > 1  # tensor parallelism plans GPUs unless --device says cpu
    device, dtype = default_device_dtype(args.device or ("cuda" if gpu_rules else None), None, check=False)
    if args.model and args.model.endswith(".json"):
        from .config import ModelConfig

        source, cfg, shown = None, ModelConfig.from_file(args.model), args.model
    elif args.model:
        source = open_checkpoint(args.model, args.gguf)
        cfg, shown = source.config, source.path
    else:
        from .synth import preset_config

        source = None
        cfg = preset_config("full-slice", num_hidden_layers=61, first_k_dense_replace=3)
        shown = "the 671B config (DeepSeek-V3/R1; GGML experts assumed Q4_K_M)"
    if rules is not None:
        why = args.rules
    elif source is not None:
        rules, why = placement.default_rules(source, device), "the rules a load without --rules uses"
    else:
        rules, why = [], "no rules: every module as it is"
    module = build(cfg)
    placed = placement.apply(module, rules, device, dtype)
    if source is not None:
        placement.check_sources(placed, source)
    if args.tp > 1:
        from .parallel import World, shard

        shard(module, World(0, args.tp))  # a planning World: marks the splits, never communicates
    print(f"{shown}\nunder {why}; default device {device}, {str(dtype).removeprefix('torch.')}"
          + (f"; tensor-parallel over {args.tp} ranks: memory below is per rank" if args.tp > 1 else ""))
    rows = placement_table(module, placed, dtype)
    w = max(len(r.what) for r in rows)
    print(f"\n{'computed by':<{w}}  {'device':<7} {'modules':>7}  {'layers':<10} rule")
    for r in rows:
        print(f"{r.what:<{w}}  {r.device:<7} {r.count:>7}  {r.layers or '-':<10} {r.rule or '(default device)'}")
    for line in engine_lines(module, source):
        print(line)
    mem = memory_plan(module, source, dtype, args.context)
    gib = 2**30
    print(f"\nmemory: weights as they will be stored, plus the MLA cache for {args.context} tokens")
    for dev in mem.devices:
        free = args.gpu_memory * 10**9 if args.gpu_memory is not None and dev.startswith("cuda") else available(dev)
        verdict = {None: "free memory unknown here", True: "fits", False: "does NOT fit"}[fits(mem, dev, free)]
        have = f"; {free / gib:.1f} GiB free" if free is not None else ""
        print(f"  {dev:<7} {mem.total(dev) / gib:8.2f} GiB = weights {mem.weights.get(dev, 0) / gib:.2f} + cache "
              f"{mem.cache.get(dev, 0) / gib:.2f}{have}: {verdict}")
        for (d, what), n in sorted(mem.by_kind.items(), key=lambda kv: -kv[1]):
            if d == dev:
                print(f"            {n / gib:8.2f} GiB  {what}")
        if dev.startswith("cuda") and free is not None and cfg.n_routed_experts and args.tp == 1:
            print(f"            {_resident_room(cfg, free - mem.total(dev) - free * HEADROOM)}")
    print("(activations, CUDA-graph pools and allocator slack come on top: 'fits' keeps 10% free)")
    return 0


def _calibrate(args) -> int:
    from .calibration import count_routing
    from .cli_support import load_model

    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        print(f"error: {args.text}: not UTF-8 text ({e.reason} at byte {e.start})", file=sys.stderr)
        return 2
    if not text.strip():
        print(f"error: {args.text}: the text is empty", file=sys.stderr)
        return 2
    pair = {"gguf": args.gguf} if args.gguf else {}
    model = load_model(args.model, info=lambda m: print(m, file=sys.stderr), device=args.device,
                       rules=args.rules, **pair)
    if model.tokenizer is None:
        print(f"error: {args.model} has no tokenizer", file=sys.stderr)
        return 2
    ids = model.tokenizer.encode(text, add_bos=True)[: args.max_tokens]
    counts = count_routing(model, ids)
    counts.save(args.out, force=args.force)
    print(f"routed {counts.tokens} tokens through {len(counts.layers)} MoE layers; wrote {args.out}", file=sys.stderr)
    return 0


def _resident_room(cfg, spare: int) -> str:
    """How many routed experts the spare GPU memory holds as block INT8 (experts.ggml_cpu's
    gpu_experts), and what share of the model's that is."""
    from .ops.experts_int8 import Int8GPUExperts

    # one expert's int8 weights and fp32 block scales, as the operator that holds them counts them
    per = Int8GPUExperts(1, cfg.hidden_size, cfg.moe_intermediate_size, "cuda", "block").planned_bytes(None, "", cfg)
    layers = sum(cfg.is_moe_layer(n) for n in range(cfg.num_hidden_layers))
    room = max(0, int(spare)) // per
    each = min(room // max(layers, 1), cfg.n_routed_experts)
    return (f"room left for {room} routed experts as INT8 ({per / 2**20:.1f} MiB each): gpu_experts: {each} "
            f"in each of the {layers} MoE layers = {each / cfg.n_routed_experts:.0%} of the experts")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The `hybrid-r1` parser and its subcommands' parsers by name."""
    ap = argparse.ArgumentParser(prog="hybrid-r1", description="DeepSeek-V3/R1 runtime",
                                 epilog="exit codes: 0 ok, 2 bad arguments or a model that cannot be loaded, "
                                        "130 interrupted")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="answer one prompt and exit",
                       description="Answer one prompt and exit: the answer on stdout as it comes, one line of "
                                   "statistics on stderr (or one JSON object with --json).")
    g.add_argument("--model", metavar="PATH",
                   help="checkpoint folder, merged folder or .gguf file (required, or --safetensor with --gguf)")
    g.add_argument("--safetensor", metavar="DIR",
                   help="with --gguf: safetensors folder whose routed experts the GGUF's replace (default: none)")
    g.add_argument("--gguf", metavar="PATH",
                   help="with --safetensor: GGUF file, first file of a split set, or a folder of one set (default: none)")
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
    p.add_argument("--rules", metavar="FILE",
                   help="placement rule file (YAML) (default: the rules a load of --model would choose)")
    p.add_argument("--model", metavar="PATH",
                   help="checkpoint folder, .gguf file or config.json (default: the 671B config)")
    p.add_argument("--gguf", metavar="PATH", help="with --model DIR: the GGUF whose routed experts replace the folder's (default: none)")
    p.add_argument("--context", type=int, default=32768, metavar="N",
                   help="tokens of MLA cache to plan for (default 32768)")
    p.add_argument("--device", help="default device (default: cuda if present, else cpu)")
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor-parallel ranks (torchrun --nproc-per-node N): show one rank's memory "
                        "(default 1; with N > 1 the default device is cuda)")
    p.add_argument("--gpu-memory", type=float, metavar="GB",
                   help="what each GPU holds, in GB (e.g. 80 for an A100-80G) (default: measured here)")
    sub.add_parser("synth", help="write a synthetic checkpoint (hybrid-r1 synth --help)", add_help=False)
    sub.add_parser("chat", help="chat in the terminal, or answer --prompt (hybrid-r1 chat --help)", add_help=False)
    sub.add_parser("serve", help="serve the model over an OpenAI-compatible API (hybrid-r1 serve --help)",
                   add_help=False)
    c = sub.add_parser("calibrate", help="count how often each routed expert is chosen on a text",
                       description="Run a text through the model and write how often its router chose each "
                                   "routed expert of each layer (JSON), for experts.ggml_cpu's hot_experts.")
    c.add_argument("--model", required=True, metavar="PATH", help="checkpoint folder, merged folder or .gguf (required)")
    c.add_argument("--gguf", metavar="PATH", help="with --model DIR: the GGUF of the routed experts (default: none)")
    c.add_argument("--rules", metavar="FILE", help="placement rule file (YAML) (default: none, one device)")
    c.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if present, else cpu)")
    c.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text to route, e.g. a sample of your prompts (required)")
    c.add_argument("--max-tokens", type=int, default=8192, metavar="N", help="route at most N tokens of it (default 8192)")
    c.add_argument("--out", required=True, metavar="FILE", help="the JSON file to write (required)")
    c.add_argument("--force", action="store_true", help="replace an existing --out (default: refuse)")
    return ap, {"generate": g, "plan": p, "calibrate": c}


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
    if args.command == "serve":
        from .server import main as serve_main

        return serve_main(rest)
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "calibrate":
        if args.max_tokens < 1:
            subs["calibrate"].error(f"--max-tokens must be >= 1, got {args.max_tokens}")
        try:
            return _calibrate(args)
        except (HybridR1Error, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.command == "plan" and args.tp < 1:
        subs["plan"].error(f"--tp must be >= 1, got {args.tp}")
    if args.command == "plan" and args.gpu_memory is not None and not args.gpu_memory > 0:
        subs["plan"].error(f"--gpu-memory must be a positive number of GB, got {args.gpu_memory}")
    if args.command == "generate":
        if bool(args.model) == bool(args.safetensor or args.gguf) or bool(args.safetensor) != bool(args.gguf):
            g.error("give --model PATH, or --safetensor DIR with --gguf PATH")
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
