"""Request bodies as OpenAPI documents them. The handlers read the raw body themselves (size limit first, then
their own checks with readable reasons), so these schemas describe the API for clients and fuzzers only."""

from __future__ import annotations

from typing import Any

_SAMPLING = {
    "model": {"type": "string", "description": "'policy' (the promoted model), 'policy:base' or 'policy:<adapter>'"},
    "max_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "minimum": 0, "maximum": 1},
    "stream": {"type": "boolean"},
}

CHAT = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        "messages": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["role", "content"],
            "properties": {"role": {"type": "string", "enum": ["system", "user", "assistant"]}, "content": {"type": "string"}}}},
        **_SAMPLING,
        "safety": {"type": "string", "enum": ["hidden", "visible"],
                   "description": "show the <safe> block in content (visible) or only in the safety field (hidden)"},
    },
}

COMPLETION = {"type": "object", "required": ["prompt"], "properties": {"prompt": {"type": "string", "minLength": 1}, **_SAMPLING}}

JOB = {"type": "object", "required": ["config"],
       "properties": {"config": {"type": "object", "description": "a RunConfig (see configs/embedded.yaml)"},
                      "name": {"type": "string"}}}


def body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
