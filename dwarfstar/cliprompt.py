"""Token-level prompt building for the `ds4` CLI (cli.md §2.3, §2.7; prompt.md §2, §4).

Contract:
- The CLI builds prompts from tokens, not from rendered text: BOS, the Think Max
  prefix, USER, ASSISTANT, `<think>`/`</think>` are inserted as ids, and user and
  system text go through *plain* BPE, so special strings typed by the user stay text
  [QUIRK, unlike the server]. `plain_bpe` is that encoding.
- A one-shot prompt that starts with the BOS string is an already-rendered chat: it is
  tokenized with the rendered-chat tokenizer (`Tokenizer.encode`, every added token
  matched) and nothing is added.
- Thinking modes are the strings "none", "high", "max". "max" is only effective when
  the context is at least `THINK_MAX_MIN_CTX` tokens; below it the CLI warns and uses
  "high" (`think_max_warning`).
"""

from __future__ import annotations

from dwarfstar import shape
from dwarfstar.text.chat import THINK_MAX_MIN_CONTEXT, THINK_MAX_PREFIX

MODES = ("none", "high", "max")
# Think Max gating and prefix text are the renderer's (prompt.md §4); one copy.
THINK_MAX_MIN_CTX = THINK_MAX_MIN_CONTEXT


def effective_mode(mode: str, ctx: int) -> str:
    """The mode actually rendered: "max" falls back to "high" below THINK_MAX_MIN_CTX."""
    assert mode in MODES, mode
    if mode == "max" and ctx < THINK_MAX_MIN_CTX:
        return "high"
    return mode


def think_max_warning(mode: str, ctx: int, name: str = "--think-max") -> str | None:
    """ds4's warning line when Think Max was asked for but the context is too small."""
    if mode != "max" or effective_mode(mode, ctx) == "max":
        return None
    return f"ds4: warning: {name} needs --ctx >= {THINK_MAX_MIN_CTX}; ctx={ctx} uses normal thinking instead"


def plain_bpe(tokenizer, text: str) -> list[int]:
    """BPE ids of `text` with no added-token recognition (cli.md §2.3)."""
    return list(tokenizer.encode_plain(text))


def is_rendered(prompt: str) -> bool:
    return prompt.startswith(shape.BOS)


def max_prefix_tokens(tokenizer) -> list[int]:
    return plain_bpe(tokenizer, THINK_MAX_PREFIX)


def header_tokens(tokenizer, system: str, mode: str) -> list[int]:
    """BOS + [Think Max prefix if `mode` (already effective) is max] + BPE(system)."""
    ids = [tokenizer.id_of(shape.BOS)]
    if mode == "max":
        ids += max_prefix_tokens(tokenizer)
    if system:
        ids += plain_bpe(tokenizer, system)
    return ids


def turn_tokens(tokenizer, text: str, mode: str) -> list[int]:
    """USER + BPE(text) + ASSISTANT + (`<think>` when thinking, else `</think>`)."""
    tag = shape.THINK_CLOSE if mode == "none" else shape.THINK_OPEN
    return (
        [tokenizer.id_of(shape.USER)]
        + plain_bpe(tokenizer, text)
        + [tokenizer.id_of(shape.ASSISTANT), tokenizer.id_of(tag)]
    )


def oneshot_tokens(tokenizer, prompt: str, system: str, mode: str) -> list[int]:
    """The one-shot prompt of cli.md §2.3; `mode` is the effective mode."""
    if is_rendered(prompt):
        return list(tokenizer.encode(prompt))
    return header_tokens(tokenizer, system, mode) + turn_tokens(tokenizer, prompt, mode)
