"""Token usage and cost of model calls, per attempt and summed per instance, stage and run."""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["Usage"]


@dataclass
class Usage:
    """What an attempt consumed from its model provider; runners add to it as they go, so a
    failed attempt's spending is counted too. ``input_tokens`` excludes cached tokens (read or
    written), whatever the provider's own convention; ``cost_usd`` is priced from the
    pipeline's price table (or reported by the agent itself, as Claude Code does)."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_usd: float = 0.0
    unpriced: int = 0
    """Requests to models with no known price: their cost is not in ``cost_usd``."""

    def add(self, other: Usage) -> None:
        # Spelled out: dataclasses.fields() per call is most of the cost of a run's totals.
        self.requests += other.requests
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cache_read_tokens += other.cache_read_tokens
        self.cache_write_tokens += other.cache_write_tokens
        self.cost_usd += other.cost_usd
        self.unpriced += other.unpriced

    def to_json(self) -> dict[str, int | float]:
        data: dict[str, int | float] = {
            item.name: getattr(self, item.name) for item in fields(self)
        }
        data["cost_usd"] = round(self.cost_usd, 6)
        return data

    def __bool__(self) -> bool:
        # Asked twice per attempt; spelled out for the same reason as add().
        return bool(
            self.requests
            or self.input_tokens
            or self.output_tokens
            or self.cache_read_tokens
            or self.cache_write_tokens
            or self.cost_usd
            or self.unpriced
        )

    def describe(self) -> str:
        """One line for people: requests, tokens, cost, and what is not priced."""
        unpriced = f" (+{self.unpriced} requests without a price)" if self.unpriced else ""
        return (
            f"{self.requests} model requests, {self.input_tokens} input / "
            f"{self.output_tokens} output / {self.cache_read_tokens} cache-read tokens, "
            f"${self.cost_usd:.4f}{unpriced}"
        )
