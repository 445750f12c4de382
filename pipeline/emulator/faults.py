"""Seeded fault decisions, so a scenario replays the same way.

Per-request faults (transient errors, disconnects, task failures) draw from one
``random.Random(seed)``. Permanent errors are a pure function of the seed and the input
bytes, so a retry of the same image gets the same answer, as a real "no face" would.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import TypeVar

__all__ = ["Faults"]

T = TypeVar("T")


class Faults:
    def __init__(self, seed: int) -> None:
        self._seed = seed
        self.rng = random.Random(seed)

    def reset(self) -> None:
        self.rng = random.Random(self._seed)

    def chance(self, rate: float) -> bool:
        """True with probability ``rate`` (never draws when the rate is 0)."""
        return rate > 0.0 and self.rng.random() < rate

    def pick(self, options: Sequence[T]) -> T:
        return self.rng.choice(options)

    def permanent(self, input_digest: str, rate: float) -> bool:
        """Whether this input is refused for the image: fixed per (seed, bytes)."""
        if rate <= 0.0:
            return False
        h = hashlib.sha256(f"{self._seed}:permanent:{input_digest}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2.0**64 < rate
