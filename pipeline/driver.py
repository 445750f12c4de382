"""The thin async driver: performs each lifecycle state's I/O for one item.

:mod:`pipeline.lifecycle` decides; this module acts. For each state the driver
first makes the state's journal checkpoint durable, then performs its I/O (rate
budget, submit, sleep, poll, download, store) and turns whatever happened, every
provider outcome and every exception, into one lifecycle event, here and nowhere
else. It is the only code that awaits on an item's behalf.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import math
import os
import pathlib
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio

from pipeline import lifecycle as lc
from pipeline.budget import last_grant
from pipeline.errors import (
    DiskFullError,
    FatalError,
    PermanentError,
    RateLimitedError,
    ResultNotImageError,
    RetryableError,
    TransportError,
    VendorError,
)
from pipeline.images import prepare_payload, sniff_image_format
from pipeline.journal import KEEP, Change, Journal, Keep
from pipeline.offload import run_small, run_sync
from pipeline.outputs import AtomicFile, result_relpath, write_result
from pipeline.providers.base import BEFORE_BILLABLE_SEND
from pipeline.providers.client import UNSAFE_ID
from pipeline.resultcheck import warm_decoder
from pipeline.sources import input_signature

if TYPE_CHECKING:
    from pipeline.engine import Engine, WorkItem
    from pipeline.providers.base import ImagePayload, Provider

__all__ = ["DurationEstimate", "Estimates", "ItemDriver", "error_info", "terminal_change"]

log = logging.getLogger("pipeline")


def error_info(exc: VendorError) -> lc.ErrorInfo:
    return lc.ErrorInfo(exc.code, exc.message, exc.kind)


class DurationEstimate:
    """How long one operation's tasks take, measured: the first-poll delay.

    Each finished task gives an upper bound of its duration: the time from its
    submit to the poll that saw it done. The first poll of a new task goes at a
    high quantile (95%) of recent bounds, a tenth of an interval early; then every
    interval. Most tasks are then done at their first poll and the rest at the
    second, at most one interval after their end (about 1.05 polls a task). Being a
    quantile of measurements, the delay can never climb past the durations actually
    seen, whatever the concurrency: the multiplier it replaces compounded to minutes
    when a whole first wave was still running at its first poll. Never sooner than
    one interval after the submit, the vendors' advised cadence (docs/vendors.md
    "AILab: polling and task states", "Perfect Corp: polling interval").

    The time a poll spends queued at the rate budget is not the task's. Counted in,
    it fed back into the next first polls, which queued longer still, up to the
    polling window's cap, and items sat finished at the vendor while the budget
    they could have used went idle (issue 9 point 3.5). So a bound is measured to
    when its poll asked the budget, and only polls that were let go within a
    quarter interval give one: a poll that queued longer and found the task done
    says only that it was done some time before the poll left. While no poll has
    given a bound (all of them queued), the first poll goes no sooner than the
    soonest any task of the operation was seen done: the one bound that a queue
    cannot push up, where polling after one interval would find a task that the
    budget has only ever seen done later still running.

    Where polls queue, the budget binds, and a poll that finds the task still
    running costs a request that another item needed (issue 9: the rate budget
    before latency): the first poll comes early by a quarter interval times the
    share of recent polls that did not queue, so the aim still probes downwards
    when the budget binds, only more slowly, and a poll that the budget let go at
    once hits a task that was still running less often.

    A poll that left after its due time (an event loop busy with a wave of tasks
    ending together) counts from its due time: that delay is the client's, and
    counted in it pushed each wave's aim later than the last. Once the aim has come
    down past the tasks' end (more than ``OVERSHOOT`` of recent aimed first polls
    found their task running), the soonest of those running answers is a floor: the
    aim stays at least a tenth of an interval above it, never above the quantile,
    for ``FLOOR_SPAN`` x ``keep`` tasks, instead of coming down past the tasks' end
    again every few waves. When no aimed first poll has found its task running for
    ``DESCENT_PATIENCE`` x ``keep`` tasks and no floor holds, the tasks may have got
    shorter: the step down doubles every ``keep`` tasks, up to ``DESCENT_MAX`` steps.
    """

    # A high quantile, a tenth of an interval early: about one task in twenty needs a
    # second poll (one interval more), the rest are polled within about a tenth of an
    # interval of the durations seen. With 80% and a quarter interval, one in five
    # took a second poll: 20 ms a task with 0.1 s intervals, 5% of the wall time of
    # 0.5 s tasks (measured with bench/pace.py async, README "Performance").
    QUANTILE = 0.95
    EARLY = 0.1  # of an interval: how fast the aim probes downwards
    LEAN = 0.25  # of an interval past a running answer: a task that took a second poll
    # A first poll that found its task running holds the aim at least EARLY above it
    # for this many times ``keep`` observations, then the aim may probe below again (in
    # case tasks got shorter). With 4, at concurrency 64 a wave in four probed and
    # took second polls: 1.41 polls a task against 1.27 (bench/pace.py async).
    FLOOR_SPAN = 16
    # The share of recent aimed first polls finding their task running that marks the
    # aim as having come down past the tasks' end (by design about 1 - QUANTILE do):
    # only then does a running answer become a floor. Below it, with durations spread
    # wide, each running answer held the aim up to the quantile (a review's simulation:
    # 0.58 s late a task against 0.55, uniform 0.3-1.5 s tasks polled every 0.1 s).
    OVERSHOOT = 0.15
    # After DESCENT_PATIENCE x ``keep`` tasks in a row whose aimed first polls all found
    # their task done (and no floor held), the step down doubles for every ``keep``
    # tasks more, up to DESCENT_MAX x EARLY of an interval: the quantile of bounds that
    # first polls found done says only "at most this long", so after durations fell
    # (a vendor less busy) the aim came down a tenth of an interval per 64 tasks:
    # 3 s tasks becoming 1 s ones (0.5 s polls) were still polled 1.4 s late on
    # average over the next 4 000 (a simulation of the driver, README "Performance").
    # Waiting four such spans first leaves a run of constant durations as it was: its
    # aim reaches the tasks' end, or a floor holds it, within one or two.
    DESCENT_PATIENCE = 4
    DESCENT_MAX = 8

    def __init__(self, interval: float, keep: int = 64) -> None:
        self.interval = interval
        self._keep = keep
        self._done: deque[float] = deque(maxlen=keep)
        self._queued: deque[bool] = deque(maxlen=keep)  # recent polls, queued or not
        self._soonest: float | None = None  # the soonest a task was seen done, at all
        self._seen = 0  # tasks observed
        # (observation number, seconds after the submit) of recent running answers
        # to aimed first polls: the task was still running then.
        self._floors: deque[tuple[int, float]] = deque(maxlen=8)
        self._aimed: deque[bool] = deque(maxlen=keep)  # recent aimed first polls: running?
        self._last_early = 0  # the observation whose aimed first poll last found it running

    def observe(
        self,
        seen_done_after: float,
        *,
        asked_after: float | None = None,
        waited: float = 0.0,
        running_after: float | None = None,
        due_after: float | None = None,
        aimed: bool = False,
    ) -> None:
        """A task was seen done ``seen_done_after`` seconds after its submit, by a
        poll that asked the rate budget ``asked_after`` seconds after the submit and
        waited ``waited`` seconds there; ``running_after``: when the poll before it
        answered "running" (None: it was the first); ``due_after``: when that poll
        was due (None: not known); ``aimed``: its first poll went at the estimate
        (then a ``running_after`` says that poll came too early).
        ``asked_after`` None: the answer came just now, and the calling task's last
        grant (:func:`pipeline.budget.last_grant`) says when that poll asked and how
        long it waited."""
        if asked_after is None:
            asked_after, waited = _poll_asked(seen_done_after)
        if due_after is not None and due_after < asked_after:
            # The poll left after its due time, behind a busy event loop (a wave of
            # tasks ending together at high concurrency). That delay is the
            # client's, and the next first polls meet it again: counted into the
            # bound, it compounded, each wave's first polls went the delay's 95th
            # percentile later, and at concurrency 64 they climbed from 523 to 544 ms
            # after the submit for 0.5 s tasks and came down 4 ms a wave (measured
            # with bench/pace.py async: 25 ms late on average over the run). Taken at
            # its due time, the aim keeps coming down a tenth of an interval a wave
            # until a poll finds its task still running, and the bound from that
            # running answer (below) sets it back just past the durations seen.
            asked_after = due_after
        if self._soonest is None or seen_done_after < self._soonest:
            self._soonest = seen_done_after
        queued = waited > self.interval / 4
        self._queued.append(queued)
        self._seen += 1
        if aimed:
            self._aimed.append(running_after is not None)
            if running_after is not None:
                self._last_early = self._seen
        if queued:
            return
        bound = asked_after
        if running_after is not None:
            # The task was still running when the poll before asked, and done by
            # this one, an interval later: it ended in between. The poll that found it
            # done says "at most an interval late", not "this long": counted as this
            # long, one task in twenty that took a second poll set the 95% quantile,
            # every first poll moved a whole interval late and stayed there (measured
            # with bench/pace.py async: 0.52 s a cycle for 0.5 s tasks became 0.61 s
            # mid-run). So such a task gives a bound just past the running answer,
            # the aim settles just past the durations seen, and a second poll stays
            # rare. While polls queue at the budget (the budget binds: fewer requests
            # first) the bound leans back towards the poll that found it done.
            lean = max(self.LEAN, self.queued_share)
            bound = min(asked_after, running_after + self.interval * lean)
            overshot = sum(self._aimed) > self.OVERSHOOT * self._keep
            if aimed and overshot:
                self._floors.append((self._seen, running_after))
        self._done.append(bound)

    @property
    def queued_share(self) -> float:
        """The share of recent polls that queued at the rate budget."""
        return sum(self._queued) / len(self._queued) if self._queued else 0.0

    def expected(self) -> float | None:
        if not self._done:
            return None if self._soonest is None else max(self.interval, self._soonest)
        ordered = sorted(self._done)
        high = ordered[int(self.QUANTILE * (len(ordered) - 1))]
        floor = self._floor()
        early = self.interval * self.EARLY * self._descent(floor) * (1.0 - self.queued_share)
        aim = high - early
        if floor is not None:
            # Without it the aim came down a tenth of an interval a wave, past the
            # running answer, set back by LEAN, and down again: at concurrency 64
            # one wave in three took second polls, an interval late (measured with
            # bench/pace.py async). The floor only raises the aim, never past the
            # quantile of the bounds (which it cannot climb past), and it is the
            # lowest recent running answer: with durations spread wide, the highest
            # held the aim near the longest tasks (a review's simulation).
            aim = max(aim, min(high, floor + self.interval * self.EARLY))
        return max(self.interval, aim)

    def _descent(self, floor: float | None) -> int:
        """How many steps of EARLY the aim comes down by: 1, doubling for every
        ``keep`` tasks past DESCENT_PATIENCE x ``keep`` with no aimed first poll
        found running, counted from the last floor's lapse if later, up to
        DESCENT_MAX. Only once a floor has held the aim and lapsed."""
        if floor is not None or not self._floors:
            # Before any floor, the aim is still coming down from the first tasks,
            # polled every interval: at most an interval and a quarter too high.
            # Doubling then overshot, and a whole wave took second polls.
            return 1
        start = max(self._last_early, self._floors[-1][0] + self.FLOOR_SPAN * self._keep)
        spans = (self._seen - start) // self._keep - self.DESCENT_PATIENCE
        return 1 if spans < 0 else min(self.DESCENT_MAX, 1 << min(spans, 16))

    def _floor(self) -> float | None:
        """The soonest a recent aimed first poll found its task still running."""
        oldest = self._seen - self.FLOOR_SPAN * self._keep
        recent = [after for seen, after in self._floors if seen >= oldest]
        return min(recent) if recent else None


def _poll_asked(seen_done_after: float) -> tuple[float, float]:
    """(seconds from the submit to when the poll that just answered asked the rate
    budget, seconds it waited there), from the calling task's last grant; when that
    is not a poll made since the submit, the answer's time and no wait."""
    grant = last_grant()
    if grant is None or grant.kind != "poll":
        return seen_done_after, 0.0
    since_asked = time.monotonic() - grant.asked
    if since_asked > seen_done_after:
        return seen_done_after, 0.0  # older than the task: not this task's poll
    return seen_done_after - since_asked, grant.waited


