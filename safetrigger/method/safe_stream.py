"""The `<safe>` block in a token stream: route it apart from the answer without ever emitting part of a tag.

A gateway that hides the block from end users cannot wait for the whole response, and must not leak a partial
`<saf` or the first words of the analysis. `SafeStream` holds back only what could still turn out to be a tag
(at most len("</safe>") - 1 characters), and follows `parse_safe`'s rules exactly: case-insensitive tags, the
first closing tag ends a block, an unclosed block swallows the rest. Joined, the visible deltas equal
`parse_safe(full).answer` (leading whitespace dropped, trailing kept until the end).
"""

from __future__ import annotations

from dataclasses import dataclass

from .tags import SAFE_CLOSE, SAFE_OPEN


def held_back(buffer: str, tag: str) -> int:
    """Length of the longest suffix of buffer that is a proper prefix of tag (case-insensitive)."""
    low, t = buffer.lower(), tag.lower()
    for n in range(min(len(low), len(t) - 1), 0, -1):
        if low.endswith(t[:n]):
            return n
    return 0


@dataclass
class Safety:
    triggered: bool
    complete: bool
    analysis: str


class SafeStream:
    """`strip_leading=False` keeps the text outside the blocks byte for byte (raw completions, where a leading
    space is part of the answer): joined, it equals `strip_safe_blocks(full).text`."""

    def __init__(self, strip_leading: bool = True) -> None:
        self._strip = strip_leading
        self._buf = ""
        self._inside = False
        self._blocks = 0
        self._analysis: list[str] = []  # of the first block only, as parse_safe
        self._closed_first = False
        self._started = False  # a visible non-whitespace character went out

    def _visible(self, text: str) -> str:
        if self._strip and not self._started:
            text = text.lstrip()
            self._started = bool(text)
        return text

    def feed(self, delta: str) -> str:
        """Visible text that is safe to emit now."""
        self._buf += delta
        out: list[str] = []
        while True:
            tag = SAFE_CLOSE if self._inside else SAFE_OPEN
            at = self._buf.lower().find(tag)
            if at < 0:
                keep = held_back(self._buf, tag)
                ready, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep:]
                self._route(ready, out)
                return "".join(out)
            self._route(self._buf[:at], out)
            self._buf = self._buf[at + len(tag):]
            if self._inside:
                self._closed_first = self._closed_first or self._blocks == 1
            else:
                self._blocks += 1
            self._inside = not self._inside

    def _route(self, text: str, out: list[str]) -> None:
        if not text:
            return
        if self._inside:
            if self._blocks == 1 and not self._closed_first:
                self._analysis.append(text)
        else:
            out.append(self._visible(text))

    def close(self) -> str:
        """Flush at the end of the stream; an unclosed block keeps its text out of the answer."""
        out: list[str] = []
        self._route(self._buf, out)
        self._buf = ""
        return "".join(out)

    @property
    def safety(self) -> Safety:
        analysis = "".join(self._analysis).strip()
        return Safety(self._blocks > 0, self._closed_first and bool(analysis), analysis)
