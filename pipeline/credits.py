"""Spending guards: the manifest's ``max_credits`` cap and the client-bug brake.

Both are plain bookkeeping the engine consults before it sends a submit; neither
does I/O. Prices are the vendors' documented per-success prices (operations.py);
vendors charge only successful tasks (docs/vendors.md, "Both vendors: billing"), so a
submit *reserves* its price until the item ends and only a success *spends* it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

from pipeline.errors import FatalError, PermanentError

__all__ = ["CreditGuard", "RejectionStreak"]


class CreditGuard:
    """Refuses a submit that could take a vendor's spend in this run past its cap.

    ``spent`` counts successes collected by this run; ``held`` counts the prices of
    items in flight and of tasks created by earlier runs that this run may still
    collect (the vendor bills those when they succeed). A new submit is allowed only if
    ``spent + held + price <= cap``: the cap holds even if every such task succeeds.
    """

    def __init__(self, caps: Mapping[str, float]) -> None:
        self.caps = dict(caps)
        self.spent: dict[str, float] = defaultdict(float)
        self._holds: dict[str, tuple[str, float]] = {}
        self._held: dict[str, float] = defaultdict(float)
        self._pool: dict[str, float] = defaultdict(float)

    def reserve_pool(self, vendor: str, amount: float) -> None:
        """Hold ``amount`` for tasks of earlier runs not met yet (they will be billed
        if they succeed); :meth:`claim` moves it to the item that resumes one."""
        self._pool[vendor] += amount
        self._held[vendor] += amount

    def claim(self, key: str, vendor: str, amount: float) -> None:
        """Hold ``amount`` for a resumed task, from the pool while it lasts."""
        if key in self._holds:
            return
        taken = min(amount, self._pool[vendor])
        self._pool[vendor] -= taken
        self._held[vendor] -= taken
        self.hold(key, vendor, amount)

    def holds(self, key: str) -> bool:
        return key in self._holds

    def hold(self, key: str, vendor: str, amount: float) -> None:
        if key not in self._holds:
            self._holds[key] = (vendor, amount)
            self._held[vendor] += amount

    def release(self, key: str) -> None:
        held = self._holds.pop(key, None)
        if held is not None:
            self._held[held[0]] -= held[1]

    def spend(self, vendor: str, amount: float) -> None:
        self.spent[vendor] += amount

    def refuse(self, vendor: str, price: float, unit: str) -> FatalError | None:
        """The reason not to submit one more item at ``price``, or None to go ahead."""
        cap = self.caps.get(vendor)
        if cap is None:
            return None
        spent, held = self.spent[vendor], self._held[vendor]
        if spent + held + price <= cap + 1e-9:
            return None
        return FatalError(
            f"max_credits for {vendor} is {cap:g} {unit}: {spent:g} spent and {held:g} "
            f"held by tasks in flight in this run, and the next item costs {price:g}; "
            f"not sent. Raise max_credits in the manifest or rerun to continue",
            code="MAX_CREDITS",
            vendor=vendor,
        )


class RejectionStreak:
    """Counts consecutive vendor rejections with the same 400/415 code.

    Many items in a row failing with the same 400 or 415 code point at a client bug,
    so the run stops (docs/vendors.md, "AILab: retries and backoff"). Any other
    outcome resets the streak.
    ``limit`` 0 turns the brake off.
    """

    STATUSES = frozenset({400, 415})

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._code: tuple[str | None, str] | None = None
        self._count = 0

    def reset(self) -> None:
        self._code = None
        self._count = 0

    def add(self, error: PermanentError) -> int | None:
        """Record a rejection; return the streak length when it reaches the limit."""
        if error.http_status not in self.STATUSES:
            self.reset()
            return None
        code = (error.vendor, error.code)
        if code == self._code:
            self._count += 1
        else:
            self._code, self._count = code, 1
        if self.limit and self._count >= self.limit:
            return self._count
        return None
