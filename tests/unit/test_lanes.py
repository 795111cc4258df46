"""Slots and lanes: priority order, resizing and cancellation of slots; the lane's AIMD limit,
pauses, rate-limit buckets and re-queued refusals, all in virtual time (a fake clock whose
sleeps end only when every task is idle), so no test waits or depends on timing luck."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import random
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import pytest

from phalanx._errors import CallTimeout, RateLimited, RunnerError
from phalanx._lanes import Lane, LaneChange, Slots, _duration, _read_limits
from phalanx.runners._base import Sent

T = TypeVar("T")


class FakeClock:
    """Virtual time. ``sleep`` parks its caller; :meth:`run` moves the clock to the earliest
    wake-up time only once every task is idle, so time passes exactly as the code under test
    asks, never because the machine was slow."""

    def __init__(self) -> None:
        self.time = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self.time

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        wake = self.time + max(0.0, seconds)
        heapq.heappush(self._sleepers, (wake, next(self._seq), future))
        await future

    async def run(self, main: Coroutine[Any, Any, T]) -> T:
        task = asyncio.ensure_future(main)
        while True:
            for _ in range(100):  # let every ready callback run: nothing here does I/O
                await asyncio.sleep(0)
            if task.done():
                return task.result()
            while self._sleepers and self._sleepers[0][2].done():
                heapq.heappop(self._sleepers)  # a cancelled sleep
            if not self._sleepers:
                task.cancel()
                raise AssertionError("stuck: no task can run and none is sleeping")
            wake, _, future = heapq.heappop(self._sleepers)
            self.time = max(self.time, wake)
            future.set_result(None)


def simulate(body: Callable[[FakeClock], Coroutine[Any, Any, T]]) -> T:
    clock = FakeClock()
    return asyncio.run(clock.run(body(clock)))


def ok(value: str = "ok", tokens: int = 0, headers: dict[str, str] | None = None) -> Sent[str]:
    return Sent(value, headers or {}, tokens)


def refusal(retry_after: float | None = 0.0, headers: dict[str, str] | None = None) -> RateLimited:
    return RateLimited("429: slow down", retry_after=retry_after, headers=headers)


# -- slots -----------------------------------------------------------------------------------


def test_slots_serve_the_highest_priority_first_and_ties_in_arrival_order() -> None:
    """Waiters are served largest priority tuple first; equal priorities first come, first
    served; an empty tuple ranks below any non-empty one."""

    async def main() -> list[str]:
        slots = Slots(1)
        await slots.acquire()
        served: list[str] = []

        async def wait(name: str, priority: tuple[float, ...]) -> None:
            await slots.acquire(priority)
            served.append(name)

        tasks = [
            asyncio.create_task(wait(name, priority))
            for name, priority in [
                ("low", (1.0,)),
                ("high-a", (3.0,)),
                ("none", ()),
                ("mid", (2.0, 5.0)),
                ("high-b", (3.0,)),
                ("mid-first", (2.0, 9.0)),
            ]
        ]
        await asyncio.sleep(0)
        assert slots.waiting == 6
        for _ in tasks:
            slots.release()
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        assert slots.in_use == 1
        return served

    assert asyncio.run(main()) == ["high-a", "high-b", "mid-first", "mid", "low", "none"]


def test_raising_the_limit_admits_waiters_and_lowering_it_preempts_nobody() -> None:
    """A higher limit wakes waiters at once; a lower one leaves holders alone and new
    acquirers wait until fewer than the new limit are in use."""

    async def main() -> None:
        slots = Slots(2)
        await slots.acquire()
        await slots.acquire()
        waiters = [asyncio.create_task(slots.acquire()) for _ in range(3)]
        await asyncio.sleep(0)
        assert (slots.in_use, slots.waiting) == (2, 3)
        slots.limit = 4
        await asyncio.sleep(0)
        assert (slots.in_use, slots.waiting) == (4, 1)
        slots.limit = 1
        assert slots.in_use == 4  # nobody preempted
        for expected in (3, 2, 1):
            slots.release()
            await asyncio.sleep(0)
            assert (slots.in_use, slots.waiting) == (expected, 1)
        slots.release()  # now 0 < 1: the last waiter gets in
        await asyncio.sleep(0)
        assert (slots.in_use, slots.waiting) == (1, 0)
        await asyncio.gather(*waiters)

    asyncio.run(main())


def test_a_cancelled_waiter_leaks_no_slot() -> None:
    """A waiter cancelled while it waits leaves the line; a slot released afterwards is free."""

    async def main() -> None:
        slots = Slots(1)
        await slots.acquire()
        waiter = asyncio.create_task(slots.acquire())
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert slots.waiting == 0
        slots.release()
        assert slots.in_use == 0
        await slots.acquire()  # at once
        assert slots.in_use == 1

    asyncio.run(main())


def test_a_waiter_granted_as_it_is_cancelled_passes_its_slot_on() -> None:
    """The race: the slot is handed to a waiter in the same loop iteration as the waiter is
    cancelled. It does not keep the slot: the next waiter gets it."""

    async def main() -> None:
        slots = Slots(1)
        await slots.acquire()
        first = asyncio.create_task(slots.acquire())
        second = asyncio.create_task(slots.acquire())
        await asyncio.sleep(0)
        slots.release()  # hands the slot to `first`...
        first.cancel()  # ...which is cancelled before it runs again
        with pytest.raises(asyncio.CancelledError):
            await first
        await second
        assert (slots.in_use, slots.waiting) == (1, 0)
        slots.release()
        assert slots.in_use == 0

    asyncio.run(main())


def test_ten_thousand_waiters_are_served_in_priority_order() -> None:
    """A run queues every pending instance on slots: 10,000 waiters with random priorities,
    half of them cancelled, are served in order and the cancelled ones leave no trace."""

    async def main() -> None:
        rng = random.Random(7)  # noqa: S311 - shuffled priorities, not secrets
        slots = Slots(0)
        served: list[float] = []

        async def wait(priority: float) -> None:
            await slots.acquire((priority,))
            served.append(priority)
            slots.release()

        priorities = [rng.random() for _ in range(10_000)]
        tasks = [asyncio.create_task(wait(p)) for p in priorities]
        await asyncio.sleep(0)
        for task in tasks[::2]:
            task.cancel()
        await asyncio.sleep(0)
        assert slots.waiting == 5_000
        slots.limit = 1
        await asyncio.gather(*tasks[1::2])
        assert served == sorted(priorities[1::2], reverse=True)
        assert (slots.in_use, slots.waiting) == (0, 0)

    asyncio.run(main())


def test_releasing_more_than_was_acquired_is_a_bug() -> None:
    """A release without an acquire raises instead of silently raising the capacity."""
    with pytest.raises(RuntimeError, match="more often than acquire"):
        Slots(1).release()


# -- AIMD ------------------------------------------------------------------------------------


async def saturate(lane: Lane) -> None:
    """Hold conversation slots until every slot of the lane's limit is in use."""
    while lane.in_use < math.floor(lane.limit):
        await lane.acquire()


