"""Byte-level BPE tokenizer built from GGUF `tokenizer.ggml.*` metadata (gguf.md §7).

Contract:
- `encode(text)` gives exactly the ids of the release `tokenizer.json` (no BOS/EOS
  added): every added token (token_type CONTROL or USER_DEFINED) is matched
  atomically anywhere in the text; the spans between them go through the three
  `Split` pre-tokenizers of gguf.md §7.4, the GPT-2 byte mapping and BPE merges.
- Text that is not valid Unicode is "handled" by replacement, never by an error:
  `bytes` input is decoded as UTF-8 with errors="replace" and lone surrogates in a
  `str` become U+FFFD, then the result is tokenized as above. Output sides do the
  same at the bytes -> str boundary: `decode` and `stream_decoder` replace invalid
  UTF-8 with U+FFFD; `token_bytes` gives the exact bytes.
- `stream_decoder().push(id)` returns only complete characters; a character split
  across tokens is held back until its last byte arrives (or `flush()`), so the
  concatenation of all pushes plus `flush()` equals `decode(ids)`.

Bytes of a token: added tokens are their UTF-8 text; other tokens map each GPT-2
alphabet character back to its byte (a character outside the alphabet, which only
a foreign vocabulary could hold, is kept as its UTF-8).
"""

from __future__ import annotations

import codecs
import re

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from dwarfstar import shape
from dwarfstar.text.vocab import ADDED_TOKEN_TYPES, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_USER_DEFINED, bytes_to_unicode

# The release tokenizer.json pre-tokenizer: three isolating splits applied in sequence.
SPLIT_PATTERNS = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+"
    r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+",
)

# Without token_type only the real 129,280-token vocabulary is accepted (gguf.md §5.2).
REAL_VOCAB_SIZE = 129280
_REAL_ADDED_IDS = (range(0, 3), range(128000, REAL_VOCAB_SIZE))
_SURROGATE = re.compile("[\ud800-\udfff]")


def _token_types(metadata: dict, tokens: list[str]) -> list[int]:
    types = metadata.get("tokenizer.ggml.token_type")
    if types is not None:
        if len(types) != len(tokens):
            raise ValueError(f"tokenizer.ggml.token_type has {len(types)} entries, tokens has {len(tokens)}")
        return [int(t) for t in types]
    if len(tokens) != REAL_VOCAB_SIZE:
        raise ValueError("tokenizer.ggml.token_type is missing and the vocabulary is not the real 129,280-token one")
    types = [TOKEN_NORMAL] * len(tokens)
    for ids in _REAL_ADDED_IDS:
        for i in ids:
            types[i] = TOKEN_CONTROL
    return types


def _check_added(added: dict[str, int]) -> None:
    """Refuse what would make leftmost matching ambiguous or the renderer impossible."""
    for text in added:
        if not text:
            raise ValueError("an added token is empty")
        for a in range(len(text)):
            for b in range(a + 1, len(text) + 1):
                if (a, b) != (0, len(text)) and text[a:b] in added:
                    raise ValueError(f"added token {text[a:b]!r} is a substring of added token {text!r}")
    missing = [s for s in shape.REQUIRED_SPECIAL_TOKENS if s not in added]
    if missing:
        raise ValueError(f"special strings missing from the added tokens: {missing}")


class Tokenizer:
    """Text <-> token ids for one vocabulary; immutable after construction."""

    def __init__(self, tokens: list[str], types: list[int], merges: list[str], bos_id: int, eos_id: int):
        self.vocab_size = len(tokens)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self._tokens = tokens
        self._types = types
        vocab = {t: i for i, t in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise ValueError("tokenizer.ggml.tokens has duplicate entries")
        self._added = {t: i for i, t in enumerate(tokens) if types[i] in ADDED_TOKEN_TYPES}
        _check_added(self._added)
        self._hf = _build_hf(vocab, merges, self._added, types)
        self._bytes = _all_token_bytes(tokens, types)

    @classmethod
    def from_metadata(cls, metadata: dict) -> "Tokenizer":
        """Build from a GGUF metadata dict holding the `tokenizer.ggml.*` keys."""
        tokens = list(metadata["tokenizer.ggml.tokens"])
        merges = list(metadata["tokenizer.ggml.merges"])
        types = _token_types(metadata, tokens)
        bos = int(metadata.get("tokenizer.ggml.bos_token_id", tokens.index(shape.BOS)))
        eos = int(metadata.get("tokenizer.ggml.eos_token_id", tokens.index(shape.EOS)))
        return cls(tokens, types, merges, bos, eos)

    def encode(self, text: str | bytes) -> list[int]:
        """Token ids of `text`, added tokens recognised anywhere; nothing prepended."""
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8", errors="replace")
        elif _SURROGATE.search(text):
            text = _SURROGATE.sub("\ufffd", text)
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of `text` by byte-level BPE alone: added-token strings are NOT recognised.

        ds4's CLI tokenises the system and user text this way (cli.md §2.3), so a user who
        types `<think>` gets the characters, not the control token.
        """
        if _SURROGATE.search(text):
            text = _SURROGATE.sub("\ufffd", text)
        ids: list[int] = []
        for piece, _ in self._hf.pre_tokenizer.pre_tokenize_str(text):
            ids.extend(t.id for t in self._hf.model.tokenize(piece))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`: their bytes joined, invalid UTF-8 replaced by U+FFFD."""
        return b"".join(self._bytes[i] for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]

    def token_text(self, token_id: int) -> str:
        """The token's bytes as text (U+FFFD for a partial character); for display and logprobs."""
        return self._bytes[token_id].decode("utf-8", errors="replace")

    def token_string(self, token_id: int) -> str:
        """The vocabulary entry as stored in the GGUF (GPT-2 alphabet for normal tokens)."""
        return self._tokens[token_id]

    def is_added(self, token_id: int) -> bool:
        return self._types[token_id] in ADDED_TOKEN_TYPES

    def id_of(self, special: str) -> int:
        """Id of an added token given its exact string; KeyError if it is not one."""
        try:
            return self._added[special]
        except KeyError:
            raise KeyError(f"{special!r} is not an added token of this vocabulary") from None

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Incremental ids -> text that never emits half of a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is held back (an unfinished character becomes U+FFFD); resets the decoder."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


def _build_hf(vocab: dict[str, int], merges: list[str], added: dict[str, int], types: list[int]) -> tokenizers.Tokenizer:
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    hf = tokenizers.Tokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
    splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in SPLIT_PATTERNS]
    hf.pre_tokenizer = pre_tokenizers.Sequence(splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    # No normalizer exists, so normalized=False changes nothing but is the honest setting.
    hf.add_tokens([
        AddedToken(text, special=types[i] == TOKEN_CONTROL, normalized=False) for text, i in added.items()
    ])
    for text, i in added.items():
        if hf.token_to_id(text) != i:
            raise ValueError(f"added token {text!r} did not keep id {i}")
    return hf


def _all_token_bytes(tokens: list[str], types: list[int]) -> list[bytes]:
    byte_of = {ch: bytes([b]) for b, ch in bytes_to_unicode().items()}
    out = []
    for text, kind in zip(tokens, types):
        if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED):
            out.append(text.encode("utf-8"))
        else:
            out.append(b"".join(byte_of.get(ch) or ch.encode("utf-8") for ch in text))
    return out
