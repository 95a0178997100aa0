"""`hybrid-r1 serve`: the loaded model behind an OpenAI-compatible HTTP API (FastAPI + uvicorn).

    hybrid-r1 serve                                   # the built-in demo model on 127.0.0.1:8000
    hybrid-r1 serve --model DIR --rules rules/int8-gpu-ggml-experts.yaml --api-key KEY

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health. Generation
itself is engine.py (one at a time, bounded queue, prefix caches); request bodies and error objects
are openai_schema.py; generated tokens -> reasoning, content and tool-call deltas openai_output.py
(DeepSeek's tool-call tokens: tool_calls.py). Here: requests -> prompts, the engine's tokens ->
OpenAI responses and server-sent events, and the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import sys
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import jinja2
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .conversation import Settings
from .engine import Engine, EngineClosed, QueueFull
from .errors import HybridR1Error
from .generate import Generation
from .openai_output import ChatOutput, CompletionOutput
from .openai_schema import APIError, ChatRequest, CompletionRequest, Message, parse
from .tool_calls import tools_system_prompt

log = logging.getLogger("hybrid_r1.server")
DEFAULTS = Settings()  # sampling defaults when a request gives none: DeepSeek's for R1
_DONE = object()  # the end of a run's token queue


# ---- one generation as the event loop sees it ------------------------------------------------

class Run:
    """An engine job's tokens as an async iterator; the job is cancelled when the client goes away."""

    def __init__(self, engine: Engine, request, prompt: list[int], params: dict):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

        def put(item) -> None:  # from the worker thread
            loop.call_soon_threadsafe(self.queue.put_nowait, item)

        try:
            self.job = engine.submit(prompt, params, put)
        except QueueFull as e:
            raise APIError(503, str(e), type="server_error", code="queue_full",
                           headers={"Retry-After": str(e.retry_after_s)}) from None
        except EngineClosed as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None
        self.job.future.add_done_callback(lambda _: _call_quietly(put, _DONE))
        self._watch = asyncio.create_task(self._until_disconnect(request))

    async def _until_disconnect(self, request) -> None:
        # The body is read, so what arrives next is the disconnect (or the end of the response).
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.job.cancel()

    async def tokens(self):
        while (item := await self.queue.get()) is not _DONE:
            yield item

    def result(self) -> Generation:
        try:
            return self.job.future.result()
        except HybridR1Error as e:
            raise APIError(400, str(e)) from None
        except Exception as e:
            log.exception("generation failed")
            raise APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error") from None

    def close(self) -> None:
        self.job.cancel()
        self._watch.cancel()


def _call_quietly(fn, *args) -> None:
    try:
        fn(*args)
    except RuntimeError:  # the event loop is gone (server stopped): nobody is waiting
        pass


# ---- the API -----------------------------------------------------------------------------------

