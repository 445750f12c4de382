"""The spending guards: max_credits reservations and the repeated-rejection brake."""

from __future__ import annotations

from pipeline.credits import CreditGuard, RejectionStreak
from pipeline.errors import PermanentError


def test_guard_without_a_cap_allows_everything() -> None:
    guard = CreditGuard({})
    assert guard.refuse("ailab", 1e9, "credits") is None


def test_guard_counts_spent_and_in_flight() -> None:
    guard = CreditGuard({"ailab": 30})
    assert guard.refuse("ailab", 12, "credits") is None
    guard.hold("a", "ailab", 12)
    guard.hold("b", "ailab", 12)
    refusal = guard.refuse("ailab", 12, "credits")  # 24 held + 12 > 30
    assert refusal is not None and refusal.code == "MAX_CREDITS" and refusal.kind == "fatal"
    assert "max_credits for ailab is 30 credits" in refusal.message
    guard.release("a")  # failed: not billed
    assert guard.refuse("ailab", 12, "credits") is None
    guard.spend("ailab", 12)  # b succeeded
    guard.release("b")
    assert guard.refuse("ailab", 12, "credits") is None  # 12 + 12 <= 30
    guard.spend("ailab", 12)
    assert guard.refuse("ailab", 12, "credits") is not None  # 24 + 12 > 30
    assert guard.refuse("perfectcorp", 1, "units") is None  # other vendor uncapped


def test_guard_hold_is_idempotent_per_item() -> None:
    guard = CreditGuard({"perfectcorp": 2})
    guard.hold("a", "perfectcorp", 1)
    guard.hold("a", "perfectcorp", 1)
    assert guard.holds("a")
    assert guard.refuse("perfectcorp", 1, "units") is None  # only one unit held
    guard.release("a")
    guard.release("a")
    assert not guard.holds("a")


def _rejection(code: str, status: int) -> PermanentError:
    return PermanentError("no", code=code, vendor="ailab", http_status=status)


def test_streak_trips_on_identical_400s_only() -> None:
    streak = RejectionStreak(3)
    assert streak.add(_rejection("ERROR_INVALID_PARAMETER", 400)) is None
    assert streak.add(_rejection("ERROR_INVALID_PARAMETER", 400)) is None
    assert streak.add(_rejection("ERROR_INVALID_PARAMETER", 400)) == 3


def test_streak_resets_on_another_code_or_outcome() -> None:
    streak = RejectionStreak(2)
    assert streak.add(_rejection("ERROR_INVALID_PARAMETER", 400)) is None
    assert streak.add(_rejection("UNSUPPORTED_FILE_TYPES", 415)) is None  # new code: 1
    streak.reset()  # a success in between
    assert streak.add(_rejection("UNSUPPORTED_FILE_TYPES", 415)) is None
    assert streak.add(_rejection("ERROR_NO_FACE_IN_FILE", 422)) is None  # 422: bad input
    assert streak.add(_rejection("UNSUPPORTED_FILE_TYPES", 415)) is None
    assert streak.add(_rejection("UNSUPPORTED_FILE_TYPES", 415)) == 2


def test_streak_zero_is_off() -> None:
    streak = RejectionStreak(0)
    for _ in range(50):
        assert streak.add(_rejection("ERROR_INVALID_PARAMETER", 400)) is None


def test_pool_for_earlier_tasks_is_held_until_claimed() -> None:
    guard = CreditGuard({"perfectcorp": 3})
    guard.reserve_pool("perfectcorp", 3)  # three tasks of an earlier run, not met yet
    assert guard.refuse("perfectcorp", 1, "units") is not None
    guard.claim("a", "perfectcorp", 1)  # met one: moves from the pool to the item
    assert guard.refuse("perfectcorp", 1, "units") is not None
    guard.release("a")  # its task failed: never billed
    assert guard.refuse("perfectcorp", 1, "units") is None
    guard.claim("b", "perfectcorp", 1)
    guard.claim("c", "perfectcorp", 1)
    guard.claim("d", "perfectcorp", 1)  # pool empty: a plain hold
    assert guard.refuse("perfectcorp", 1, "units") is not None
