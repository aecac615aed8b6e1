"""Routes of ds4-server (server.md §2, §4): FastAPI app over a Preparer and a Worker.

Contract: `create_app(options, preparer, worker)` returns the ASGI app. Every
error is an ApiError rendered in the error shape of the path's API with a real
status code (README decision 5); unknown paths are 404, known paths with
another method 405 with an `Allow` header, OPTIONS 204. Every response carries
`Connection: close` and, with `--cors`, the Access-Control headers.
"""

from __future__ import annotations

import asyncio
import json

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from dwarfstar.server import anthropic, openai, responses
from dwarfstar.server.errors import ApiError, error_body
from dwarfstar.server.prepare import read_json
from dwarfstar.server.stream import collect, pump

MODEL_ID = "deepseek-v4-flash"
MAX_BODY = 64 * 1024 * 1024
CORS = {"Access-Control-Allow-Origin": "*", "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        "Access-Control-Allow-Headers": "*"}
POST_PATHS = {"/v1/chat/completions": "chat", "/v1/completions": "completion",
              "/v1/responses": "responses", "/v1/messages": "anthropic"}
GET_PATHS = ("/v1/models", "/health")


def model_object(ctx: int, tokens: int) -> dict:
    return {"id": MODEL_ID, "object": "model", "created": 1767225600, "owned_by": "ds4.c",
            "name": "DeepSeek V4 Flash", "context_length": ctx,
            "top_provider": {"context_length": ctx, "max_completion_tokens": min(tokens, ctx),
                             "is_moderated": False},
            "supported_parameters": ["tools", "tool_choice", "response_format", "max_tokens", "temperature",
                                     "top_p", "top_k", "min_p", "stop", "seed", "stream", "reasoning_effort"]}


def _json(body: dict, status: int = 200, headers: dict | None = None) -> Response:
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":")) + "\n"
    return Response(text, status_code=status, media_type="application/json", headers=headers)


def _error(path: str, err: ApiError, headers: dict | None = None) -> Response:
    return _json(error_body(path, err), err.status, headers)


class CommonHeaders:
    """ASGI middleware: Connection: close on every response, CORS when enabled."""

    def __init__(self, app, cors: bool):
        self.app, self.cors = app, cors

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        extra = [(b"connection", b"close")]
        if self.cors:
            extra += [(k.lower().encode(), v.encode()) for k, v in CORS.items()]

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"connection"]
                message = dict(message, headers=headers + extra)
            await send(message)

        return await self.app(scope, receive, send_with_headers)


def _allowed(path: str) -> str | None:
    if path in POST_PATHS:
        return "POST, OPTIONS"
    if path in GET_PATHS or path.startswith("/v1/models/"):
        return "GET, OPTIONS"
    return None


def create_app(options, preparer, worker) -> FastAPI:
    app = FastAPI(title="ds4-server", docs_url=None, redoc_url=None)
    app.add_middleware(CommonHeaders, cors=options.cors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        path = request.url.path
        allow = _allowed(path)
        if exc.status_code == 405 and allow:
            return _error(path, ApiError(405, "method not allowed"), {"Allow": allow})
        return _error(path, ApiError(404, "unknown endpoint"))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _error(request.url.path, exc)

    @app.exception_handler(Exception)
    async def server_fault(request: Request, exc: Exception):
        return _error(request.url.path, ApiError(500, f"internal error: {type(exc).__name__}"))

    @app.options("/{path:path}")
    async def preflight(path: str):
        return Response(status_code=204)

    @app.get("/health")
    async def health():
        return _json({"status": "ok", "queued": worker.queue.qsize()})

    @app.get("/v1/models")
    async def models():
        return _json({"object": "list", "data": [model_object(options.ctx, options.tokens)]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != MODEL_ID:
            raise ApiError(404, "unknown model", "model", "model_not_found")
        return _json(model_object(options.ctx, options.tokens))

    async def generate(request: Request, api: str):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            raise ApiError(413 if length.isdigit() else 400,
                           "request body too large" if length.isdigit() else "bad HTTP request")
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise ApiError(413, "request body too large")
        body = read_json(raw)
        job = await run_in_threadpool(preparer.build, api, body, raw)
        return await _run(api, job)

    async def _run(api: str, job):
        job.bind(asyncio.get_running_loop())
        worker.submit(job)
        projector = _projector(api, job)
        if job.params.stream:
            # The SSE headers go out at the first prefill chunk or when generation
            # starts (server.md §7.3): a prefill that fails before is an HTTP error.
            try:
                first = await job.events.get()
            except BaseException:
                job.cancelled.set()
                raise
            if first[0] == "fail":
                raise ApiError(first[1], first[2])
            return StreamingResponse(pump(job, projector, first), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        event = await collect(job)
        if event[0] == "fail":
            raise ApiError(event[1], event[2])
        return _json(_final(api, job, projector, event[1]), headers={"x-ds4-prefilled-tokens": str(
            event[1].write_tokens)})

    for path, api in POST_PATHS.items():
        async def endpoint(request: Request, api=api):
            return await generate(request, api)
        app.add_api_route(path, endpoint, methods=["POST"])
    return app


def _projector(api: str, job):
    p = job.params
    if api == "chat":
        return openai.ChatStream(p.model, p.include_usage)
    if api == "completion":
        return openai.CompletionStream(p.model, p.include_usage)
    if api == "anthropic":
        return anthropic.MessageStream(p.model)
    return responses.ResponseStream(responses.Output(p.model, job.want_summary, p.mode))


def _final(api: str, job, projector, result) -> dict:
    if api == "chat":
        return openai.chat_response(job.number, job.params.model, result)
    if api == "completion":
        return openai.completion_response(job.number, job.params.model, result)
    if api == "anthropic":
        return anthropic.message_response(job.number, job.params.model, result)
    return projector.out.response(result)
