"""The run-wide brakes: when to stop starting items, or stop the run, and why.

Plain bookkeeping with no I/O, consulted by the engine: a vendor that answers
nothing (``VENDOR_UNREACHABLE``), a streak of identical rejections that points at
the request rather than the inputs (``REPEATED_REJECTION``), too many failures
(``max_failure_ratio``), and how many tasks a rate budget can keep polled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.config import NetworkConfig, RateLimit
from pipeline.credits import RejectionStreak
from pipeline.errors import (
    FatalError,
    PermanentError,
    RateLimitedError,
    TransportError,
    VendorError,
)

__all__ = ["FailureRatio", "Reachability", "RejectionBrake", "in_flight_cap"]


@dataclass
class Reachability:
    """Consecutive requests to one vendor that got no answer at all.

    Refused connections, DNS or TLS failures, timeouts and transport-level 5xx count;
    any answer (an error, a rate limit, a task's own failure) proves the vendor is
    there and resets the count.
    """

    host: str
    vendor: str
    network: NetworkConfig
    failures: int = 0
    since: float | None = None

    def observe(self, exc: VendorError | None, now: float) -> FatalError | None:
        """Record one request's outcome; the reason to stop the run, or None."""
        if exc is None or not isinstance(exc, TransportError) or isinstance(exc, RateLimitedError):
            self.failures, self.since = 0, None
            return None
        self.failures += 1
        self.since = self.since if self.since is not None else now
        waited = now - self.since
        enough = self.failures >= self.network.unreachable_after_requests or (
            self.failures >= 2 and waited >= self.network.unreachable_after_seconds
        )
        if not enough:
            return None
        return FatalError(
            f"{self.host} did not answer {self.failures} requests in a row over {waited:.0f} s "
            f"({exc.code}); the run stops. Check the network, proxy and base_url, then "
            "rerun: nothing paid is lost",
            code="VENDOR_UNREACHABLE",
            vendor=self.vendor,
        )


class RejectionBrake:
    """N items in a row rejected with the same 400/415 code: a client bug, not bad
    inputs (docs/vendors.md "AILab: retries and backoff")."""

    def __init__(self, limit: int) -> None:
        self.streak = RejectionStreak(limit)

    def reset(self) -> None:
        self.streak.reset()

    def observe(self, exc: PermanentError) -> FatalError | None:
        count = self.streak.add(exc)
        if count is None:
            return None
        return FatalError(
            f"{count} items in a row were rejected with {exc.vendor} {exc.code} "
            f"(HTTP {exc.http_status}): that points at the request or its params, not the "
            f"inputs, so the run stops instead of sending the rest; check the manifest's "
            f"params (last answer: {exc.message})",
            code="REPEATED_REJECTION",
            vendor=exc.vendor,
        )


@dataclass
class FailureRatio:
    """``max_failure_ratio``: stop starting items once that share of those finished
    has failed, counted after ``minimum`` finished."""

    ratio: float | None
    minimum: int
    finished: int = 0
    failed: int = 0

    def observe(self, failed: bool) -> str | None:
        self.finished += 1
        self.failed += failed
        if self.ratio is None or self.finished < self.minimum:
            return None
        if self.failed / self.finished < self.ratio:
            return None
        return (
            f"{self.failed} of {self.finished} finished items failed, over max_failure_ratio "
            f"{self.ratio:g}; no more items are started (exit 1). Fix the cause and rerun"
        )


def in_flight_cap(limit: RateLimit | None, max_gap: float, window: float | None) -> int | None:
    """How many tasks a vendor's budget can keep polled within its polling window.

    Perfect Corp expires a task left unpolled (docs/vendors.md "Perfect Corp: polling
    window") and its budget is 250 requests per 300 s: at most ``rate x gap`` running
    tasks can each get a poll every ``gap`` seconds. 15% of the budget is left for
    uploads and submits. None: no window or no budget, no cap.
    """
    if window is None or limit is None:
        return None
    rates = []
    if limit.requests and limit.per_seconds:
        rates.append(limit.requests / limit.per_seconds)
    if limit.qps:
        rates.append(limit.qps)
    if not rates:
        return None
    return max(1, math.floor(min(rates) * max_gap * 0.85))
