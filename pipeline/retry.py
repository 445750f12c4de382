"""Backoff and poll schedules: plain functions of numbers, no sleeping here."""

from __future__ import annotations

import random

__all__ = ["backoff_delay", "next_poll_delay"]


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