class Estimates:
    """One :class:`DurationEstimate` per operation, made on first use."""

    def __init__(self, intervals: dict[str, float]) -> None:
        self._intervals = intervals  # poll interval per vendor
        self._by_op: dict[str, DurationEstimate] = {}

    def __getitem__(self, operation: str) -> DurationEstimate:
        found = self._by_op.get(operation)
        if found is None:
            interval = self._intervals[operation.split("/", 1)[0]]
            found = self._by_op[operation] = DurationEstimate(interval)
        return found

    def first_polls(self) -> dict[str, float]:
        """The measured first-poll delay per operation (seconds), for the report."""
        out = {}
        for op, est in sorted(self._by_op.items()):
            expected = est.expected()
            out[op] = round(est.interval if expected is None else expected, 3)
        return out


@dataclass
class _Held:
    """What the driver holds for one item between states (the state holds none)."""

    payload: ImagePayload | None = None
    files: dict[str, ImagePayload] = field(default_factory=dict)
    changes: list[str] = field(default_factory=list)
    result: bytes | None = None
    sink: AtomicFile | None = None  # a download streamed to its temporary file
    billed_now: bool = False
    polls: int = 0
    poll_lag: float | None = None
    aimed: bool = False  # its task's first poll went at a measured estimate


class ItemDriver:
    """Drives one item from its resumed state to a terminal one."""

    def __init__(self, engine: Engine, item: WorkItem, policy: lc.Policy) -> None:
        self.engine = engine
        self.item = item
        self.policy = policy
        self.op = item.variant.operation
        self.provider: Provider = engine.providers[self.op.vendor]
        self.journal: Journal = engine.journal
        self.held = _Held()
        self._written: lc.Checkpoint | None = None
        self.recorded_output: str | None = None  # a path an earlier run recorded keeps
        self._pending_send: lc.Checkpoint | None = None
        self.billed_before = False
        self._slots: list[anyio.CapacityLimiter] = []  # held while at the vendor
        self._claimed_task: str | None = None  # RunContext.claim_task

    async def run(self, state: lc.State, *, polls_before: int = 0) -> lc.State:
        """Checkpoint, perform, step; until a terminal state, which is journaled."""
        self.held.polls = polls_before
        try:
            return await self._run(state)
        finally:
            self._release_slots()
            self._release_task()
            if self.held.sink is not None:  # a crash or a stop between fetch and store
                self.held.sink.discard()

    async def _claim(self, task_id: str, *, resumed: bool) -> str | None:
        """:meth:`RunContext.claim_task` for this item (the id it held before, if
        another, let go): the input of another item holding ``task_id``, else None."""
        self._release_task()
        item = self.item
        holder = await self.engine.claim_task(
            self.op.vendor, task_id, item.key, item.input_rel, resumed=resumed
        )
        if holder is None:
            self._claimed_task = task_id
        return holder

    def _release_task(self) -> None:
        if self._claimed_task is not None:
            self.engine.release_task(self.op.vendor, self._claimed_task, self.item.key)
            self._claimed_task = None

    async def _take_slots(self, state: lc.State) -> None:
        """Hold a vendor slot (and, for a task, the vendor's in-flight cap) while the
        item is at the vendor: sending, or its task running. Not while its input is
        read, a retry waits, or its result is fetched and stored."""
        at_vendor = isinstance(state, lc.Send | lc.Poll)
        if not at_vendor:
            self._release_slots()
            return
        if self._slots:
            return
        cap = self.engine.task_slots(self.op.vendor) if self.op.is_async else None
        # The vendor's cap first: waiting for it must not keep a run-wide slot.
        taken: list[anyio.CapacityLimiter] = []
        try:
            for limiter in (cap, self.engine.vendor_slots):
                if limiter is not None:
                    await limiter.acquire_on_behalf_of(self)
                    taken.append(limiter)
        except BaseException:
            for limiter in taken:
                limiter.release_on_behalf_of(self)
            raise
        self._slots = taken

    def _release_slots(self) -> None:
        for limiter in reversed(self._slots):
            limiter.release_on_behalf_of(self)
        self._slots = []

    async def _run(self, state: lc.State) -> lc.State:
        while not lc.is_terminal(state):
            await self._checkpoint(state)
            await self._take_slots(state)
            # Storing a paid result is not cancellable (bounded by the disk): Ctrl-C or
            # a fatal stop elsewhere must not lose bytes the vendor has billed.
            shield = isinstance(state, lc.Store)
            try:
                with anyio.CancelScope(shield=shield):
                    event = await self._perform(state)
            except (FatalError, anyio.get_cancelled_exc_class()):
                raise
            except Exception as exc:  # a bug in I/O code: fail this item, not the run
                log.error("%s: unexpected error: %s", self.item.input_rel, _one_line(exc))
                log.debug("the unexpected error in full", exc_info=True)
                event = lc.Crashed(_one_line(exc))
            self._note(state, event)
            state = lc.next(state, event, time.monotonic(), self.policy)
        # Slots are let go in run(), after this: an item that failed at the vendor
        # holds its slot until a fatal answer has stopped the run.
        await self.engine.finish_item(self, state)
        return state

    async def _checkpoint(self, state: lc.State) -> None:
        cp = lc.checkpoint(state)
        if cp is None or cp == self._written:
            return
        if cp.status is lc.Status.SUBMITTING:
            # Written by the provider right before the billable request leaves (after
            # the budget wait): see BEFORE_BILLABLE_SEND and _send.
            self._pending_send = cp
            return
        await self._write_checkpoint(cp)

    async def _write_checkpoint(self, cp: lc.Checkpoint) -> None:
        await self.engine.record(
            self.item.key,
            Change(
                cp.status,
                task_id=cp.task_id if cp.status is not lc.Status.SUBMITTING else None,
                attempts=KEEP if cp.attempts is None else cp.attempts,
                unknown_sends=KEEP if cp.unknown_sends is None else cp.unknown_sends,
                unknown_total=KEEP if cp.unknown_total is None else cp.unknown_total,
                changes=json.dumps(self.held.changes) if self.held.changes else KEEP,
                spool=self.held.result if cp.spool and self.held.result is not None else KEEP,
            ),
        )
        self._written = cp

    def _note(self, state: lc.State, event: lc.Event) -> None:
        """Bookkeeping that follows events: billing, learned durations, poll lag."""
        if isinstance(event, lc.SyncResult | lc.TaskSucceeded) and not self.held.billed_now:
            billed_before = isinstance(state, lc.Poll) and state.billed
            if not billed_before:
                self._billed()
        if isinstance(event, lc.TaskSucceeded) and isinstance(state, lc.Poll):
            now = time.monotonic()
            if state.started is not None and state.refetches == 0:
                # A first poll that was not aimed (nothing measured yet: polled every
                # interval from the submit) says nothing about how close to its end
                # the task was when last seen running: only aimed ones narrow the bound.
                running_after = (
                    None
                    if state.last_running is None or not self.held.aimed
                    else state.last_running - state.started
                )
                self.engine.estimates[self.op.name].observe(
                    now - state.started,
                    running_after=running_after,
                    due_after=state.due - state.started,
                    aimed=self.held.aimed,
                )
            since = state.last_running
            if since is None and state.started is not None:
                expected = self.engine.estimates[self.op.name].expected() or 0.0
                since = state.started + expected
            if since is not None:
                self.held.poll_lag = round(max(0.0, now - since), 3)
        if isinstance(event, lc.SendFailed) and event.billed and not self.held.billed_now:
            self._billed()
        # An expired task the vendor may charge is counted as spent (issue 9 point 2).
        expired = isinstance(event, lc.TaskFailed) and event.maybe_billed
        if (
            expired
            and not self.held.billed_now
            and not (isinstance(state, lc.Poll) and state.billed)
        ):
            self._billed()

    def _billed(self) -> None:
        """The vendor billed this item now: count it as spent, once."""
        self.held.billed_now = True
        self.engine.credits.spend(self.op.vendor, self.op.price)
        self.engine.credits.release(self.item.key)
        self.engine.progress.spent(self.op.vendor, self.op.price)

    # -- each state's I/O -------------------------------------------------------------------

    async def _perform(self, state: lc.State) -> lc.Event:
        if isinstance(state, lc.Prepare):
            return await self._prepare()
        if isinstance(state, lc.Send):
            return await self._send(state)
        if isinstance(state, lc.Retry):
            await _sleep_until(state.until)
            return lc.Stopping(_not_sent(self.engine)) if self.engine.stopping else lc.Timer()
        if isinstance(state, lc.Poll):
            await _sleep_until(state.due)
            return await self._poll(state)
        if isinstance(state, lc.Fetch):
            await _sleep_until(state.due)
            return await self._fetch(state)
        if isinstance(state, lc.Store):
            return await self._store(state)
        raise AssertionError(f"no I/O for {state!r}")

    async def _prepare(self) -> lc.Event:
        if self.item.problem is not None:
            return lc.InputRejected(error_info(self.item.problem))
        if self.engine.stopping:
            return lc.Stopping(_not_sent(self.engine))
        limits, auto_fix = self.op.limits, self.engine.manifest.auto_fix
        try:
            prepared = await run_small(
                _size_hint(self.item.input_path), prepare_payload, self.item.input_path,
                limits, auto_fix,
            )  # fmt: skip
            for name, path in self.item.variant.files.items():
                self.held.files[name] = await self.engine.prepared_file(path, limits)
        except PermanentError as exc:
            info = error_info(exc)
            if info.code in _TRANSIENT_INPUT:
                info = lc.ErrorInfo(info.code, info.message, "retryable")
            return lc.InputRejected(info)
        changed = _changed_since_listed(self.item)  # one stat: no hop
        if changed is not None:
            return lc.InputRejected(changed)
        self.held.payload = prepared.payload
        self.held.changes = list(prepared.changes)
        return lc.InputReady()

    async def _send(self, state: lc.Send) -> lc.Event:
        engine = self.engine
        if engine.stopping:
            return lc.Stopping(_not_sent(engine))
        refusal = engine.credits_refusal(self.item.key, self.op)
        if refusal is not None:
            engine.stop_starting(refusal)
            return lc.SendFailed(error_info(refusal))
        assert self.held.payload is not None
        warm_decoder()  # results will come: their checker loads while this one waits
        token = BEFORE_BILLABLE_SEND.set(self._send_checkpoint)
        try:
            # The billable request itself is shielded by the provider once it is on
            # the wire (VendorClient._call); the budget wait before it is not.
            submitted = await self.provider.submit(
                self.op.name, self.held.payload, self.item.variant.params, self.held.files
            )
        except VendorError as exc:
            engine.reachability(self.op.vendor, exc)
            return self._send_failed(exc, state.tally)
        finally:
            BEFORE_BILLABLE_SEND.reset(token)
        engine.reachability(self.op.vendor, None)
        engine.rejections.reset()
        if submitted.task_id:
            holder = await self._claim(submitted.task_id, resumed=False)
            if holder is not None:
                return lc.SendFailed(_task_id_reused(submitted.task_id, holder), maybe_sent=True)
            expected = engine.estimates[self.op.name].expected()
            self.held.aimed = expected is not None
            return lc.TaskCreated(submitted.task_id, expected)
        if submitted.image is not None:
            self.held.result = submitted.image
            self.held.payload, self.held.files = None, {}  # never sent again: let it go
            return lc.SyncResult()
        # Answered "ok" without a task id or a result: it may have been billed.
        error = lc.ErrorInfo("NO_TASK_ID", "the vendor answered without a task id", "retryable")
        return lc.SendFailed(error, maybe_sent=True)

    async def _send_checkpoint(self) -> None:
        cp, self._pending_send = self._pending_send, None
        if cp is not None:
            await self._write_checkpoint(cp)

    def _send_failed(self, exc: VendorError, tally: lc.Tally) -> lc.Event:
        info = error_info(exc)
        if isinstance(exc, ResultNotImageError):
            return lc.SendFailed(info, billed=True)
        if isinstance(exc, RateLimitedError):
            self.engine.rate_limited(self.op.vendor, exc, tally.rate_limited + 1)
            return lc.SendFailed(info, rate_limited=True, retry_after=exc.retry_after)
        if isinstance(exc, TransportError):
            return lc.SendFailed(info, maybe_sent=exc.maybe_sent)
        if isinstance(exc, PermanentError):
            self.engine.note_rejection(exc)
        # An answer whose task id we refuse to keep came from a task that may exist.
        return lc.SendFailed(info, maybe_sent=exc.code == UNSAFE_ID)

    async def _poll(self, state: lc.Poll) -> lc.Event:
        if state.task_id != self._claimed_task:  # a task resumed from the journal
            holder = await self._claim(state.task_id, resumed=True)
            if holder is not None:
                return lc.TaskTaken(_task_id_reused(state.task_id, holder))
        try:
            answer = await self.provider.poll(self.op.name, state.task_id)
        except VendorError as exc:
            self.engine.reachability(self.op.vendor, exc)
            if isinstance(exc, RateLimitedError):
                self.engine.rate_limited(self.op.vendor, exc, state.tally.rate_limited + 1)
                return lc.PollError(error_info(exc), rate_limited=True, retry_after=exc.retry_after)
            if isinstance(exc, RetryableError | FatalError):
                # About the request (or the account), not the task: the task id is kept.
                return lc.PollError(error_info(exc), retry_after=None)
            # A permanent answer to a poll is about the task (gone, failed).
            return lc.TaskFailed(error_info(exc))
        finally:
            self.held.polls += 1
        self.engine.reachability(self.op.vendor, None)
        if answer.state == "running":
            return lc.TaskRunning(answer.poll_after)
        if answer.state == "failed":
            assert answer.error is not None
            return lc.TaskFailed(error_info(answer.error), maybe_billed=answer.maybe_billed)
        if answer.image is not None:
            self.held.result = answer.image
        return lc.TaskSucceeded(answer.result_url, has_image=answer.image is not None)

    async def _fetch(self, state: lc.Fetch) -> lc.Event:
        """Stream the result to a temporary file beside its final name (memory stays
        bounded whatever its size); the provider checks it is an image. Where no such
        file can be made (a name the folder refuses, a planted file), fetch it into
        memory instead, so the paid bytes can still be spooled to the journal."""
        rel = self._output_rel("jpg")
        if self.engine.disk_full:
            return _store_failed(rel, OSError(errno.ENOSPC, "No space left on device"))
        try:
            sink = await run_sync(self.engine.result_folders.open, rel)
        except (OSError, ValueError):
            sink = None
        try:
            if sink is None:
                self.held.result = await self.provider.download(state.url)
                return lc.Downloaded(to_file=False)
            fmt = await self.provider.download_to(state.url, sink, check_path=str(sink.path))
            # The extension is known now; one lstat in the same folder: no hop.
            sink.retarget(sink.target.with_name(self._output_rel(fmt).rsplit("/", 1)[-1]))
            self.held.sink = sink
        except ResultNotImageError as exc:
            return lc.DownloadFailed(error_info(exc), "not_image")
        except RetryableError as exc:
            return lc.DownloadFailed(error_info(exc), "transient")
        except VendorError as exc:
            return lc.DownloadFailed(error_info(exc), "url")
        except (OSError, ValueError) as exc:  # the temporary file: disk full, I/O error
            return _store_failed(rel, exc)
        finally:
            if sink is not None and self.held.sink is not sink:
                sink.discard()  # not handed over: failed or cancelled (idempotent)
        return lc.Downloaded()

    async def _store(self, state: lc.Store) -> lc.Event:
        if state.source == "file":
            sink = self.held.sink
            assert sink is not None
            rel = self._output_rel(sink.target.name.rsplit(".", 1)[-1])
            try:
                await run_sync(sink.commit)
            except (OSError, ValueError) as exc:
                return _store_failed(rel, exc)
            finally:
                self.held.sink = None
            return lc.Stored(rel)
        data = self.held.result
        if state.source == "spool":
            data = self.held.result = await self.journal.load_spool(self.item.key)
        if data is None:
            info = lc.ErrorInfo("RESULT_LOST", "the paid result was not kept", "permanent")
            return lc.DownloadFailed(info, "not_image")
        # Checked by the provider when it arrived (and before it was spooled).
        rel = self._output_rel(sniff_image_format(data) or "jpg")
        for last in (False, True):
            try:
                await run_sync(
                    functools.partial(
                        write_result, self.engine.output_dir, rel, data,
                        folders=self.engine.result_folders,
                    )
                )  # fmt: skip
                return lc.Stored(rel)
            except (OSError, ValueError) as exc:
                full = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
                if full:
                    self.engine.disk_full = True
                    # Nothing more is sent: each answer now needs room it may not find.
                    self.engine.stop_starting(
                        DiskFullError(
                            f"the disk is full (writing {rel}); paid results are kept in "
                            "the journal. Free some space and rerun"
                        )
                    )
                # A full disk: the space held back lets a paid result in, once.
                if last or not full or not self.engine.reserve.release():
                    return _store_failed(rel, exc)
        raise AssertionError("unreachable")

    def _output_rel(self, ext: str) -> str:
        """Where the result goes: the path a journal already recorded, else the mapping
        (a name of the item's own where another item's result is: ``displaced``)."""
        if self.recorded_output:
            return self.recorded_output
        return mapped_output(self.item, ext)