class Service:
    """What the routes share: the runtime, its engine, and the serving options."""

    def __init__(self, runtime, *, model_id: str, context: int | None = None, api_key: str | None = None,
                 max_queue: int = 16, cache_slots: int = 4, default_max_tokens: int | None = None,
                 reasoning_format: str = "deepseek"):
        if runtime.tokenizer is None:
            raise HybridR1Error("the checkpoint has no tokenizer.json: the server needs the model's tokenizer")
        longest = runtime.config.max_position_embeddings
        if context is not None and not 2 <= context <= longest:
            raise HybridR1Error(f"--context {context}: must be in [2, {longest}] (the model's max_position_embeddings)")
        self.runtime = runtime
        self.tokenizer = runtime.tokenizer
        self.model_id = model_id
        self.context = context or longest
        self.api_key = api_key
        self.default_max_tokens = default_max_tokens
        self.reasoning_format = reasoning_format
        self.engine = Engine(runtime, context=self.context, max_queue=max_queue, cache_slots=cache_slots)
        self.created = int(time.time())
        self._template_takes_tools: bool | None = None

    # ---- checks shared by the routes ----
    def check_key(self, request) -> None:
        if self.api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {self.api_key}".encode()):
            raise APIError(401, "Incorrect API key provided" if got else "No API key provided (Authorization: Bearer KEY)",
                           code="invalid_api_key")

    def check_model(self, name: str) -> None:
        if name != self.model_id:
            raise APIError(404, f"The model {name!r} does not exist; this server serves {self.model_id!r}",
                           param="model", code="model_not_found")

    def budget(self, n_prompt: int, asked: int | None, what: str) -> int:
        """The completion's token budget; 400 naming the limits if prompt + completion overflow."""
        if asked is not None and n_prompt + asked > self.context:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                                f"requested {n_prompt + asked} tokens ({n_prompt} in the {what}, {asked} in the "
                                f"completion). Please reduce the length of the {what} or completion.",
                           param=what, code="context_length_exceeded")
        room = self.context - n_prompt
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens and the {what} "
                                f"take {n_prompt}: no room for a completion.", param=what,
                           code="context_length_exceeded")
        return asked if asked is not None else min(room, self.default_max_tokens or room)

    def params(self, req, max_new: int) -> dict:
        return dict(max_new_tokens=max_new,
                    temperature=DEFAULTS.temperature if req.temperature is None else req.temperature,
                    top_p=DEFAULTS.top_p if req.top_p is None else req.top_p,
                    top_k=req.top_k or 0, seed=req.seed)

    # ---- prompts ----
    def chat_prompt(self, req: ChatRequest) -> list[int]:
        messages = [_template_message(i, m) for i, m in enumerate(req.messages)]
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []] if req.tool_choice != "none" else []
        if tools and not self.template_takes_tools():
            messages = _with_system(messages, tools_system_prompt(tools))
        try:
            return self.tokenizer.encode_chat(messages, tools=tools or None)
        except jinja2.TemplateError as e:  # what the template refuses (raise_exception) or cannot render
            raise APIError(400, f"messages: the chat template refused them: {e}", param="messages") from None

    def template_takes_tools(self) -> bool:
        # R1's original template ignores `tools`; later DeepSeek templates render them.
        if self._template_takes_tools is None:
            msgs = [{"role": "user", "content": "x"}]
            tool = {"type": "function", "function": {"name": "probe_tool", "parameters": {}}}
            self._template_takes_tools = (self.tokenizer.apply_chat_template(msgs, tools=[tool])
                                          != self.tokenizer.apply_chat_template(msgs))
        return self._template_takes_tools

    def completion_prompt(self, req: CompletionRequest) -> list[int]:
        prompt = req.prompt_text()
        if isinstance(prompt, list):
            if any(t < 0 or t >= self.runtime.config.vocab_size for t in prompt):
                raise APIError(400, f"prompt: token ids must be in [0, {self.runtime.config.vocab_size})", param="prompt")
            return prompt
        ids = self.tokenizer.encode(prompt, add_bos=self.tokenizer.add_bos_token)
        if not ids:
            raise APIError(400, "prompt: empty", param="prompt")
        return ids

    # ---- responses ----
    def usage(self, gen: Generation, reasoning_tokens: int | None = None) -> dict:
        s = gen.stats
        usage = {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.new_tokens,
                 "total_tokens": s.prompt_tokens + s.new_tokens,
                 "prompt_tokens_details": {"cached_tokens": s.prompt_tokens - s.prefilled_tokens}}
        if reasoning_tokens is not None:
            usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
        return usage


def timings(gen: Generation) -> dict:
    """The extension field with the generation's speed (also in X-Prefill-Tok-S style headers)."""
    s = gen.stats
    return {"prompt_tokens": s.prompt_tokens, "cached_tokens": s.prompt_tokens - s.prefilled_tokens,
            "prefill_tok_s": round(s.prefill_tok_s, 2), "decode_tok_s": round(s.decode_tok_s, 2),
            "time_to_first_token_s": round(s.time_to_first_token_s, 4), "stop_reason": s.stop_reason}


