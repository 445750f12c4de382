"""The rate budget's windows and the backoff schedule: pure arithmetic."""

from __future__ import annotations

import random

import anyio
import pytest

from pipeline.budget import (
    DECREASE_FACTOR,
    MIN_RATE,
    RECOVERY_SECONDS,
    AdaptiveRate,
    RateBudget,
    SlidingWindow,
)
from pipeline.config import RateLimit
from pipeline.retry import FirstPollSchedule, backoff_delay, next_poll_delay


def test_sliding_window_allows_limit_then_waits_for_oldest() -> None:
    window = SlidingWindow(3, 10.0)
    for t in (0.0, 1.0, 2.0):
        assert window.wait_time(t) == 0.0
        window.record(t)
    wait = window.wait_time(2.5)
    assert wait == pytest.approx(10.0 * 1.02 - 2.5)
    assert window.wait_time(0.0 + window.seconds) == 0.0


def test_sliding_window_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        SlidingWindow(0, 1.0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_budget_spaces_requests_by_qps() -> None:
    clock = FakeClock()
    budget = RateBudget(RateLimit(requests=250, per_seconds=300, qps=5), clock=clock)
    for _ in range(5):
        await budget.acquire()
    assert budget.sent == 5
    # The sixth must wait for the one-second window; with a fake clock that never
    # advances the wait would be forever, so check the arithmetic instead.
    assert budget._wait_time(clock.now) > 0.99


async def test_budget_pause_holds_every_caller() -> None:
    budget = RateBudget(None)
    budget.pause(0.05)
    start = anyio.current_time()
    await budget.acquire()
    assert anyio.current_time() - start >= 0.04


def test_backoff_grows_and_is_capped() -> None:
    rng = random.Random(1)
    delays = [backoff_delay(n, initial=1, maximum=8, rng=rng) for n in range(1, 8)]
    assert 0.5 <= delays[0] <= 1.0
    assert all(d <= 8 for d in delays)
    assert delays[-1] >= 4  # capped base 8, equal jitter keeps at least half
    assert backoff_delay(0, initial=1, maximum=8) == 0.0


def test_backoff_honours_server_hint_as_floor() -> None:
    assert backoff_delay(1, initial=0.01, maximum=1, hint=5.0) == 5.0


def test_poll_never_faster_than_interval() -> None:
    assert next_poll_delay(5.0, 1.0) == 5.0
    assert next_poll_delay(5.0, 7.5) == 7.5
    assert next_poll_delay(5.0, None) == 5.0


# -- AIMD ---------------------------------------------------------------------------------


def test_adaptive_rate_is_off_until_a_rate_limit_answer() -> None:
    rate = AdaptiveRate(ceiling=5.0)
    assert rate.rate(0.0) is None and rate.wait_time(0.0) == 0.0


def _sent(rate: AdaptiveRate, count: int, every: float, start: float = 0.0) -> float:
    for i in range(count):
        rate.record(start + i * every)
    return start + count * every


def test_adaptive_rate_cuts_to_a_share_of_the_send_rate_and_recovers() -> None:
    rate = AdaptiveRate(ceiling=None)
    now = _sent(rate, 20, 0.1)  # 10 requests/s over the last two seconds
    assert not rate.decrease(now)  # one refusal among 20: noise, no cut
    assert rate.rate(now) is None
    assert rate.decrease(now + 0.01)  # a second one: 10% refused, that is congestion
    sent_rate = 19 / 2.0  # the first request has left the two-second span
    cut = rate.rate(now + 0.01)
    assert cut == pytest.approx(sent_rate * DECREASE_FACTOR)
    # Spaced 1/rate apart while cut.
    rate.record(now + 0.01)
    assert rate.wait_time(now + 0.01) == pytest.approx(1 / cut, rel=0.01)
    # Linear climb back to the provoking rate in RECOVERY_SECONDS, then beyond.
    # Back to at least the provoking rate in RECOVERY_SECONDS, then beyond.
    back = rate.rate(now + 0.01 + RECOVERY_SECONDS)
    assert back is not None and back >= sent_rate
    later = rate.rate(now + 0.01 + 2 * RECOVERY_SECONDS)
    assert later is not None and later > back


def test_adaptive_rate_ignores_noise_and_the_echo_of_requests_in_flight() -> None:
    rate = AdaptiveRate()
    now = _sent(rate, 100, 0.02)  # 50/s
    for i in range(4):  # 4% refused: noise
        assert not rate.decrease(now + i * 0.01)
    for i in range(4, 10):
        rate.decrease(now + i * 0.01)
    first = rate.rate(now + 0.1)
    assert first is not None and rate.decreases == 1  # one cut for the whole burst
    assert not rate.decrease(now + 0.5)  # within the cooldown: same congestion event
    _sent(rate, 30, 0.05, start=now + 0.5)
    for i in range(4):  # a new burst of refusals, more than a second later
        rate.decrease(now + 2.1 + i * 0.01)
    assert rate.decreases == 2 and rate.lowest is not None and rate.lowest < first


def test_adaptive_rate_reads_a_burst_over_at_least_a_second() -> None:
    rate = AdaptiveRate()
    now = _sent(rate, 24, 0.001)  # 24 workers firing at once at start-up
    rate.decrease(now)
    rate.decrease(now)
    assert rate.decrease(now)  # three refusals of 24: over 10%
    assert rate.rate(now) == pytest.approx(24 * DECREASE_FACTOR)  # not 24 / 0.024 s


def test_adaptive_rate_switches_off_above_the_configured_ceiling() -> None:
    rate = AdaptiveRate(ceiling=5.0)
    now = _sent(rate, 10, 0.2)  # 5/s
    rate.decrease(now)
    assert rate.decrease(now)
    base = 5.0 * DECREASE_FACTOR
    assert rate.rate(now) == pytest.approx(base)
    slope = base / RECOVERY_SECONDS
    reaches_ceiling = now + (5.0 - base) / slope
    assert rate.rate(reaches_ceiling - 0.1) is not None
    assert rate.rate(reaches_ceiling + 0.01) is None  # back at 5/s: the windows govern


def test_adaptive_rate_never_drops_below_the_floor_and_climbs_from_it() -> None:
    rate = AdaptiveRate()
    rate.decrease(0.0)
    assert rate.decrease(0.0)  # refused with nothing sent at all
    assert rate.rate(0.0) == pytest.approx(MIN_RATE)
    # Even from the floor the rate at least doubles every RECOVERY_SECONDS.
    doubled = rate.rate(RECOVERY_SECONDS)
    assert doubled is not None and doubled >= 2 * MIN_RATE


async def test_budget_rate_limited_pauses_and_cuts() -> None:
    budget = RateBudget(None)
    for _ in range(4):
        await budget.acquire("submit")
    budget.rate_limited(0.05, retry_after=None)
    budget.rate_limited(0.05, retry_after=None)
    assert budget.adaptive.rate(anyio.current_time()) is not None
    start = anyio.current_time()
    await budget.acquire("submit")
    assert anyio.current_time() - start >= 0.04
    summary = budget.summary()
    assert summary["rate_limited_answers"] == 2 and summary["rate_decreases"] == 1
    assert summary["sent"] == 5


async def test_budget_serves_polls_before_waiting_submits() -> None:
    # One request per ~70 ms (50 ms plus the safety margin): one grant at a time.
    budget = RateBudget(RateLimit(requests=1, per_seconds=0.05))
    order: list[str] = []

    async def take(kind: str, label: str) -> None:
        await budget.acquire(kind)
        order.append(label)

    await budget.acquire("submit")  # the window is now full
    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(take, "upload", f"upload{i}")
        await anyio.sleep(0.01)
        tg.start_soon(take, "submit", "submit")
        tg.start_soon(take, "poll", "poll")
    assert order == ["poll", "submit", "upload0", "upload1", "upload2"]


async def test_budget_survives_a_cancelled_waiter() -> None:
    budget = RateBudget(RateLimit(qps=1))
    await budget.acquire("submit")
    with anyio.move_on_after(0.05):
        await budget.acquire("submit")  # would wait ~1 s: cancelled
    with anyio.fail_after(3):
        await budget.acquire("poll")  # the cancelled ticket must not block this one
    assert budget.sent == 2


# -- lean polling -------------------------------------------------------------------------


def test_first_poll_learns_a_long_task_and_settles_near_one_poll() -> None:
    schedule = FirstPollSchedule(interval=5.0)
    duration = 12.0
    polls = []
    for _ in range(200):
        first = schedule.first_delay()
        assert first >= 5.0
        # Simulate: poll at first, then every 5 s until the task is done.
        n, t, last_running = 1, first, None
        while t < duration:
            last_running = t
            t += 5.0
            n += 1
        polls.append(n)
        schedule.observe(done_at_first_poll=n == 1, running_until=last_running)
    tail = polls[-100:]
    assert sum(tail) / len(tail) < 1.25  # vs 3 polls (5, 10, 15) at the interval
    assert schedule.first_delay() < duration * 1.3  # and not much later than needed


def test_first_poll_never_below_interval_for_fast_tasks() -> None:
    schedule = FirstPollSchedule(interval=5.0)
    for _ in range(100):
        schedule.observe(done_at_first_poll=True)
    assert schedule.first_delay() == 5.0


def test_first_poll_is_capped() -> None:
    schedule = FirstPollSchedule(interval=1.0, maximum=30.0)
    for _ in range(100):
        schedule.observe(done_at_first_poll=False, running_until=1e6)
    assert schedule.first_delay() == 30.0
