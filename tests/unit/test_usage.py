"""``Usage`` spells its fields out in ``add`` and ``__bool__`` (they run on the event loop for
every attempt); a field added later must be named there too."""

from __future__ import annotations

from dataclasses import fields

import pytest

from phalanx import Usage

NAMES = [item.name for item in fields(Usage)]


@pytest.mark.parametrize("name", NAMES)
def test_every_field_counts_in_truth_and_in_add(name: str) -> None:
    one = Usage(**{name: 1})
    assert one
    total = Usage()
    total.add(one)
    total.add(one)
    assert getattr(total, name) == 2
    assert all(getattr(total, other) == 0 for other in NAMES if other != name)


def test_an_empty_usage_is_false() -> None:
    assert not Usage()
