"""A chat conversation without a terminal: history, chat template, KV-cache reuse across turns,
settings, streaming to a listener, save and load.

`ChatSession` is what a front end drives (the terminal REPL in chat.py; a server could drive it the
same way): `reply(text, listener)` appends the user turn, generates, streams reasoning and answer
text to the listener and returns a `Reply`; `save`/`load` keep a conversation as JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Protocol

from .cache import ContextOverflowError
from . import checks
from .errors import HybridR1Error
from .generate import Sampling, Stats, check_max_new_tokens

SAVE_FORMAT = "hybrid_r1.chat/1"


class ChatError(HybridR1Error):
    """A chat command or file that cannot be used (bad /set value, unreadable /load file)."""


# ---- settings --------------------------------------------------------------------------------

@dataclass
class Settings:
    """What /set changes and /save keeps. Defaults are DeepSeek's recommendations for R1."""

    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0  # 0 = no limit
    max_new_tokens: int = 2048
    seed: int | None = None  # None = a new random seed each answer
    think: bool = True  # show the reasoning (dimmed); off = hide it

    def set(self, key: str, value) -> None:
        """Set one setting from a string (/set) or a JSON value (/load); ChatError if invalid."""
        kinds = {f.name: f.type for f in fields(self)}
        if key not in kinds:
            raise ChatError(f"unknown setting {key!r}; settings: {', '.join(kinds)}")
        try:
            new = _parse_setting(kinds[key], value)
        except (ValueError, TypeError, OverflowError):
            raise ChatError(f"{key}: cannot use {value!r} ({_KIND_WORDS[kinds[key]]})") from None
        trial = Settings(**{**asdict(self), key: new})
        trial.validate()
        setattr(self, key, new)

    def validate(self) -> None:
        try:
            Sampling(self.temperature, self.top_p, self.top_k, self.seed)
            check_max_new_tokens(self.max_new_tokens, minimum=1)
            checks.boolean("think", self.think)
        except ValueError as e:
            raise ChatError(str(e)) from None

    def describe(self) -> str:
        return "  ".join(f"{k}={v}" for k, v in asdict(self).items())


_KIND_WORDS = {"float": "a number", "int": "an integer", "int | None": "an integer or none", "bool": "on or off"}


def _parse_setting(kind: str, value):
    """A typed value from /set's text or /load's JSON value; ValueError if it is not one. JSON values
    keep their type: "0.5" (a string) is parsed like /set text, a list or an object is refused."""
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if not isinstance(value, str) or value.lower() not in ("on", "off", "true", "false", "1", "0", "yes", "no"):
            raise ValueError(value)
        return value.lower() in ("on", "true", "1", "yes")
    if kind == "int | None" and (value is None or isinstance(value, str) and value.lower() in ("none", "random", "")):
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(value)
    if kind == "float":
        return float(value)
    if isinstance(value, float):
        raise ValueError(value)  # 2.5 is not an integer
    return int(value)


