"""One rate budget per vendor account, shared by every call to its API host.

Perfect Corp publishes 250 requests per 300 s and 5 QPS per key, counting every call
(docs/vendors.md, "Perfect Corp: rate limits"); AILab publishes nothing and answers 429
``EXCEEDING_LIMITS`` or 503 ``AI_SERVICE_FLOW_RESTRICTION`` (docs/vendors.md, "AILab:
rate limits"). The budget is a
pair of sliding windows (the sustained limit and the per-second limit) plus a pause
that a rate-limit answer imposes on every caller. Result downloads from storage hosts
never pass through it.

On top of the published limits sits an adaptive rate (:class:`AdaptiveRate`, additive
increase / multiplicative decrease): a rate-limit answer cuts the rate we send at to
``DECREASE_FACTOR`` times the rate that provoked it, and the rate then climbs back
linearly while the vendor stops objecting, so a vendor whose real limit is unknown
(AILab) or lower than configured is probed instead of hammered.

The arithmetic is sans-I/O (:class:`SlidingWindow` and :class:`AdaptiveRate` take
``now`` and return how long to wait); :class:`RateBudget` is the thin async layer
that sleeps.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field

import anyio

from pipeline.config import RateLimit

__all__ = ["AdaptiveRate", "Grant", "RateBudget", "SlidingWindow", "last_grant"]

# Clocks and network latency differ between us and the vendor: a request we send
# at the very edge of a window can land inside it on their side, later than we
# counted it by however long it waited in our event loop and on the network. Keep a
# margin of 2% of the window, and at least 100 ms of latency jitter.
WINDOW_MARGIN = 0.02  # share of the window length
MIN_MARGIN_SECONDS = 0.1


class SlidingWindow:
    """At most ``limit`` events in any ``seconds``-long interval."""

    def __init__(self, limit: int, seconds: float) -> None:
        if limit < 1 or seconds <= 0:
            raise ValueError("a window needs limit >= 1 and seconds > 0")
        self.limit = limit
        self.seconds = seconds + max(MIN_MARGIN_SECONDS, seconds * WINDOW_MARGIN)
        self._events: deque[float] = deque()

    def wait_time(self, now: float) -> float:
        """Seconds to wait before one more event is allowed at ``now``."""
        while self._events and now - self._events[0] >= self.seconds:
            self._events.popleft()
        if len(self._events) < self.limit:
            return 0.0
        return self._events[0] + self.seconds - now

    def record(self, now: float) -> None:
        self._events.append(now)


# AIMD constants. A cut to 0.7x (TCP CUBIC's beta) rather than 0.5x keeps the average
# rate of the probing sawtooth near 85% of an unknown limit instead of 75%.
DECREASE_FACTOR = 0.7
# After a cut the rate climbs linearly, gaining the cut rate once more every this many
# seconds: with a 0.7x cut it is back at the provoking level after ~4.3 s and keeps
# climbing at the same slope until the vendor objects again. Even a cut to the floor
# doubles in this time, so 429s that are not about our rate cost a dip, not the night.
RECOVERY_SECONDS = 10.0
# Rate-limit answers to requests already in flight when the first one arrived say
# nothing new: one cut per this many seconds (or per Retry-After, if longer).
DECREASE_COOLDOWN_SECONDS = 1.0
# Lower goes first. Polls serve tasks already paid for; a Perfect Corp task create
# finishes an item whose file is already uploaded; uploads start new items.
PRIORITY = {"poll": 0, "credits": 0, "submit": 1}
DEFAULT_PRIORITY = 2
MIN_RATE = 0.05  # requests/s: never slower than one request per 20 s
RATE_SAMPLE_SECONDS = 2.0  # the send rate at a 429 is measured over this span
# A lone 429 among many successes is noise (AILab also answers 429 for momentary
# overloads, docs/vendors.md "AILab: error codes"), not a sign that our rate is too
# high: cut only when at least this many answers, and this share of what was sent,
# were refusals in the sample span.
MIN_REFUSALS = 2
CONGESTION_SHARE = 0.1


class AdaptiveRate:
    """Additive-increase / multiplicative-decrease limit on the send rate.

    Unlimited until the first :meth:`decrease`. After that, :meth:`rate` grows
    linearly with time and :meth:`wait_time` spaces requests ``1 / rate`` apart. Once
    the rate has climbed past ``ceiling`` (the configured QPS, when there is one) the
    adaptive limit switches itself off: the vendor has recovered.
    """

    def __init__(self, ceiling: float | None = None) -> None:
        self.ceiling = ceiling
        self._base: float | None = None  # rate right after the last cut
        self._slope = 0.0  # requests/s gained per second since the cut
        self._cut_at = float("-inf")
        self._last_send = float("-inf")
        self._first_send: float | None = None
        self._sends: deque[float] = deque()
        self._refusals: deque[float] = deque()
        self.decreases = 0
        self.lowest: float | None = None

    def rate(self, now: float) -> float | None:
        """Current allowed requests/s, or None when not limiting."""
        if self._base is None:
            return None
        current = self._base + self._slope * max(0.0, now - self._cut_at)
        if self.ceiling is not None and current >= self.ceiling:
            self._base = None  # recovered: the configured windows govern again
            return None
        return current

    def wait_time(self, now: float) -> float:
        rate = self.rate(now)
        if rate is None:
            return 0.0
        return max(0.0, self._last_send + 1.0 / rate - now)

    def record(self, now: float) -> None:
        if self._first_send is None:
            self._first_send = now
        self._last_send = now
        self._sends.append(now)
        self._trim(now)

    def _trim(self, now: float) -> None:
        for events in (self._sends, self._refusals):
            while events and now - events[0] > RATE_SAMPLE_SECONDS:
                events.popleft()

    def send_rate(self, now: float) -> float:
        """Requests/s sent over the last ``RATE_SAMPLE_SECONDS`` (counted over at least
        one second, so a start-up burst of a few requests is not read as a huge rate)."""
        self._trim(now)
        first = self._first_send if self._first_send is not None else now
        span = max(1.0, min(RATE_SAMPLE_SECONDS, now - first))
        return len(self._sends) / span

    def congested(self, now: float) -> bool:
        """Whether recent refusals say we send too fast, rather than being noise: at
        least ``MIN_REFUSALS`` of them and ``CONGESTION_SHARE`` of what was sent."""
        self._trim(now)
        refused = len(self._refusals)
        return refused >= MIN_REFUSALS and refused >= CONGESTION_SHARE * len(self._sends)

    def decrease(self, now: float, cooldown: float = DECREASE_COOLDOWN_SECONDS) -> bool:
        """A rate-limit answer arrived: cut the rate. False if within the cooldown
        or if the answers are too few to mean congestion (see :meth:`congested`).

        The cut is to ``DECREASE_FACTOR`` times the rate we were sending at (or the
        current limit, if lower); the climb then gains the cut rate every
        ``RECOVERY_SECONDS``.
        """
        self._refusals.append(now)
        current = self.rate(now)
        if now - self._cut_at < max(cooldown, 2.0 / current if current else 0.0):
            return False
        if not self.congested(now):
            return False
        provoking = self.send_rate(now)
        if current is not None:
            provoking = min(provoking, current)
        provoking = max(provoking, MIN_RATE)
        self._base = max(MIN_RATE, provoking * DECREASE_FACTOR)
        self._slope = self._base / RECOVERY_SECONDS
        self._cut_at = now
        self.decreases += 1
        self.lowest = self._base if self.lowest is None else min(self.lowest, self._base)
        return True


@dataclass(frozen=True)
class Grant:
    """One request the gate let go: its kind, when it asked and when it was let go
    (``time.monotonic()``, whatever clock the budget itself runs on)."""

    kind: str
    asked: float
    granted: float

    @property
    def waited(self) -> float:
        return self.granted - self.asked


# The current task's last grant. Set inside :meth:`RateBudget.acquire`, which callers
# await in their own task, so it is the caller's: an item's driver reads it after a
# poll to tell the task's duration from the time that poll queued at the gate.
_LAST_GRANT: ContextVar[Grant | None] = ContextVar("pipeline_budget_last_grant", default=None)


def last_grant() -> Grant | None:
    """What the gate did for the calling task's most recent request (None: nothing yet)."""
    return _LAST_GRANT.get()


