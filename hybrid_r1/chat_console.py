"""Terminal output of the chat: `Console` writes what the model says (reasoning dimmed, or set off by
<think> lines without color) and everything else (notices, stats, errors) to a second stream."""

from __future__ import annotations

import os
import re
import sys

from .conversation import Reply
from .generate import Stats

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
            color = isatty(self.out) and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
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
    first = "none" if s.time_to_first_token_s is None else f"{s.time_to_first_token_s:.2f} s"
    return (f"{s.prompt_tokens} prompt tokens ({cached} cached) | prefill {s.prefill_tok_s:.1f} tok/s | "
            f"decode {s.decode_tok_s:.1f} tok/s | first token {first} | "
            f"{s.new_tokens} new tokens, {_STOP_WORDS.get(s.stop_reason, s.stop_reason)}"
            + (f" | VRAM {s.vram_bytes / 2**30:.1f} GiB" if s.vram_bytes else "")
            + (f" | RAM {s.ram_bytes / 2**30:.1f} GiB" if s.ram_bytes else ""))


def isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
