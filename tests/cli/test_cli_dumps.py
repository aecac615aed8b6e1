"""`--dump-tokens` and `--dump-logprobs` exact formats (cli.md §2.5, §2.6, §10 item 3).

Oracles: expected bytes written out by hand from the spec (and ds4's json_write_string
rules); logprobs recomputed in float64 with `math` (tolerance 1e-6 absolute: the dump
computes log-softmax in float32 and prints 9 significant digits)."""

import io
import json
import math

import pytest
import torch

from dwarfstar.cli import main
from dwarfstar.dumps import LogprobWriter, format_token_dump, json_string, top_logprobs


def test_token_dump_layout():
    vocab = ["<｜begin▁of▁sentence｜>", "a", "Ġb", "c"]
    assert format_token_dump([0, 2, 99, 123456], vocab) == (
        "[0, 2, 99, 123456]\n"
        "     0  <｜begin▁of▁sentence｜>\n"
        "     2  Ġb\n"
    )
    assert format_token_dump([], vocab) == "[]\n"


@pytest.mark.parametrize("data, expected", [
    (b"Ada", b'"Ada"'),
    (b'a"b\\c', b'"a\\"b\\\\c"'),
    (b"\n\r\t\x01\x1f ", b'"\\n\\r\\t\\u0001\\u001f "'),
    ("è€".encode(), '"è€"'.encode()),
    # Invalid UTF-8 (a lone continuation byte, a truncated 3-byte char): every byte >= 0x80 escaped.
    (b"\x80a", b'"\\u0080a"'),
    (b"\xe2\x82", b'"\\u00e2\\u0082"'),
    # Overlong and surrogate encodings are invalid for ds4 too.
    (b"\xc0\xaf", b'"\\u00c0\\u00af"'),
    (b"\xed\xa0\x80", b'"\\u00ed\\u00a0\\u0080"'),
    (b"\x7f", b'"\x7f"'),
])
def test_json_string_matches_ds4_escaping(data, expected):
    assert json_string(data) == expected
    assert json.loads(expected) is not None


def test_logprob_file_exact_layout():
    vocab = {0: b"A", 1: b"\n", 2: b"\xe2"}
    out = io.BytesIO()
    w = LogprobWriter(out, vocab.__getitem__, prompt_tokens=21, ctx=16384, top_k=2)
    w.step(0, torch.tensor([2.0, 0.0, 0.0]))
    w.step(2, torch.tensor([0.0, 0.0, 1.0]))
    w.close()
    lp_a = 2.0 - math.log(math.exp(2) + 2)
    lp_b = -math.log(math.exp(2) + 2)
    lp_c = 1.0 - math.log(math.exp(1) + 2)
    lp_d = -math.log(math.exp(1) + 2)
    g = lambda x: format(float(torch.tensor(x, dtype=torch.float32)), ".9g")
    expected = (
        '{\n  "source":"ds4",\n  "prompt_tokens":21,\n  "ctx":16384,\n  "top_k":2,\n  "steps":[\n'
        '    {"step":0,"selected":{"id":0,"text":"A","bytes":[65]},"top_logprobs":['
        f'{{"token":{{"id":0,"text":"A","bytes":[65]}},"logit":2,"logprob":{g(lp_a)}}},'
        f'{{"token":{{"id":1,"text":"\\n","bytes":[10]}},"logit":0,"logprob":{g(lp_b)}}}]}},\n'
        '    {"step":1,"selected":{"id":2,"text":"\\u00e2","bytes":[226]},"top_logprobs":['
        f'{{"token":{{"id":2,"text":"\\u00e2","bytes":[226]}},"logit":1,"logprob":{g(lp_c)}}},'
        f'{{"token":{{"id":0,"text":"A","bytes":[65]}},"logit":0,"logprob":{g(lp_d)}}}]}}'
        "\n  ]\n}\n"
    )
    assert out.getvalue().decode() == expected
    doc = json.loads(expected)
    assert doc["steps"][0]["top_logprobs"][0]["logprob"] == pytest.approx(lp_a, abs=1e-6)


def test_logprob_file_with_no_steps():
    out = io.BytesIO()
    LogprobWriter(out, lambda i: b"", 5, 6, 20).close()
    assert out.getvalue() == b'{\n  "source":"ds4",\n  "prompt_tokens":5,\n  "ctx":6,\n  "top_k":20,\n  "steps":[\n\n  ]\n}\n'


def test_top_logprobs_order_and_values():
    logits = torch.tensor([0.5, 3.0, -1.0, 3.0, 2.0])
    got = top_logprobs(logits, 4)
    assert [i for i, _, _ in got] == [1, 3, 4, 0]
    norm = math.log(sum(math.exp(x) for x in logits.tolist()))
    for i, logit, logprob in got:
        assert logit == logits[i].item()
        assert logprob == pytest.approx(logits[i].item() - norm, abs=1e-6)


def test_dump_tokens_end_to_end_on_a_vocabulary_only_file(tmp_path, capsys, tok):
    from dwarfstar.gguf.writer import write_gguf
    from dwarfstar.text import vocab

    path = tmp_path / "vocab.gguf"
    write_gguf(path, vocab.tiny_vocab_metadata(512), [])
    text = "<｜begin▁of▁sentence｜><｜User｜>the cat<think>"
    assert main(["-m", str(path), "--dump-tokens", "-p", text]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected_ids = tok.encode(text)
    assert lines[0] == "[" + ", ".join(map(str, expected_ids)) + "]"
    assert lines[1] == f"{expected_ids[0]:6d}  <｜begin▁of▁sentence｜>"
    assert lines[2].endswith("  <｜User｜>") and lines[-1].endswith("  <think>")
    # Raw vocabulary strings: a leading space shows as the byte-level 'Ġ'.
    assert any(line[8:].startswith("Ġ") for line in lines[1:])
    assert len(lines) == 1 + len(expected_ids)
    strings = vocab.tiny_vocab_metadata(512)["tokenizer.ggml.tokens"]
    assert lines[1:] == [f"{i:6d}  {strings[i]}" for i in expected_ids]