def test_the_limit_halves_on_a_refusal_then_grows_back_slow_start_then_additive() -> None:
    """While saturated each success adds one (slow start); a refusal halves the limit and the
    refused call is sent again; after that each success adds 1/limit, about one per round
    trip. Only whole-number moves are announced."""
    changes: list[LaneChange] = []

    async def main(clock: FakeClock) -> list[float]:
        lane = Lane("p m", auto=True, ceiling=64, start=4, clock=clock, on_change=changes.append)
        gate = lane.gate()
        limits = [lane.limit]
        for _ in range(2):
            await saturate(lane)
            assert await gate.request(_returns(ok()), estimate=10) == "ok"
            limits.append(lane.limit)
        outcomes: list[Sent[str] | RateLimited] = [refusal(), ok()]
        assert await gate.request(_script(outcomes), estimate=10) == "ok"
        limits.append(lane.limit)
        assert lane.in_use >= lane.limit  # still saturated: 6 held, limit 3
        for _ in range(3):
            await gate.request(_returns(ok()), estimate=10)
            limits.append(lane.limit)
        assert (lane.requests, lane.rejections, lane.requeued) == (7, 1, 1)
        return limits

    limits = simulate(main)
    assert limits[:3] == [4.0, 5.0, 6.0]
    assert limits[3] == pytest.approx(3.0 + 1 / 3)  # halved to 3, then the re-sent call's success
    assert limits[4] == pytest.approx(limits[3] + 1 / limits[3])
    assert math.floor(limits[-1]) == 4
    assert [(c.old, c.new, c.reason) for c in changes] == [
        (4, 5, "increase"),
        (5, 6, "increase"),
        (6, 3, "decrease"),
        (3, 4, "increase"),
    ]


