"""Live counters of a run: a tqdm bar on a terminal, progress lines everywhere else.

The engine calls :class:`Progress`'s methods as items move (``discovered``,
``started``, ``stopped``, ``succeeded``, ``failed``, ``carried_over``, ``skipped``,
``rate_limited``, ``spent``). What a person sees:

- **on a terminal** (and not ``--quiet`` or ``--log-json``): a tqdm bar; log lines
  print above it (``tqdm.contrib.logging.logging_redirect_tqdm``). Its total is the
  real one once :meth:`Progress.counted` gives it (:func:`report_progress` counts the
  inputs first), and says "discovering" until then, so its ETA never runs against a
  total that is still growing;
- **anywhere else** (cron, CI, a pipe): a ``progress`` log line every
  ``interval`` seconds (the config's ``reporting.progress_interval_seconds``):
  finished of total, succeeded, failed, skipped, in flight, rate, credits spent, 429s
  and ETA (see :mod:`pipeline.logs` for the line formats).

Lines come from a monotonic-clock check in every method call, so a busy run needs
no task; :func:`report_progress` (a task beside the engine) keeps them coming while
every item waits on the vendor, and counts the inputs for the real total. No
threads except the counting walk, which runs in a worker thread and stops with it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import anyio
import anyio.to_thread

from pipeline import logs

if TYPE_CHECKING:
    from pipeline.manifest import Manifest

__all__ = ["Progress", "count_work_items", "report_progress"]

# Rate over about the last minute of progress lines (at least 3 lines).
_RATE_WINDOW_SECONDS = 60.0
_COUNT_CHECK_EVERY = 1024  # entries walked between looks at the stop flag


class Progress:
    """Counts of a run; draws a bar or logs progress lines (see the module docstring).

    ``enabled``: the caller found a terminal and no ``--quiet``, so a bar may be drawn
    (never with ``--log-json``). ``interval``: seconds between progress lines; ``None``
    takes :func:`pipeline.logs.settings` (which the CLI sets from the config).
    ``limit``: the run processes at most this many new items (``--limit``): the ETA
    counts no more than that.
    """

    def __init__(
        self,
        *,
        enabled: bool,
        interval: float | None = None,
        limit: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.enabled = enabled
        self.interval = interval
        self.limit = limit
        self._clock = clock
        self.found = 0  # work items discovered so far
        self.planned: int | None = None  # work items counted up front
        self.discovery_complete = False
        self.done = 0  # succeeded in this run
        self.failed_count = 0  # failed in this run
        self.carried_count = 0  # permanent failures of earlier runs, not retried
        self.skipped_count = 0  # done by an earlier run
        self.in_flight = 0
        self.rate_limits = 0  # rate-limit answers (429s and AILab's flow restriction)
        self.spend: dict[str, float] = {}
        self.lines = 0  # progress lines logged
        self._bar: Any = None
        self._redirect: Any = None
        self._t0 = clock()
        self._first_start: float | None = None
        self._next_line = math.inf
        self._samples: deque[tuple[float, int]] = deque()

    # -- what the bar and the lines show ---------------------------------------------------

    @property
    def total(self) -> int | None:
        """Work items in the run: counted, or found once discovery ended; else ``None``."""
        if self.planned is not None:
            return max(self.planned, self.found)
        return self.found if self.discovery_complete else None

    @property
    def finished(self) -> int:
        return self.done + self.failed_count + self.carried_count + self.skipped_count

    @property
    def worked(self) -> int:
        """Items this run sent work for and finished (what the rate measures)."""
        return self.done + self.failed_count

    @property
    def drawing(self) -> bool:
        return self._bar is not None

    def rate(self, now: float | None = None) -> float | None:
        """Items finished per second (this run's own work, not skips), recently."""
        now = self._clock() if now is None else now
        if self._samples:
            t, worked = self._samples[0]
        elif self._first_start is not None:
            t, worked = self._first_start, 0
        else:
            return None
        span = now - t
        if span <= 0:
            return None
        return (self.worked - worked) / span

    def eta_seconds(self, now: float | None = None) -> float | None:
        """Seconds to go at the recent rate; ``None`` while unknown."""
        total = self.total
        if total is None:
            return None
        remaining = max(0, total - self.finished)
        if self.limit is not None:
            remaining = min(remaining, max(0, self.limit - self.worked))
        if remaining == 0:
            return 0.0
        rate = self.rate(now)
        if not rate or rate <= 0:
            return None
        return remaining / rate

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """The fields of a progress line (``--log-json`` prints them as they are)."""
        now = self._clock() if now is None else now
        rate = self.rate(now)
        eta = self.eta_seconds(now)
        return {
            "finished": self.finished,
            "total": self.total,
            "found": self.found,
            "succeeded": self.done,
            "failed": self.failed_count,
            "failed_earlier": self.carried_count,
            "skipped": self.skipped_count,
            "in_flight": self.in_flight,
            "rate_per_second": None if rate is None else round(rate, 3),
            "credits_spent": {v: self.spend[v] for v in sorted(self.spend)},
            "rate_limited": self.rate_limits,
            "eta_seconds": None if eta is None else round(eta, 1),
            "elapsed_seconds": round(now - self._t0, 1),
        }

    def line(self, now: float | None = None) -> str:
        """A progress line's words, e.g. ``340 of 1204 finished (300 succeeded, ...)``."""
        snap = self.snapshot(now)
        total = snap["total"]
        of = f"{total}" if total is not None else f"{self.found}+ (discovering)"
        parts = [f"{snap['succeeded']} succeeded", f"{snap['failed']} failed"]
        if snap["failed_earlier"]:
            parts.append(f"{snap['failed_earlier']} failed earlier")
        parts.append(f"{snap['skipped']} skipped")
        rate = snap["rate_per_second"]
        rate_text = "rate unknown" if rate is None else f"{rate:.2f} items/s"
        spend = logs.format_spend(
            {v: {"amount": a, "unit": _unit(v)} for v, a in snap["credits_spent"].items()}
        )
        if total is None:
            eta = "ETA unknown (still discovering inputs)"
        elif snap["eta_seconds"] is None:
            eta = "ETA unknown"
        else:
            eta = f"ETA {logs.format_duration(snap['eta_seconds'])}"
        return (
            f"{snap['finished']} of {of} finished ({', '.join(parts)}), "
            f"{snap['in_flight']} in flight, {rate_text}, spent {spend}, "
            f"{snap['rate_limited']} 429s, {eta}"
        )

    # -- the bar and the clock -----------------------------------------------------------

    def __enter__(self) -> Self:
        settings = logs.settings()
        if self.interval is None:
            self.interval = settings.progress_interval
        now = self._clock()
        self._t0 = now
        self._next_line = now + max(self.interval, 0.01)
        if self.enabled and not settings.json:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._bar = tqdm(
                total=self.total, unit="item", dynamic_ncols=True, leave=True, desc="discovering"
            )
            self._redirect = logging_redirect_tqdm(
                loggers=[logging.getLogger(logs.ROOT)], tqdm_class=tqdm
            )
            self._redirect.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._refresh()
            self._bar.close()
            self._bar = None
        if self._redirect is not None:
            self._redirect.__exit__(exc_type, exc, tb)
            self._redirect = None
        self._next_line = math.inf

    def set_interval(self, seconds: float) -> None:
        """Log progress lines every ``seconds`` from now on."""
        self.interval = seconds
        if self._next_line != math.inf:
            self._next_line = min(self._next_line, self._clock() + max(seconds, 0.01))

    def count_delay(self) -> float | None:
        """When to count the inputs for the real total: at once for a bar; for progress
        lines, halfway to the first one; ``None`` when nobody sees a total (``--quiet``,
        no bar). The count walks every input a second time beside the engine, which
        made a quick rerun a quarter slower (README "Performance"); a run over before
        its first line never needs it."""
        if self._bar is not None:
            return 0.0
        if not logging.getLogger(logs.EVENTS).isEnabledFor(logging.INFO):
            return None
        return self.seconds_to_next_line() / 2

    def seconds_to_next_line(self) -> float:
        return max(0.0, self._next_line - self._clock())

    def tick(self) -> None:
        """Log a progress line if one is due (no bar drawn) and schedule the next."""
        now = self._clock()
        if now < self._next_line:
            return
        assert self.interval is not None  # set by __enter__ (the only way _next_line is finite)
        self._next_line = now + max(self.interval, 0.01)
        if self._bar is not None:
            return
        events = logging.getLogger(logs.EVENTS)
        if events.isEnabledFor(logging.INFO):
            logs.emit("progress", self.line(now), **self.snapshot(now))
            self.lines += 1
        self._samples.append((now, self.worked))
        while len(self._samples) > 3 and now - self._samples[0][0] > _RATE_WINDOW_SECONDS:
            self._samples.popleft()

    def _refresh(self, advance: int = 0) -> None:
        bar = self._bar
        if bar is None:
            self.tick()
            return
        total = self.total
        if bar.total != total:
            bar.total = total
            if total is not None:
                bar.set_description_str("", refresh=False)
        bar.set_postfix(
            ok=self.done, failed=self.failed_count + self.carried_count,
            skipped=self.skipped_count, in_flight=self.in_flight, refresh=False,
        )  # fmt: skip
        bar.update(advance)

    # -- what the engine calls -----------------------------------------------------------

    def discovered(self, n: int) -> None:
        """``n`` more work items were found (inputs x variants)."""
        self.found += n
        self._refresh()

    def counted(self, total: int) -> None:
        """The inputs were counted up front: the run has ``total`` work items."""
        self.planned = total
        self._refresh()

    def discovery_finished(self) -> None:
        """Every input was found: ``found`` is the total."""
        self.discovery_complete = True
        self._refresh()

    def started(self) -> None:
        if self._first_start is None:
            self._first_start = self._clock()
        self.in_flight += 1
        self._refresh()

    def stopped(self) -> None:
        self.in_flight -= 1
        self._refresh()

    def succeeded(self) -> None:
        self.done += 1
        self._refresh(1)

    def failed(self) -> None:
        self.failed_count += 1
        self._refresh(1)

    def carried_over(self, n: int = 1) -> None:
        """``n`` permanent failures of an earlier run, met again and not retried."""
        self.carried_count += n
        self._refresh(n)

    def skipped(self, n: int = 1) -> None:
        """``n`` items done by an earlier run (output on disk), met again."""
        self.skipped_count += n
        self._refresh(n)

    def rate_limited(self) -> None:
        self.rate_limits += 1
        self._refresh()

    def spent(self, vendor: str, amount: float) -> None:
        """The vendor billed ``amount`` (its unit: credits or units) in this run."""
        self.spend[vendor] = self.spend.get(vendor, 0) + amount
        self._refresh()


def _unit(vendor: str) -> str:
    from pipeline.operations import OPERATIONS

    for spec in OPERATIONS.values():
        if spec.vendor == vendor:
            return spec.price_unit
    return "credits"


# -- the task beside the engine --------------------------------------------------------------


def count_work_items(manifest: Manifest, stop: threading.Event | None = None) -> int | None:
    """Work items of ``manifest`` (matched entries x variants), by walking its inputs.

    Only lists and stats entries (never opens a file), so 10^6 inputs take seconds.
    ``None`` if ``stop`` was set first or the walk failed (the engine reports why).
    """
    from pipeline.errors import PipelineError
    from pipeline.inputs import NoInputsMatched, iter_input_entries

    n = 0
    try:
        for _ in iter_input_entries(manifest.base_dir, manifest.inputs, manifest.output):
            n += 1
            if stop is not None and n % _COUNT_CHECK_EVERY == 0 and stop.is_set():
                return None
    except NoInputsMatched:
        return 0
    except (PipelineError, OSError):
        return None
    return n * len(manifest.variants)


async def _count(progress: Progress, manifest: Manifest, delay: float) -> None:
    await anyio.sleep(delay)
    stop = threading.Event()
    try:
        total = await anyio.to_thread.run_sync(
            count_work_items, manifest, stop, abandon_on_cancel=True
        )
    finally:
        stop.set()  # an abandoned walk ends at its next check
    if total is not None:
        progress.counted(total)


async def report_progress(
    progress: Progress, interval: float | None = None, *, manifest: Manifest | None = None
) -> None:
    """Run beside the engine until cancelled: counts ``manifest``'s work items (for the
    real total, when someone sees it: :meth:`Progress.count_delay`) and keeps progress
    lines coming every ``interval`` seconds even while nothing finishes. ``progress``
    must be entered (``with Progress(...)``) first."""
    if interval is not None:
        progress.set_interval(interval)
    async with anyio.create_task_group() as tg:
        delay = progress.count_delay()
        if manifest is not None and delay is not None:
            tg.start_soon(_count, progress, manifest, delay)
        while True:
            await anyio.sleep(max(progress.seconds_to_next_line(), 0.01))
            progress.tick()