class RateBudget:
    """The gate every API-host request of one vendor account passes through.

    ``acquire()`` returns when a request may be sent now and records it.
    ``pause(seconds)`` holds every caller back (a 429's ``Retry-After`` or backoff);
    ``rate_limited(...)`` is what a rate-limit answer calls: pause plus AIMD cut.
    With no limit configured only pauses and the adaptive rate apply.
    """

    def __init__(
        self,
        limit: RateLimit | None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._windows: list[SlidingWindow] = []
        if limit is not None:
            if limit.requests and limit.per_seconds:
                self._windows.append(SlidingWindow(limit.requests, limit.per_seconds))
            if limit.qps:
                # "5 QPS": at most qps requests in any one-second interval.
                per_second = max(1, int(limit.qps))
                self._windows.append(SlidingWindow(per_second, per_second / limit.qps))
        ceiling = limit.qps if limit is not None and limit.qps else None
        self.adaptive = AdaptiveRate(ceiling)
        self._paused_until = 0.0
        self._waiting: list[_Ticket] = []
        self._seq = itertools.count()
        self._dispatching = False
        self.sent = 0
        self.waited_seconds = 0.0
        self.rate_limited_answers = 0

    def pause(self, seconds: float) -> None:
        """Hold every request back for ``seconds`` from now."""
        self._paused_until = max(self._paused_until, self._clock() + max(0.0, seconds))

    def rate_limited(self, pause_seconds: float, retry_after: float | None = None) -> None:
        """A rate-limit answer: hold everyone back and lower the rate (AIMD)."""
        self.rate_limited_answers += 1
        now = self._clock()
        cooldown = max(DECREASE_COOLDOWN_SECONDS, retry_after or 0.0)
        self.adaptive.decrease(now, cooldown)
        self.pause(pause_seconds)

    def summary(self) -> dict[str, float | int | None]:
        """What the budget did this run, for the report."""
        rate = self.adaptive.rate(self._clock())
        return {
            "sent": self.sent,
            "waited_seconds": round(self.waited_seconds, 3),
            "rate_limited_answers": self.rate_limited_answers,
            "rate_decreases": self.adaptive.decreases,
            "lowest_rate": round(self.adaptive.lowest, 3) if self.adaptive.lowest else None,
            "adaptive_rate_now": round(rate, 3) if rate is not None else None,
        }

    def _wait_time(self, now: float) -> float:
        wait = max(self._paused_until - now, self.adaptive.wait_time(now))
        for window in self._windows:
            wait = max(wait, window.wait_time(now))
        return max(0.0, wait)

    async def acquire(self, kind: str = "submit") -> None:
        """Wait until one request of ``kind`` may be sent now, and record it.

        Polls (and credit queries) go before everything else that is waiting, then
        task creates, then uploads: a finished task's result should not wait behind
        new submits (docs/vendors.md, "Perfect Corp: rate limits": polls are served
        before new submits).
        Within a priority, arrival order. Afterwards :func:`last_grant` tells the
        caller how long it waited.
        """
        asked = time.monotonic()
        ticket = _Ticket(PRIORITY.get(kind, DEFAULT_PRIORITY), next(self._seq))
        heapq.heappush(self._waiting, ticket)
        try:
            while not ticket.granted:
                if not self._dispatching:
                    await self._dispatch(ticket)
                else:
                    await ticket.wake.wait()
                    ticket.wake = anyio.Event()
            _LAST_GRANT.set(Grant(kind, asked, time.monotonic()))
        finally:
            if not ticket.granted:  # cancelled while waiting
                ticket.abandoned = True
                if not self._dispatching:
                    self._hand_over()

    async def _dispatch(self, mine: _Ticket) -> None:
        """Grant slots, best ticket first, until ``mine`` is granted; then hand over.

        Exactly one waiter dispatches at a time; the others sleep on their events.
        """
        self._dispatching = True
        try:
            while not mine.granted:
                now = self._clock()
                wait = self._wait_time(now)
                if wait > 0:
                    self.waited_seconds += wait
                    await anyio.sleep(wait)
                    continue  # a better ticket may have arrived meanwhile
                ticket = self._pop_live()
                if ticket is None:  # pragma: no cover - mine is always waiting
                    return
                for window in self._windows:
                    window.record(now)
                self.adaptive.record(now)
                self.sent += 1
                ticket.granted = True
                ticket.wake.set()
        finally:
            if not mine.granted:
                mine.abandoned = True
            self._dispatching = False
            self._hand_over()

    def _pop_live(self) -> _Ticket | None:
        while self._waiting:
            ticket = heapq.heappop(self._waiting)
            if not ticket.abandoned:
                return ticket
        return None

    def _hand_over(self) -> None:
        """Wake the best waiter so that it takes over dispatching."""
        while self._waiting and self._waiting[0].abandoned:
            heapq.heappop(self._waiting)
        if self._waiting:
            self._waiting[0].wake.set()


@dataclass(order=True)
class _Ticket:
    priority: int
    seq: int
    granted: bool = field(default=False, compare=False)
    abandoned: bool = field(default=False, compare=False)
    wake: anyio.Event = field(default_factory=anyio.Event, compare=False)