def test_a_refusal_cuts_to_what_the_provider_accepted_by_a_tenth_to_a_half() -> None:
    """The calls sent before a refused one and still in flight were accepted: the provider
    took that many at once, so the limit comes down to their number. It comes down by half
    when fewer were accepted, and by a tenth even when nearly all were. (Halving a hard cap of
    50 each time it is found again leaves a quarter of it unused on average.)"""

    async def main(clock: FakeClock) -> list[float]:
        limits = []
        for accepted in (4, 10, 15):
            lane = Lane("p m", auto=True, ceiling=64, start=16, clock=clock)

            async def held(lane: Lane = lane) -> str:
                return await lane.gate().request(_script([ok()], clock, latency=5.0), estimate=1)

            tasks = [asyncio.ensure_future(held()) for _ in range(accepted)]
            await clock.sleep(0.1)  # all of them sent, none answered yet
            assert await lane.gate().request(_script([refusal(), ok()]), estimate=1) == "ok"
            limits.append(lane.limit)
            assert await asyncio.gather(*tasks) == ["ok"] * accepted
        return limits

    assert simulate(main) == [8.0, 10.0, pytest.approx(14.4)]


def test_the_limit_grows_only_while_the_lane_is_saturated() -> None:
    """Successes while slots are left unused do not raise the limit: it would only license a
    burst later."""

    async def main(clock: FakeClock) -> float:
        lane = Lane("p m", auto=True, ceiling=64, start=4, clock=clock)
        await lane.acquire()
        for _ in range(10):
            await lane.gate().request(_returns(ok()), estimate=1)
        return lane.limit

    assert simulate(main) == 4.0


def test_calls_held_back_by_the_buckets_do_not_grow_the_limit() -> None:
    """Conversations queued at an empty requests bucket fill the slots, but what holds them
    back is the rate limit: their successes must not raise the concurrency limit, or the lane
    would send a burst of that size once the bucket refills."""
    empty = {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1s",
    }

    async def main(clock: FakeClock) -> tuple[float, float]:
        lane = Lane("p m", auto=True, ceiling=64, start=4, clock=clock)
        await saturate(lane)
        gate = lane.gate()
        await gate.request(_returns(ok(headers=empty)), estimate=1)  # grows: it did not wait
        grown = lane.limit
        await saturate(lane)
        for _ in range(5):  # each waits about a second for the bucket
            await gate.request(_returns(ok(headers=empty)), estimate=1)
        return grown, lane.limit

    grown, after = simulate(main)
    assert grown == 5.0
    assert after == grown


def test_one_cut_per_window() -> None:
    """Calls in flight together that are all refused cut the limit once: refusals of calls
    sent before the last cut say nothing about the new limit. A call sent after the cut and
    refused cuts again."""
    changes: list[LaneChange] = []

    async def main(clock: FakeClock) -> None:
        lane = Lane("p m", auto=True, ceiling=64, start=8, clock=clock, on_change=changes.append)

        async def call() -> str:
            outcomes: list[Sent[str] | RateLimited] = [refusal(), ok()]
            return await lane.gate().request(_script(outcomes, clock, latency=1.0), estimate=1)

        assert await asyncio.gather(*(call() for _ in range(3))) == ["ok"] * 3
        assert lane.limit == 4.0
        assert (lane.rejections, lane.requeued) == (3, 3)
        await call()
        assert lane.limit == 2.0

    simulate(main)
    assert [(c.old, c.new, c.reason) for c in changes] == [(8, 4, "decrease"), (4, 2, "decrease")]