def _timing_headers(gen: Generation) -> dict:
    t = timings(gen)
    return {"X-Prefill-Tok-S": str(t["prefill_tok_s"]), "X-Decode-Tok-S": str(t["decode_tok_s"]),
            "X-Time-To-First-Token-S": str(t["time_to_first_token_s"])}


def _finish_reason(gen: Generation, stopped: bool, tool_calls: bool = False) -> str:
    if tool_calls and (stopped or gen.stats.stop_reason != "length"):
        return "tool_calls"
    return "length" if gen.stats.stop_reason == "length" and not stopped else "stop"


def _template_message(i: int, m: Message) -> dict:
    text = m.text()
    if m.role in ("system", "developer", "user", "tool") and text is None:
        raise APIError(400, f"messages[{i}].content: required for a {m.role} message", param=f"messages[{i}].content")
    if m.role == "assistant" and text is None and not m.tool_calls:
        raise APIError(400, f"messages[{i}]: an assistant message needs content or tool_calls", param=f"messages[{i}]")
    out = {"role": "system" if m.role == "developer" else m.role, "content": text or ""}
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": c.type, "function": c.function.model_dump()} for c in m.tool_calls]
    return out


def _with_system(messages: list[dict], text: str) -> list[dict]:
    """Append `text` to the system prompt (or start one), as DeepSeek's later templates do for tools."""
    for i, m in enumerate(messages):
        if m["role"] == "system":
            return messages[:i] + [{**m, "content": m["content"] + "\n\n" + text}] + messages[i + 1:]
    return [{"role": "system", "content": text}] + messages


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"



def _head(prefix: str, service) -> dict:
    return {"id": prefix + uuid.uuid4().hex, "created": int(time.time()), "model": service.model_id,
            "system_fingerprint": None}


def _include_usage(req) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


def _stream(events, run: Run) -> StreamingResponse:
    return StreamingResponse(_guarded(events, run), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _guarded(events, run: Run):
    """A stream's events; once its status line is sent, an error goes in the stream (as OpenAI
    does); the run is closed however the stream ends."""
    try:
        async for event in events:
            yield event
    except APIError as e:
        yield _sse(e.body())
    except Exception as e:
        log.exception("streaming failed")
        yield _sse(APIError(500, f"internal error: {type(e).__name__}", type="server_error").body())
    finally:
        run.close()

def create_app(service: Service):
    """The FastAPI application serving `service`; its shutdown stops the engine."""

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.engine.close()

    app = FastAPI(title="hybrid_r1", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                     code=code).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(request, e: Exception):
        log.exception("internal error")
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}", type="server_error").body(),
                            status_code=500)

    async def body_of(request: Request, model):
        service.check_key(request)
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"malformed JSON in the request body: {e}") from None
        req = parse(model, data)
        service.check_model(req.model)
        return req

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.model_id, "pending": service.engine.pending,
                "max_queue": service.engine.max_queue, "context": service.context}

    @app.get("/v1/models")
    async def models(request: Request):
        service.check_key(request)
        return {"object": "list", "data": [_model_card(service)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        service.check_key(request)
        service.check_model(name)
        return _model_card(service)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await body_of(request, ChatRequest)
        ids = service.chat_prompt(req)
        max_new = service.budget(len(ids), req.max_completion_tokens or req.max_tokens, "messages")
        tok = service.tokenizer
        inline = (req.reasoning_format or service.reasoning_format) == "none"
        output = ChatOutput(tok, in_think=tok.think_start_id is not None and tok.think_start_id in ids[-2:],
                            inline=inline, stops=req.stop_strings(),
                            tools=bool(req.tools) and req.tool_choice != "none")
        run = Run(service.engine, request, ids, service.params(req, max_new))
        head = _head("chatcmpl-", service)
        if req.stream:
            return _stream(_chat_events(service, run, output, head, _include_usage(req)), run)
        gen = await _collect(run, output)
        message = {"role": "assistant", "content": "".join(output.content_parts) or (None if output.tool_calls else "")}
        if not inline:
            message["reasoning_content"] = "".join(output.reasoning_parts)
        if output.tool_calls:
            message["tool_calls"] = [c.to_openai() for c in output.tool_calls]
        body = {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "logprobs": None,
                             "finish_reason": _finish_reason(gen, output.stopped, bool(output.tool_calls))}],
                "usage": service.usage(gen, output.reasoning_tokens), "timings": timings(gen)}
        return JSONResponse(body, headers=_timing_headers(gen))

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await body_of(request, CompletionRequest)
        ids = service.completion_prompt(req)
        max_new = service.budget(len(ids), req.max_tokens, "prompt")
        output = CompletionOutput(service.tokenizer, req.stop_strings())
        run = Run(service.engine, request, ids, service.params(req, max_new))
        head = _head("cmpl-", service)
        if req.stream:
            return _stream(_completion_events(service, run, output, head, _include_usage(req)), run)
        gen = await _collect(run, output)
        body = {**head, "object": "text_completion",
                "choices": [{"index": 0, "text": "".join(output.text), "logprobs": None,
                             "finish_reason": _finish_reason(gen, output.stopped)}],
                "usage": service.usage(gen), "timings": timings(gen)}
        return JSONResponse(body, headers=_timing_headers(gen))

    return app


