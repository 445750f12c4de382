"""One rate budget per vendor account, shared by every call to its API host.

Perfect Corp publishes 250 requests per 300 s and 5 QPS per key, counting every call
(vendor-protocols.md §2.6, Q13); AILab publishes nothing and answers 429
``EXCEEDING_LIMITS`` or 503 ``AI_SERVICE_FLOW_RESTRICTION`` (§1.7). The budget is a
pair of sliding windows (the sustained limit and the per-second limit) plus a pause
that a rate-limit answer imposes on every caller. Result downloads from storage hosts
never pass through it.

The window arithmetic is sans-I/O (:class:`SlidingWindow` takes ``now`` and returns
how long to wait); :class:`RateBudget` is the thin async layer that sleeps.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import anyio

from pipeline.config import RateLimit

__all__ = ["RateBudget", "SlidingWindow"]

# Clocks and network latency differ between us and the vendor: a request we send
# at the very edge of a window can land inside it on their side. Keep a margin.
WINDOW_MARGIN = 0.02  # share of the window length
MIN_MARGIN_SECONDS = 0.02


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


class RateBudget:
    """The gate every API-host request of one vendor account passes through.

    ``acquire()`` returns when a request may be sent now and records it.
    ``pause(seconds)`` holds every caller back (a 429's ``Retry-After`` or backoff).
    With no limit configured it only applies pauses.
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
        self._paused_until = 0.0
        self._lock = anyio.Lock()
        self.sent = 0
        self.waited_seconds = 0.0

    @property
    def limited(self) -> bool:
        return bool(self._windows)

    def pause(self, seconds: float) -> None:
        """Hold every request back for ``seconds`` from now."""
        self._paused_until = max(self._paused_until, self._clock() + max(0.0, seconds))

    def _wait_time(self, now: float) -> float:
        wait = self._paused_until - now
        for window in self._windows:
            wait = max(wait, window.wait_time(now))
        return max(0.0, wait)

    async def acquire(self) -> None:
        # The lock makes callers queue in arrival order, so the windows stay exact.
        async with self._lock:
            while True:
                now = self._clock()
                wait = self._wait_time(now)
                if wait <= 0:
                    break
                self.waited_seconds += wait
                await anyio.sleep(wait)
            now = self._clock()
            for window in self._windows:
                window.record(now)
            self.sent += 1
