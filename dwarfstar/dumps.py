"""Byte-exact diagnostic outputs of `ds4`: `--dump-tokens` and `--dump-logprobs` (cli.md §2.5, §2.6).

Contract:
- `format_token_dump(ids, vocab)` is the `--dump-tokens` text: the id list as
  `[a, b, c]`, then one line per in-range id, `%6d` + two spaces + the raw vocabulary
  string (GPT-2 byte alphabet for normal tokens, literal text for added ones).
- `json_string(data: bytes)` writes token bytes as a JSON string exactly like ds4:
  `"` and `\\` escaped, `\\n \\r \\t`, other bytes < 0x20 as `\\u00xx`; when the bytes are
  not valid UTF-8 every byte >= 0x80 becomes `\\u00xx` (the `bytes` array is then the
  authoritative value); otherwise UTF-8 is written as is.
- `LogprobWriter` streams the `--dump-logprobs` JSON: a fixed header, one line per
  step, floats as C's `%.9g`.
"""

from __future__ import annotations

from typing import BinaryIO

import torch


def format_token_dump(ids: list[int], vocab: list[str]) -> str:
    lines = ["[" + ", ".join(str(i) for i in ids) + "]"]
    lines += [f"{i:6d}  {vocab[i]}" for i in ids if 0 <= i < len(vocab)]
    return "\n".join(lines) + "\n"


def _is_utf8(data: bytes) -> bool:
    # Python's strict decoder rejects what ds4's json_utf8_valid rejects: overlongs,
    # surrogates, code points above U+10FFFF and truncated sequences.
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


_SHORT_ESCAPES = {0x22: b'\\"', 0x5C: b"\\\\", 0x0A: b"\\n", 0x0D: b"\\r", 0x09: b"\\t"}


def json_string(data: bytes) -> bytes:
    is_valid = _is_utf8(data)
    out = bytearray(b'"')
    for b in data:
        if b in _SHORT_ESCAPES:
            out += _SHORT_ESCAPES[b]
        elif b < 0x20 or (b >= 0x80 and not is_valid):
            out += b"\\u%04x" % b
        else:
            out.append(b)
    out += b'"'
    return bytes(out)


def fmt_g9(x: float) -> str:
    """C printf `%.9g` (Python's `g` matches it, including inf/nan spelling)."""
    return format(x, ".9g")


def json_token(token_id: int, data: bytes) -> bytes:
    return b'{"id":%d,"text":%s,"bytes":[%s]}' % (token_id, json_string(data), ",".join(map(str, data)).encode())


def top_logprobs(logits: torch.Tensor, k: int) -> list[tuple[int, float, float]]:
    """The k best (id, logit, logprob) by descending logprob; ties keep the lower id first."""
    logits = logits.float()
    # float64 normalisation, then float32 values like ds4's token scores: the printed
    # logprob is the correctly rounded float32 of the exact value.
    logprobs = torch.log_softmax(logits.double(), dim=-1).float()
    k = min(k, logits.numel())
    # A stable descending sort gives a deterministic tie order (spec: tie order UNCERTAIN).
    order = torch.sort(logprobs, descending=True, stable=True).indices[:k]
    return [(int(i), float(logits[i]), float(logprobs[i])) for i in order]


class LogprobWriter:
    """Writes the --dump-logprobs file step by step; `close()` writes the footer."""

    def __init__(self, out: BinaryIO, token_bytes, prompt_tokens: int, ctx: int, top_k: int):
        self.out = out
        self.token_bytes = token_bytes
        self.top_k = top_k
        self.n_steps = 0
        header = '{\n  "source":"ds4",\n  "prompt_tokens":%d,\n  "ctx":%d,\n  "top_k":%d,\n  "steps":[\n'
        out.write((header % (prompt_tokens, ctx, top_k)).encode())

    def step(self, selected: int, logits: torch.Tensor) -> None:
        parts = [b",\n" if self.n_steps else b"", b'    {"step":%d,"selected":' % self.n_steps]
        parts.append(json_token(selected, self.token_bytes(selected)))
        entries = []
        for token_id, logit, logprob in top_logprobs(logits, self.top_k):
            entry = b'{"token":' + json_token(token_id, self.token_bytes(token_id))
            entry += f',"logit":{fmt_g9(logit)},"logprob":{fmt_g9(logprob)}}}'.encode()
            entries.append(entry)
        parts += [b',"top_logprobs":[', b",".join(entries), b"]}"]
        self.out.write(b"".join(parts))
        self.n_steps += 1

    def close(self) -> None:
        self.out.write(b"\n  ]\n}\n")