def test_after_a_refusal_the_lane_stays_one_below_it_and_probes_ever_more_rarely() -> None:
    """Refused at 4 slots: the limit grows back to 3 and stays there (probing 4 again would
    cost the whole lane a pause) until the probe time has passed; refused again at 4, it
    waits twice as long before the next probe; once it grows past 4 unrefused, it forgets."""

    async def main(clock: FakeClock) -> None:
        lane = Lane("p m", auto=True, ceiling=64, start=4, clock=clock, probe=2.0)
        gate = lane.gate()

        async def grow(calls: int) -> None:
            for _ in range(calls):
                await saturate(lane)
                await gate.request(_returns(ok()), estimate=1)

        await saturate(lane)
        await gate.request(_script([refusal(), ok()]), estimate=1)  # refused at 4: down to 2
        await grow(40)
        assert math.floor(lane.limit) == 3
        await clock.sleep(2.5)  # the probe time has passed: 4 is tried again
        await grow(1)
        assert math.floor(lane.limit) == 4
        await gate.request(_script([refusal(), ok()]), estimate=1)  # refused at 4 again
        await clock.sleep(2.5)
        await grow(40)
        assert math.floor(lane.limit) == 3  # now it waits 4 s, not 2
        await clock.sleep(2.0)
        await grow(40)
        assert math.floor(lane.limit) > 5  # grown past 4 unrefused: the memory is gone

    simulate(main)


def test_a_call_timeout_cuts_the_limit_and_fails_the_attempt() -> None:
    """A call that timed out is not sent again (the attempt fails and its retry policy
    decides), but it is a sign of overload: the limit halves; other errors leave it alone."""

    async def main(clock: FakeClock) -> float:
        lane = Lane("p m", auto=True, ceiling=64, start=8, clock=clock)
        with pytest.raises(CallTimeout):
            await lane.gate().request(_raises(CallTimeout("no answer")), estimate=1)
        with pytest.raises(RunnerError):
            await lane.gate().request(_raises(RunnerError("500")), estimate=1)
        assert lane.requests == 2
        return lane.limit

    assert simulate(main) == 4.0


def test_the_limit_never_goes_below_one_nor_above_the_ceiling() -> None:
    """Refusals halve down to 1 and no further; slow start stops at the ceiling."""

    async def main(clock: FakeClock) -> tuple[float, float]:
        low = Lane("low", auto=True, ceiling=8, start=2, clock=clock)
        for _ in range(4):
            outcomes: list[Sent[str] | RateLimited] = [refusal(), ok()]
            await low.gate().request(_script(outcomes), estimate=1)
        high = Lane("high", auto=True, ceiling=6, start=4, clock=clock)
        for _ in range(5):
            await saturate(high)
            await high.gate().request(_returns(ok()), estimate=1)
        return low.limit, high.limit

    assert simulate(main) == (1.0, 6.0)


def test_ceiling_changes() -> None:
    """Lowering the ceiling brings an adaptive limit down to it (announced as ``ceiling``);
    raising it lets the limit grow again without jumping; a fixed lane's slot count follows
    its ceiling."""
    changes: list[LaneChange] = []

    async def main(clock: FakeClock) -> None:
        lane = Lane("p m", auto=True, ceiling=8, start=4, clock=clock, on_change=changes.append)
        lane.set_ceiling(2)
        assert (lane.limit, lane.ceiling) == (2.0, 2)
        lane.set_ceiling(16)
        assert lane.limit == 2.0
        await saturate(lane)
        await lane.gate().request(_returns(ok()), estimate=1)
        assert lane.limit == 3.0

        fixed = Lane("local", auto=False, ceiling=4, clock=clock, on_change=changes.append)
        for _ in range(4):
            await fixed.acquire()
        blocked = asyncio.create_task(fixed.acquire())
        await asyncio.sleep(0)
        assert fixed.waiting == 1
        fixed.set_ceiling(6)
        await blocked
        assert (fixed.limit, fixed.in_use, fixed.waiting) == (6.0, 5, 0)
        with pytest.raises(ValueError, match=">= 1"):
            fixed.set_ceiling(0)

    simulate(main)
    assert [(c.lane, c.old, c.new, c.reason) for c in changes] == [
        ("p m", 4, 2, "ceiling"),
        ("p m", 2, 3, "increase"),
        ("local", 4, 6, "ceiling"),
    ]


