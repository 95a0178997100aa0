"""Generated token ids -> the text of OpenAI responses: reasoning apart from the answer, stop
sequences cut, DeepSeek tool calls parsed; the same objects serve streamed and whole responses,
so the two cannot disagree."""

from __future__ import annotations

from .conversation import TextStream
from .tokenizer import THINK_START, StreamDecoder
from .tool_calls import ToolCallParser, partial_suffix


class StopMatcher:
    """Text in, text out, cut before the first stop sequence; holds back a possible start of one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.hit = False
        self._buf = ""

    def feed(self, text: str) -> str:
        if self.hit or not self.stops:
            return "" if self.hit else text
        self._buf += text
        found = [i for s in self.stops if (i := self._buf.find(s)) >= 0]
        if found:
            self.hit = True
            out, self._buf = self._buf[: min(found)], ""
            return out
        keep = max(partial_suffix(self._buf, s) for s in self.stops)
        out, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep:]
        return out

    def close(self) -> str:
        out, self._buf = self._buf, ""
        return out


class ChatOutput:
    """Generated token ids -> OpenAI deltas ({"reasoning_content", "content", "tool_calls"}).

    R1's template opens the answer inside <think>: what comes before </think> is reasoning,
    returned apart (as DeepSeek's API does) or, inline, left in the content with its tags."""

    def __init__(self, tokenizer, *, in_think: bool, inline: bool, stops: list[str], tools: bool):
        self.inline = inline
        self.think_end_id = tokenizer.think_end_id
        self.in_think = in_think
        if inline:
            self._decoder = StreamDecoder(tokenizer)
            self._prefix = THINK_START + "\n" if in_think else ""  # the template wrote it
        else:
            self._text = TextStream(tokenizer, in_think, self)
        self._stops = StopMatcher(stops), StopMatcher(stops)  # reasoning, content
        self._tools = ToolCallParser() if tools else None
        self.reasoning_parts, self.content_parts, self.tool_calls = [], [], []
        self.reasoning_tokens = 0
        self._delta: dict = {}

    @property
    def stopped(self) -> bool:
        return any(s.hit for s in self._stops)

    def feed(self, token: int) -> dict:
        if self.in_think:
            self.reasoning_tokens += 1
            self.in_think = token != self.think_end_id
        if self.inline:
            self.answer(self._prefix + self._decoder.feed(token))
            self._prefix = ""
        else:
            self._text.feed(token)
        return self._take()

    def close(self) -> dict:
        if self.inline:
            self.answer(self._prefix + self._decoder.flush())
        else:
            self._text.close()
        self._emit("reasoning_content", self._stops[0].close())
        self._content(self._stops[1].close(), final=True)
        return self._take()

    # the TextStream listener
    def notice(self, text: str) -> None:
        pass

    def reasoning(self, text: str) -> None:
        if not self.stopped:
            self._emit("reasoning_content", self._stops[0].feed(text))

    def answer(self, text: str) -> None:
        if not self.stopped:
            # the reasoning is over: what its stop matcher holds cannot begin a stop sequence now
            self._emit("reasoning_content", self._stops[0].close())
            self._content(self._stops[1].feed(text))

    def _content(self, text: str, final: bool = False) -> None:
        if self._tools is None:
            return self._emit("content", text)
        content, calls = self._tools.feed(text)
        if final:
            content += self._tools.close()
        self._emit("content", content)
        for call in calls:
            self._delta.setdefault("tool_calls", []).append(call.to_openai(len(self.tool_calls)))
            self.tool_calls.append(call)

    def _emit(self, key: str, text: str) -> None:
        if text:
            self._delta[key] = self._delta.get(key, "") + text
            (self.reasoning_parts if key == "reasoning_content" else self.content_parts).append(text)

    def _take(self) -> dict:
        delta, self._delta = self._delta, {}
        return delta


class CompletionOutput:
    """Generated token ids -> text deltas, for /v1/completions (no chat template, no split)."""

    def __init__(self, tokenizer, stops: list[str]):
        self._decoder = StreamDecoder(tokenizer)
        self._stop = StopMatcher(stops)
        self.text: list[str] = []

    @property
    def stopped(self) -> bool:
        return self._stop.hit

    def feed(self, token: int) -> str:
        return self._keep(self._stop.feed(self._decoder.feed(token)) if not self._stop.hit else "")

    def close(self) -> str:
        return self._keep("" if self._stop.hit else self._stop.feed(self._decoder.flush()) + self._stop.close())

    def _keep(self, text: str) -> str:
        if text:
            self.text.append(text)
        return text
