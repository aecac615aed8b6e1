"""Validation of ds4-layout GGUF files (gguf.md §5.2): is this a model we can load?

Contract:
- `validate(f) -> ModelConfig` accepts a main-model file or raises `GGUFError` with the
  first reason, naming the key or tensor, what was expected and what was found.
  Order: architecture, metadata types, config consistency, Flash profile, tokenizer,
  tensor set / dims / types, `tid2eid` values (the only tensor data read).
- A file whose `general.name` does not start with `shape.SYNTHETIC_NAME_PREFIX` claims
  to be DeepSeek V4 Flash and must match `shape.FLASH` exactly, including the special
  token ids of the real vocabulary (gguf.md §2.4).
- `validate_mtp(f, main_config)` checks the separate MTP file against the main model.
- `summary(f)` gives what `ds4-gguf info` reports (totals per type, routed types per
  layer); it never raises, so it also describes files that fail validation.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as T, GGUFValueType as V

from dwarfstar import shape
from dwarfstar.gguf import names
from dwarfstar.gguf.reader import GGUFError, GGUFFile

ARCH_KEY = "general.architecture"
NAME_KEY = "general.name"
TOKENS_KEY = "tokenizer.ggml.tokens"
MERGES_KEY = "tokenizer.ggml.merges"
TOKEN_TYPE_KEY = "tokenizer.ggml.token_type"
MTP_EXPERT_COUNT_KEY = "deepseek4.expert_count"
# Token types that mark added tokens (llama.cpp convention; gguf.md §7.2).
ADDED_TOKEN_TYPES = (3, 4)
# The published main files hold exactly this many tensors (gguf.md §3.4).
FLASH_TENSOR_COUNT = 1328
# Ids of the special strings in the real DeepSeek V4 vocabulary (gguf.md §5.2 table).
FLASH_SPECIAL_IDS = {
    shape.BOS: 0, shape.EOS: 1, shape.USER: 128803, shape.ASSISTANT: 128804,
    shape.THINK_OPEN: 128821, shape.THINK_CLOSE: 128822, shape.DSML: 128825,
    shape.LATEST_REMINDER: 128828, "<｜action｜>": 128829, "<｜query｜>": 128830,
    "<｜authority｜>": 128831, "<｜domain｜>": 128832, "<｜title｜>": 128836, "<｜read_url｜>": 128845,
}
# GGUF value types ds4 accepts per kind of key (gguf.md §2.1).
_FLOAT_TYPES = (V.FLOAT32, V.FLOAT64, V.UINT32, V.INT32)
_ACCEPTED = {
    "int": ((V.UINT32,), None),
    "float": (_FLOAT_TYPES, None),
    "bool": ((V.BOOL,), None),
    "int_array": ((V.ARRAY,), (V.UINT32, V.INT32)),
    "float_array": ((V.ARRAY,), (V.FLOAT32, V.FLOAT64)),
}
_SPECIAL_ACCEPTED = {
    "deepseek4.rope.scaling.original_context_length": ((V.UINT64, V.UINT32), None),
    shape.CONTEXT_LENGTH_KEY: ((V.UINT64, V.UINT32, V.INT64, V.INT32), None),
}


def _fail(message: str) -> None:
    raise GGUFError(message)


def _kind(value: Any) -> str:
    """Kind of a config field, read off its Flash value (bool before int: bool is an int)."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, tuple):
        return "int_array" if isinstance(value[0], int) else "float_array"
    return "int" if isinstance(value, int) else "float"


def _accepted_types() -> dict[str, tuple[tuple[V, ...], tuple[V, ...] | None]]:
    out = {}
    for field in fields(shape.ModelConfig):
        key = shape.KEY_OF_FIELD.get(field.name)
        if key is not None:
            out[key] = _SPECIAL_ACCEPTED.get(key, _ACCEPTED[_kind(getattr(shape.FLASH, field.name))])
    for key in shape.OPTIONAL_ZERO_KEYS:
        out[key] = ((V.UINT32,), None)
    out[shape.CONTEXT_LENGTH_KEY] = _SPECIAL_ACCEPTED[shape.CONTEXT_LENGTH_KEY]
    return out