def test_a_fixed_lane_does_not_adapt_but_still_pauses_and_requeues() -> None:
    """For servers that queue instead of refusing (vLLM, Ollama): the slot count stays put,
    refusals still pause the lane and are sent again."""

    async def main(clock: FakeClock) -> Lane:
        lane = Lane("local", auto=False, ceiling=3, clock=clock)
        outcomes: list[Sent[str] | RateLimited] = [refusal(2.0), ok()]
        await lane.gate().request(_script(outcomes), estimate=1)
        assert clock.now() == 2.0
        await saturate(lane)
        await lane.gate().request(_returns(ok()), estimate=1)
        return lane

    lane = simulate(main)
    assert (lane.limit, lane.rejections, lane.requeued) == (3.0, 1, 1)


# -- pauses and re-queueing ------------------------------------------------------------------


def test_retry_after_pauses_every_call_of_the_lane() -> None:
    """A refusal with ``retry-after: 5`` pauses the lane: a call started during the pause waits
    until it ends (and says so to ``on_wait``), the refused call is sent again then too."""
    changes: list[LaneChange] = []
    waits: list[float] = []

    async def main(clock: FakeClock) -> dict[str, list[float]]:
        lane = Lane("p m", auto=True, ceiling=8, clock=clock, on_change=changes.append)
        sent: dict[str, list[float]] = {"a": [], "b": []}

        async def first() -> str:
            outcomes: list[Sent[str] | RateLimited] = [refusal(5.0), ok("a")]
            send = _script(outcomes, clock, latency=1.0, log=sent["a"])
            return await lane.gate().request(send, estimate=1)

        async def second() -> str:
            await clock.sleep(2.0)
            assert lane.paused_until == 6.0
            send = _script([ok("b")], clock, latency=1.0, log=sent["b"])
            return await lane.gate(on_wait=waits.append).request(send, estimate=1)

        assert list(await asyncio.gather(first(), second())) == ["a", "b"]
        snapshot = lane.snapshot()
        assert (snapshot.requests, snapshot.rejections, snapshot.requeued) == (3, 1, 1)
        assert snapshot.paused_until == 6.0
        return sent

    sent = simulate(main)
    assert sent == {"a": [0.0, 6.0], "b": [6.0]}
    assert sum(waits) == pytest.approx(4.0)
    assert [(c.reason, c.paused_for) for c in changes] == [("decrease", None), ("pause", 5.0)]


def test_a_pause_is_announced_once_however_many_calls_are_refused() -> None:
    """Calls refused while the lane is already paused extend the pause silently."""
    changes: list[LaneChange] = []

    async def main(clock: FakeClock) -> None:
        lane = Lane("p m", auto=False, ceiling=8, clock=clock, on_change=changes.append)

        async def call() -> str:
            outcomes: list[Sent[str] | RateLimited] = [refusal(3.0), ok()]
            return await lane.gate().request(_script(outcomes, clock, latency=1.0), estimate=1)

        await asyncio.gather(*(call() for _ in range(5)))
        assert clock.now() == 5.0  # refused at 1, paused until 4, answered at 5

    simulate(main)
    assert [(c.reason, c.paused_for) for c in changes] == [("pause", 3.0)]


def test_a_refusal_without_retry_after_pauses_until_the_exhausted_limit_resets() -> None:
    """No ``retry-after``: the pause lasts until the reset of the limit the headers show
    exhausted; with no headers at all, one second."""

    async def main(clock: FakeClock) -> list[float]:
        lane = Lane("p m", auto=False, ceiling=8, clock=clock)
        exhausted = {
            "x-ratelimit-limit-requests": "100",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "2.5s",
            "x-ratelimit-limit-tokens": "100000",
            "x-ratelimit-remaining-tokens": "90000",
            "x-ratelimit-reset-tokens": "6m0s",
        }
        log: list[float] = []
        outcomes: list[Sent[str] | RateLimited] = [
            refusal(None, exhausted),
            refusal(None),
            ok(),
        ]
        await lane.gate().request(_script(outcomes, clock, log=log), estimate=10)
        return log

    assert simulate(main) == [0.0, 2.5, 3.5]


def test_a_call_refused_more_than_max_requeues_times_fails() -> None:
    """Each refusal sends the call again after the pause, up to ``max_requeues`` times; the
    next refusal is raised, so the attempt fails and the retry policy takes over."""

    async def main(clock: FakeClock) -> tuple[Lane, list[float]]:
        lane = Lane("p m", auto=True, ceiling=8, clock=clock, max_requeues=2)
        log: list[float] = []
        outcomes: list[Sent[str] | RateLimited] = [refusal(0.5)] * 10
        with pytest.raises(RateLimited):
            await lane.gate().request(_script(outcomes, clock, log=log), estimate=1)
        return lane, log

    lane, log = simulate(main)
    assert log == [0.0, 0.5, 1.0]
    assert (lane.requests, lane.rejections, lane.requeued) == (3, 3, 2)


