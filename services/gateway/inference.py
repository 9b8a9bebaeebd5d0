"""OpenAI-compatible inference through the policy: model routing to the promoted adapter, reasoning into
`reasoning_content`, the `<safe>` block into a structured `safety` field. The block and its analysis reach only
a client whose key may see them (`show_safety`); others get the verdict. Streaming goes through `SafeStream`, so a hidden block never leaks in part.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict
from typing import Any, AsyncIterator

from safetrigger.method import parse_safe, strip_safe_blocks
from safetrigger.method.safe_stream import SafeStream, held_back
from services import adapters, registry

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class RequestError(Exception):
    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


def resolve_model(requested: str | None, served_name: str, adapter_root: str | None) -> str:
    """`policy` (or nothing): the promoted adapter, else the base; `policy:base`: the base; `policy:<name>`: that
    adapter's current version; `policy:<name>@vN`: that exact version."""
    if not requested or requested == served_name:
        chosen = registry.promoted(adapter_root)
        return chosen["model"] if chosen else served_name
    if requested == f"{served_name}:base":
        return served_name
    if requested.startswith(f"{served_name}:"):
        _check_adapter(requested.split(":", 1)[1], adapter_root)
        return requested
    raise RequestError(404, f"model {requested!r} not found: use {served_name!r} (the promoted model), "
                            f"{served_name}:base or {served_name}:<adapter>")


# One grammar for adapter model ids: ASCII only, a pin without leading zeros, so each adapter version has exactly
# one spelling (one cached handle, one metrics series) and nothing reaches int() that it cannot parse.
_ADAPTER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}(@v[1-9][0-9]{0,8})?")


def _check_adapter(name: str, adapter_root: str | None) -> None:
    """404 here, with a reason, rather than a failed request inside a replica (messages name no server paths)."""
    if not _ADAPTER_ID.fullmatch(name):
        raise RequestError(400, f"adapter must be '<name>' or '<name>@v<version>' (ASCII letters, digits, '._-'; "
                                f"version 1-999999999 without leading zeros), got {name[:80]!r}")
    if not adapter_root:
        raise RequestError(404, f"adapter {name!r} not found: this gateway serves no adapters")
    adapter, _, pinned = name.partition("@v")
    try:
        if pinned:
            adapters.version(adapter_root, adapter, int(pinned))
        else:
            adapters.current(adapter_root, adapter)
    except adapters.AdapterError:
        raise RequestError(404, f"adapter {name!r} not found") from None


def split_think(content: str, opened: bool = False) -> tuple[str, str]:
    """(reasoning, answer) from a content that carries its `<think>` block inline. `opened`: the policy's template
    opened the block (R1-Distill), so the content starts inside the reasoning. A block that never closes is all
    reasoning (cut off before the answer), as `ThinkSplitter` streams it."""
    if THINK_CLOSE in content:
        head, _, tail = content.partition(THINK_CLOSE)
        return head.replace(THINK_OPEN, "", 1).strip(), tail.lstrip()
    stripped = content.lstrip()
    if stripped.startswith(THINK_OPEN):
        return stripped[len(THINK_OPEN):].strip(), ""
    return (content.strip(), "") if opened else ("", content)


# vLLM's own response fields beside OpenAI's: the prompt back (its tokens, text and per-token log-probs) and engine
# internals. A prefilled or echoed `<safe>` block came back through `prompt_logprobs` token by token in a hidden
# response; none of them is something a client of this gateway asked for.
ENGINE_RESPONSE_FIELDS = ("prompt_logprobs", "prompt_token_ids", "prompt_text", "kv_transfer_params",
                          "ec_transfer_params", "metrics")
ENGINE_CHOICE_FIELDS = ("token_ids", "prompt_token_ids", "routed_experts", "prompt_logprobs")


def public_fields(response: dict[str, Any]) -> dict[str, Any]:
    """The response without vLLM's prompt-echoing and internal fields, at the top and in every choice."""
    out = {k: v for k, v in response.items() if k not in ENGINE_RESPONSE_FIELDS}
    if isinstance(out.get("choices"), list):
        out["choices"] = [{k: v for k, v in c.items() if k not in ENGINE_CHOICE_FIELDS} if isinstance(c, dict) else c
                          for c in out["choices"]]
    return out


def safety_field(content: str, show_safety: bool) -> dict[str, Any]:
    """The verdict on a response; the analysis only for a client allowed to see it (hidden, it would hand out
    what the block was hidden for)."""
    b = parse_safe(content)
    return verdict({"triggered": b.triggered, "complete": b.complete, "analysis": b.analysis}, show_safety)


def verdict(safety: dict[str, Any], show_safety: bool) -> dict[str, Any]:
    return safety if show_safety else {k: v for k, v in safety.items() if k != "analysis"}


def shape_text_choice(choice: dict[str, Any], show_safety: bool) -> dict[str, Any]:
    """A completions choice: raw text, so only the `<safe>` blocks come out when hidden, whitespace untouched."""
    text = choice.get("text") or ""
    return {**choice, "text": text if show_safety else strip_safe_blocks(text).text,
            "safety": safety_field(text, show_safety)}


