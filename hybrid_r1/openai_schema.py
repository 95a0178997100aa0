"""The OpenAI API's request bodies (the fields hybrid_r1 serves) and error objects.

Validation is strict: a known field of the wrong type is a 400 naming it ("temperature": "hot"),
as OpenAI does; fields the server does not know are ignored, since clients send many.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import HybridR1Error


class APIError(HybridR1Error):
    """An error returned to the client as OpenAI's `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCallIn(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    def text(self) -> str | None:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content


class Function(_Strict):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: Function


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # extension (0 = no limit)
    seed: int | None = Field(None, ge=-2**63, lt=2**64)  # what torch.Generator.manual_seed takes
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)  # batch 1: one choice per request
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, "stop: at most 4 sequences", param="stop")
        return [s for s in stops if s]


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict | None = None
    # extension, as llama-server's: "deepseek" returns the reasoning as `reasoning_content`,
    # "none" leaves it inline in `content` between <think> and </think>
    reasoning_format: Literal["deepseek", "none"] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    echo: Literal[False] = False
    logprobs: None = None
    suffix: None = None

    def prompt_text(self) -> str | list[int]:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            if len(self.prompt) != 1:
                raise APIError(400, "prompt: one prompt per request (batch 1)", param="prompt")
            return self.prompt[0]
        if isinstance(self.prompt, list) and not self.prompt:
            raise APIError(400, "prompt: empty", param="prompt")
        return self.prompt


def parse(model: type[BaseModel], body) -> BaseModel:
    """Validate a decoded JSON body; APIError 400 naming the first bad field (for a field that may
    take several forms, what each form wanted)."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        errors = [(_param(err["loc"]), err["msg"]) for err in e.errors()]
        param = errors[0][0]
        alternatives = dict.fromkeys(f"{p}: {m}" if p else m for p, m in errors if p.startswith(param))
        raise APIError(400, ", or ".join(alternatives), param=param or None) from None


_UNION_TAGS = ("str", "int", "float", "bool", "dict")


def _param(loc: tuple) -> str:
    """pydantic's error location as the client wrote it (messages[0].content); pydantic adds the
    union member it tried ("str", "list[TextPart]"), which is not part of it."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" not in part and part not in _UNION_TAGS:
            out += ("." if out else "") + part
    return out
