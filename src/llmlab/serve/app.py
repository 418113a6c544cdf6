"""The HTTP side: OpenAI's /v1/completions and /v1/chat/completions (JSON or server-sent events),
/v1/models, /health, /metrics and the chat page at /, on FastAPI.

Every refusal is an OpenAI error object with a 4xx status (ApiError), whatever the body holds;
the API key is checked for every path but /health and the page (which is static and holds no
data; its requests carry the key typed into it), with a constant-time comparison; bodies are read
in chunks and refused past --max-body bytes; nothing a request says names a file.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmlab.errors import LlmlabError
from llmlab.serve import page
from llmlab.serve.chat import ChatTemplate
from llmlab.serve.engine import Sampling, Sequence
from llmlab.serve.protocol import ApiError, ChatRequest, CompletionRequest, parse
from llmlab.serve.client import EngineClient, Request as Job
from llmlab.textstream import TextStream

PUBLIC_PATHS = ("/health", "/")
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for completions


@dataclass
class Served:
    """What the server serves: the model's name, tokenizer, chat template, stop ids, context."""
    name: str
    tokenizer: object
    template: ChatTemplate
    stop_ids: frozenset
    max_len: int
    vocab_size: int
    created: int


class Guard:
    """ASGI middleware: the API key (constant-time compare) on every path but PUBLIC_PATHS."""

    def __init__(self, app, api_key: Optional[str]):
        self.app = app
        self.key = None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.key is not None and scope["path"] not in PUBLIC_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.key):
                err = ApiError(401, "a valid API key is needed: send `Authorization: Bearer KEY`",
                               type="authentication_error", code="invalid_api_key")
                return await error_response(err)(scope, receive, send)
        return await self.app(scope, receive, send)


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, read in chunks and refused (413) past `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(served: Served, engine: EngineClient, api_key: Optional[str] = None, max_body: int = 1 << 20):
    async def lifespan(app):
        engine.start()
        yield
        await engine.stop()

    app = FastAPI(title="llmlab serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(request, err: ApiError):
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):  # unknown path (404), wrong method (405)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind))

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return HTMLResponse(page.html(), headers={"Cache-Control": "no-store"})

    @app.get("/health")
    async def health():
        if engine.draining or engine.dead:
            return JSONResponse({"status": "shutting down" if engine.draining else "engine stopped"},
                                status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": served.created,
                                            "owned_by": "llmlab", "max_model_len": served.max_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse(CompletionRequest, await read_body(request, max_body))
        prompt = _completion_ids(served, req.prompt)
        return await _run(request, served, engine, req, prompt, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse(ChatRequest, await read_body(request, max_body))
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = served.template.render(messages)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        return await _run(request, served, engine, req, _encode(served, text, "messages"), chat=True)

    guarded = Guard(app, api_key)
    guarded.engine = engine
    return guarded


def _encode(served: Served, text: str, param: str) -> list[int]:
    try:
        return served.tokenizer.encode(text)
    except LlmlabError as e:  # e.g. a character a char vocabulary never saw
        raise ApiError(400, str(e), param=param) from None


def _completion_ids(served: Served, prompt) -> list[int]:
    from llmlab.sample import encode_prompt

    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompt = prompt[0]  # [text] or [[ids]]: one prompt
    if isinstance(prompt, str):
        try:
            return encode_prompt(served.tokenizer, prompt)  # "" starts from the end-of-text token / a newline
        except LlmlabError as e:
            raise ApiError(400, str(e), param="prompt") from None
    if not prompt:
        raise ApiError(400, "prompt: the list of token ids is empty", param="prompt")
    if max(prompt) >= served.vocab_size:
        raise ApiError(400, f"prompt: token id {max(prompt)} is outside the vocabulary [0, {served.vocab_size})",
                       param="prompt")
    return list(prompt)


def _job(served: Served, engine: EngineClient, req, prompt: list[int], chat: bool) -> Job:
    """The engine request, every size checked (400 for what can never run)."""
    room = served.max_len - len(prompt)
    if room < 1:
        raise ApiError(400, f"the prompt has {len(prompt)} tokens; this model's context is {served.max_len} tokens "
                            "(prompt + output): shorten it", param="messages" if chat else "prompt",
                       code="context_length_exceeded")
    asked = (req.max_completion_tokens or req.max_tokens) if chat else req.max_tokens
    if asked is not None and len(prompt) + asked > served.max_len:
        raise ApiError(400, f"this model's context is {served.max_len} tokens; the prompt has {len(prompt)} and "
                            f"max_tokens asks for {asked}: ask for at most {room}", param="max_tokens",
                       code="context_length_exceeded")
    max_tokens = asked if asked is not None else room if chat else min(DEFAULT_COMPLETION_TOKENS, room)
    blocks, pool = engine.blocks_needed(len(prompt), max_tokens), engine.total_blocks
    if blocks > pool:
        raise ApiError(400, f"prompt + max_tokens need {blocks} cache blocks; the server's pool has {pool}: ask for "
                            "fewer tokens", param="max_tokens", code="context_length_exceeded")
    sampling = Sampling(1.0 if req.temperature is None else req.temperature, req.top_k, req.top_p, req.seed)
    stops = req.stops() + (list(served.template.stop) if chat else [])
    return Job(Sequence(prompt, max_tokens, sampling, served.stop_ids), TextStream(served.tokenizer, stops))


async def _run(request: Request, served: Served, engine: EngineClient, req, prompt: list[int], chat: bool):
    if req.model != served.name:
        raise ApiError(404, f"the model {req.model!r} does not exist; this server serves {served.name!r}",
                       param="model", code="model_not_found")
    job = _job(served, engine, req, prompt, chat)
    engine.submit(job)
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    shape = _Shape(ident, served.name, chat)
    if req.stream:
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_sse(engine, job, shape, usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _whole(request, engine, job, shape)


class _Shape:
    """OpenAI's response objects for one request."""

    def __init__(self, ident: str, model: str, chat: bool):
        self.ident, self.model, self.chat, self.created = ident, model, chat, int(time.time())

    def _envelope(self, obj: str, choices: list, usage: Optional[dict] = None) -> dict:
        out = {"id": self.ident, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    def whole(self, text: str, reason: str, usage: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": reason}
            return self._envelope("chat.completion", [choice], usage)
        return self._envelope("text_completion", [{"index": 0, "text": text, "logprobs": None,
                                                   "finish_reason": reason}], usage)

    def chunk(self, text: Optional[str], reason: Optional[str] = None, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self, usage: dict) -> dict:
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [], usage)


def _usage(job: Job) -> dict:
    p, c = len(job.seq.prompt), job.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _failure(reason: str) -> ApiError:
    if reason == "cancelled":
        return ApiError(503, "the server shut down before this request finished", type="server_error")
    return ApiError(500, "the model failed on this request (see the server log)", type="server_error")


def _data(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(engine: EngineClient, job: Job, shape: _Shape, usage: bool) -> AsyncIterator[str]:
    done = False
    try:
        if shape.chat:
            yield _data(shape.chunk(None, role=True))
        while True:
            delta, reason = await job.events.get()
            if reason in ("cancelled", "error"):
                yield _data(_failure(reason).body())
                break
            if delta:
                yield _data(shape.chunk(delta))
            if reason:
                yield _data(shape.chunk(None if shape.chat else "", reason))
                if usage:
                    yield _data(shape.usage_chunk(_usage(job)))
                break
        yield "data: [DONE]\n\n"
        done = True
    finally:  # the client went away (the generator is cancelled or closed): free its row
        if not done:
            engine.cancel(job)


async def _whole(request: Request, engine: EngineClient, job: Job, shape: _Shape) -> Response:
    """Wait for the whole answer; a client that disconnects meanwhile is cancelled."""
    gone = asyncio.ensure_future(_disconnected(request))
    parts = []
    try:
        while True:
            get = asyncio.ensure_future(job.events.get())
            finished, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
            if get not in finished:
                get.cancel()
                engine.cancel(job)
                return Response(status_code=499)  # nobody reads it
            delta, reason = get.result()
            if reason in ("cancelled", "error"):
                raise _failure(reason)
            parts.append(delta)
            if reason:
                return JSONResponse(shape.whole("".join(parts), reason, _usage(job)))
    finally:
        gone.cancel()
        engine.cancel(job)  # a no-op once finished; a handler cancelled at shutdown frees its row


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
