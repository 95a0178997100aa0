"""DeepSeek-V3/R1 tool calls: the tokens the model writes for them, parsed into OpenAI `tool_calls`
as text arrives (streaming and whole answers alike), and the tool list for a chat template that
does not render `tools` itself.

The model writes, after its answer text (the markers are single tokens of the vocabulary, decoded
as text):

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    {"arg": 1}
    ```<｜tool▁call▁end｜>[\\n<｜tool▁call▁begin｜>...<｜tool▁call▁end｜>]<｜tool▁calls▁end｜>

which is what DeepSeek's own chat template writes for an assistant message with `tool_calls`.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON text, as OpenAI's `function.arguments`
    type: str = "function"
    id: str = ""

    def __post_init__(self):
        self.id = self.id or "call_" + uuid.uuid4().hex[:24]

    def to_openai(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": self.type, "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def parse_call(text: str) -> ToolCall | None:
    """The text between <｜tool▁call▁begin｜> and <｜tool▁call▁end｜>, or None if it is not a call."""
    kind, sep, rest = text.partition(SEP)
    if not sep:
        return None
    name, _, args = rest.partition("\n")
    args = args.strip()
    if args.startswith("```"):  # ```json ... ```
        args = args.split("\n", 1)[1] if "\n" in args else ""
        args = args.removesuffix("```").strip()
    if not name.strip():
        return None
    return ToolCall(name.strip(), args or "{}", kind.strip() or "function")


class ToolCallParser:
    """Answer text in, (content text, finished tool calls) out, as the text streams.

    Text that could still become a marker is held back until it is decided. Outside a tool-call
    block the text is content; a call that never closes (the answer was cut off) is given back as
    content by `close()`, so nothing the model wrote is lost; text between calls (the template's
    newline) is dropped."""

    def __init__(self):
        self._buf = ""
        self._in_calls = False  # between <｜tool▁calls▁begin｜> and <｜tool▁calls▁end｜>
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._buf += text
        content, calls = [], []
        while True:
            if not self._in_calls:
                i = self._buf.find(CALLS_BEGIN)
                if i < 0:
                    keep = partial_suffix(self._buf, CALLS_BEGIN)
                    content.append(self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep:]
                    break
                content.append(self._buf[:i])
                self._buf = self._buf[i + len(CALLS_BEGIN):]
                self._in_calls = True
                continue
            end = self._buf.find(CALLS_END)
            call_end = self._buf.find(CALL_END)
            if call_end >= 0 and (end < 0 or call_end < end):
                body = self._buf[:call_end]
                self._buf = self._buf[call_end + len(CALL_END):]
                call = parse_call(body.split(CALL_BEGIN, 1)[-1])
                if call is not None:
                    calls.append(call)
                continue
            if end >= 0:
                self._buf = self._buf[end + len(CALLS_END):]
                self._in_calls = False
                continue
            break
        self.calls += calls
        return "".join(content), calls

    def close(self) -> str:
        """What is still held, as content: a call cut off before its end comes back as its text
        (the calls completed before the cut stay calls)."""
        text, self._buf, self._in_calls = self._buf, "", False
        return text


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def tools_system_prompt(tools: list[dict]) -> str:
    """The tool list in the words of DeepSeek-R1-0528's chat template, for templates (the original
    R1's) that take no `tools`: appended to the system prompt."""
    text = ("You are a helpful assistant with tool calling capabilities. When a tool call is needed, you MUST "
            "use the following format to issue the call:\n"
            f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}FUNCTION_NAME\n```json\n"
            '{"param1": "value1", "param2": "value2"}\n'
            f"```{CALL_END}{CALLS_END}\n\n"
            "Make sure the JSON is valid.## Tools\n\n### Function\n\nYou have the following functions available:\n\n")
    for tool in tools:
        text += "\n```json\n" + json.dumps(tool, ensure_ascii=False) + "\n```\n"
    return text


def render_call(call: ToolCall) -> str:
    """One call as the model writes it (the inverse of parse_call, for tests and prompts)."""
    return f"{CALL_BEGIN}{call.type}{SEP}{call.name}\n```json\n{call.arguments}\n```{CALL_END}"
