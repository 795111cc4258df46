"""The price table: longest-prefix matching, cache prices, unpriced models."""

from __future__ import annotations

import pytest

from phalanx._prices import Price, add_cost, default_prices
from phalanx._usage import Usage


def test_cost_uses_the_family_entry_and_cache_prices() -> None:
    """A dated snapshot is priced by its family; cache reads and writes have their own
    prices; the cost is exact; a newer version is never priced as an older one."""
    table = default_prices()
    usage = Usage()
    spent = Usage(
        requests=1,
        input_tokens=1_000_000,
        output_tokens=100_000,
        cache_read_tokens=2_000_000,
        cache_write_tokens=1_000_000,
    )
    add_cost(usage, spent, "claude-sonnet-4-5-20250929", table)
    assert usage.cost_usd == pytest.approx(3.0 + 1.5 + 0.6 + 3.75)
    assert usage.requests == 1
    assert usage.unpriced == 0
    mini = Usage()
    add_cost(mini, Usage(requests=1, input_tokens=1_000_000), "gpt-4o-mini-2024-07-18", table)
    assert mini.cost_usd == pytest.approx(0.15)  # not gpt-4o's 2.50
    newer = Usage()
    add_cost(newer, Usage(requests=1, input_tokens=10), "claude-sonnet-4-6", table)
    assert (newer.cost_usd, newer.unpriced) == (0.0, 1)


def test_unknown_models_are_counted_not_guessed() -> None:
    """A model with no price adds tokens but no cost, and is counted as unpriced; a price
    given for it (as a pipeline's ``prices:`` does) is used, cache defaulting to input."""
    usage = Usage()
    spent = Usage(requests=2, input_tokens=10, output_tokens=5, cache_read_tokens=4)
    add_cost(usage, spent, "my-local-model", default_prices())
    assert (usage.cost_usd, usage.unpriced, usage.input_tokens) == (0.0, 2, 10)
    table = {**default_prices(), "my-local-model": Price(input=1.0, output=2.0)}
    priced = Usage()
    add_cost(priced, spent, "my-local-model", table)
    assert priced.cost_usd == pytest.approx((10 * 1.0 + 5 * 2.0 + 4 * 1.0) / 1_000_000)
