"""Rate limits as token buckets, and the headers each API uses to announce them."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

__all__ = ["Limits", "TokenBucket"]


class TokenBucket:
    """A bucket holding up to ``per_minute`` units, refilled continuously at ``per_minute / 60``
    per second, starting full. It can go below zero when more is charged after the fact (output
    tokens), which delays later requests."""

    def __init__(self, per_minute: int) -> None:
        if per_minute < 1:
            raise ValueError(f"a per-minute limit must be >= 1, not {per_minute}")
        self.limit = per_minute
        self.rate = per_minute / 60.0
        self.level = float(per_minute)
        self._updated = time.monotonic()

    def _refill(self, now: float) -> None:
        self.level = min(float(self.limit), self.level + (now - self._updated) * self.rate)
        self._updated = now

    def wait_for(self, amount: int, now: float) -> float:
        """Seconds until ``amount`` units are available (0.0 when they are now). An amount
        larger than the bucket waits for a full bucket."""
        self._refill(now)
        missing = min(amount, self.limit) - self.level
        return max(0.0, missing / self.rate)

    def take(self, amount: int, now: float) -> None:
        self._refill(now)
        self.level -= min(amount, self.limit)

    def charge(self, amount: int, now: float) -> None:
        """Remove ``amount`` units even if the bucket goes below zero."""
        self._refill(now)
        self.level -= amount

    def remaining(self, now: float) -> int:
        self._refill(now)
        return max(0, math.floor(self.level))

    def until_full(self, now: float) -> float:
        self._refill(now)
        return (self.limit - self.level) / self.rate


@dataclass
class Limits:
    """The server's requests-per-minute and tokens-per-minute buckets (either may be absent)."""

    requests: TokenBucket | None
    tokens: TokenBucket | None

    def admit(self, tokens: int, now: float) -> tuple[float, Literal["requests", "tokens"]]:
        """Take one request and ``tokens`` input tokens if both fit and return ``(0.0, _)``;
        otherwise take nothing and return the seconds to wait and which limit is the cause."""
        wait_requests = self.requests.wait_for(1, now) if self.requests else 0.0
        wait_tokens = self.tokens.wait_for(tokens, now) if self.tokens else 0.0
        if wait_requests > 0.0 or wait_tokens > 0.0:
            if wait_requests >= wait_tokens:
                return wait_requests, "requests"
            return wait_tokens, "tokens"
        if self.requests:
            self.requests.take(1, now)
        if self.tokens:
            self.tokens.take(tokens, now)
        return 0.0, "requests"

    def charge_output(self, tokens: int, now: float) -> None:
        if self.tokens:
            self.tokens.charge(tokens, now)

    def anthropic_headers(self, now: float) -> dict[str, str]:
        headers: dict[str, str] = {}
        for name, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            if bucket is not None:
                prefix = f"anthropic-ratelimit-{name}"
                headers[f"{prefix}-limit"] = str(bucket.limit)
                headers[f"{prefix}-remaining"] = str(bucket.remaining(now))
                headers[f"{prefix}-reset"] = _rfc3339(time.time() + bucket.until_full(now))
        return headers

    def openai_headers(self, now: float) -> dict[str, str]:
        headers: dict[str, str] = {}
        for name, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            if bucket is not None:
                headers[f"x-ratelimit-limit-{name}"] = str(bucket.limit)
                headers[f"x-ratelimit-remaining-{name}"] = str(bucket.remaining(now))
                headers[f"x-ratelimit-reset-{name}"] = duration(bucket.until_full(now))
        return headers


def retry_after(seconds: float) -> str:
    """A ``retry-after`` value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))


def duration(seconds: float) -> str:
    """A duration the way OpenAI writes its reset headers: ``120ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1.0:
        return f"{round(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60.0)
    text = f"{round(rest, 3):g}s"
    return f"{int(minutes)}m{text}" if minutes else text


def _rfc3339(epoch: float) -> str:
    moment = datetime.fromtimestamp(math.ceil(epoch), tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
