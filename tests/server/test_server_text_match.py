"""Text-prefix reuse is byte-exact (server.md §9.2 steps 6-7).

A turn cut inside a UTF-8 character leaves the partial character's bytes in the
live KV while the client receives U+FFFD for them. A client that sends that answer
back renders a prompt whose bytes differ from the KV at that point, so it must not
continue from the live KV by text. Oracles: the bytes of the KV's tokens against
the bytes of the rendered prompt (they must be identical up to the effective
prompt length), and the trace's cache source. A positive control shows that a
non-canonical but whole-character tokenization still continues by text.
"""

from __future__ import annotations

from server_samples import CHAT

ANSWER = "ab€"
USER = [{"role": "user", "content": "say it"}]
EURO = "€".encode()


def forced_tokens(server, pieces: list[bytes]) -> list[int]:
    """One token per byte string (each a single token of the tiny vocabulary)."""
    tok = server.engine.tokenizer
    ids = []
    for piece in pieces:
        (token,) = [i for i in range(tok.vocab_size) if tok.token_bytes(i) == piece and not tok.is_added(i)]
        ids.append(token)
    return ids


def trace_blocks(server) -> list[tuple[str, str]]:
    """(cache source, rendered prompt) per request."""
    trace = open(server.options.trace).read()
    out = []
    for block in trace.split("--- cache decision ---")[1:]:
        source = block.split("cache_source: ", 1)[1].split("\n", 1)[0]
        prompt = block.split("--- rendered prompt ---\n", 1)[1].split("\n\n--- generated text ---", 1)[0]
        out.append((source, prompt))
    return out


def kv_bytes(server, n: int) -> bytes:
    tok = server.engine.tokenizer
    return b"".join(tok.token_bytes(t) for t in server.session.tokens[:n])


def first_turn(server, **fields) -> dict:
    return server.client.post(CHAT, json={"messages": USER, **fields}).json()


def second_turn(server, answer_sent_back: str) -> dict:
    history = USER + [{"role": "assistant", "content": answer_sent_back}, {"role": "user", "content": "more"}]
    return server.client.post(CHAT, json={"messages": history, "reasoning_effort": "none", "max_tokens": 1}).json()


def test_turn_cut_inside_a_character_does_not_match_by_text(make_server):
    server = make_server(debug_forced_output=ANSWER)
    # 4 tokens: "a", "b" and the first two bytes of the 3-byte "€" (finish: length).
    one = first_turn(server, reasoning_effort="none", max_tokens=4)
    assert one["choices"][0]["message"]["content"] == "ab\ufffd"
    assert kv_bytes(server, len(server.session.tokens)).endswith(b"ab" + EURO[:2])
    two = second_turn(server, "ab\ufffd")
    (_, _), (source, prompt) = trace_blocks(server)
    assert source not in ("memory-text", "thinking-visible")
    n = two["usage"]["prompt_tokens"]
    assert kv_bytes(server, n) == prompt.encode(), "the KV holds exactly the rendered prompt"


def test_thinking_turn_ending_inside_a_character_leaves_no_visible_binding(make_server):
    server = make_server()
    # Forced reasoning, then "ab" + the first two bytes of "€", then EOS (finish: stop).
    tok = server.engine.tokenizer
    server.worker.forced = tok.encode("hmm</think>ab") + forced_tokens(server, [EURO[:1], EURO[1:2]])
    one = first_turn(server, max_tokens=50)
    assert one["choices"][0]["finish_reason"] == "stop"
    assert one["choices"][0]["message"]["content"] == "ab\ufffd"
    assert kv_bytes(server, len(server.session.tokens)).endswith(b"ab" + EURO[:2])
    two = second_turn(server, "ab\ufffd")
    (_, _), (source, prompt) = trace_blocks(server)
    assert source not in ("memory-text", "thinking-visible")
    assert kv_bytes(server, two["usage"]["prompt_tokens"]) == prompt.encode()


def test_whole_characters_in_another_tokenization_still_match_by_text(make_server):
    server = make_server()
    # "the" as t + h + e, while BPE of the rendered prompt gives t + he: no token
    # prefix, but the bytes are the same.
    server.worker.forced = forced_tokens(server, [b"t", b"h", b"e"])
    one = first_turn(server, reasoning_effort="none", max_tokens=50)
    assert one["choices"][0]["message"]["content"] == "the"
    two = second_turn(server, "the")
    (_, _), (source, prompt) = trace_blocks(server)
    assert source == "memory-text"
    held = one["usage"]["prompt_tokens"] + one["usage"]["completion_tokens"]
    assert two["usage"]["prompt_tokens_details"]["cached_tokens"] == held
    assert kv_bytes(server, two["usage"]["prompt_tokens"]) == prompt.encode()