def test_cancelling_waiting_calls_lets_the_next_one_through() -> None:
    """Calls cancelled while they wait in line for a pause (the head of the line, sleeping,
    and one behind it) leave the line: the call behind them goes when the pause ends."""

    async def main(clock: FakeClock) -> list[float]:
        lane = Lane("p m", auto=False, ceiling=8, clock=clock)
        refused = asyncio.create_task(
            lane.gate().request(_script([refusal(8.0), ok()]), estimate=1)
        )
        await clock.sleep(0.5)  # refused at 0: paused until 8, first in line
        second = asyncio.create_task(lane.gate().request(_returns(ok()), estimate=1))
        log: list[float] = []
        third = asyncio.create_task(
            lane.gate().request(_script([ok()], clock, log=log), estimate=1)
        )
        await clock.sleep(0.5)
        for task in (refused, second):
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert await third == "ok"
        assert lane.requests == 2
        return log

    assert simulate(main) == [8.0]


# -- rate-limit buckets ----------------------------------------------------------------------


class FakeProvider:
    """A provider with per-minute request and token buckets in virtual time: a call whose
    request or input tokens do not fit is refused (429); output tokens are charged when it is
    answered. Responses carry Anthropic's or OpenAI's rate-limit headers."""

    def __init__(
        self,
        clock: FakeClock,
        api: Literal["anthropic", "openai"],
        *,
        rpm: int | None = None,
        tpm: int | None = None,
        latency: float = 1.0,
    ) -> None:
        self.clock = clock
        self.api = api
        self.latency = latency
        self.limits = {"requests": rpm, "tokens": tpm}
        self.levels = {kind: float(limit or 0) for kind, limit in self.limits.items()}
        self.updated = 0.0
        self.admitted: list[float] = []
        self.refused = 0

    def _refill(self) -> None:
        now = self.clock.now()
        for kind, limit in self.limits.items():
            if limit is not None:
                level = self.levels[kind] + (now - self.updated) * limit / 60
                self.levels[kind] = min(float(limit), level)
        self.updated = now

    def headers(self) -> dict[str, str]:
        self._refill()
        headers: dict[str, str] = {}
        for kind, limit in self.limits.items():
            if limit is None:
                continue
            remaining = str(max(0, math.floor(self.levels[kind])))
            until_full = (limit - self.levels[kind]) / (limit / 60)
            if self.api == "anthropic":
                reset = datetime.fromtimestamp(math.ceil(time.time() + until_full), tz=UTC)
                headers[f"anthropic-ratelimit-{kind}-limit"] = str(limit)
                headers[f"anthropic-ratelimit-{kind}-remaining"] = remaining
                headers[f"anthropic-ratelimit-{kind}-reset"] = reset.strftime("%Y-%m-%dT%H:%M:%SZ")
            else:
                headers[f"x-ratelimit-limit-{kind}"] = str(limit)
                headers[f"x-ratelimit-remaining-{kind}"] = remaining
                headers[f"x-ratelimit-reset-{kind}"] = f"{until_full:.3f}s"
        return headers

    def send(
        self, input_tokens: int, output_tokens: int
    ) -> Callable[[], Coroutine[Any, Any, Sent[str]]]:
        async def send() -> Sent[str]:
            self._refill()
            wants = {"requests": 1, "tokens": input_tokens}
            if any(
                self.limits[kind] is not None and self.levels[kind] < wants[kind] for kind in wants
            ):
                self.refused += 1
                raise refusal(1.0, self.headers())
            for kind, amount in wants.items():
                self.levels[kind] -= amount
            self.admitted.append(self.clock.now())
            await self.clock.sleep(self.latency)
            self._refill()
            self.levels["tokens"] -= output_tokens
            return ok(tokens=input_tokens + output_tokens, headers=self.headers())

        return send


def most_in_a_minute(times: list[float]) -> int:
    """The most calls admitted within any 60-second window."""
    return max(sum(1 for t in times if start <= t < start + 60) for start in times)


