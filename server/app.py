"""The FastAPI app: OpenAI completions and chat completions (plain and SSE), models, health, metrics.

Handlers only translate: they validate a request, submit one engine request per (prompt, choice), and
turn the engine's block-level outputs into OpenAI responses or `data:` chunks. The engine thread does
all the work, so the event loop stays free to accept connections and notice disconnects.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from jinja2 import TemplateError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from transformers import PreTrainedTokenizerBase

from qdllm.engine import AsyncEngine, EngineError, QueueFullError, RequestOutput
from qdllm.engine.tokenizer import chat_prompt

from .errors import APIError, error_body, error_response
from .logprobs import chat_logprobs, completion_logprobs
from .metrics import Metrics
from .protocol import ChatRequest, CompletionRequest, parse, sampling_params

log = logging.getLogger("qdllm.server")
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
DISCONNECT_POLL_S = 0.25


@dataclass
class ServerConfig:
    model_name: str
    defaults: dict  # SamplingParams fields the model's artifact sets; a request overrides them
    api_key: str | None = None
    max_n: int = 16  # choices per request
    max_body_bytes: int = 8 << 20  # larger bodies get 413 before they are read
    body_timeout_s: float = 60.0  # from the headers to the body's last byte: 8 MiB at about 1 Mbit/s


def create_app(engine: AsyncEngine, tokenizer: PreTrainedTokenizerBase, config: ServerConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(engine.shutdown)  # the server takes no more requests; end those in flight

    app = FastAPI(title="qdllm", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    metrics = Metrics()
    created = int(time.time())

    app.add_middleware(AuthAndCount, api_key=config.api_key, metrics=metrics)
    # A token spans at most the longest vocabulary entry (x4 for normalizers that merge characters), so a text
    # longer than this cannot fit the context; it is refused before the tokenizer spends time and memory on it.
    max_chars = 4 * max((len(t) for t in tokenizer.get_vocab()), default=1) * engine.core.max_model_len
    # The most JSON values a request the server can run holds: a full queue of prompts of token ids, a message
    # per token (each a few values), a logit_bias entry per vocabulary token, and the other fields.
    max_values = (engine.max_queue + 16) * engine.core.max_model_len + len(tokenizer) + 4096

    @app.exception_handler(APIError)
    async def on_api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = "no such endpoint" if e.status_code == 404 else str(e.detail)
        if e.status_code == 405 and e.headers and "Allow" in e.headers:
            message = f"{request.method} is not allowed on {request.url.path}; use {e.headers['Allow']}"
        return JSONResponse(error_body(e.status_code, message), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def on_unexpected(_: Request, e: Exception) -> JSONResponse:
        # no log here: Starlette raises the exception on to uvicorn, which logs its traceback once
        return JSONResponse(error_body(500, f"internal error: {type(e).__name__}"), status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.alive
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {"id": config.model_name, "object": "model", "created": created, "owned_by": "qdllm",
                "max_model_len": engine.core.max_model_len}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict:
        check_model(model)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = parse(await read_body(request), CompletionRequest, max_values)
        check_model(req.model)
        prompts = completion_prompts(req.prompt)
        check_choices(req.n, len(prompts))
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs asks for the prompt's logprobs, which a diffusion model does not "
                                "compute", "echo")
        if req.suffix:
            check_length(len(req.suffix), "suffix")
        ids = await asyncio.to_thread(lambda: [tokenizer(p)["input_ids"] if isinstance(p, str) else p
                                               for p in prompts])  # off the event loop, which keeps serving
        suffix = await asyncio.to_thread(lambda: tokenizer(req.suffix, add_special_tokens=False)["input_ids"]) \
            if req.suffix else None
        echo = None
        if req.echo:  # each choice's text starts with its prompt's; token ids are decoded off the event loop too
            texts = await asyncio.to_thread(lambda: [p if isinstance(p, str) else tokenizer.decode(p) for p in prompts])
            echo = [t for t in texts for _ in range(req.n)]
        return await respond(request, req, ids, chat=False, suffix=suffix, echo=echo)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = parse(await read_body(request), ChatRequest, max_values)
        check_model(req.model)
        if not req.messages:
            raise APIError(400, "messages must hold at least one message", "messages")
        check_choices(req.n, 1)
        conversation = [{"role": m.role, "content": m.text(i)} | ({"name": m.name} if m.name else {})
                        for i, m in enumerate(req.messages)]
        check_length(sum(len(m["content"]) + len(m.get("name", "")) for m in conversation), "messages")
        try:
            ids = await asyncio.to_thread(chat_prompt, tokenizer, conversation)
        except TemplateError as e:  # a template's raise_exception: e.g. roles that must alternate
            raise APIError(400, f"the model's chat template refuses these messages: {e}".splitlines()[0],
                           "messages") from None
        except Exception as e:  # the template itself is broken on these messages: the server's fault, said plainly
            log.error("the chat template fails: %s: %s", type(e).__name__, e)
            raise APIError(500, f"the model's chat template fails on these messages ({type(e).__name__}: {e})"
                           .splitlines()[0]) from None
        return await respond(request, req, [ids], chat=True)

    async def read_body(request: Request) -> bytes:
        """The body, refused once it outgrows the limit, so a huge one costs neither memory nor time; and once it
        is late or the server shuts down, so an unfinished one holds its handler for no longer."""
        too_large = APIError(413, f"the request body is larger than the server's limit of {config.max_body_bytes} "
                                  f"bytes")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > config.max_body_bytes:
            raise too_large
        chunks, size = [], 0
        stream, deadline = request.stream(), time.monotonic() + config.body_timeout_s
        try:
            while (chunk := await next_chunk(stream, deadline)) is not None:
                size += len(chunk)
                if size > config.max_body_bytes:
                    raise too_large
                chunks.append(chunk)
        except ClientDisconnect:  # the client left mid-upload; nobody reads this
            raise APIError(499, "the client disconnected") from None
        return b"".join(chunks)

    async def next_chunk(stream: AsyncIterator[bytes], deadline: float) -> bytes | None:
        task = asyncio.ensure_future(anext(stream, None))
        try:
            while not (await asyncio.wait({task}, timeout=DISCONNECT_POLL_S))[0]:
                if not engine.alive:
                    raise APIError(503, "the server is shutting down; retry later")
                if time.monotonic() > deadline:
                    raise APIError(408, f"the request body did not arrive within {config.body_timeout_s:g} s")
            return task.result()
        finally:
            task.cancel()  # a no-op once it is done

    def check_model(name: str) -> None:
        if name != config.model_name:
            raise APIError(404, f"model '{name}' does not exist; this server serves '{config.model_name}'", "model")

    def check_choices(n: int, prompts: int) -> None:
        """Refuse what the server can never queue now, as 400: a 503 would tell the client to retry."""
        if not 1 <= n <= config.max_n:
            raise APIError(400, f"n must be between 1 and {config.max_n}, got {n}", "n")
        if prompts * n > engine.max_queue:
            raise APIError(400, f"{prompts} prompts x n={n} make {prompts * n} requests; the server queues at most "
                                f"{engine.max_queue}", "prompt" if prompts > 1 else "n")

    def check_length(chars: int, param: str) -> None:
        if chars > max_chars:
            raise APIError(400, f"{param} holds {chars} characters, more than the model's context of "
                                f"{engine.core.max_model_len} tokens can hold", param)

    def completion_prompts(prompt: str | list) -> list[str | list[int]]:
        """The request's prompts, not yet tokenized: strings or lists of token ids."""
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and all(type(t) is int for t in prompt):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt must not be empty", "prompt")
        for p in prompt:
            if isinstance(p, str):
                check_length(len(p), "prompt")
        return prompt

    async def respond(request: Request, req: CompletionRequest | ChatRequest, prompts: list[list[int]],
                      chat: bool, suffix: list[int] | None = None, echo: list[str] | None = None) -> Response:
        params = [sampling_params(req, config.defaults, i) for i in range(req.n)]
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        streams = []
        try:
            for p, prompt in enumerate(prompts):
                for i, sp in enumerate(params):
                    streams.append(engine.submit(prompt, sp, request_id=f"{rid}-{p * req.n + i}", suffix=suffix))
        except (ValueError, QueueFullError, EngineError) as e:
            for s in streams:
                s.cancel()
            raise submit_error(e, chat) from None
        meta = Meta(rid, config.model_name, chat, sum(len(p) for p in prompts), tokenizer, echo)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(sse(streams, meta, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        finals = await collect(request, streams)
        if finals is None:  # the client left; its requests are cancelled and nobody reads this
            return Response(status_code=499)
        if any(o.finish_reason == "abort" for o in finals):
            raise APIError(503, "the server is shutting down; retry later")
        record(meta, finals)
        # in a thread: the logprobs of a large request take seconds to detokenize, and the event loop serves others
        return await asyncio.to_thread(lambda: JSONResponse(meta.response(finals)))

    async def collect(request: Request, streams: list) -> list[RequestOutput] | None:
        """Every choice's final output, or None if the client disconnects first (the requests are cancelled)."""
        async def finals() -> list[RequestOutput]:  # a task, not gather's future: cancelled, it logs nothing
            return await asyncio.gather(*(s.final() for s in streams))

        task = asyncio.ensure_future(finals())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    return None
        except EngineError as e:
            raise APIError(503, str(e)) from None
        finally:
            if not task.done():
                task.cancel()
            for s in streams:
                s.cancel()

    async def sse(streams: list, meta: Meta, include_usage: bool) -> AsyncIterator[str]:
        finals: list[RequestOutput | None] = [None] * len(streams)
        sent = [(0, 0)] * len(streams)  # per choice: tokens whose logprobs went out, and their text's length
        try:
            for index in range(len(streams)):
                if meta.chat:
                    yield meta.chunk(index, {"role": "assistant", "content": ""}, None)
                elif meta.echo:
                    yield meta.chunk(index, meta.echo[index], None)
            async for index, out in merged(streams):
                if isinstance(out, Exception) or out.finish_reason == "abort":
                    message = str(out) if isinstance(out, Exception) else "the server is shutting down"
                    yield f"data: {json.dumps(error_body(503, message))}\n\n"
                    return
                if out.delta_text or out.finished:
                    logprobs, sent[index] = meta.logprobs(out, *sent[index])
                    yield meta.chunk(index, out.delta_text, out.finish_reason, logprobs)
                if out.finished:
                    finals[index] = out
            record(meta, finals)
            if include_usage:
                yield meta.usage_chunk(finals)
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects mid-stream: the engine drops the requests
            for s in streams:
                s.cancel()

    def record(meta: Meta, finals: list[RequestOutput]) -> None:
        for o in finals:
            metrics.prompt_tokens += len(o.prompt_token_ids)
            metrics.completion_tokens += len(o.token_ids)
            metrics.nfe += o.nfe
            metrics.latency.observe(o.stats.latency_s)
            metrics.queue.observe(o.stats.queue_s)
            metrics.first_block.observe(o.stats.first_block_s)
            metrics.nfe_hist.observe(o.nfe)
        usage = meta.usage(finals)
        log.info("%s prompt_tokens=%d completion_tokens=%d nfe=%d latency=%.3fs", meta.id, usage["prompt_tokens"],
                 usage["completion_tokens"], sum(o.nfe for o in finals), time.perf_counter() - meta.start)

    return app


class AuthAndCount:
    """Bearer auth on /v1/* and request counts by endpoint and status, as plain ASGI, so streamed
    responses and client disconnects pass through untouched."""

    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app, self.metrics = app, metrics
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "/v1/models/{model}" if path.startswith("/v1/models/") else "other"

        started = False

        async def counted(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.requests[(endpoint, message["status"])] += 1
            await send(message)

        if self.expected and path.startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                e = APIError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'")
                return await error_response(e)(scope, receive, counted)
        try:
            await self.app(scope, receive, counted)
        except Exception:  # Starlette's catch-all handler answers 500 outside this middleware: count it here
            if not started:  # once started, the client has its status (counted) and gets no 500
                self.metrics.requests[(endpoint, 500)] += 1
            raise


def submit_error(e: Exception, chat: bool) -> APIError:
    if isinstance(e, QueueFullError):
        return APIError(503, str(e), headers={"Retry-After": "1"})
    if isinstance(e, EngineError):
        return APIError(503, str(e))
    param = getattr(e, "field", None)  # RequestError says which field; SamplingParams name it in the message
    if param == "prompt" and chat:
        param = "messages"
    return APIError(400, str(e).removeprefix("SamplingParams."), param)


async def merged(streams: list) -> AsyncIterator[tuple[int, RequestOutput | Exception]]:
    """Outputs of several streams as they come, tagged with the stream's index; ends when all have finished."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream) -> None:
        try:
            async for out in stream:
                await queue.put((index, out))
        except EngineError as e:
            await queue.put((index, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if isinstance(item, Exception) or item.finished:
                remaining -= 1
            yield index, item
    finally:
        for t in tasks:
            t.cancel()


@dataclass
class Meta:
    """What every response and chunk of one HTTP request shares, and how they are shaped."""

    id: str
    model: str
    chat: bool
    prompt_tokens: int  # each prompt counts once however many choices it has, as OpenAI counts it
    tokenizer: PreTrainedTokenizerBase
    echo: list[str] | None = None  # completions: each choice's prompt text, which its text starts with
    created: int = field(default_factory=lambda: int(time.time()))
    start: float = field(default_factory=time.perf_counter)

    @property
    def kind(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def usage(self, finals: list[RequestOutput]) -> dict:
        completion = sum(len(o.token_ids) for o in finals)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def _envelope(self, kind: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def logprobs(self, out: RequestOutput, sent: int = 0, offset: int = 0) -> tuple[dict | None, tuple[int, int]]:
        """The logprobs object for the answer's tokens after the first `sent` (whose text is `offset` characters
        long), or None if the request did not ask; and the new (sent, offset)."""
        if out.logprobs is None:
            return None, (sent, offset)
        before, entries = out.token_ids[:sent], out.logprobs[sent:]
        if self.chat:
            return chat_logprobs(self.tokenizer, entries, before), (len(out.logprobs), offset)
        lists = completion_logprobs(self.tokenizer, entries, before, offset)
        return lists, (len(out.logprobs), offset + sum(len(t) for t in lists["tokens"]))

    def response(self, finals: list[RequestOutput]) -> dict:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": o.text},
                        "logprobs": self.logprobs(o)[0], "finish_reason": o.finish_reason}
                       for i, o in enumerate(finals)]
        else:
            choices = [{"index": i, "text": (self.echo[i] if self.echo else "") + o.text,
                        "logprobs": self.logprobs(o)[0], "finish_reason": o.finish_reason}
                       for i, o in enumerate(finals)]
        return self._envelope(self.kind, choices) | {"usage": self.usage(finals)}

    def chunk(self, index: int, delta: str | dict, finish_reason: str | None, logprobs: dict | None = None) -> str:
        if self.chat:
            delta = delta if isinstance(delta, dict) else {"content": delta} if delta else {}
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            body = self._envelope("chat.completion.chunk", [choice])
        else:
            body = self._envelope("text_completion", [{"index": index, "text": delta, "logprobs": logprobs,
                                                       "finish_reason": finish_reason}])
        return f"data: {json.dumps(body)}\n\n"

    def usage_chunk(self, finals: list[RequestOutput]) -> str:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return f"data: {json.dumps(self._envelope(kind, []) | {'usage': self.usage(finals)})}\n\n"