ACCEPTED_TYPES = _accepted_types()


def _type_name(vtype: V, etype: V | None) -> str:
    return f"ARRAY of {etype.name}" if vtype == V.ARRAY and etype is not None else vtype.name


def check_metadata_types(f: GGUFFile) -> None:
    """Every present model key has a GGUF type ds4 accepts (missing keys: see from_metadata)."""
    for key, (types, elem_types) in ACCEPTED_TYPES.items():
        if key not in f.metadata_types:
            continue
        vtype, etype = f.metadata_types[key]
        if vtype not in types or (elem_types is not None and etype not in elem_types):
            want = " or ".join(_type_name(t, e) for t in types for e in (elem_types or (None,)))
            _fail(f"metadata {key}: type {_type_name(vtype, etype)} not accepted, expected {want}")


def check_architecture(f: GGUFFile, want: str) -> None:
    got = f.metadata.get(ARCH_KEY)
    if got != want:
        _fail(f"expected {ARCH_KEY}={want}, got {got!r}" if got is not None else f"{ARCH_KEY} is missing")


def is_synthetic(f: GGUFFile) -> bool:
    name = f.metadata.get(NAME_KEY)
    return isinstance(name, str) and name.startswith(shape.SYNTHETIC_NAME_PREFIX)


def config_of(f: GGUFFile) -> shape.ModelConfig:
    """ModelConfig from the metadata, with ConfigError turned into GGUFError."""
    check_metadata_types(f)
    try:
        return shape.ModelConfig.from_metadata(f.metadata)
    except shape.ConfigError as e:
        raise GGUFError(str(e)) from None


# ---- tokenizer ----------------------------------------------------------------------
def _string_array(f: GGUFFile, key: str) -> list[str]:
    if f.metadata_types.get(key) != (V.ARRAY, V.STRING):
        found = _type_name(*f.metadata_types[key]) if key in f.metadata_types else "missing"
        _fail(f"metadata {key}: expected an ARRAY of STRING, got {found}")
    return f.metadata[key]


def check_tokenizer(f: GGUFFile, config: shape.ModelConfig, strict_flash: bool) -> None:
    """gguf.md §5.2 Tokenizer: arrays, vocab size, added tokens, special strings (and ids)."""
    tokens = _string_array(f, TOKENS_KEY)
    _string_array(f, MERGES_KEY)
    if f.metadata_types.get(TOKEN_TYPE_KEY) != (V.ARRAY, V.INT32):
        found = _type_name(*f.metadata_types[TOKEN_TYPE_KEY]) if TOKEN_TYPE_KEY in f.metadata_types else "missing"
        _fail(f"metadata {TOKEN_TYPE_KEY}: expected an ARRAY of INT32, got {found}")
    types = f.metadata[TOKEN_TYPE_KEY]
    if len(types) != len(tokens):
        _fail(f"metadata {TOKEN_TYPE_KEY}: has {len(types)} entries, expected {len(tokens)} (one per token)")
    if len(tokens) != config.vocab_size:
        _fail(f"metadata {TOKENS_KEY}: has {len(tokens)} tokens, expected "
              f"{shape.KEY_OF_FIELD['vocab_size']}={config.vocab_size}")
    added = {}
    for i, t in enumerate(types):
        if t in ADDED_TOKEN_TYPES:
            if tokens[i] in added:
                _fail(f"metadata {TOKENS_KEY}: added token {tokens[i]!r} appears twice (ids {added[tokens[i]]}, {i})")
            added[tokens[i]] = i
    _check_added_tokens(added)
    _check_special_tokens(tokens, added, strict_flash)


def _check_added_tokens(added: dict[str, int]) -> None:
    """No added token is empty or a substring of another (leftmost matching stays unambiguous)."""
    for token, i in added.items():
        if not token:
            _fail(f"metadata {TOKENS_KEY}: added token {i} is empty")
        # Every proper substring of `token`: at most ~n^2/2 set lookups, n = len(token) (short).
        for a in range(len(token)):
            for b in range(a + 1, len(token) + (a > 0)):
                inner = token[a:b]
                if inner in added:
                    _fail(f"metadata {TOKENS_KEY}: added token {inner!r} (id {added[inner]}) is a "
                          f"substring of added token {token!r} (id {i})")


