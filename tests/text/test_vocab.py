"""Vocabulary metadata: real tokenizer.json content and the synthetic tiny vocabulary."""

import json

from dwarfstar import shape
from dwarfstar.text import vocab


def _tokenizer_json() -> dict:
    return json.loads(vocab._package_tokenizer_json().read_text(encoding="utf-8"))


def test_real_vocab_matches_tokenizer_json():
    meta = vocab.real_vocab_metadata()
    data = _tokenizer_json()
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 129280
    for text, i in data["model"]["vocab"].items():
        assert tokens[i] == text
    added = {a["id"]: a["content"] for a in data["added_tokens"]}
    assert {i for i, t in enumerate(types) if t in vocab.ADDED_TOKEN_TYPES} == set(added)
    assert all(tokens[i] == s for i, s in added.items())
    user_defined = {tokens[i] for i, t in enumerate(types) if t == vocab.TOKEN_USER_DEFINED}
    assert user_defined == {"<think>", "</think>", "｜DSML｜", "<dsml:", "</dsml:", "<｜/table>｜"}
    assert meta["tokenizer.ggml.merges"] == data["model"]["merges"]
    assert len(meta["tokenizer.ggml.merges"]) == 127741
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (0, 1)
    assert meta["tokenizer.ggml.add_bos_token"] is False and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "joyai-llm"
    assert set(meta) == set(vocab.VOCAB_VALUE_TYPES)


def test_real_vocab_special_ids():
    tokens = vocab.real_vocab_metadata()["tokenizer.ggml.tokens"]
    expected = {shape.USER: 128803, shape.ASSISTANT: 128804, shape.THINK_OPEN: 128821,
                shape.THINK_CLOSE: 128822, shape.DSML: 128825, shape.LATEST_REMINDER: 128828,
                "<｜action｜>": 128829, "<｜read_url｜>": 128845}
    for s, i in expected.items():
        assert tokens.index(s) == i


def test_tiny_vocab_shape():
    meta = vocab.tiny_vocab_metadata(512)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == len(set(tokens)) == 512
    assert tokens[0] == shape.BOS and tokens[1] == shape.EOS
    for s in shape.REQUIRED_SPECIAL_TOKENS:
        assert types[tokens.index(s)] in vocab.ADDED_TOKEN_TYPES
    assert set(vocab.bytes_to_unicode().values()) <= set(tokens)
    for merge in meta["tokenizer.ggml.merges"]:
        left, right = merge.split(" ")
        assert left in tokens and right in tokens and left + right in tokens
    assert set(meta) == set(vocab.VOCAB_VALUE_TYPES)


def test_tiny_vocab_minimum():
    assert len(vocab.tiny_vocab_metadata(vocab.TINY_VOCAB_MIN)["tokenizer.ggml.tokens"]) == vocab.TINY_VOCAB_MIN
    try:
        vocab.tiny_vocab_metadata(vocab.TINY_VOCAB_MIN - 1)
    except ValueError as e:
        assert "minimum" in str(e)
    else:
        raise AssertionError("a too-small vocab_size must be refused")


def test_bytes_to_unicode_is_a_bijection_without_spaces():
    table = vocab.bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert all(not ch.isspace() and ch.isprintable() for ch in table.values())
    assert table[ord(" ")] == "Ġ"