def check_text(text: str, what: str) -> None:
    """ChatError unless `text` is valid Unicode (lone surrogates come from undecodable input bytes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ChatError(f"{what} is not valid UTF-8 text ({e.reason} at character {e.start}): not used") from None


# ---- one answer ------------------------------------------------------------------------------

@dataclass
class Reply:
    text: str  # the answer: what follows </think>
    reasoning: str  # what came between <think> and </think>
    tokens: list[int]
    stats: Stats
    notices: list[str] = field(default_factory=list)  # e.g. turns dropped to fit the context

    @property
    def interrupted(self) -> bool:
        return self.stats.stop_reason == "interrupted"

    def to_json(self) -> dict:
        s = self.stats
        return {"text": self.text, "reasoning": self.reasoning, "tokens": self.tokens,
                "stats": {"prompt_tokens": s.prompt_tokens, "prefilled_tokens": s.prefilled_tokens,
                          "new_tokens": s.new_tokens, "prefill_tok_s": s.prefill_tok_s,
                          "decode_tok_s": s.decode_tok_s, "time_to_first_token_s": s.time_to_first_token_s,
                          "stop_reason": s.stop_reason, "vram_bytes": s.vram_bytes, "ram_bytes": s.ram_bytes}}


class Listener(Protocol):
    """Receives an answer as it is generated (Console is one)."""

    def notice(self, text: str) -> None: ...
    def reasoning(self, text: str) -> None: ...
    def answer(self, text: str) -> None: ...


class TextStream:
    """Generated token ids -> UTF-8-safe text, routed to reasoning or answer at <think>/</think>."""

    def __init__(self, tokenizer, in_think: bool, listener: Listener | None):
        from .tokenizer import StreamDecoder

        self.decoder = StreamDecoder(tokenizer)
        self.think_ids = (tokenizer.think_start_id, tokenizer.think_end_id)
        self.in_think = in_think
        self.listener = listener
        self.reasoning: list[str] = []
        self.answer: list[str] = []

    def feed(self, token: int) -> None:
        if token in self.think_ids:  # the tags are not text: they switch where the text goes
            self._emit(self.decoder.flush())
            self.in_think = token == self.think_ids[0]
        else:
            self._emit(self.decoder.feed(token))

    def close(self) -> None:
        self._emit(self.decoder.flush())

    def _emit(self, text: str) -> None:
        if not self.in_think and not self.answer:
            text = text.lstrip()  # R1 writes "</think>\n\n" before its answer
        if not text:
            return
        (self.reasoning if self.in_think else self.answer).append(text)
        if self.listener is not None:
            (self.listener.reasoning if self.in_think else self.listener.answer)(text)


# ---- the conversation ------------------------------------------------------------------------

class ChatSession:
    """A conversation with a loaded model: messages, settings and the KV cache they share.

    Each turn renders the whole conversation through the model's chat template (R1's drops the
    reasoning of earlier answers); `Runtime.generate` reuses the cached prefix it has in common
    with the previous turn and computes only the rest."""

    def __init__(self, runtime, settings: Settings | None = None, system: str | None = None,
                 context: int | None = None):
        if runtime.tokenizer is None:
            raise ChatError("the checkpoint has no tokenizer.json: the chat needs the model's tokenizer")
        self.runtime = runtime
        self.tokenizer = runtime.tokenizer
        self.settings = settings or Settings()
        self.settings.validate()
        self.system = system or None
        limit = runtime.config.max_position_embeddings
        self.context = context or limit
        if not 2 <= self.context <= limit:
            raise ChatError(f"the context must hold 2 to {limit} tokens (max_position_embeddings), got {self.context}")
        if system is not None:
            check_text(system, "the system prompt")
        self.messages: list[dict] = []  # user and assistant turns; the system prompt is kept apart
        self.cache = runtime.new_cache(max_tokens=self.context)
        self.last: Reply | None = None

    def template_messages(self) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": m["role"], "content": m["content"]} for m in self.messages]

    def prompt_ids(self) -> list[int]:
        return self.tokenizer.encode_chat(self.template_messages(), add_generation_prompt=True)

    def reply(self, text: str, listener: Listener | None = None) -> Reply:
        """Add a user message, generate the answer (streamed to `listener`), add it.

        Interrupted (KeyboardInterrupt in generation): the partial answer is kept, marked
        `interrupted`; if nothing was generated yet the user message is taken back out."""
        check_text(text, "the message")
        self.messages.append({"role": "user", "content": text})
        try:
            ids, max_new, notices = self._fit()
        except ChatError:
            self.messages.pop()
            raise
        for n in notices:
            if listener is not None:
                listener.notice(n)
        s = self.settings
        # R1's template opens the assistant turn with "<think>\n": the answer starts inside it.
        stream = TextStream(self.tokenizer, self.tokenizer.think_start_id in ids[-2:], listener)
        try:
            gen = self.runtime.generate(ids, max_new_tokens=max_new, temperature=s.temperature, top_p=s.top_p,
                                        top_k=s.top_k, seed=s.seed, on_token=stream.feed, cache=self.cache)
            stream.close()
        except ContextOverflowError as e:  # _fit prevents it; should it happen, start afresh
            self.messages.pop()
            self.cache = self.runtime.new_cache(max_tokens=self.context)
            raise ChatError(f"{e}: message not sent") from None
        except BaseException:
            self.messages.pop()
            raise
        reply = Reply("".join(stream.answer), "".join(stream.reasoning), list(gen), gen.stats, notices)
        if reply.interrupted and not reply.tokens:
            self.messages.pop()
        else:
            msg = {"role": "assistant", "content": reply.text}
            if reply.reasoning:
                msg["reasoning"] = reply.reasoning
            if reply.interrupted:
                msg["interrupted"] = True
            self.messages.append(msg)
        self.last = reply
        return reply

    def _fit(self) -> tuple[list[int], int, list[str]]:
        """The prompt ids and the answer's token budget, after dropping the oldest turns if the
        prompt would not leave max_new_tokens (at most half the context) for the answer. The
        budget never passes the context, so generation itself cannot overflow it."""
        want = self.settings.max_new_tokens
        reserve = min(want, self.context // 2)
        system = [{"role": "system", "content": self.system}] if self.system else []
        alone = len(self.tokenizer.encode_chat(system + [self.messages[-1]], add_generation_prompt=True))
        if alone >= self.context:  # refused before any turn is dropped for it
            raise ChatError(f"the message is {alone} tokens with the template; the context holds "
                            f"{self.context} (--context): message not sent")
        ids = self.prompt_ids()
        dropped = 0
        while len(ids) + reserve > self.context and len(self.messages) > 1:
            pair = len(self.messages) > 2 and self.messages[1]["role"] == "assistant"
            del self.messages[: 2 if pair else 1]
            dropped += 1
            ids = self.prompt_ids()
        notices = []
        if dropped:
            notices.append(f"context limit ({self.context} tokens): dropped the oldest {dropped} "
                           f"turn{'s' if dropped > 1 else ''} to make room")
        room = self.context - len(ids)
        if room < reserve:
            notices.append(f"context limit ({self.context} tokens): this answer is cut to {room} tokens")
        return ids, min(want, room), notices

    def reset(self) -> None:
        """Forget the conversation; keep the system prompt and the settings. The cache keeps only
        the prefix the next conversation shares (the system prompt), so /stats shows what is left."""
        self.messages.clear()
        self.last = None
        fresh = (self.tokenizer.encode_chat([{"role": "system", "content": self.system}], add_generation_prompt=False)
                 if self.system else [])
        n = 0
        while n < min(len(fresh), len(self.cache.tokens)) and fresh[n] == self.cache.tokens[n]:
            n += 1
        self.cache.truncate(n)

    # ---- /save and /load ----
    def to_json(self) -> dict:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return {"format": SAVE_FORMAT, "settings": asdict(self.settings), "messages": system + self.messages}

    def save(self, path: str | Path) -> None:
        Path(path).expanduser().write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n",
                                           encoding="utf-8")

    def load(self, path: str | Path) -> None:
        """Replace the conversation and settings with a file written by `save` (ChatError if bad)."""
        try:
            data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ChatError(f"cannot read {path}: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise ChatError(f"{path}: not a saved conversation (expected an object with a messages list)")
        saved = data.get("settings") or {}
        if not isinstance(saved, dict):
            raise ChatError(f"{path}: settings must be an object of KEY: VALUE, got {type(saved).__name__}")
        settings = Settings()
        for key, value in saved.items():
            try:
                settings.set(key, value)
            except ChatError as e:
                raise ChatError(f"{path}: {e}") from None
        system, messages = [], []
        for i, m in enumerate(data["messages"]):
            if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                    and isinstance(m.get("content"), str)):
                raise ChatError(f"{path}: message {i} needs a role (system|user|assistant) and a text content")
            check_text(m["content"], f"{path}: message {i}")
            (system if m["role"] == "system" else messages).append(m)
        self.settings = settings
        self.system = "\n\n".join(m["content"] for m in system) or None
        self.messages = messages
        self.last = None  # the cache stays: the next turn reuses whatever prefix still matches
