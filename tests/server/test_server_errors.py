"""Bad input: real 4xx codes in each API's own error shape, and the server keeps serving
(server.md §3, §13). Runs in-process on the fake engine; the oracle is the spec's table."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]

# (path, body (dict or raw bytes), status, message substring, param)
CASES = [
    ("malformed-json", CHAT, b'{"messages": [', 400, "invalid JSON request", None),
    ("not-object", CHAT, b"[1, 2]", 400, "invalid JSON request", None),
    ("not-utf8", CHAT, b'{"messages": "\xff"}', 400, "invalid JSON request", None),
    ("lone-surrogate", CHAT, b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "invalid JSON", None),
    ("nesting-257", CHAT, b'{"x": ' + b"[" * 257 + b"]" * 257 + b"}", 400, "invalid JSON request", None),
    ("stream-string", CHAT, {"messages": USER, "stream": "true"}, 400, "invalid JSON request", "stream"),
    ("max-tokens-string", CHAT, {"messages": USER, "max_tokens": "5"}, 400, "invalid JSON request", "max_tokens"),
    ("max-tokens-negative", CHAT, {"messages": USER, "max_tokens": -1}, 400, "max_tokens", "max_tokens"),
    ("missing-messages", CHAT, {"model": "x"}, 400, "missing messages", "messages"),
    ("empty-messages", CHAT, {"messages": []}, 400, "messages must not be empty", "messages"),
    ("messages-wrong-type", CHAT, {"messages": "hi"}, 400, "invalid JSON request", "messages"),
    ("unknown-role", CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "unsupported role: wizard",
     "messages"),
    ("empty-developer", CHAT, {"messages": [{"role": "developer", "content": ""}]}, 400,
     "developer message must have content", "messages"),
    ("bad-task", CHAT, {"messages": [{"role": "user", "content": "x", "task": "dance"}]}, 400, "unsupported task",
     "messages"),
    ("bad-effort", CHAT, {"messages": USER, "reasoning_effort": "extreme"}, 400, "invalid JSON request",
     "reasoning_effort"),
    ("bad-response-format", CHAT, {"messages": USER, "response_format": {"type": "yaml"}}, 400,
     "unsupported response_format", "response_format"),
    ("unknown-tool-id", CHAT, {"messages": USER + [{"role": "tool", "tool_call_id": "call_nope", "content": "1"}]},
     400, "call_nope", "messages"),
    ("missing-prompt", "/v1/completions", {"max_tokens": 1}, 400, "missing prompt", "prompt"),
    ("missing-input", "/v1/responses", {"model": "x"}, 400, "missing input", "input"),
    ("previous-response", "/v1/responses", {"input": "x", "previous_response_id": "resp_1"}, 400,
     "previous_response_id is not supported", "previous_response_id"),
    ("forced-tool-choice", "/v1/responses", {"input": "x", "tool_choice": {"type": "function", "name": "f"}}, 400,
     "forced tool_choice not supported", "tool_choice"),
    ("tool-choice-required", "/v1/responses", {"input": "x", "tool_choice": "required"}, 400,
     "tool_choice=required not supported", "tool_choice"),
    ("image-in-responses", "/v1/responses", {"input": [{"role": "user", "content": [{"type": "input_image"}]}]},
     400, "invalid JSON request", "input"),
    ("responses-unknown-call", "/v1/responses",
     {"input": [{"type": "function_call_output", "call_id": "call_zz", "output": "1"}]}, 400,
     "Responses continuation state is not available for call_id call_zz", "messages"),
]

ANTHROPIC_CASES = [
    ("malformed-json", b"{", 400, "invalid_request_error", "invalid JSON request"),
    ("missing-messages", {"max_tokens": 3}, 400, "invalid_request_error", "missing messages"),
    ("empty-messages", {"messages": [], "max_tokens": 3}, 400, "invalid_request_error", "messages must not be empty"),
    ("unknown-tool-use-id", {"max_tokens": 3, "messages": [
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "1"}]}]},
     400, "invalid_request_error", "Anthropic continuation state is not available for tool_use_id toolu_x"),
    ("negative-max-tokens", {"messages": USER, "max_tokens": -5}, 400, "invalid_request_error", "max_tokens"),
]


def _post(client, path, body):
    if isinstance(body, bytes):
        return client.post(path, content=body, headers={"content-type": "application/json"})
    return client.post(path, json=body)


@pytest.mark.parametrize("name,path,body,status,message,param", CASES, ids=[c[0] for c in CASES])
def test_openai_errors(server, name, path, body, status, message, param):
    response = _post(server.client, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert message in error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


@pytest.mark.parametrize("name,body,status,kind,message", ANTHROPIC_CASES, ids=[c[0] for c in ANTHROPIC_CASES])
def test_anthropic_errors(server, name, body, status, kind, message):
    response = _post(server.client, "/v1/messages", body)
    assert response.status_code == status, response.text
    payload = response.json()
    assert payload["type"] == "error"
    assert payload["error"]["type"] == kind
    assert message in payload["error"]["message"]


def test_context_too_long_both_shapes(make_server):
    server = make_server(ctx=64)
    long = [{"role": "user", "content": "word " * 100}]
    response = server.client.post(CHAT, json={"messages": long})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert error["n_ctx"] == 64 and error["n_prompt_tokens"] >= 64
    assert error["message"] == f"Prompt has {error['n_prompt_tokens']} tokens, but the configured context size is 64 tokens"
    response = server.client.post("/v1/messages", json={"messages": long, "max_tokens": 1})
    payload = response.json()
    assert response.status_code == 400 and payload["type"] == "error"
    assert payload["error"]["n_ctx"] == 64


def test_routing_errors_and_models(server):
    client = server.client
    assert client.get("/v1/nowhere").status_code == 404
    assert client.get("/v1/nowhere").json()["error"]["message"] == "unknown endpoint"
    wrong = client.get(CHAT)
    assert wrong.status_code == 405 and "POST" in wrong.headers["allow"]
    unknown = client.get("/v1/models/gpt-4")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert client.get("/v1/messages/count_tokens").json()["type"] == "error"
    model = client.get("/v1/models/deepseek-v4-flash").json()
    assert model["context_length"] == 4096 and model["top_provider"]["max_completion_tokens"] == 300
    assert client.get("/v1/models").json()["data"] == [model]
    preflight = client.options(CHAT)
    assert preflight.status_code == 204 and preflight.content == b""
    assert "access-control-allow-origin" not in preflight.headers
    assert client.get("/health").json()["status"] == "ok"


def test_cors_opt_in(make_server):
    client = make_server(cors=True).client
    for response in (client.options(CHAT), client.get("/v1/models"), client.get("/v1/nowhere")):
        assert response.headers["access-control-allow-origin"] == "*"
        assert response.headers["connection"] == "close"


def test_server_keeps_serving_after_errors(server):
    for _, path, body, *_ in CASES:
        _post(server.client, path, body)
    response = server.client.post(CHAT, json={"messages": USER, "max_tokens": 3, "reasoning_effort": "none"})
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 3


# Bounded fuzz: JSON values built from the fields the endpoints read, at any type.
FIELDS = ["messages", "model", "max_tokens", "max_completion_tokens", "max_output_tokens", "temperature", "top_p",
          "top_k", "min_p", "seed", "stop", "stop_sequences", "stream", "stream_options", "tools", "tool_choice",
          "reasoning_effort", "thinking", "think", "response_format", "prompt", "input", "system", "reasoning",
          "instructions", "text", "role", "content", "type", "tool_calls", "tool_call_id", "function", "name",
          "arguments", "tool_use_id", "call_id", "output", "status", "task"]
SCALARS = st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False, width=32) | \
    st.sampled_from(["user", "assistant", "tool", "system", "developer", "none", "high", "max", "text",
                     "function", "message", "tool_result", "tool_use", "enabled", "", "x"])
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) |
                    st.dictionaries(st.sampled_from(FIELDS), inner, max_size=4), max_leaves=12)
BODIES = st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6)
PATHS = st.sampled_from([CHAT, "/v1/completions", "/v1/responses", "/v1/messages"])


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    from server_fake import FakeServer
    server = FakeServer(tmp_path_factory.mktemp("fuzz"), tokens=2)
    yield server
    server.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=PATHS, body=BODIES)
def test_fuzz_no_server_errors(fuzz_server, path, body):
    body = dict(body, stream=False) if "stream" in body and body["stream"] is True else body
    body = {k: v for k, v in body.items() if k not in ("max_tokens", "max_output_tokens", "max_completion_tokens")}
    response = fuzz_server.client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code in (200, 400), response.text
    payload = response.json()
    if response.status_code == 400:
        assert payload["type"] == "error" if path == "/v1/messages" else "message" in payload["error"]