def mapped_output(item: WorkItem, ext: str) -> str:
    """The result path of ``item`` with no recorded one, for a result of ``ext``."""
    v = item.variant
    key = item.key if item.displaced else None
    return result_relpath(v.operation.name, v.label, item.input_rel, ext, displaced_key=key)


# Input problems a rerun may not meet again: the file moved away mid-run.
_TRANSIENT_INPUT = frozenset({"INPUT_MISSING"})


def _changed_since_listed(item: WorkItem) -> lc.ErrorInfo | None:
    """Why ``item``'s input is no longer what its key was hashed from, if it is not:
    bytes read now would go to the vendor under another photo's key (a file replaced
    while its task ran, say). Retryable: a rerun hashes it again, as a new item."""
    if item.signature is None:
        return None
    try:
        now = input_signature(os.stat(item.input_path))
    except OSError:
        now = None
    if now == item.signature:
        return None
    return lc.ErrorInfo(
        "INPUT_CHANGED",
        f"{item.input_rel}: the file changed since this run read it; not sent under "
        "its old content's key. Rerun to send it as it is now",
        "retryable",
    )


def _size_hint(path: pathlib.Path) -> int:
    """The input's size for :func:`run_small` (large when unknown: read in a thread)."""
    try:
        return os.stat(path).st_size
    except (OSError, ValueError):
        return sys.maxsize


