"""Thinking-mode sampling (server.md §6): the client's knobs are ignored and every token is
drawn with temperature 1, top_p 1, min_p 0.05, top_k 0; chat mode keeps the knobs.

In-process on the fake engine, whose logits are replaced here by a fixed four-letter
distribution that depends on the history. Oracle: the token sequence a hand-written
sampler produces from the same logits, following server.md §6.1 (xorshift64* seeded
with the request's `seed`, weights exp(l - l_max) walked in ascending token id, weights
below min_p dropped; temperature <= 0 is argmax). The distribution separates the knobs:
the fourth letter (weight e^-4 < 0.05) is kept only without min_p, the third (e^-2.5)
only with min_p <= 0.08, and greedy always takes the first. Anthropic and Responses
requests carry no seed (server.md §4.4, §4.5), so the worker's fresh random seed is
pinned to UNSEEDED here.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from server_fake import VOCAB, FakeSession
from server_samples import CHAT, USER

from dwarfstar.server import worker

SEED = 12345
UNSEEDED = 777
N_TOKENS = 40
LETTER_LOGITS = (5.0, 4.0, 2.5, 1.0)
# Knobs a client might send; thinking mode must ignore every one of them.
KNOBS = {"temperature": 0.0, "top_p": 0.2, "top_k": 1, "min_p": 0.9}


def letter_logits(engine, tokens: list[int]) -> torch.Tensor:
    logits = torch.full((VOCAB,), -math.inf)
    first = (sum(tokens) * 7 + len(tokens)) % 26
    for rank, value in enumerate(LETTER_LOGITS):
        logits[engine.letter_ids[(first + rank) % 26]] = value
    return logits


@pytest.fixture
def server(make_server, monkeypatch):
    monkeypatch.setattr(FakeSession, "logits", lambda self: letter_logits(self.engine, self.tokens))
    # The worker draws `randbits(63) + 1` for a request without a seed.
    monkeypatch.setattr(worker, "secrets", SimpleNamespace(randbits=lambda bits: UNSEEDED - 1))
    return make_server()


def xorshift_uniforms(seed: int):
    mask = (1 << 64) - 1
    state = seed
    while True:
        state ^= state >> 12
        state ^= (state << 25) & mask
        state ^= state >> 27
        yield (((state * 0x2545F4914F6CDD1D) & mask) >> 40 & 0xFFFFFF) / 16777216


def expected_tokens(engine, prompt: list[int], temperature: float, min_p: float, seed: int) -> list[int]:
    """server.md §6.1 steps 1-2 (top_k 0, top_p 1) on the replaced logits."""
    tokens, out, uniforms = list(prompt), [], xorshift_uniforms(seed)
    for _ in range(N_TOKENS):
        logits = letter_logits(engine, tokens).tolist()
        finite = [(i, l) for i, l in enumerate(logits) if l != -math.inf]
        top = max(l for _, l in finite)
        if temperature <= 0:
            token = min(i for i, l in finite if l == top)
        else:
            weights = [(i, math.exp((l - top) / temperature)) for i, l in finite]
            weights = [(i, w) for i, w in weights if w >= min_p]
            r = next(uniforms) * sum(w for _, w in weights)
            token = None
            for i, w in weights:
                r -= w
                if r <= 0:
                    token = i
                    break
            token = token if token is not None else max(weights, key=lambda iw: iw[1])[0]
        tokens.append(token)
        out.append(token)
    return out


def generated(server, api: str, body: dict) -> tuple[list[int], list[int]]:
    """(prompt tokens, generated tokens) of one request, from the live session; checks
    that the text the client got is the decoded generation."""
    path = {"chat": CHAT, "anthropic": "/v1/messages", "responses": "/v1/responses"}[api]
    reply = server.client.post(path, json=dict(body, max_tokens=N_TOKENS))
    assert reply.status_code == 200, reply.text
    reply = reply.json()
    if api == "chat":
        n_prompt, message = reply["usage"]["prompt_tokens"], reply["choices"][0]["message"]
        text = (message.get("reasoning_content") or "") + message["content"]
    elif api == "anthropic":
        n_prompt = reply["usage"]["cache_read_input_tokens"] + reply["usage"]["cache_creation_input_tokens"]
        text = "".join(b.get("text", "") + b.get("thinking", "") for b in reply["content"])
    else:
        n_prompt = reply["usage"]["input_tokens"]
        text = "".join(p["text"] for item in reply["output"] for p in item.get("content", []))
    live = server.session.tokens
    assert len(live) == n_prompt + N_TOKENS
    assert server.engine.tokenizer.decode(live[n_prompt:]) == text
    return live[:n_prompt], live[n_prompt:]


@pytest.mark.parametrize("api, body", [
    ("chat", {"messages": USER, "seed": SEED, **KNOBS}),
    ("anthropic", {"messages": USER, "temperature": 0.0, "top_p": 0.2, "top_k": 1}),
    ("responses", {"input": "weather?", "temperature": 0.0, "top_p": 0.2}),
])
def test_thinking_mode_ignores_client_knobs(server, api, body):
    prompt, tokens = generated(server, api, body)
    seed = body.get("seed", UNSEEDED)
    assert server.engine.tokenizer.decode(prompt).endswith("<think>")
    assert tokens == expected_tokens(server.engine, prompt, 1.0, 0.05, seed)
    # The knobs would have mattered: greedy and min_p 0 give other sequences.
    assert tokens != expected_tokens(server.engine, prompt, 0.0, 0.05, seed)
    assert tokens != expected_tokens(server.engine, prompt, 1.0, 0.0, seed)


def test_chat_mode_keeps_client_knobs(server):
    chat = {"messages": USER, "reasoning_effort": "none", "seed": SEED}
    prompt, tokens = generated(server, "chat", dict(chat, temperature=0))
    assert server.engine.tokenizer.decode(prompt).endswith("</think>")
    assert tokens == expected_tokens(server.engine, prompt, 0.0, 0.05, SEED)
    prompt, tokens = generated(server, "chat", dict(chat, min_p=0))
    assert tokens == expected_tokens(server.engine, prompt, 1.0, 0.0, SEED)
    # Defaults when the client sends nothing: the same as thinking mode's fixed settings.
    prompt, tokens = generated(server, "chat", {"messages": USER, "thinking": {"type": "disabled"}})
    assert tokens == expected_tokens(server.engine, prompt, 1.0, 0.05, UNSEEDED)