async def _collect(run: Run, output: ChatOutput | CompletionOutput) -> Generation:
    """Feed a whole (non-streamed) answer's tokens to `output`; the generation with its stats."""
    try:
        async for token in run.tokens():
            output.feed(token)
            if output.stopped:  # a stop sequence: nothing after it is wanted
                run.job.cancel()
        gen = run.result()
    finally:
        run.close()
    output.close()
    return gen


def _model_card(service: Service) -> dict:
    return {"id": service.model_id, "object": "model", "created": service.created, "owned_by": "hybrid_r1",
            "context_length": service.context}


async def _chat_events(service: Service, run: Run, output: ChatOutput, head: dict, include_usage: bool):
    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        return _sse({**head, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra})

    yield chunk({"role": "assistant", "content": ""})
    async for token in run.tokens():
        delta = output.feed(token)
        if output.stopped:
            run.job.cancel()
        if delta:
            yield chunk(delta)
    gen = run.result()
    if delta := output.close():
        yield chunk(delta)
    yield chunk({}, _finish_reason(gen, output.stopped, bool(output.tool_calls)), timings=timings(gen))
    if include_usage:
        yield _sse({**head, "object": "chat.completion.chunk", "choices": [],
                    "usage": service.usage(gen, output.reasoning_tokens)})
    yield "data: [DONE]\n\n"


