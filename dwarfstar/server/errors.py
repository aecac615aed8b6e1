"""API errors and their two JSON shapes (server.md §3).

Contract: request parsing raises `ApiError(status, message, param, code, extra)`;
the app turns it into the error body of the API the path belongs to:
`openai_error(err)` (chat, completions, responses, models, unknown paths) or
`anthropic_error(err)` (paths under /v1/messages). `extra` carries the two
context-length fields (`n_prompt_tokens`, `n_ctx`) kept from ds4.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ApiError(Exception):
    status: int
    message: str
    param: str | None = None
    code: str | None = None
    extra: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.status} {self.message}"


def invalid_json(param: str | None = None) -> ApiError:
    """The catch-all 400 for unreadable bodies and wrongly typed fields."""
    return ApiError(400, "invalid JSON request", param)


def context_exceeded(n_prompt: int, n_ctx: int, param: str | None) -> ApiError:
    message = f"Prompt has {n_prompt} tokens, but the configured context size is {n_ctx} tokens"
    extra = {"n_prompt_tokens": n_prompt, "n_ctx": n_ctx}
    return ApiError(400, message, param, "context_length_exceeded", extra)


def openai_error(err: ApiError) -> dict:
    kind = "server_error" if err.status >= 500 else "invalid_request_error"
    body = {"message": err.message, "type": kind, "param": err.param, "code": err.code}
    body.update(err.extra)
    return {"error": body}


def anthropic_error(err: ApiError) -> dict:
    if err.status >= 500:
        kind = "api_error"
    elif err.status == 404:
        kind = "not_found_error"
    elif err.status == 413:
        kind = "request_too_large"
    else:
        kind = "invalid_request_error"
    body = {"type": kind, "message": err.message}
    body.update(err.extra)
    return {"type": "error", "error": body}


def error_body(path: str, err: ApiError) -> dict:
    """The error body for `path`: Anthropic shape under /v1/messages, else OpenAI."""
    if path.startswith("/v1/messages"):
        return anthropic_error(err)
    return openai_error(err)
