"""One account's balances, debited on success only.

Both vendors bill only successful work: AILab bills only successes, Perfect Corp uses
no unit on error (docs/vendors.md, "Both vendors: billing"). A submit *holds* the price so
that work in flight can never overdraw the account; the hold is debited when the work
succeeds and released when it fails. AILab takes from the API's own pool first, then
``common`` (docs/vendors.md, "AILab: emulator behaviour").
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["Hold", "Ledger"]


@dataclass
class Hold:
    """Amounts set aside per pool for one piece of work."""

    parts: dict[str, float] = field(default_factory=dict)
    closed: bool = False

    @property
    def amount(self) -> float:
        return sum(self.parts.values())


class Ledger:
    """Pools of one account (AILab: ``common`` + per-API pools; Perfect Corp: one pool)."""

    def __init__(self, pools: Mapping[str, float]) -> None:
        self.initial = dict(pools)
        self.balances = dict(pools)
        self._held: dict[str, float] = dict.fromkeys(pools, 0.0)
        self.last_update = time.time()

    def free(self, pool: str) -> float:
        """Balance of ``pool`` not held by work in flight."""
        return self.balances.get(pool, 0.0) - self._held.get(pool, 0.0)

    def hold(self, price: float, pools: Sequence[str]) -> Hold | None:
        """Set ``price`` aside from ``pools`` in order; ``None`` if they cannot cover it."""
        if sum(max(0.0, self.free(p)) for p in pools) + 1e-9 < price:
            return None
        hold = Hold()
        left = price
        for pool in pools:
            take = min(left, max(0.0, self.free(pool)))
            if take > 0:
                hold.parts[pool] = take
                self._held[pool] = self._held.get(pool, 0.0) + take
                left -= take
        return hold

    def debit(self, hold: Hold) -> float:
        """Turn a hold into a charge; returns the amount charged (0 if already closed)."""
        if hold.closed:
            return 0.0
        for pool, amount in hold.parts.items():
            self._held[pool] -= amount
            self.balances[pool] -= amount
        hold.closed = True
        self.last_update = time.time()
        return hold.amount

    def release(self, hold: Hold) -> None:
        """Give a hold back without charging."""
        if hold.closed:
            return
        for pool, amount in hold.parts.items():
            self._held[pool] -= amount
        hold.closed = True
