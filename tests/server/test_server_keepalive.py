"""Prefill keepalive (server.md §7.3, §8): a streaming request whose prefill outlasts the
keepalive interval gets `: prefill` SSE comments, at most one per interval, before its
first event; a short prefill gets none. A prefill that fails before any byte was sent is
an HTTP 500 with the engine's error text; after the comments began, it is the SSE error
event of server.md §3.1.

The app runs on the fake engine behind a real uvicorn on 127.0.0.1 (so bytes reach the
client as the server writes them, unlike Starlette's in-process TestClient). The fake
session's `sync` is made slow: CHUNKS prefill chunks of CHUNK_S seconds each, reporting
progress after each like the real session. The interval (`stream.KEEPALIVE_S`, 5 s in
production) is shortened to INTERVAL for the test. Read at the byte level with httpx.
"""

from __future__ import annotations

import re
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from server_live import free_port
from server_samples import CHAT, USER, events

from dwarfstar.server import stream

INTERVAL = 0.2
CHUNKS, CHUNK_S = 10, 0.1
FORCED = "Hmm</think>Hello there."
COMMENT = b": prefill\n\n"
BODIES = {
    CHAT: {"messages": USER, "stream": True},
    "/v1/completions": {"prompt": "x", "stream": True},
    "/v1/messages": {"messages": USER, "max_tokens": 50, "stream": True},
    "/v1/responses": {"input": "weather?", "stream": True},
}


class SlowPrefill:
    """Replaces one session's sync: `n_chunks` chunks of CHUNK_S seconds, progress after each."""

    def __init__(self, session):
        self.session, self.sync = session, session.sync
        self.n_chunks = CHUNKS
        # Raise this after the chunks instead of finishing the prefill.
        self.error: Exception | None = None
        self.started = self.finished = 0.0
        session.sync = self

    def __call__(self, tokens, progress=None):
        self.started = time.monotonic()
        for i in range(self.n_chunks):
            time.sleep(CHUNK_S)
            if progress is not None:
                progress(i + 1, self.n_chunks)
        self.finished = time.monotonic()
        if self.error is not None:
            raise self.error
        return self.sync(tokens)


@pytest.fixture
def served(make_server, monkeypatch):
    """(base URL, SlowPrefill) of the fake-engine app behind uvicorn."""
    monkeypatch.setattr(stream, "KEEPALIVE_S", INTERVAL)
    fake = make_server(debug_forced_output=FORCED)
    slow = SlowPrefill(fake.session)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(fake.client.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", slow
    server.should_exit = True
    thread.join(timeout=10)


def read_stream(url: str, path: str) -> tuple[bytes, list[float]]:
    """The raw body and the arrival time of each `: prefill` comment."""
    body, arrivals = b"", []
    with httpx.stream("POST", url + path, json=BODIES[path], timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for chunk in response.iter_raw():
            body += chunk
            arrivals += [time.monotonic()] * (body.count(COMMENT) - len(arrivals))
    return body, arrivals


@pytest.mark.parametrize("path", list(BODIES))
def test_long_prefill_sends_comments_before_the_first_event(served, path):
    url, slow = served
    body, arrivals = read_stream(url, path)
    head = re.match(rb"((?:: prefill\n\n)*)(event: |data: )", body)
    assert head is not None, body[:200]
    n_comments = head.group(1).count(COMMENT)
    # Nothing but the leading comments: no keepalive after the first event.
    assert body.count(COMMENT) == n_comments
    prefill_s = slow.finished - slow.started
    assert 2 <= n_comments <= prefill_s / INTERVAL + 1
    # Written while the prefill ran, not buffered until it ended.
    assert arrivals[0] < slow.finished

    # The events after the comments are the normal, complete sequence.
    parsed = events(httpx.Response(200, content=body[head.end(1):]))
    if path == "/v1/messages":
        assert parsed[0][0] == "message_start" and parsed[-1][0] == "message_stop"
    elif path == "/v1/responses":
        assert parsed[0][1]["type"] == "response.created" and parsed[-1][1]["type"] == "response.completed"
    else:
        assert parsed[-1][1] == "[DONE]"


def test_short_prefill_sends_no_comment(served):
    url, slow = served
    slow.n_chunks = 1
    body, _ = read_stream(url, CHAT)
    assert body.startswith(b"data: ") and COMMENT not in body
    parsed = events(httpx.Response(200, content=body))
    assert parsed[0][1]["choices"][0]["delta"] == {"role": "assistant"} and parsed[-1][1] == "[DONE]"


def test_official_client_reads_through_the_comments(served):
    url, _ = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
    chunks = list(client.chat.completions.create(model="deepseek-v4-flash", messages=USER, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "Hmm"
    assert "".join(d.content or "" for d in deltas) == "Hello there."
    assert chunks[-1].choices[0].finish_reason == "stop"


ERROR_SHAPES = {
    CHAT: {"error": {"message": "out of memory", "type": "server_error", "param": None, "code": None}},
    "/v1/messages": {"type": "error", "error": {"type": "api_error", "message": "out of memory"}},
    "/v1/responses": {"error": {"message": "out of memory", "type": "server_error", "param": None, "code": None}},
}


@pytest.mark.parametrize("path", list(ERROR_SHAPES))
def test_prefill_failure_before_any_byte_is_http_500(served, path):
    url, slow = served
    slow.n_chunks, slow.error = 0, RuntimeError("out of memory")
    response = httpx.post(url + path, json=BODIES[path], timeout=30)
    assert response.status_code == 500
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == ERROR_SHAPES[path]
    # Non-streaming gets the same answer, and the server keeps serving.
    response = httpx.post(url + path, json=dict(BODIES[path], stream=False), timeout=30)
    assert response.status_code == 500 and response.json() == ERROR_SHAPES[path]
    slow.error = None
    assert httpx.post(url + path, json=BODIES[path], timeout=30).status_code == 200


@pytest.mark.parametrize("path", list(ERROR_SHAPES))
def test_prefill_failure_after_keepalives_is_an_sse_error_event(served, path):
    url, slow = served
    slow.error = RuntimeError("out of memory")
    body, _ = read_stream(url, path)
    comments, _, rest = body.rpartition(COMMENT)
    assert comments and not comments.replace(COMMENT, b"")
    # Only the error event follows: no role chunk, message_start or response.created first.
    assert events(httpx.Response(200, content=rest)) == [("error", ERROR_SHAPES[path])]


def test_production_interval_is_five_seconds():
    assert stream.KEEPALIVE_S == 5.0
