"""The chat's interactive loop: `Repl` (prompt_toolkit: history, multi-line input, completion) and
its slash commands, driving a `conversation.ChatSession` and writing through a `chat_console.Console`."""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

from .chat_console import Console, stats_line
from .conversation import ChatError, ChatSession, Settings, check_text
from .errors import HybridR1Error

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


def commands_help() -> str:
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

        class History(FileHistory):
            def store_string(self, string: str) -> None:
                # undecodable input bytes arrive as lone surrogates, which FileHistory cannot write
                super().store_string(string.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))

        self.prompt = PromptSession(
            history=History(str(self.history_file)), key_bindings=keys, multiline=False,
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
                check_text(line, "the line")
                if line.startswith("/") and not line.startswith("//"):
                    if self.command(line):
                        return 0
                elif line.strip():
                    self.send(line[1:] if line.startswith("//") else line)
            except KeyboardInterrupt:  # Ctrl-C outside generation (printing, saving): back to the prompt
                self.console.notice("interrupted")
            except HybridR1Error as e:  # a bad line or setting must not end the conversation
                self.console.error(str(e))

    def send(self, text: str) -> None:
        self.console.show_thinking = self.session.settings.think
        try:
            reply = self.session.reply(text, self.console)
        except HybridR1Error as e:  # ChatError, or the runtime refusing an argument (InputError)
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
        except HybridR1Error as e:
            self.console.error(str(e))
            return False

    def cmd_help(self, arg: str) -> None:
        keys = "\n".join(f"  {k:<22} {v}" for k, v in KEYS)
        self.console.info(f"commands:\n{commands_help()}\nkeys:\n{keys}")

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
                          f"context {s.context} tokens; cache {s.cache.length} tokens "
                          f"({s.cache.nbytes() / 2**20:.1f} MiB of buffers, kept for reuse)")
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
