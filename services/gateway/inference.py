"""OpenAI-compatible inference through the policy: model routing to the promoted adapter, reasoning into
`reasoning_content`, the `<safe>` block into a structured `safety` field, hidden from `content` unless the key
or the request asks to see it. Streaming goes through `SafeStream`, so a hidden block never leaks in part.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

from safetrigger.method import parse_safe
from safetrigger.method.safe_stream import SafeStream, _held
from services import registry

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class RequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def resolve_model(requested: str | None, served_name: str, adapter_root: str | None) -> str:
    """`policy` (or nothing): the promoted adapter, else the base; `policy:base`: the base; `policy:<name>`: that
    adapter's current version; `policy:<name>@vN`: that exact version."""
    if not requested or requested == served_name:
        chosen = registry.promoted(adapter_root)
        return chosen["model"] if chosen else served_name
    if requested == f"{served_name}:base":
        return served_name
    if requested.startswith(f"{served_name}:"):
        return requested
    raise RequestError(404, f"model {requested!r} not found: use {served_name!r} (the promoted model), "
                            f"{served_name}:base or {served_name}:<adapter>")


def split_think(content: str) -> tuple[str, str]:
    """(reasoning, answer) from a content that carries its `<think>` block inline."""
    if THINK_CLOSE not in content:
        return "", content
    head, _, tail = content.partition(THINK_CLOSE)
    return head.replace(THINK_OPEN, "", 1).strip(), tail.lstrip()


def safety_field(content: str) -> dict[str, Any]:
    b = parse_safe(content)
    return {"triggered": b.triggered, "complete": b.complete, "analysis": b.analysis}


def shape_message(message: dict[str, Any], show_safety: bool) -> dict[str, Any]:
    content = message.get("content") or ""
    reasoning, content = split_think(content)
    out = dict(message)
    if reasoning and not out.get("reasoning_content"):
        out["reasoning_content"] = reasoning
    out["safety"] = safety_field(content)
    out["content"] = content if show_safety else parse_safe(content).answer
    return out


class ThinkSplitter:
    """Streams an inline `<think>…</think>` at the start of the content apart; holds back partial tags only."""

    def __init__(self) -> None:
        self._buf, self._state = "", "start"  # start -> (think ->) answer

    def feed(self, delta: str) -> tuple[str, str]:
        self._buf += delta
        if self._state == "start":
            stripped = self._buf.lstrip()
            if stripped.startswith(THINK_OPEN):
                self._buf, self._state = stripped[len(THINK_OPEN):], "think"
            elif THINK_OPEN.startswith(stripped):
                return "", ""  # could still become <think>
            else:
                self._state = "answer"
        if self._state == "think":
            at = self._buf.find(THINK_CLOSE)
            if at < 0:
                keep = _held(self._buf, THINK_CLOSE)
                out, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep:]
                return out, ""
            reasoning, self._buf, self._state = self._buf[:at], self._buf[at + len(THINK_CLOSE):], "answer"
            rest, self._buf = self._buf, ""
            return reasoning, rest
        out, self._buf = self._buf, ""
        return "", out

    def close(self) -> tuple[str, str]:
        rest, self._buf = self._buf, ""
        return (rest, "") if self._state == "think" else ("", rest)


async def shape_stream(lines: AsyncIterator[str], show_safety: bool, on_done) -> AsyncIterator[str]:
    """Server-sent events from the policy -> server-sent events for the client, one choice per stream."""
    think, safe = ThinkSplitter(), SafeStream()
    last: dict[str, Any] | None = None
    finish: str | None = None
    async for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if not chunk.get("choices"):
            last = chunk  # e.g. a usage-only chunk: passed on as is
            yield f"data: {data}\n\n"
            continue
        choice = chunk["choices"][0]
        delta = choice.get("delta") or {}
        reasoning, content = think.feed(delta.get("content") or "")
        visible = safe.feed(content)
        delta = {k: v for k, v in delta.items() if k != "content"}
        if reasoning:
            delta["reasoning_content"] = (delta.get("reasoning_content") or "") + reasoning
        text = content if show_safety else visible
        if text:
            delta["content"] = text
        finish = choice.get("finish_reason") or finish
        last = chunk
        if delta:  # the finish reason goes out with the last chunk, after what was held back
            yield "data: " + json.dumps({**chunk, "choices": [{**choice, "delta": delta, "finish_reason": None}]}) + "\n\n"
    # the end: whatever was held back, the finish reason and the safety verdict in one last chunk
    reasoning, content = think.close()
    tail = safe.feed(content) + safe.close()
    delta: dict[str, Any] = {}
    if reasoning:
        delta["reasoning_content"] = reasoning
    text = content if show_safety else tail
    if text:
        delta["content"] = text
    s = safe.safety
    safety = {"triggered": s.triggered, "complete": s.complete, "analysis": s.analysis}
    base = last or {"object": "chat.completion.chunk"}
    final = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish or "stop", "safety": safety}]}
    on_done(safety)
    yield "data: " + json.dumps(final) + "\n\n"
    yield "data: [DONE]\n\n"
