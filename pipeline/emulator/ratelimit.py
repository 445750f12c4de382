"""The vendors' request budgets, enforced per API key and per client IP.

Perfect Corp publishes "250 requests per 300 s and 5 QPS, applied per IP and,
separately, per access token" and "Both conditions must be met" (docs/vendors.md,
"Perfect Corp: rate limits"); AILab publishes nothing (docs/vendors.md, "AILab: rate
limits"), so the scenario decides. Only admitted requests
use up budget: a client that backs off after a 429 is not punished for the 429s.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from pipeline.emulator.scenario import RateLimitSpec

__all__ = ["RateLimiter"]


class _Budget:
    """One subject's budget: a sliding window plus a token bucket."""

    def __init__(self, spec: RateLimitSpec, now: float) -> None:
        self._spec = spec
        self._window: deque[float] = deque()
        self._capacity = max(1.0, spec.qps) if spec.qps is not None else 0.0
        self._tokens = self._capacity
        self._refilled_at = now

    def allows(self, now: float) -> bool:
        spec = self._spec
        if spec.qps is not None:
            self._tokens = min(self._capacity, self._tokens + (now - self._refilled_at) * spec.qps)
            self._refilled_at = now
            if self._tokens < 1.0:
                return False
        if spec.requests is not None and spec.per_seconds is not None:
            horizon = now - spec.per_seconds
            while self._window and self._window[0] <= horizon:
                self._window.popleft()
            if len(self._window) >= spec.requests:
                return False
        return True

    def spend(self, now: float) -> None:
        if self._spec.qps is not None:
            self._tokens -= 1.0
        if self._spec.requests is not None:
            self._window.append(now)


class RateLimiter:
    """Admits a request only if its key's budget and its IP's budget both allow it."""

    def __init__(self, spec: RateLimitSpec, *, per_ip: bool, clock: Callable[[], float]) -> None:
        self._spec = spec
        self._per_ip = per_ip
        self._clock = clock
        self._budgets: dict[tuple[str, str], _Budget] = {}

    def admit(self, key: str, ip: str | None) -> bool:
        """True (and the request is charged to both budgets) if both allow it now."""
        now = self._clock()
        subjects = [("key", key)]
        if self._per_ip and ip:
            subjects.append(("ip", ip))
        budgets = [self._budget(subject, now) for subject in subjects]
        if not all(budget.allows(now) for budget in budgets):
            return False
        for budget in budgets:
            budget.spend(now)
        return True

    def _budget(self, subject: tuple[str, str], now: float) -> _Budget:
        budget = self._budgets.get(subject)
        if budget is None:
            budget = self._budgets[subject] = _Budget(self._spec, now)
        return budget