def _check_special_tokens(tokens: list[str], added: dict[str, int], strict_flash: bool) -> None:
    wanted = set(shape.REQUIRED_SPECIAL_TOKENS)
    seen: dict[str, list[int]] = {}
    for i, token in enumerate(tokens):
        if token in wanted:
            seen.setdefault(token, []).append(i)
    for token in shape.REQUIRED_SPECIAL_TOKENS:
        ids = seen.get(token, [])
        if len(ids) != 1:
            _fail(f"metadata {TOKENS_KEY}: required special token {token!r} "
                  + ("is missing" if not ids else f"appears {len(ids)} times (ids {ids})"))
        if token not in added:
            _fail(f"metadata {TOKEN_TYPE_KEY}: special token {token!r} (id {ids[0]}) is not an added "
                  f"token (type CONTROL or USER_DEFINED)")
        if strict_flash and ids[0] != FLASH_SPECIAL_IDS[token]:
            _fail(f"expected token {token!r} at id {FLASH_SPECIAL_IDS[token]} for DeepSeek4 Flash, got id {ids[0]}")


# ---- tensors ------------------------------------------------------------------------
def _type_names(types) -> str:
    return " or ".join(T(t).name for t in types)


def check_tensor(f: GGUFFile, name: str, spec: names.TensorSpec, ne: tuple[int, ...],
                 types: tuple[int, ...]) -> None:
    """One tensor: exact n_dims, dims and type."""
    info = f.tensors[name]
    if len(info.ne) != len(ne):
        _fail(f"tensor {name}: has {len(info.ne)} dims {list(info.ne)}, expected {len(ne)} dims {list(ne)}")
    for i, (got, want) in enumerate(zip(info.ne, ne)):
        if got != want:
            _fail(f"tensor {name}: has dim[{i}]={got}, expected {want} (ne {list(info.ne)}, expected {list(ne)})")
    if info.ggml_type not in types:
        what = "a routed expert quant type" if spec.is_routed else "type"
        _fail(f"tensor {name}: has type {info.ggml_type.name}, expected {what} {_type_names(types)}")


def check_tensor_set(f: GGUFFile, required: dict, optional: dict, type_rule) -> None:
    """Exact set: every required tensor, no tensor outside required + optional; dims and types."""
    for name in required:
        if name not in f.tensors:
            _fail(f"required tensor is missing: {name}")
    for name in f.tensors:
        if name not in required and name not in optional:
            _fail(f"unexpected tensor: {name} (not part of the ds4 layout for this configuration)")
    for name, (spec, ne) in {**required, **optional}.items():
        if name in f.tensors:
            check_tensor(f, name, spec, ne, type_rule(spec))


def check_routed_pairs(f: GGUFFile, prefixes: list[str]) -> None:
    """Gate and up experts of one layer share a quant type (the down type may differ)."""
    w1, w3 = (next(s for s in names.LAYER if s.field == fld) for fld in ("w1", "w3"))
    for prefix in prefixes:
        gate, up = f.tensors[prefix + w1.gguf].ggml_type, f.tensors[prefix + w3.gguf].ggml_type
        if gate != up:
            _fail(f"tensor {prefix + w3.gguf}: routed gate/up experts use different quant types "
                  f"({gate.name} vs {up.name})")


def _main_type_rule(spec: names.TensorSpec) -> tuple[int, ...]:
    return names.ROUTED_TYPES if spec.is_routed else spec.types


def check_tid2eid(f: GGUFFile, config: shape.ModelConfig) -> None:
    """Hash-routing tables hold expert ids in [0, expert_count) (reads those tensors' data)."""
    spec = next(s for s in names.LAYER if s.field == "tid2eid")
    for layer in range(config.n_hash_layers):
        name = names.layer_name(layer, spec)
        ids = f.raw(name).view(np.int32)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= config.n_routed_experts:
            _fail(f"tensor {name}: expert ids must lie in [0, {config.n_routed_experts}), found [{lo}, {hi}]")


