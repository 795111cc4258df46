"""Slots with a movable limit, and the adaptive lanes that API runners' calls go through.

A :class:`Lane` is shared by every instance that talks to the same provider, endpoint, model
and credential: whatever limits the provider enforces, it enforces on all of them together.
It holds three things.

- Conversation slots: an attempt holds one for its whole conversation, so the lane's limit is
  the number of conversations in flight. With ``auto`` the limit adapts (AIMD, like TCP's
  congestion window): it starts low, grows while the provider accepts every call and the lane
  is saturated, and comes down when the provider refuses one (429, 529, 503: to what the
  provider was seen to accept, by at least a tenth and at most half) or a call times out
  (by half).
  Without ``auto`` it is a fixed slot count, for local servers (vLLM, Ollama) that queue
  requests instead of refusing them and so never say when to slow down.
- A pause: after a refusal every call waits for the provider's ``retry-after`` (or the reset of
  the rate limit the headers show exhausted, or a second when nothing is known).
- Token buckets for requests and tokens per minute, unknown until the provider's rate-limit
  headers announce them and re-synchronised from every response, so a run paces itself inside
  its quota instead of discovering the quota through refusals.

A refused call is sent again by the lane's :class:`~phalanx.runners._base.Gate` instead of
failing the attempt: being told to wait is not the agent's failure. Nothing here knows about
stages or the scheduler.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal, Protocol, TypeVar

from ._errors import CallTimeout, RateLimited
from .runners._base import Gate, Sent

__all__ = ["SYSTEM_CLOCK", "Clock", "Lane", "LaneChange", "LaneSnapshot", "Slots"]

_T = TypeVar("_T")
_EPSILON = 1e-9
"""Waits shorter than this are none: float rounding must not make a waiter sleep forever for
an amount of time a clock cannot represent."""


class Clock(Protocol):
    """Where lanes (and the scheduler's guards) read the time and wait: the system's, or a fake
    one whose ``sleep`` advances virtual time so tests are deterministic."""

    def now(self) -> float:
        """Monotonic seconds."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time."""
        ...


class _SystemClock:
    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK: Final[Clock] = _SystemClock()
"""``time.monotonic`` and ``asyncio.sleep``."""


# -- slots -----------------------------------------------------------------------------------


class _SlotWaiter:
    """One acquirer waiting in a :class:`Slots` heap. The heap is a min-heap, so "less than"
    means "served first": the larger priority, then the earlier arrival."""

    __slots__ = ("future", "priority", "seq")

    def __init__(self, priority: tuple[float, ...], seq: int, future: asyncio.Future[None]) -> None:
        self.priority = priority
        self.seq = seq
        self.future = future

    def __lt__(self, other: _SlotWaiter) -> bool:
        if self.priority != other.priority:
            return self.priority > other.priority
        return self.seq < other.seq


class Slots:
    """A semaphore whose limit can change while it is in use and whose waiters are served by
    priority: the waiter with the largest ``priority`` tuple first, ties in arrival order.

    Raising :attr:`limit` admits waiters at once; lowering it never takes a slot from its
    holder: new acquirers wait until fewer than ``limit`` are in use. Every operation is
    O(log n) in the number of waiters (a heap; cancelled waiters are dropped lazily), because
    the scheduler queues every pending instance of a run on these, ten thousand and more.

    A cancelled :meth:`acquire` never leaks a slot, including when the slot was handed to it
    in the same loop iteration as it was cancelled: it then passes the slot on.
    """

    def __init__(self, limit: int) -> None:
        self._limit = _check_limit(limit)
        self._in_use = 0
        self._heap: list[_SlotWaiter] = []
        self._live = 0
        self._seq = itertools.count()

    @property
    def limit(self) -> int:
        """How many may hold a slot at once (0 admits nobody)."""
        return self._limit

    @limit.setter
    def limit(self, value: int) -> None:
        self._limit = _check_limit(value)
        self._grant()

    @property
    def in_use(self) -> int:
        """Slots held now (may exceed :attr:`limit` just after it was lowered)."""
        return self._in_use

    @property
    def waiting(self) -> int:
        """Acquirers waiting for a slot."""
        return self._live

    async def acquire(self, priority: Sequence[float] = ()) -> None:
        """Take a slot, waiting behind every waiter of a higher priority and every earlier one
        of the same priority."""
        if self._in_use < self._limit:
            # Nobody waits while a slot is free: _grant hands free slots out the moment they
            # free up, so taking this one jumps no queue.
            self._in_use += 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = _SlotWaiter(tuple(priority), next(self._seq), future)
        heapq.heappush(self._heap, waiter)
        self._live += 1
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # granted as it was cancelled: pass the slot on
            else:
                future.cancel()  # left in the heap; _grant skips it
                self._live -= 1
                self._compact()
            raise

    def release(self) -> None:
        """Give a slot back; the first waiter in line takes it if the limit allows."""
        if self._in_use <= 0:
            raise RuntimeError("Slots.release() called more often than acquire()")
        self._in_use -= 1
        self._grant()

    def _grant(self) -> None:
        while self._in_use < self._limit and self._heap:
            waiter = heapq.heappop(self._heap)
            if waiter.future.done():
                continue  # cancelled while it waited
            waiter.future.set_result(None)
            self._in_use += 1
            self._live -= 1

    def _compact(self) -> None:
        """Drop cancelled waiters once they are most of the heap, so a long run that cancels
        many waiters keeps a heap the size of its live ones."""
        if len(self._heap) > 64 and len(self._heap) > 2 * self._live:
            self._heap = [waiter for waiter in self._heap if not waiter.future.done()]
            heapq.heapify(self._heap)


def _check_limit(value: int) -> int:
    if value < 0:
        raise ValueError(f"a slot limit must be >= 0, not {value}")
    return value


# -- rate-limit headers ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Announced:
    """One rate limit as a response's headers announce it; ``reset`` in seconds from now."""

    limit: int
    remaining: int
    reset: float | None


_Kind = Literal["requests", "tokens"]


def _read_limits(headers: Mapping[str, str], wall: float) -> dict[_Kind, _Announced]:
    """The request and token limits a response announces (``wall`` is ``time.time()``, for
    Anthropic's absolute reset times).

    Anthropic: ``anthropic-ratelimit-requests-*`` and ``anthropic-ratelimit-tokens-*``. The
    latter already describes the most restrictive of its token limits. When a response has
    only the split ``input-tokens-*`` / ``output-tokens-*`` headers, the one with fewer tokens
    remaining stands for both, by the same rule. A lane keeps one token bucket and reserves
    input plus ``max_tokens`` in it, at least what either limit charges, so neither can be
    overshot. OpenAI: ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``.
    """
    lower = {name.lower(): value for name, value in headers.items()}
    found: dict[_Kind, _Announced] = {}
    requests = _anthropic(lower, "requests", wall) or _openai(lower, "requests")
    if requests is not None:
        found["requests"] = requests
    tokens = _anthropic(lower, "tokens", wall)
    if tokens is None:
        split = [
            announced
            for name in ("input-tokens", "output-tokens")
            if (announced := _anthropic(lower, name, wall)) is not None
        ]
        tokens = min(split, key=lambda announced: announced.remaining) if split else None
    tokens = tokens or _openai(lower, "tokens")
    if tokens is not None:
        found["tokens"] = tokens
    return found


def _anthropic(headers: Mapping[str, str], name: str, wall: float) -> _Announced | None:
    prefix = f"anthropic-ratelimit-{name}"
    reset: float | None = None
    text = headers.get(f"{prefix}-reset")
    if text is not None:
        with contextlib.suppress(ValueError):
            reset = max(0.0, datetime.fromisoformat(text).timestamp() - wall)
    return _announced(headers.get(f"{prefix}-limit"), headers.get(f"{prefix}-remaining"), reset)


def _openai(headers: Mapping[str, str], name: str) -> _Announced | None:
    text = headers.get(f"x-ratelimit-reset-{name}")
    reset = _duration(text) if text is not None else None
    limit = headers.get(f"x-ratelimit-limit-{name}")
    return _announced(limit, headers.get(f"x-ratelimit-remaining-{name}"), reset)


def _announced(limit: str | None, remaining: str | None, reset: float | None) -> _Announced | None:
    if limit is None or remaining is None:
        return None
    try:
        count, left = int(float(limit)), int(float(remaining))
    except ValueError:
        return None
    if count < 1:
        return None
    return _Announced(count, max(0, left), reset)


_PART = re.compile(r"(\d+(?:\.\d*)?)(ms|h|m|s)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration(text: str) -> float | None:
    """OpenAI's reset durations: ``120ms``, ``1.5s``, ``6m0s``, ``1h2m3s``; a bare number is
    seconds."""
    text = text.strip()
    parts = _PART.findall(text)
    if parts and "".join(number + unit for number, unit in parts) == text:
        return sum(float(number) * _UNITS[unit] for number, unit in parts)
    try:
        return max(0.0, float(text))
    except ValueError:
        return None


# -- buckets ---------------------------------------------------------------------------------


class _Bucket:
    """A per-minute allowance refilled continuously at ``limit / 60`` a second; the level may
    go below zero (a call that used more than it reserved). Unknown (``limit`` None) until a
    response announces it: then nothing waits for it."""

    def __init__(self) -> None:
        self.limit: int | None = None
        self.level = 0.0
        self._updated = 0.0

    def _refill(self, now: float) -> None:
        if self.limit is not None:
            rate = self.limit / 60.0
            self.level = min(float(self.limit), self.level + (now - self._updated) * rate)
        self._updated = now

    def wait(self, amount: int, now: float) -> float:
        """Seconds until ``amount`` is available (a full bucket, for more than it holds)."""
        if self.limit is None:
            return 0.0
        self._refill(now)
        missing = min(amount, self.limit) - self.level
        return missing / (self.limit / 60.0) if missing > _EPSILON else 0.0

    def add(self, amount: float, now: float) -> None:
        """Take (negative) or give back (positive) ``amount``."""
        self._refill(now)
        if self.limit is not None:
            self.level = min(float(self.limit), self.level + amount)

    def sync(self, announced: _Announced, pending: float, now: float) -> None:
        self.limit = announced.limit
        self.level = min(float(announced.limit), announced.remaining - pending)
        self._updated = now


# -- the lane ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaneChange:
    """A lane's limit moved to another whole number (``reason`` ``increase``, ``decrease``, or
    ``ceiling`` when live tuning lowered or, for a fixed lane, moved its ceiling), or the lane
    paused (``reason`` ``pause``, ``paused_for`` seconds; ``old == new``)."""

    lane: str
    old: int
    new: int
    reason: Literal["increase", "decrease", "ceiling", "pause"]
    paused_for: float | None = None


@dataclass(frozen=True)
class LaneSnapshot:
    """A lane's state for the live display. ``paused_until`` is a time of the lane's clock:
    the lane is paused while ``now() < paused_until``."""

    name: str
    limit: float
    ceiling: int
    in_use: int
    waiting: int
    requests: int
    rejections: int
    requeued: int
    paused_until: float


@dataclass
class _Ticket:
    """One call sent through the lane: its place in the order of sends, what it reserved and
    the limit's window it was sent in."""

    seq: int
    estimate: int
    window: int
    waited: bool = False  # it waited in line, for a pause or for the buckets


class _Waiter:
    """A call in a lane's line. ``reported`` is the clock time up to which its waiting has been
    reported to ``on_wait``: each report moves it, so what one call hears adds up to what it
    waited, however often the line's sleeps are cut short."""

    __slots__ = ("on_wait", "reported", "turn")

    def __init__(self, on_wait: Callable[[float], None] | None, now: float) -> None:
        self.on_wait = on_wait
        self.reported = now
        self.turn: asyncio.Future[None] | None = None

    def report_until(self, when: float) -> None:
        seconds, self.reported = when - self.reported, when
        if self.on_wait is not None and abs(seconds) > _EPSILON:
            self.on_wait(seconds)


class Lane:
    """The concurrency limit, pause and rate-limit buckets of one provider, endpoint, model and
    credential (see the module docstring).

    With ``auto`` the limit starts at ``min(start, ceiling)``. Each call that succeeds while
    the lane is saturated (every slot of the current limit in use) raises it: by one per call
    until the first cut (slow start, doubling per round trip), then by ``1/limit`` per call
    (about one per round trip). A refusal cuts it to the number of calls the provider was
    seen to accept (sent before the refused one and still in flight), by at least a tenth and
    at most half; a call timeout halves it. Never below 1, and once per window: refusals of
    calls sent before the last cut say nothing about the new limit, so they do not cut again.
    ``ceiling`` (the configured maximum) caps it. Without ``auto`` the slot count is
    ``ceiling``, fixed.

    A refusal costs far more than a round trip (the whole lane waits out ``retry-after``), so
    the lane remembers the slot count that was refused and grows back only to one below it.
    It probes that count again after ``probe`` seconds, twice as long after each refusal at
    or below it (up to ``max_probe``), and forgets it once it has grown past it unrefused.

    ``on_change`` hears every move of the whole-number limit and every pause. A call is sent
    again after up to ``max_requeues`` refusals; the next refusal fails it.
    """

    def __init__(
        self,
        name: str,
        *,
        auto: bool,
        ceiling: int,
        start: int = 4,
        clock: Clock = SYSTEM_CLOCK,
        on_change: Callable[[LaneChange], None] | None = None,
        max_requeues: int = 20,
        probe: float = 2.0,
        max_probe: float = 60.0,
    ) -> None:
        if ceiling < 1 or start < 1:
            raise ValueError(f"a lane's ceiling and start must be >= 1, not {ceiling}, {start}")
        self.name = name
        self.auto = auto
        self.clock = clock
        self.on_change = on_change
        self.max_requeues = max_requeues
        self._ceiling = ceiling
        self._limit = float(min(start, ceiling)) if auto else float(ceiling)
        self._slow_start = True
        self._window = 0
        self._probe, self._max_probe = probe, max_probe
        self._refused_at: int | None = None  # the slot count last refused
        self._probe_wait = probe
        self._probe_after = 0.0
        self._slots = Slots(math.floor(self._limit))
        self._paused_until = 0.0
        self._requests_bucket = _Bucket()
        self._tokens_bucket = _Bucket()
        self._queue: deque[_Waiter] = deque()
        self._napping_until: float | None = None
        self._nudge: asyncio.Future[None] | None = None
        self._sends = itertools.count()
        self._in_flight: dict[int, _Ticket] = {}
        self._finished: deque[tuple[int, int]] = deque()
        self._requests = 0
        self._rejections = 0
        self._requeued = 0

    # -- what the scheduler and the display read -----------------------------------------------

    @property
    def limit(self) -> float:
        """The concurrency limit; the slots admit ``floor(limit)`` conversations."""
        return self._limit

    @property
    def ceiling(self) -> int:
        return self._ceiling

    @property
    def in_use(self) -> int:
        return self._slots.in_use

    @property
    def waiting(self) -> int:
        return self._slots.waiting

    @property
    def requests(self) -> int:
        """Calls sent (a call sent again after a refusal counts each time)."""
        return self._requests

    @property
    def rejections(self) -> int:
        """Calls the provider refused (429, 529, 503)."""
        return self._rejections

    @property
    def requeued(self) -> int:
        """Refused calls sent again instead of failing their attempt."""
        return self._requeued

    @property
    def paused_until(self) -> float:
        """The clock time until which no call is sent (in the past when not paused)."""
        return self._paused_until

    def snapshot(self) -> LaneSnapshot:
        return LaneSnapshot(
            name=self.name,
            limit=self._limit,
            ceiling=self._ceiling,
            in_use=self._slots.in_use,
            waiting=self._slots.waiting,
            requests=self._requests,
            rejections=self._rejections,
            requeued=self._requeued,
            paused_until=self._paused_until,
        )

    # -- conversation slots ----------------------------------------------------------------------

    async def acquire(self, priority: Sequence[float] = ()) -> None:
        """Take a conversation slot (held for a whole attempt), higher priorities first."""
        await self._slots.acquire(priority)

    def release(self) -> None:
        self._slots.release()

    def set_ceiling(self, ceiling: int) -> None:
        """Change the ceiling while the run lasts (``phalanx tune``): an adaptive limit above it
        comes down to it, a fixed one becomes it."""
        if ceiling < 1:
            raise ValueError(f"a lane's ceiling must be >= 1, not {ceiling}")
        self._ceiling = ceiling
        if not self.auto or self._limit > ceiling:
            self._move(float(ceiling), "ceiling")

    def gate(self, on_wait: Callable[[float], None] | None = None) -> Gate:
        """The gate an attempt's calls go through. Each wait for a pause or a bucket is
        reported to ``on_wait`` (seconds) before it starts, so the attempt's timeout can be
        extended by it; a wait that ends early is corrected by a negative report, so the
        reports add up to the time the calls waited."""
        return _LaneGate(self, on_wait)

    # -- AIMD ----------------------------------------------------------------------------------

    def _move(self, limit: float, reason: Literal["increase", "decrease", "ceiling"]) -> None:
        old = math.floor(self._limit)
        self._limit = limit
        new = math.floor(limit)
        self._slots.limit = new
        if new != old and self.on_change is not None:
            self.on_change(LaneChange(self.name, old, new, reason))

    def _increase(self) -> None:
        if not self.auto or self._slots.in_use < math.floor(self._limit):
            return  # growing a limit that is not used would only license a later burst
        step = 1.0 if self._slow_start else 1.0 / self._limit
        limit = min(float(self._ceiling), self._limit + step)
        refused = self._refused_at
        if refused is not None:
            if self.clock.now() < self._probe_after:
                limit = min(limit, refused - 1e-6)  # stay one below what was refused
            elif math.floor(limit) > refused:
                self._refused_at = None  # grown past it without a refusal: it has lifted
                self._probe_wait = self._probe
        if limit > self._limit:
            self._move(limit, "increase")

    def _decrease(self, ticket: _Ticket, *, refused: bool = False) -> None:
        """Cut the limit after a call timed out (by half) or was ``refused``: then to the
        number of this lane's calls the provider was seen to accept (those sent before the
        refused one and still in flight), by at least a tenth and at most half. Halving a
        hard concurrency cap would leave up to half of it unused for the many round trips the
        additive increase takes to climb back, each refusal."""
        if not self.auto or ticket.window != self._window:
            return
        self._window += 1
        self._slow_start = False
        level = math.floor(self._limit)
        if self._refused_at is not None and level <= self._refused_at:
            self._probe_wait = min(self._max_probe, self._probe_wait * 2)
        self._refused_at = level
        self._probe_after = self.clock.now() + self._probe_wait
        target = self._limit * 0.5
        if refused:
            accepted = sum(1 for seq in self._in_flight if seq < ticket.seq)
            target = max(target, min(self._limit * 0.9, float(accepted)))
        self._move(max(1.0, target), "decrease")

    def _pause(self, seconds: float) -> None:
        if seconds <= 0.0:
            return
        now = self.clock.now()
        was_paused = now < self._paused_until
        self._paused_until = max(self._paused_until, now + seconds)
        if not was_paused and self.on_change is not None:
            # Extensions of a running pause (other calls refused with it) are not announced:
            # with hundreds in flight they would flood the display; paused_until shows them.
            whole = math.floor(self._limit)
            self.on_change(LaneChange(self.name, whole, whole, "pause", seconds))

    # -- admission and accounting --------------------------------------------------------------

    def _wait(self, estimate: int, now: float) -> float:
        pause = self._paused_until - now
        return max(
            pause if pause > _EPSILON else 0.0,
            self._requests_bucket.wait(1, now),
            self._tokens_bucket.wait(estimate, now),
        )

    async def _admit(self, estimate: int, on_wait: Callable[[float], None] | None) -> _Ticket:
        """Wait in line for the pause to end and the buckets to hold one request and
        ``estimate`` tokens, then reserve them. First come, first served: a call needing many
        tokens is not overtaken forever by small ones. Only the head of the line sleeps, until
        the wait it computed is over or a finished call changes the buckets (a call reserves
        ``max_tokens`` it seldom uses, and gives the rest back when it ends). Each sleep is
        reported to everyone in line before it starts, since it delays them all; the unslept
        part of a sleep cut short is taken back (a negative report)."""
        waiter = _Waiter(on_wait, self.clock.now())
        if self._queue:
            waiter.turn = asyncio.get_running_loop().create_future()
            if self._napping_until is not None:
                waiter.report_until(self._napping_until)
        self._queue.append(waiter)
        waited = waiter.turn is not None
        try:
            if waiter.turn is not None:
                await waiter.turn
            while (wait := self._wait(estimate, now := self.clock.now())) > 0.0:
                waited = True
                self._napping_until = now + wait
                for queued in self._queue:
                    queued.report_until(now + wait)
                try:
                    await self._nap(wait)
                finally:
                    self._napping_until = None
                    now = self.clock.now()
                    for queued in self._queue:
                        queued.report_until(now)
            ticket = self._reserve(estimate, now)
            ticket.waited = waited
            return ticket
        finally:
            head = self._queue[0] is waiter
            self._queue.remove(waiter)
            if head and self._queue:
                turn = self._queue[0].turn
                if turn is not None and not turn.done():
                    turn.set_result(None)

    async def _nap(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if a call settles meanwhile."""
        nudge = self._nudge = asyncio.get_running_loop().create_future()
        sleeper = asyncio.ensure_future(self.clock.sleep(seconds))
        try:
            await asyncio.wait((sleeper, nudge), return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._nudge = None
            nudge.cancel()
            sleeper.cancel()

    def _reserve(self, estimate: int, now: float) -> _Ticket:
        self._requests_bucket.add(-1, now)
        self._tokens_bucket.add(-estimate, now)
        ticket = _Ticket(next(self._sends), estimate, self._window)
        self._in_flight[ticket.seq] = ticket
        self._requests += 1
        return ticket

    def _settle(
        self,
        ticket: _Ticket,
        used: int,
        headers: Mapping[str, str] | None,
        *,
        counted: int | None = None,
    ) -> None:
        """Book a finished call: give the tokens bucket back what it reserved beyond ``used``
        and re-synchronise both buckets from the response's ``headers``. ``counted`` (default
        ``used``) is the tokens the server may have charged for it, for later
        re-synchronisations.

        The headers count what the server had received when it answered. Calls leave this
        client one after another, so the server received every call sent before this one
        first: the headers count them (with their ``max_tokens``, which Anthropic and OpenAI
        charge when they admit a call). Calls sent after it may or may not be counted, so they
        are subtracted from ``remaining``: what each still in flight reserved, what each that
        finished used (one request, for a refused one). Those the server did count are
        subtracted twice until a later response re-synchronises: that costs a moment's
        throughput, never an overshoot.
        """
        now = self.clock.now()
        del self._in_flight[ticket.seq]
        self._tokens_bucket.add(ticket.estimate - used, now)
        if headers and (announced := _read_limits(headers, time.time())):
            later = [t.estimate for t in self._in_flight.values() if t.seq > ticket.seq]
            later += [tokens for seq, tokens in self._finished if seq > ticket.seq]
            if "requests" in announced:
                self._requests_bucket.sync(announced["requests"], len(later), now)
            if "tokens" in announced:
                self._tokens_bucket.sync(announced["tokens"], sum(later), now)
        self._finished.append((ticket.seq, used if counted is None else counted))
        # A finished call matters only to calls in flight that were sent before it.
        oldest = next(iter(self._in_flight), None)
        while self._finished and (oldest is None or self._finished[0][0] < oldest):
            self._finished.popleft()
        if self._nudge is not None and not self._nudge.done():
            self._nudge.set_result(None)

    def _refused(self, ticket: _Ticket, error: RateLimited) -> None:
        """A refusal: no tokens spent (its request still counts), the limit cut, the lane
        paused for the ``retry-after``, else the reset of an exhausted limit, else a second."""
        self._rejections += 1
        headers = error.headers or {}
        self._settle(ticket, 0, headers)
        self._decrease(ticket, refused=True)
        pause = error.retry_after
        if pause is None:
            needs = {"requests": 1, "tokens": ticket.estimate}
            short = [
                announced.reset
                for kind, announced in _read_limits(headers, time.time()).items()
                if announced.reset is not None
                and announced.remaining < min(needs[kind], announced.limit)
            ]
            pause = max(short) if short else 1.0
        self._pause(pause)


class _LaneGate(Gate):
    """A lane's gate for one attempt (see :meth:`Gate.request`)."""

    def __init__(self, lane: Lane, on_wait: Callable[[float], None] | None) -> None:
        self._lane = lane
        self._on_wait = on_wait

    async def request(self, send: Callable[[], Awaitable[Sent[_T]]], *, estimate: int) -> _T:
        lane = self._lane
        estimate = max(0, estimate)
        refused = 0
        while True:
            ticket = await lane._admit(estimate, self._on_wait)
            try:
                sent = await send()
            except RateLimited as exc:
                lane._refused(ticket, exc)
                refused += 1
                if refused > lane.max_requeues:
                    raise
                lane._requeued += 1
                continue
            except asyncio.CancelledError:
                # The reservation goes back to the bucket; as the request may have reached
                # the server, later re-synchronisations still count it at its estimate.
                lane._settle(ticket, 0, None, counted=ticket.estimate)
                raise
            except BaseException as exc:
                # Failed after it left (a 500, a reset, a timeout): the server may have
                # charged all of it, so it is settled at its estimate.
                lane._settle(ticket, ticket.estimate, None)
                if isinstance(exc, CallTimeout):
                    lane._decrease(ticket)
                raise
            lane._settle(ticket, sent.tokens, sent.headers)
            if not ticket.waited:
                # A call that waited for the buckets or a pause was held back by the rate
                # limit, not by the concurrency limit: its success says nothing about more
                # conversations at once, and growing on it would license a burst later.
                lane._increase()
            return sent.value
