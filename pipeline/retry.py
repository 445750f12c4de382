"""Backoff and poll schedules: plain functions of numbers, no sleeping here."""

from __future__ import annotations

import random

__all__ = ["FirstPollSchedule", "backoff_delay", "next_poll_delay"]


def backoff_delay(
    failures: int,
    *,
    initial: float,
    maximum: float,
    rng: random.Random | None = None,
    hint: float | None = None,
) -> float:
    """Seconds to wait after the ``failures``-th consecutive failure (1-based).

    Exponential (``initial * 2**(failures-1)``, capped at ``maximum``) with "equal
    jitter": half the delay is fixed, half random, so retries spread out but never
    collapse to zero. A server hint (``Retry-After``) is a floor, not a cap.
    """
    if failures < 1:
        return 0.0
    base = min(maximum, initial * 2.0 ** min(failures - 1, 30))
    r = rng.random() if rng is not None else random.random()
    delay = base / 2 + r * base / 2
    if hint is not None and hint > delay:
        delay = hint
    return delay


def next_poll_delay(interval: float, vendor_hint: float | None) -> float:
    """Seconds until the next poll: never faster than the provider's interval."""
    if vendor_hint is not None and vendor_hint > interval:
        return vendor_hint
    return interval


class FirstPollSchedule:
    """When to poll a new task first, learned from the tasks of one operation so far.

    Every poll costs a request from the vendor's budget, so a 12 s task should be
    polled once at ~12 s, not at 5 s, 10 s and 15 s. The first-poll delay tracks a
    high quantile of the task durations: a task still running at its first poll
    pushes the delay up by ``GROW``; a task already done at its first poll nudges it
    down by ``SHRINK`` (it may have been done earlier). At equilibrium
    P(task longer than the delay) = SHRINK / (GROW + SHRINK), about 9%, so ~1.1
    polls per task while the wait past a task's end stays small. Never below the
    vendor's interval, never above ``maximum``.
    """

    GROW = 0.2
    SHRINK = 0.02

    def __init__(self, interval: float, maximum: float = 300.0) -> None:
        self.interval = interval
        self.maximum = max(maximum, interval)
        self.delay = interval

    def first_delay(self) -> float:
        return self.delay

    def observe(self, *, done_at_first_poll: bool, running_until: float | None = None) -> None:
        """Learn from a task that ended. ``running_until``: seconds since submit at
        which it was last seen running (a lower bound of its duration)."""
        if done_at_first_poll:
            self.delay = max(self.interval, self.delay * (1 - self.SHRINK))
            return
        grown = self.delay * (1 + self.GROW)
        if running_until is not None:
            # It was still running then; the next task like it will be too.
            grown = max(grown, min(running_until, self.delay * 2))
        self.delay = min(self.maximum, grown)
