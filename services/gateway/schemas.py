"""Request bodies as OpenAPI documents them. The handlers read the raw body themselves (size limit first, then
their own checks with readable reasons), so these schemas describe the API for clients and fuzzers only."""

from __future__ import annotations

from typing import Any

from services import adapters

_SAMPLING = {
    "model": {"type": "string", "description": "'policy' (the promoted model), 'policy:base' or 'policy:<adapter>'"},
    "max_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "minimum": 0, "maximum": 1},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}, "additionalProperties": False},
    "max_completion_tokens": {"type": "integer", "minimum": 1},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "seed": {"type": "integer", "minimum": 0},
    "n": {"type": "integer", "enum": [1]},
    "stop": {"oneOf": [{"type": "string", "minLength": 1, "maxLength": 64},
                       {"type": "array", "maxItems": 4, "items": {"type": "string", "minLength": 1, "maxLength": 64}}]},
    "user": {"type": "string", "maxLength": 256},
    "safety": {"type": "string", "enum": ["hidden", "visible"],
               "description": "hide the <safe> block (the verdict only) or show it, in content and safety.analysis; "
                              "'visible' only for a key with show_safety"},
}

# Only these fields are accepted (services/gateway/fields.py); an operator may grant a key a few engine fields more.
CHAT = {
    "type": "object",
    "required": ["messages"],
    "additionalProperties": False,
    "properties": {
        "messages": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["role", "content"], "additionalProperties": False,
            "properties": {"role": {"type": "string", "enum": ["system", "user", "assistant"]}, "content": {"type": "string"},
                           "name": {"type": "string", "maxLength": 64}}}},
        **_SAMPLING,
    },
}

COMPLETION = {"type": "object", "required": ["prompt"], "additionalProperties": False,
              "properties": {"prompt": {"type": "string", "minLength": 1}, **_SAMPLING}}

JOB = {"type": "object", "required": ["config"],
       "properties": {"config": {"type": "object", "description": "a RunConfig (see configs/embedded.yaml)"},
                      "name": {"type": "string"}}}

# OpenAPI links: a listed job's id feeds every per-job operation (clients and schemathesis' stateful runs follow them)
JOB_LIST_LINKS = {
    "description": "this key's jobs, newest first",
    "content": {"application/json": {"schema": {"type": "object", "required": ["jobs"], "properties": {"jobs": {
        "type": "array", "items": {"type": "object", "required": ["id", "status"],
                                   "properties": {"id": {"type": "string"}, "status": {"type": "string"}}}}}}}},
    "links": {name: {"operationId": op, "parameters": {"job_id": "$response.body#/jobs/0/id"}}
              for name, op in (("Status", "job_status"), ("Logs", "job_logs"), ("Progress", "job_progress"),
                               ("Report", "job_report"), ("Cancel", "cancel_job"))},
}

PROMOTE = {"type": "object", "required": ["job", "adapter"], "additionalProperties": False,
           "properties": {"job": {"type": "string", "pattern": "^st-[0-9a-f]{12}$"},
                          "adapter": {"type": "string", "pattern": adapters.NAME_PATTERN},
                          "version": {"type": "integer", "minimum": 1, "maximum": 999999999}}}


def body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
