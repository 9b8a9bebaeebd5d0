"""API keys, scopes, per-key rate and concurrency limits.

Keys are stored hashed and compared in constant time; a request names its key only through the key's id in logs
and metrics. Rate limits are token buckets (refill requests_per_minute, capacity burst); concurrency is a count
of requests in flight. Both answer 429 with Retry-After.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from dataclasses import dataclass, field

from .config import KeyConfig


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "st-" + secrets.token_urlsafe(32)


class AuthError(Exception):
    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


@dataclass
class _Bucket:
    tokens: float
    updated: float
    in_flight: int = 0


@dataclass
class KeyRing:
    keys: list[KeyConfig]
    _state: dict[str, _Bucket] = field(default_factory=dict)

    def authenticate(self, authorization: str | None, scope: str) -> KeyConfig:
        if not authorization or not authorization.lower().startswith("bearer "):
            raise AuthError(401, "missing API key: send 'Authorization: Bearer <key>'")
        digest = hash_key(authorization[7:].strip())
        found = None
        for k in self.keys:  # compare against every key, so timing says nothing about which one matched
            if hmac.compare_digest(k.sha256, digest):
                found = k
        if found is None:
            raise AuthError(401, "invalid API key")
        if scope not in found.scopes:
            raise AuthError(403, f"this key may not use {scope} (its scopes: {', '.join(found.scopes)})")
        return found

    def acquire(self, key: KeyConfig, now: float | None = None) -> None:
        """Take one request from the key's bucket and one concurrency slot, or raise 429."""
        now = time.monotonic() if now is None else now
        b = self._state.setdefault(key.id, _Bucket(float(key.burst), now))
        rate = key.requests_per_minute / 60.0
        b.tokens = min(float(key.burst), b.tokens + (now - b.updated) * rate)
        b.updated = now
        if b.in_flight >= key.max_concurrent:
            raise AuthError(429, f"too many concurrent requests for key {key.id} (limit {key.max_concurrent})", 1.0)
        if b.tokens < 1.0:
            raise AuthError(429, f"rate limit of {key.requests_per_minute:g} requests/minute exceeded for key {key.id}",
                            math.ceil((1.0 - b.tokens) / rate))
        b.tokens -= 1.0
        b.in_flight += 1

    def in_flight(self) -> dict[str, int]:
        """Concurrency slots held now, by key id (the `in_flight` gauge: a slot that is never released shows)."""
        return {key_id: b.in_flight for key_id, b in self._state.items()}

    def refund(self, key: KeyConfig) -> None:
        """Give back the rate token of a request the policy could not serve (503): a client that retries through
        a replica restart as Retry-After asks must not find its budget spent when the replica is back."""
        b = self._state.get(key.id)
        if b:
            b.tokens = min(float(key.burst), b.tokens + 1.0)

    def release(self, key: KeyConfig) -> None:
        b = self._state.get(key.id)
        if b and b.in_flight > 0:
            b.in_flight -= 1
