"""What model calls cost: a dated table of list prices, overridable per pipeline.

Prices are US dollars per million tokens. A model is matched by its own entry, or by its
family's when its name only adds a snapshot date, so ``claude-sonnet-4-5-20250929`` is priced as
``claude-sonnet-4-5``. A model with no entry is counted in ``Usage.unpriced`` rather than
guessed; give it a price under the pipeline's ``prices:``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field

from ._usage import Usage

__all__ = ["PRICES_AS_OF", "Price", "add_cost", "default_prices"]

PRICES_AS_OF = "2025-11"
"""When the shipped prices were taken from the providers' published price lists."""


class Price(BaseModel):
    """One model's prices, USD per million tokens. ``cache_read`` / ``cache_write`` default to
    the input price when a provider does not distinguish them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cache_read: float | None = Field(default=None, ge=0)
    cache_write: float | None = Field(default=None, ge=0)


def _p(into: float, out: float, read: float, write: float | None = None) -> Price:
    return Price(input=into, output=out, cache_read=read, cache_write=write)


_DEFAULTS: dict[str, Price] = {
    # Anthropic: cache writes (5-minute) at 1.25x input, cache reads at 0.1x input.
    "claude-opus-4-1": _p(15.0, 75.0, 1.50, 18.75),
    "claude-opus-4-5": _p(5.0, 25.0, 0.50, 6.25),
    "claude-sonnet-4-5": _p(3.0, 15.0, 0.30, 3.75),
    "claude-sonnet-4": _p(3.0, 15.0, 0.30, 3.75),
    "claude-haiku-4-5": _p(1.0, 5.0, 0.10, 1.25),
    "claude-3-5-haiku": _p(0.80, 4.0, 0.08, 1.0),
    # OpenAI: cached input at the listed discount; no separate cache-write price.
    "gpt-5-nano": _p(0.05, 0.40, 0.005),
    "gpt-5-mini": _p(0.25, 2.0, 0.025),
    "gpt-5": _p(1.25, 10.0, 0.125),
    "gpt-4.1-nano": _p(0.10, 0.40, 0.025),
    "gpt-4.1-mini": _p(0.40, 1.60, 0.10),
    "gpt-4.1": _p(2.0, 8.0, 0.50),
    "gpt-4o-mini": _p(0.15, 0.60, 0.075),
    "gpt-4o": _p(2.50, 10.0, 1.25),
}


def default_prices() -> dict[str, Price]:
    """The shipped table (see :data:`PRICES_AS_OF`); a copy the caller may extend."""
    return dict(_DEFAULTS)


_SNAPSHOT = re.compile(r"(-\d{8}|-\d{4}-\d{2}-\d{2}|-latest)?")


def _lookup(model: str, table: Mapping[str, Price]) -> Price | None:
    """The price of ``model``: its own entry, or its family's when ``model`` only adds a
    snapshot date (``-20250929``, ``-2024-07-18``) or ``-latest``. ``claude-sonnet-4-6`` is
    *not* priced as ``claude-sonnet-4``: a new version is not assumed to cost the same."""
    for name, price in table.items():
        if model.startswith(name) and _SNAPSHOT.fullmatch(model[len(name) :]):
            return price
    return None


def add_cost(usage: Usage, spent: Usage, model: str, table: Mapping[str, Price]) -> None:
    """Add ``spent`` (one response's tokens) to ``usage``, with its cost when ``model`` has a
    price, else counting it as unpriced."""
    usage.add(spent)
    price = _lookup(model, table)
    if price is None:
        usage.unpriced += spent.requests
        return
    read = price.input if price.cache_read is None else price.cache_read
    write = price.input if price.cache_write is None else price.cache_write
    usage.cost_usd += (
        spent.input_tokens * price.input
        + spent.output_tokens * price.output
        + spent.cache_read_tokens * read
        + spent.cache_write_tokens * write
    ) / 1_000_000
