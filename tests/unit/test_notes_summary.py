"""The stage summary: its figures are the stage result's own, however many instances it has."""

from __future__ import annotations

import random
from pathlib import Path

from phalanx._notes import _seconds, render_summary, usage_lines
from phalanx._results import AttemptRecord, InstanceResult, StageResult, Status
from phalanx._usage import Usage


def _stage(rng: random.Random, n: int) -> StageResult:
    """``n`` instances of every status, with zero to three attempts, some of them spending."""
    statuses: list[Status] = ["committed", "cached", "failed", "skipped"]
    instances = []
    for i in range(n):
        attempts = tuple(
            AttemptRecord(
                attempt,
                0.0,
                rng.random(),
                usage=(
                    Usage(requests=1, input_tokens=rng.randrange(100), cost_usd=rng.random() / 7)
                    if rng.random() < 0.3
                    else None
                ),
            )
            for attempt in range(1, rng.randrange(4) + 1)
        )
        status = rng.choice(statuses)
        instances.append(
            InstanceResult(
                "s", f"k{i:04d}", status, Path("out"), attempts, cause="error", message="m"
            )
        )
    return StageResult("s", tuple(instances), required=n // 2, wall_s=rng.random() * 10)


def test_the_summary_figures_are_the_stage_results() -> None:
    """Counts, the five slowest instances (ties in plan order), the serial time, the speedup
    and the model usage in the summary are what ``StageResult`` computes for itself."""
    for seed in range(5):
        result = _stage(random.Random(seed), 400)  # noqa: S311 - test data
        text = render_summary(result, run_id="r1")

        counts = (
            f"| {result.total} | {result.committed} | {result.cached} | {result.failed} "
            f"| {result.skipped} | {result.required} |"
        )
        assert counts in text
        for inst in result.slowest(5):
            share = inst.duration_s / result.wall_s
            assert f"| `{inst.key}` | {_seconds(inst.duration_s)} | {share:.0%} |" in text
        assert f"- sum of instance times (serial): {_seconds(result.sum_instance_s)}" in text
        assert f"- effective speedup: {result.speedup:.1f}x" in text
        assert "\n".join(usage_lines(result.usage)) in text


def test_a_stage_that_did_not_run_has_no_slowest_and_no_usage() -> None:
    """Without attempts there is no slowest table and no model usage; the speedup is 0."""
    result = StageResult(
        "s",
        (InstanceResult("s", "a", "skipped", Path("out"), reason="upstream failed"),),
        required=1,
        wall_s=0.0,
        skipped_reason="upstream stage 'm' did not run",
    )
    text = render_summary(result, run_id="r1")
    assert "## Slowest instances" not in text
    assert "## Model usage" not in text
    assert "- effective speedup: 0.0x" in text
    assert "| 1 | 0 | 0 | 0 | 1 | 1 | MISSED |" in text
