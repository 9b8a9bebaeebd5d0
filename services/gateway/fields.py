"""What a request body may hold: an allowlist of OpenAI fields, each with a type and bounds, checked before anything
reaches the engine.

Everything else an engine accepts (`echo`, `logprobs`, `prompt_logprobs`, `best_of`, `logit_bias`, `tools`,
`chat_template`, token-id or list prompts, `continue_final_message` …) changes what the engine computes or
returns in ways the `<safe>` shaping and the replica's LoRA path are not proven on: a prompt-logprobs request
crashed the shared engine for every tenant (issue 17, finding 0), and a list prompt gave several interleaved
choices to one stream shaper, so one choice's `</safe>` streamed another's hidden analysis (finding 7). An
operator may grant named extra fields to a key (`KeyConfig.engine_fields`), never to every key.
"""

from __future__ import annotations

import math
from typing import Any, Callable, get_args

from .config import EngineField
from .inference import RequestError

Check = Callable[[str, Any], None]

MAX_STOP = 4
MAX_STOP_CHARS = 64
MAX_USER_CHARS = 256
ROLES = ("system", "user", "assistant")
GRANTABLE: tuple[str, ...] = get_args(EngineField)


def _number(lo: float, hi: float) -> Check:
    def check(name: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
            raise RequestError(400, f"{name} must be a number in [{lo:g}, {hi:g}], got {_short(v)}")
    return check


def _integer(lo: int, hi: int) -> Check:
    def check(name: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise RequestError(400, f"{name} must be an integer in [{lo}, {hi}], got {_short(v)}")
    return check


def _boolean(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise RequestError(400, f"{name} must be true or false, got {_short(v)}")


def _text(limit: int) -> Check:
    def check(name: str, v: Any) -> None:
        if not isinstance(v, str) or len(v) > limit:
            raise RequestError(400, f"{name} must be a string of at most {limit} characters")
    return check


def _stop(name: str, v: Any) -> None:
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or len(items) > MAX_STOP or not all(
            isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in items):
        raise RequestError(400, f"{name} must be a string or a list of at most {MAX_STOP} strings of 1-{MAX_STOP_CHARS} "
                                "characters")


def _stream_options(name: str, v: Any) -> None:
    if not isinstance(v, dict) or set(v) - {"include_usage"} or not isinstance(v.get("include_usage", False), bool):
        raise RequestError(400, f"{name} may only hold include_usage (true or false)")


def _n(name: str, v: Any) -> None:
    if v != 1 or isinstance(v, bool):
        raise RequestError(400, "n must be 1 (one choice per request)")


def _model(name: str, v: Any) -> None:
    if not isinstance(v, str):
        raise RequestError(400, "model must be a string")


def _safety(name: str, v: Any) -> None:
    if v not in ("hidden", "visible"):
        raise RequestError(400, f"safety must be 'hidden' or 'visible', got {_short(v)}")


def _messages(name: str, v: Any) -> None:
    if not isinstance(v, list) or not v:
        raise RequestError(400, "messages must be a non-empty list of message objects")
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            raise RequestError(400, f"messages[{i}] must be an object with role and content")
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise RequestError(400, f"messages[{i}] has fields this gateway does not accept: {', '.join(map(_short, extra))}")
        if m.get("role") not in ROLES:
            raise RequestError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {_short(m.get('role'))}")
        if not isinstance(m.get("content"), str):
            raise RequestError(400, f"messages[{i}].content must be a string")
        if "name" in m:
            _text(64)(f"messages[{i}].name", m["name"])


def _prompt(name: str, v: Any) -> None:
    if not isinstance(v, str) or not v:
        raise RequestError(400, "prompt must be a non-empty string (one prompt per request; no lists or token ids)")


_COMMON: dict[str, Check] = {
    "model": _model,
    "max_tokens": _integer(1, 2**31 - 1),  # the configured limit is checked apart, with its own message
    "max_completion_tokens": _integer(1, 2**31 - 1),
    "temperature": _number(0.0, 2.0),
    "top_p": _number(0.0, 1.0),
    "presence_penalty": _number(-2.0, 2.0),
    "frequency_penalty": _number(-2.0, 2.0),
    "seed": _integer(0, 2**63 - 1),
    "n": _n,
    "stop": _stop,
    "stream": _boolean,
    "stream_options": _stream_options,
    "user": _text(MAX_USER_CHARS),
    "safety": _safety,
}
CHAT_FIELDS: dict[str, Check] = {"messages": _messages, **_COMMON}
COMPLETION_FIELDS: dict[str, Check] = {"prompt": _prompt, **_COMMON}
_GRANTED_CHECKS: dict[str, Check] = {name: _boolean for name in GRANTABLE}


def check_fields(body: dict[str, Any], chat: bool, granted: tuple[str, ...] | list[str] = ()) -> None:
    """400 naming every field outside the allowlist (and this key's grants), else the first bad value."""
    allowed = {**(CHAT_FIELDS if chat else COMPLETION_FIELDS), **{g: _GRANTED_CHECKS[g] for g in granted}}
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise RequestError(400, f"fields this gateway does not accept: {', '.join(map(_short, unknown))}; "
                                f"accepted: {', '.join(sorted(allowed))}")
    required = "messages" if chat else "prompt"
    if required not in body:
        allowed[required](required, None)
    for name, value in body.items():
        allowed[name](name, value)


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."
