"""Typed access to request fields shared by the four APIs (server.md §3.3, §4, §5, §6).

Contract: every getter returns `default` for an absent or null field and
raises `invalid_json(param)` (400) when the field has the wrong JSON type;
nothing here ever raises anything else. `GenParams` is what every API
request boils down to besides its messages.

Integer fields accept any JSON number, truncated toward zero and clamped to
INT_MAX (ds4). One deliberate departure, asked for by the lead: a negative
`max_tokens` is a 400 instead of being clamped to 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dwarfstar.server.errors import ApiError, invalid_json

INT_MAX = 2**31 - 1
# Think Max needs this much context (prompt.md §4, server.md §5).
THINK_MAX_MIN_CTX = 393216
EFFORTS = {"max": "max", "xhigh": "high", "high": "high", "medium": "high",
           "low": "high", "minimal": "high", "none": "none"}
THINKING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.05}


@dataclass
class GenParams:
    """Per-request generation settings after defaults, clamping and thinking rules."""

    model: str = "deepseek-v4-flash"
    max_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.05
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    mode: str = "thinking"


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _get(body: dict, key: str, default, is_valid):
    """The field as is when `is_valid(value)`; `default` when absent or null; else 400."""
    value = body.get(key)
    if value is None:
        return default
    if not is_valid(value):
        raise invalid_json(key)
    return value


def get_str(body: dict, key: str, default=None):
    return _get(body, key, default, lambda value: isinstance(value, str))


def get_bool(body: dict, key: str, default=None):
    return _get(body, key, default, lambda value: isinstance(value, bool))


def get_float(body: dict, key: str, default=None):
    value = _get(body, key, None, is_number)
    return default if value is None else float(value)


def get_objects(body: dict, key: str) -> list[dict]:
    """An array of objects (e.g. `tools`); absent or null -> []."""
    return _get(body, key, [], lambda value: isinstance(value, list) and all(isinstance(v, dict) for v in value))


def get_int(body: dict, key: str, default=None):
    """A JSON number truncated toward zero, negative -> 0, clamped to INT_MAX."""
    value = get_float(body, key)
    if value is None:
        return default
    if value != value:
        raise invalid_json(key)
    return int(max(0.0, min(float(INT_MAX), value)))


def get_max_tokens(body: dict, keys: tuple[str, ...], default: int) -> int:
    """The output limit; the last spelling present in the body wins (JSON key order)."""
    limit = default
    for key in [k for k in body if k in keys]:
        value = get_float(body, key)
        if value is None:
            continue
        if value != value or value < 0:
            raise ApiError(400, f"{key} must be a non-negative number", key)
        limit = int(min(float(INT_MAX), value))
    return limit


def get_stop(body: dict, key: str) -> list[str]:
    """A string or an array of strings; non-strings and empty strings are skipped."""
    value = body.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list):
        return [s for s in value if isinstance(s, str) and s]
    raise invalid_json(key)


def effort_of(value, key: str):
    """An effort name -> "max" | "high" | "none"; null -> None; unknown -> 400."""
    if value is None:
        return None
    if not isinstance(value, str) or value not in EFFORTS:
        raise invalid_json(key)
    return EFFORTS[value]


def thinking_control(value):
    """(explicit, enabled or None) for a `thinking`/`think` value (§5)."""
    if isinstance(value, bool):
        return True, value
    if isinstance(value, dict):
        kind = value.get("type")
        if kind == "enabled":
            return True, True
        if kind == "disabled":
            return True, False
    # null and unknown shapes count as explicit but change nothing.
    return True, None


def select_mode(model: str, controls: list, efforts: list, n_ctx: int) -> str:
    """server.md §5: `controls` are the explicit thinking values present, `efforts`
    the effort names already mapped by `effort_of` (None for absent)."""
    enabled, effort, explicit = True, "high", False
    for value in controls:
        is_explicit, state = thinking_control(value)
        explicit = explicit or is_explicit
        if state is not None:
            enabled = state
    for value in efforts:
        if value is not None:
            effort = value
    if not explicit and model == "deepseek-chat":
        enabled = False
    if not enabled or effort == "none":
        return "chat"
    if effort == "max" and n_ctx >= THINK_MAX_MIN_CTX:
        return "max"
    return "thinking"


def sampling_fields(body: dict, params: GenParams, keys: tuple[str, ...]) -> None:
    """Read the sampling knobs named in `keys`; thinking mode overrides them (§6)."""
    if "temperature" in keys:
        params.temperature = get_float(body, "temperature", params.temperature)
    if "top_p" in keys:
        params.top_p = get_float(body, "top_p", params.top_p)
    if "min_p" in keys:
        params.min_p = get_float(body, "min_p", params.min_p)
    if "top_k" in keys:
        params.top_k = get_int(body, "top_k", params.top_k)
    if "seed" in keys:
        params.seed = get_int(body, "seed", params.seed)
    params.top_p = params.top_p if 0 < params.top_p <= 1 else 1.0
    params.min_p = max(0.0, params.min_p)
    params.top_k = min(params.top_k, 1024)
    if params.mode != "chat":
        for name, value in THINKING_DEFAULTS.items():
            setattr(params, name, value)


def content_text(value) -> str:
    """OpenAI/Anthropic content: string as is; array -> concatenated text parts (no
    separator); null or anything else -> "" (prompt.md §12.1)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "".join(parts)
    return ""


def require_list(body: dict, key: str, missing: str) -> list:
    """A required array field: absent/null -> 400 `missing`, wrong type -> 400."""
    value = body.get(key)
    if value is None:
        raise ApiError(400, missing, key)
    if not isinstance(value, list):
        raise invalid_json(key)
    return value


def require_object(value, param: str) -> dict:
    if not isinstance(value, dict):
        raise invalid_json(param)
    return value