def shape_message(message: dict[str, Any], show_safety: bool, think_opened: bool = False) -> dict[str, Any]:
    content = message.get("content") or ""
    # a server that parses reasoning itself (vLLM --reasoning-parser) leaves only the answer in content
    reasoning, content = split_think(content, think_opened and not message.get("reasoning_content"))
    out = dict(message)
    if reasoning and not out.get("reasoning_content"):
        out["reasoning_content"] = reasoning
    out["safety"] = safety_field(content, show_safety)
    out["content"] = content if show_safety else parse_safe(content).answer
    return out


class ThinkSplitter:
    """Streams an inline `<think>…</think>` at the start of the content apart; holds back partial tags only.
    `opened`: the template opened the block, so the stream starts inside the reasoning."""

    def __init__(self, opened: bool = False) -> None:
        self._buf, self._state = "", "think" if opened else "start"  # start -> (think ->) answer

    def server_parsed(self) -> None:
        """The server splits reasoning itself (it sent `reasoning_content`): content is all answer."""
        if self._state != "answer" and not self._buf:
            self._state = "answer"

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
                keep = held_back(self._buf, THINK_CLOSE)
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


class StreamShaper:
    """One streamed choice, payload by payload: chat deltas get `reasoning_content` split off and the `<safe>`
    block held out of `content`; completions the same for `text`. What could still be a partial tag is held
    back and goes out with the last chunk, which also carries the finish reason and the `safety` verdict."""

    def __init__(self, chat: bool, show_safety: bool, think_opened: bool = False) -> None:
        self.chat, self.show = chat, show_safety
        self._think, self._safe = ThinkSplitter(think_opened), SafeStream(strip_leading=chat)
        self._last: dict[str, Any] | None = None
        self._finish: str | None = None

    def feed(self, data: str) -> str:
        """One upstream SSE payload -> the SSE event(s) to send now ("" when everything is held back)."""
        chunk = public_fields(json.loads(data))
        if not chunk.get("choices"):
            self._last = chunk  # e.g. a usage-only chunk: passed on as is
            return f"data: {json.dumps(chunk)}\n\n"
        choice = chunk["choices"][0]
        self._finish = choice.get("finish_reason") or self._finish
        self._last = chunk
        if self.chat:
            delta = dict(choice.get("delta") or {})
            if delta.get("reasoning_content"):
                self._think.server_parsed()
            reasoning, content = self._think.feed(delta.pop("content", None) or "")
            visible = self._safe.feed(content)
            if reasoning:
                delta["reasoning_content"] = (delta.get("reasoning_content") or "") + reasoning
            text = content if self.show else visible
            if text:
                delta["content"] = text
            if not delta:
                return ""
            out = {**choice, "delta": delta, "finish_reason": None}
        else:
            raw = choice.get("text") or ""
            visible = self._safe.feed(raw)
            text = raw if self.show else visible
            if not text and not choice.get("logprobs"):
                return ""
            out = {**choice, "text": text, "finish_reason": None}
        # the finish reason goes out with the last chunk, after what was held back
        return "data: " + json.dumps({**chunk, "choices": [out]}) + "\n\n"

    def finish(self) -> str:
        """The last chunk (what was held back, the finish reason, the verdict) and `[DONE]`."""
        s = self._safe
        if self.chat:
            reasoning, content = self._think.close()
            tail = s.feed(content) + s.close()
            last: dict[str, Any] = {"index": 0, "delta": {}}
            if reasoning:
                last["delta"]["reasoning_content"] = reasoning
            text = content if self.show else tail
            if text:
                last["delta"]["content"] = text
        else:
            tail = s.close()
            last = {"index": 0, "text": "" if self.show else tail}
        last["finish_reason"] = self._finish or "stop"
        last["safety"] = verdict(self.safety, self.show)
        base = self._last or {"object": "chat.completion.chunk" if self.chat else "text_completion"}
        return "data: " + json.dumps({**base, "choices": [last]}) + "\n\ndata: [DONE]\n\n"

    @property
    def safety(self) -> dict[str, Any]:
        return asdict(self._safe.safety)  # the same three fields as safety_field shows


async def shape_stream(batches: AsyncIterator[list[str]], shaper: StreamShaper,
                       spent: list[float] | None = None) -> AsyncIterator[str]:
    """Upstream batches of SSE payloads -> one packet per batch for the client (a batch that is all held back
    sends nothing). `spent[0]` accumulates the time spent shaping."""
    spent = spent if spent is not None else [0.0]
    async for batch in batches:
        t = time.thread_time()
        packet = "".join(shaper.feed(data) for data in batch)
        spent[0] += time.thread_time() - t
        if packet:
            yield packet
    t = time.thread_time()
    last = shaper.finish()
    spent[0] += time.thread_time() - t
    yield last