@pytest.mark.parametrize("api", ["anthropic", "openai"])
def test_requests_per_minute_from_the_headers_are_never_overshot(
    api: Literal["anthropic", "openai"],
) -> None:
    """Once a response announced 10 requests a minute, 30 calls at once are paced: none is
    refused, the first minute sends no more than the announced allowance, and the pacing is
    close to the allowance (about one call every six seconds once the bucket is empty)."""

    async def main(clock: FakeClock) -> FakeProvider:
        provider = FakeProvider(clock, api, rpm=10)
        lane = Lane("p m", auto=False, ceiling=100, clock=clock)
        await lane.gate().request(provider.send(10, 10), estimate=100)  # learns the limits
        calls = [lane.gate().request(provider.send(10, 10), estimate=100) for _ in range(30)]
        await asyncio.gather(*calls)
        return provider

    provider = simulate(main)
    assert provider.refused == 0
    assert len(provider.admitted) == 31
    # A token bucket lets a full bucket through, then the refill: at most 10 + 10 a minute.
    assert most_in_a_minute(provider.admitted) <= 20
    assert sum(1 for t in provider.admitted if t < 60) <= 10 + 10
    assert provider.admitted[-1] <= 1 + 21 * 6 + 6  # never far behind the allowance


@pytest.mark.parametrize("api", ["anthropic", "openai"])
def test_tokens_per_minute_are_reserved_and_settled(api: Literal["anthropic", "openai"]) -> None:
    """Each call reserves its input plus max_tokens and gives back what it did not use: with
    6,000 tokens a minute, 20 calls of 1,000 input tokens (estimate 2,000, real 1,300) are
    never refused, and they go at the rate the real usage allows, not the estimate's."""

    async def main(clock: FakeClock) -> FakeProvider:
        provider = FakeProvider(clock, api, tpm=6000)
        lane = Lane("p m", auto=False, ceiling=100, clock=clock)
        await lane.gate().request(provider.send(1000, 300), estimate=2000)
        calls = [lane.gate().request(provider.send(1000, 300), estimate=2000) for _ in range(20)]
        await asyncio.gather(*calls)
        return provider

    provider = simulate(main)
    assert provider.refused == 0
    assert len(provider.admitted) == 21
    # 21 calls x 1,300 tokens at 100 tokens/s is 273 s, minus the first full bucket (60 s);
    # reserving the full 2,000 each without settling would take about 360 s.
    assert provider.admitted[-1] < 300


def test_reserve_settle_and_an_early_wake() -> None:
    """A call waits for the tokens another call reserved; when that call ends and gives back
    what it did not use, the waiting call goes at once instead of sleeping the wait it first
    computed, and what ``on_wait`` heard adds up to the time it really waited."""

    async def main(clock: FakeClock) -> tuple[list[float], list[float]]:
        lane = Lane("p m", auto=False, ceiling=8, clock=clock)
        seed = {"x-ratelimit-limit-tokens": "6000", "x-ratelimit-remaining-tokens": "3000"}
        await lane.gate().request(_returns(ok(headers=seed)), estimate=0)
        log: list[float] = []
        waits: list[float] = []
        big = lane.gate().request(_script([ok(tokens=500)], clock, latency=2.0), estimate=2500)
        small = lane.gate(on_wait=waits.append).request(
            _script([ok()], clock, log=log), estimate=1000
        )
        await asyncio.gather(big, small)
        return log, waits

    log, waits = simulate(main)
    assert log == [2.0]  # 500 left + 100/s would take until 5.0; the settle at 2.0 frees 2,000
    assert waits[0] == pytest.approx(5.0)
    assert sum(waits) == pytest.approx(2.0)


def test_a_cancelled_call_releases_its_reservation() -> None:
    """Cancelling an attempt mid-call gives the call's tokens back: the next call does not wait
    for tokens nobody is using."""

    async def main(clock: FakeClock) -> list[float]:
        lane = Lane("p m", auto=False, ceiling=8, clock=clock)
        seed = {"x-ratelimit-limit-tokens": "6000", "x-ratelimit-remaining-tokens": "6000"}
        await lane.gate().request(_returns(ok(headers=seed)), estimate=0)
        stuck = asyncio.create_task(
            lane.gate().request(_script([ok()], clock, latency=100.0), estimate=5000)
        )
        await clock.sleep(1.0)
        stuck.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stuck
        log: list[float] = []
        await lane.gate().request(_script([ok()], clock, log=log), estimate=5000)
        return log

    assert simulate(main) == [1.0]