def _store_failed(rel: str, exc: BaseException) -> lc.StoreFailed:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        info = lc.ErrorInfo(
            "DISK_FULL",
            f"the disk is full: cannot write {rel}; the paid result is kept in the journal "
            "if it fits there (else it is recorded as lost, RESULT_LOST). Free some space "
            "and rerun",
            "fatal",
        )
        return lc.StoreFailed(info, disk_full=True)
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    info = lc.ErrorInfo(
        "STORE_FAILED",
        f"cannot write {rel}: {reason}; the result is paid for and kept: fix the output "
        "folder and rerun to store it (it is not paid for again)",
        "retryable",
    )
    return lc.StoreFailed(info)


def _not_sent(engine: Engine) -> lc.ErrorInfo:
    reason = engine.fatal.code if engine.fatal else "stopping"
    return lc.ErrorInfo(
        "NOT_SENT", f"not sent: the run is stopping ({reason}); a rerun sends it", "fatal"
    )


def _task_id_reused(task_id: str, holder: str) -> lc.ErrorInfo:
    # No vendor documents giving one task id to two sends (docs/vendors.md, "Task ids
    # given twice"): the task's result would be stored as both photos' results.
    return lc.ErrorInfo(
        "TASK_ID_REUSED",
        f"the vendor gave this item's send task id {task_id}, which it had already "
        f"given {holder}: its result could be either photo's, so it is not fetched for "
        "this one. This send may have been billed; check the vendor console, then rerun "
        "with --retry-failed to send it again",
        "permanent",
    )


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())[:300]