def check_flash_profile(f: GGUFFile, config: shape.ModelConfig) -> None:
    diffs = shape.flash_differences(config)
    if diffs:
        _fail(f"{diffs[0]} (general.name {f.metadata.get(NAME_KEY)!r} does not start with "
              f"{shape.SYNTHETIC_NAME_PREFIX!r}, so the file must match DeepSeek V4 Flash)")


def validate(f: GGUFFile) -> shape.ModelConfig:
    """Accept a main-model file and return its config, or raise GGUFError (module docstring)."""
    check_architecture(f, shape.ARCH)
    config = config_of(f)
    strict = not is_synthetic(f)
    if strict:
        check_flash_profile(f, config)
    check_tokenizer(f, config, strict_flash=strict)
    required = names.expected_tensors(config)
    check_tensor_set(f, required, names.optional_tensors(config), _main_type_rule)
    check_routed_pairs(f, [f"blk.{layer}." for layer in range(config.n_layers)])
    check_tid2eid(f, config)
    return config


def validate_mtp(f: GGUFFile, main_config: shape.ModelConfig) -> None:
    """Accept the MTP file for a main model of `main_config`, or raise GGUFError (gguf.md §5.2 MTP)."""
    check_architecture(f, shape.MTP_ARCH)
    if MTP_EXPERT_COUNT_KEY in f.metadata and f.metadata[MTP_EXPERT_COUNT_KEY] != main_config.n_routed_experts:
        _fail(f"metadata {MTP_EXPERT_COUNT_KEY}: expected {main_config.n_routed_experts} (the main model's), "
              f"got {f.metadata[MTP_EXPERT_COUNT_KEY]!r}")

    def type_rule(spec: names.TensorSpec) -> tuple[int, ...]:
        if spec.is_routed:
            return names.ROUTED_TYPES
        return (*spec.types, T.F32) if spec.field in names.MTP_F32_OK else spec.types

    check_tensor_set(f, names.expected_mtp_tensors(main_config), {}, type_rule)
    check_routed_pairs(f, [names.MTP_PREFIX])


# ---- summary for `ds4-gguf info` ----------------------------------------------------
@dataclass(frozen=True)
class Summary:
    n_tensors: int
    total_bytes: int
    by_type: dict[str, tuple[int, int]]          # type name -> (tensors, bytes)
    routed_types: dict[str, tuple[str, ...]]     # tensor prefix -> (gate, up, down) type names
    is_synthetic: bool


def routed_label(types: tuple[str, ...]) -> str:
    """q2 / q4 for the published combinations (gguf.md §3.3), else 'mixed'."""
    for label, by_field in names.EXPERT_TYPES.items():
        if types == tuple(by_field[fld].name for fld in ("w1", "w3", "w2")):
            return label
    return "mixed"


def summary(f: GGUFFile) -> Summary:
    """Totals per type and routed expert types per layer (never raises)."""
    by_type: dict[str, list[int]] = {}
    for info in f.tensors.values():
        entry = by_type.setdefault(info.ggml_type.name, [0, 0])
        entry[0] += 1
        entry[1] += info.n_bytes
    routed = [next(s for s in names.LAYER if s.field == fld) for fld in ("w1", "w3", "w2")]
    prefixes = sorted({name[: -len(s.gguf)] for name in f.tensors for s in routed if name.endswith(s.gguf)},
                      key=_prefix_order)
    routed_types = {p: tuple(f.tensors[p + s.gguf].ggml_type.name if p + s.gguf in f.tensors else "-"
                             for s in routed) for p in prefixes}
    return Summary(len(f.tensors), sum(i.n_bytes for i in f.tensors.values()),
                   {k: (v[0], v[1]) for k, v in by_type.items()}, routed_types, is_synthetic(f))


def _prefix_order(prefix: str) -> tuple[int, str]:
    parts = prefix.split(".")
    return (int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else -1, prefix)