def test_unknown_limits_do_not_hold_calls_back() -> None:
    """Before any response announced a limit (or with a server that announces none), calls go
    at once."""

    async def main(clock: FakeClock) -> float:
        lane = Lane("p m", auto=False, ceiling=100, clock=clock)
        calls = [lane.gate().request(_returns(ok()), estimate=10**9) for _ in range(50)]
        await asyncio.gather(*calls)
        return clock.now()

    assert simulate(main) == 0.0


def test_rate_limit_headers_are_read() -> None:
    """Anthropic's combined headers; its split input/output headers (the one with fewer tokens
    remaining stands for both); OpenAI's, with their durations; junk is ignored."""
    wall = datetime(2025, 1, 1, tzinfo=UTC).timestamp()
    anthropic = _read_limits(
        {
            "Anthropic-RateLimit-Requests-Limit": "50",
            "anthropic-ratelimit-requests-remaining": "49",
            "anthropic-ratelimit-requests-reset": "2025-01-01T00:00:02Z",
            "anthropic-ratelimit-tokens-limit": "40000",
            "anthropic-ratelimit-tokens-remaining": "39000",
        },
        wall,
    )
    assert (anthropic["requests"].limit, anthropic["requests"].remaining) == (50, 49)
    assert anthropic["requests"].reset == pytest.approx(2.0)
    assert (anthropic["tokens"].limit, anthropic["tokens"].remaining) == (40000, 39000)
    split = _read_limits(
        {
            "anthropic-ratelimit-input-tokens-limit": "400000",
            "anthropic-ratelimit-input-tokens-remaining": "390000",
            "anthropic-ratelimit-output-tokens-limit": "80000",
            "anthropic-ratelimit-output-tokens-remaining": "70000",
        },
        wall,
    )
    assert (split["tokens"].limit, split["tokens"].remaining) == (80000, 70000)
    assert "requests" not in split
    openai = _read_limits(
        {
            "x-ratelimit-limit-requests": "500",
            "x-ratelimit-remaining-requests": "499",
            "x-ratelimit-reset-requests": "120ms",
            "x-ratelimit-limit-tokens": "30000",
            "x-ratelimit-remaining-tokens": "not a number",
        },
        wall,
    )
    assert openai["requests"].reset == pytest.approx(0.12)
    assert "tokens" not in openai
    assert [_duration(text) for text in ("6m0s", "1.5s", "1h2m3s", "20ms", "2", "soon")] == [
        360.0,
        1.5,
        3723.0,
        0.02,
        2.0,
        None,
    ]


def test_refusals_pickle_with_their_headers() -> None:
    """A refusal crosses process boundaries with its rate-limit headers."""
    import pickle

    error = refusal(2.0, {"retry-after": "2"})
    copy = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own object, round-tripped
    assert (type(copy), copy.retry_after, copy.headers) == (RateLimited, 2.0, {"retry-after": "2"})


# -- fake sends --------------------------------------------------------------------------------


def _returns(sent: Sent[str]) -> Callable[[], Coroutine[Any, Any, Sent[str]]]:
    async def send() -> Sent[str]:
        return sent

    return send


def _raises(error: Exception) -> Callable[[], Coroutine[Any, Any, Sent[str]]]:
    async def send() -> Sent[str]:
        raise error

    return send


def _script(
    outcomes: list[Sent[str] | RateLimited],
    clock: FakeClock | None = None,
    *,
    latency: float = 0.0,
    log: list[float] | None = None,
) -> Callable[[], Coroutine[Any, Any, Sent[str]]]:
    """A send that answers with ``outcomes`` in turn, each after ``latency``, and notes in
    ``log`` the clock time of every send."""
    queue = list(outcomes)

    async def send() -> Sent[str]:
        if log is not None:
            assert clock is not None
            log.append(clock.now())
        if latency and clock is not None:
            await clock.sleep(latency)
        outcome = queue.pop(0)
        if isinstance(outcome, RateLimited):
            raise outcome
        return outcome

    return send