async def _sleep_until(when: float) -> None:
    delay = when - time.monotonic()
    if delay > 0 and math.isfinite(delay):
        await anyio.sleep(delay)


def terminal_change(state: lc.State, held: _Held, *, run_id: int) -> Change | None:
    """The journal write that records a terminal state (None: nothing to write).

    ``billed_run`` is set to this run when the vendor billed the item in it."""
    billed: int | Keep = run_id if held.billed_now else KEEP
    attempts: int | Keep = KEEP
    if isinstance(state, lc.Succeeded | lc.Failed) and state.tally.attempts:
        attempts = state.tally.attempts
    if isinstance(state, lc.Succeeded):
        return Change(
            lc.Status.SUCCEEDED, output=state.output, run_status="succeeded",
            succeeded_run=run_id, billed_run=billed, error=None, finished=True, spool=None,
            polls=held.polls, poll_lag=held.poll_lag if held.poll_lag is not None else KEEP,
            attempts=attempts,
        )  # fmt: skip
    if isinstance(state, lc.Failed):
        keep_task = state.task_id is not None or state.status is lc.Status.FAILED
        return Change(
            state.status, task_id=state.task_id if keep_task else KEEP, error=state.error,
            run_status="failed", billed_run=billed, unknown_sends=state.tally.unknown_sends,
            unknown_total=state.tally.unknown_total,
            finished=True, polls=held.polls, attempts=attempts,
            spool=held.result if state.spool and held.result is not None else KEEP,
        )  # fmt: skip
    return None