async def _completion_events(service: Service, run: Run, output: CompletionOutput, head: dict, include_usage: bool):
    def chunk(text: str, finish: str | None = None, **extra) -> str:
        return _sse({**head, "object": "text_completion",
                     "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}], **extra})

    async for token in run.tokens():
        text = output.feed(token)
        if output.stopped:
            run.job.cancel()
        if text:
            yield chunk(text)
    gen = run.result()
    yield chunk(output.close(), _finish_reason(gen, output.stopped), timings=timings(gen))
    if include_usage:
        yield _sse({**head, "object": "text_completion", "choices": [], "usage": service.usage(gen)})
    yield "data: [DONE]\n\n"


# ---- the command line --------------------------------------------------------------------------

DEMO_MAX_TOKENS = 64  # the demo writes random text: a request without max_tokens gets a short one


def build_parser(prog: str = "hybrid-r1 serve") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog, description="Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, "
                               "/v1/completions, /v1/models, /health). With no model: the built-in demo "
                               "(random weights).",
        epilog="exit codes: 0 stopped (Ctrl-C), 2 bad arguments or a model that cannot be loaded.")
    m = ap.add_argument_group("model")
    m.add_argument("--model", metavar="PATH", help="checkpoint folder, merged folder or .gguf file; default: the demo")
    m.add_argument("--safetensor", metavar="DIR",
                   help="with --gguf: the safetensors folder whose routed experts the GGUF's replace (no merge step)")
    m.add_argument("--gguf", metavar="PATH",
                   help="with --safetensor: GGUF file, first file of a split set, or a folder of one set")
    m.add_argument("--rules", metavar="FILE", help="placement rule file (YAML)")
    m.add_argument("--device", help="default device: cpu, cuda, cuda:1 (default: cuda if present; the demo: cpu)")
    m.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    m.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: torch's choice)")
    m.add_argument("--context", type=int, metavar="N",
                   help="most tokens a request (prompt + completion) may use (default: the model's maximum)")
    s = ap.add_argument_group("serving")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1/*")
    s.add_argument("--max-queue", type=int, default=16, metavar="N",
                   help="requests that may wait behind the running one; more get 503 (default 16)")
    s.add_argument("--cache-slots", type=int, default=4, metavar="N",
                   help="conversations whose KV cache is kept for prefix reuse (default 4)")
    s.add_argument("--served-model-name", metavar="NAME", help="the model id clients send (default: the folder name)")
    s.add_argument("--max-tokens", type=int, metavar="N",
                   help="completion budget of a request that gives none (default: the rest of the context; demo: "
                        f"{DEMO_MAX_TOKENS})")
    s.add_argument("--reasoning-format", choices=["deepseek", "none"], default="deepseek",
                   help="deepseek: reasoning in reasoning_content (default); none: inline in content "
                        "between <think> tags. A request's reasoning_format overrides it.")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return ap


def _check_args(ap: argparse.ArgumentParser, args) -> None:
    if args.model and (args.safetensor or args.gguf):
        ap.error("give either --model PATH or --safetensor DIR --gguf PATH")
    if bool(args.safetensor) != bool(args.gguf):
        ap.error("--safetensor and --gguf go together")
    for flag, value, least in (("--threads", args.threads, 1), ("--context", args.context, 2),
                               ("--max-queue", args.max_queue, 0), ("--cache-slots", args.cache_slots, 1),
                               ("--max-tokens", args.max_tokens, 1), ("--port", args.port, 0)):
        if value is not None and value < least:
            ap.error(f"{flag} must be >= {least}, got {value}")
    if args.port > 65535:
        ap.error(f"--port must be <= 65535, got {args.port}")


def main(argv: list[str] | None = None, prog: str = "hybrid-r1 serve") -> int:
    ap = build_parser(prog)
    args = ap.parse_args(argv)
    _check_args(ap, args)
    from .chat import Console, open_model

    console = Console(sys.stderr, color=False)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        runtime, is_demo = open_model(args, console)  # the chat's loader: --model, merged, or the demo
        name = args.served_model_name or ("hybrid-r1-demo" if is_demo else
                                          Path(args.model or args.safetensor).name.removesuffix(".gguf"))
        service = Service(runtime, model_id=name, context=args.context, api_key=args.api_key,
                          max_queue=args.max_queue, cache_slots=args.cache_slots,
                          default_max_tokens=args.max_tokens or (DEMO_MAX_TOKENS if is_demo else None),
                          reasoning_format=args.reasoning_format)
    except (HybridR1Error, OSError) as e:
        console.error(str(e))
        return 2
    if is_demo:
        console.notice("DEMO MODEL: random weights, so its answers are random text.")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        console.notice(f"listening on {args.host}: anyone who can reach this address can use the model"
                       + ("" if args.api_key else " (no --api-key set)"))
    console.info(f"serving {name!r} on http://{args.host}:{args.port}/v1 (context {service.context} tokens)")
    server = GracefulServer(uvicorn.Config(create_app(service), host=args.host, port=args.port,
                                           log_level=args.log_level), service.engine)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it drained for
        pass
    except SystemExit:  # uvicorn could not bind (it said why): a bad --host or --port
        return 2
    return 0 if server.started else 2


class GracefulServer(uvicorn.Server):
    """uvicorn's server that, on Ctrl-C / SIGTERM, first stops the running generation and the
    queued ones (their clients get what was generated so far), then drains as uvicorn does."""

    def __init__(self, config: uvicorn.Config, engine: Engine):
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig, frame) -> None:
        self.engine.close()
        super().handle_exit(sig, frame)


if __name__ == "__main__":
    sys.exit(main())
