"""What one run shares between its work queue and its items' drivers.

The run's settings and connections, its brakes and budgets, and the services a
driver asks of the run: journaling a change (with the disk-full rule), the prepared
template, credit holds, rate-limit pauses, the rejection and reachability brakes.
:class:`pipeline.engine.Engine` builds on it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import anyio
import anyio.to_thread

from pipeline import lifecycle as lc
from pipeline.brakes import FailureRatio, Reachability, RejectionBrake, in_flight_cap
from pipeline.budget import RateBudget
from pipeline.config import Config
from pipeline.credits import CreditGuard
from pipeline.driver import Estimates
from pipeline.errors import (
    DiskFullError,
    FatalError,
    PermanentError,
    RateLimitedError,
    UsageError,
    VendorError,
)
from pipeline.htmlreport import GALLERY_MAX
from pipeline.images import prepare_payload
from pipeline.inputs import stat_input
from pipeline.journal import KEEP, Change, Journal
from pipeline.manifest import Manifest
from pipeline.metkeys import MetKeys
from pipeline.offload import run_sync
from pipeline.operations import ImageLimits, OperationSpec
from pipeline.outputs import DiskReserve, ResultFolders
from pipeline.progress import Progress
from pipeline.providers.base import ImagePayload, Provider
from pipeline.rescue import RescueLog
from pipeline.runner import RunOptions
from pipeline.thumbnails import ThumbnailCache

__all__ = ["RunContext"]

log = logging.getLogger("pipeline")

# Journal writes made before anything is sent: on a full disk, nothing is sent.
_BEFORE_SEND = frozenset({lc.Status.PENDING, lc.Status.SUBMITTING})


@dataclass
class RunContext:
    """The state of one run that its workers and drivers share."""

    manifest: Manifest
    config: Config
    providers: Mapping[str, Provider]
    budgets: Mapping[str, RateBudget]
    journal: Journal
    run_id: int
    options: RunOptions
    progress: Progress
    policies: Mapping[str, lc.Policy]
    reserve: DiskReserve
    rescue: RescueLog | None = None  # where task ids go when the journal is full
    fatal: FatalError | None = None
    halted: str | None = None  # why the run stopped starting items (not fatal)
    stopping: bool = False
    duplicates: int = 0
    started_new: int = 0  # items this run started from nothing (for --limit)
    _inflight: set[str] = field(default_factory=set)
    _queued: set[str] = field(default_factory=set)  # sent to the workers, not finished
    # Keys this run has met (journaled as seen): only their batch-time journal rows can
    # be stale, so only they are read again before they start.
    _met: MetKeys = field(default_factory=MetKeys)
    _reach: dict[str, Reachability] = field(default_factory=dict)
    # Per vendor: tasks in flight that its budget can keep polled within the window.
    _task_slots: dict[str, anyio.CapacityLimiter] = field(default_factory=dict)
    _files: dict[tuple[Path, ImageLimits], ImagePayload] = field(default_factory=dict)
    _uncollected: int = 0
    # Task ids held by this run's items while they are driven: (vendor, task id) ->
    # (key, input). See claim_task.
    _task_claims: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    _scope: anyio.CancelScope | None = None
    usage_error: UsageError | None = None
    # The disk filled: what is left of it goes to the journal (task ids, billed
    # results), not to downloads that a rerun can make from the kept task ids.
    disk_full: bool = False
    # Answers the full disk let nothing record (the run's one-line error says so).
    _lost_answers: int = 0
    _first_lost: str | None = None
    # One disk-full fallback commit at a time: two grouped would fail together.
    _full_lock: anyio.Lock = field(default_factory=anyio.Lock)

    def __post_init__(self) -> None:
        self.output_dir = self.manifest.output
        # ``concurrency`` bounds what is in flight at the vendors: requests being
        # sent and tasks running. Reading inputs before and storing results after
        # overlap with it (see ItemDriver._hold_slots).
        self.vendor_slots = anyio.CapacityLimiter(self.manifest.concurrency)
        self.result_folders = ResultFolders(self.output_dir)  # closed by Engine.run
        self.thumbnails = ThumbnailCache(self.output_dir)
        # Items driven that may still get their gallery thumbnails made as they
        # succeed (Engine._thumbnail): the report's first page.
        self._gallery_room = GALLERY_MAX
        self.credits = CreditGuard(self.manifest.max_credits)
        self.rejections = RejectionBrake(self.config.retry.stop_after_identical_rejections)
        self.failures = FailureRatio(
            self.manifest.max_failure_ratio, self.manifest.min_items_for_failure_ratio
        )
        self.estimates = Estimates({v: p.poll.interval for v, p in self.policies.items()})
        for vendor in self.providers:
            poll = self.policies[vendor].poll
            cap = in_flight_cap(self.config.provider(vendor).rate_limit, poll.max_gap, poll.window)
            if cap is not None:
                self._task_slots[vendor] = anyio.CapacityLimiter(cap)
            base_url = self.config.provider(vendor).base_url
            self._reach[vendor] = Reachability(base_url, vendor, self.config.network)

    async def claim_task(
        self, vendor: str, task_id: str, key: str, input_rel: str, *, resumed: bool = False
    ) -> str | None:
        """Claim ``vendor``'s task id for ``key``: one the vendor just gave its send,
        or (``resumed``) one its journal row held when this run met it. Returns the
        input of another item that holds it (a task id given twice: a replayed answer),
        and then claims nothing; else None.

        A claimed id is held until its item ends (:meth:`release_task`), and by the
        journal from the checkpoint that records it (committed before the task's first
        poll), so no moment leaves it unheld. Another item's row holding it refuses a
        new send; for a resumed task (two rows with one id, left by a release before
        this check), only one that stored its result does, and otherwise the first of
        them to claim it in this run keeps it.
        """
        claimed = self._task_claims.setdefault((vendor, task_id), (key, input_rel))
        if claimed[0] != key:
            return claimed[1]
        holder = await self.journal.task_holder(vendor, task_id, key, stored_only=resumed)
        if holder is not None:
            del self._task_claims[(vendor, task_id)]
        return holder

    def release_task(self, vendor: str, task_id: str, key: str) -> None:
        if self._task_claims.get((vendor, task_id), ("", ""))[0] == key:
            del self._task_claims[(vendor, task_id)]

    def task_slots(self, vendor: str) -> anyio.CapacityLimiter | None:
        """The vendor's cap on tasks in flight, if its budget sets one."""
        return self._task_slots.get(vendor)

    def stop_run(self, reason: FatalError) -> None:
        """Stop now: cancel every worker (what is journaled stays journaled)."""
        if self.fatal is None:
            self.fatal = reason
            log.info("stopping the run: %s", reason)  # the CLI reports it once
        self.stopping = True
        if self._scope is not None:
            self._scope.cancel()

    def stop_starting(self, reason: FatalError | None, halted: str | None = None) -> None:
        """Start no more items; let those in flight finish."""
        if reason is not None and self.fatal is None:
            self.fatal = reason
            log.info("stopping the run: %s", reason)  # the CLI reports it once
        if halted and self.halted is None:
            self.halted = halted
            log.info("stopping the run: %s", halted)
        self.stopping = True

    async def record(self, key: str, change: Change) -> None:
        """Journal one change. On a full disk the run stops sending at once; a change
        that records what the vendor answered (a task id, a billed result) gets the
        space held in reserve and one more try, one made before a send does not: the
        send is never made. A billed result whose bytes still find no room is journaled
        without them (:meth:`_record_without_spool`); a task id or a lost sync answer
        the journal cannot take at all goes to the rescue file; and if nothing can
        record the answer, the run's one-line error says so (:meth:`_unrecorded`)."""
        spooled = isinstance(change.spool, bytes)
        if self.disk_full and spooled and not self.reserve.size:
            # Known full, the reserve spent: the bytes may still fit (a small result),
            # but a failed commit of them takes the other writes of its group commit
            # down with it (rows that journal other answers): one such try at a time,
            # then the row alone. Shielded, like the journal's own commits: a fatal
            # stop elsewhere (this disk-full stop itself) must not cancel the record
            # of an answer already paid for.
            with anyio.CancelScope(shield=True):
                async with self._full_lock:
                    with contextlib.suppress(DiskFullError):
                        await self.journal.change(key, change)
                        return
                    if await self._record_without_spool(key, change):
                        return
                await self._rescue(key, change, None)
            return
        try:
            await self.journal.change(key, change)
        except DiskFullError as exc:
            self.stop_starting(exc)
            self.disk_full = True
            if change.status in _BEFORE_SEND:
                raise
            if self.reserve.release():
                with contextlib.suppress(DiskFullError):
                    await self.journal.change(key, change)
                    return
            with anyio.CancelScope(shield=True):  # as above
                if spooled:
                    async with self._full_lock:
                        if await self._record_without_spool(key, change):
                            return
                await self._rescue(key, change, exc)

    async def _rescue(self, key: str, change: Change, exc: DiskFullError | None) -> None:
        """No room even so: a task id goes to the preallocated rescue file, which the
        next run applies before it sends anything (pipeline.rescue); a sync answer
        (no task id) goes there as paid for and lost. Raises if neither is kept."""
        task_id = change.task_id
        rescue = self.rescue
        kept_before = rescue is not None and rescue.holds(key)
        if rescue is None:
            kept = False
        elif isinstance(task_id, str):
            kept = await run_sync(rescue.add, key, task_id)
        elif isinstance(change.spool, bytes):
            kept = await run_sync(rescue.add_paid_lost, key, self.run_id)
        elif exc is not None:
            raise exc  # nothing the vendor answered rides on it (a result stored, say)
        else:
            kept = False
        if not kept:
            raise self._unrecorded(key) from None
        if not kept_before and rescue is not None:
            what = "task id" if isinstance(task_id, str) else "paid (and lost) result"
            log.warning(
                "the disk is full: the %s of %s is kept in %s for the next run",
                what, key[:12], rescue.path.name,
            )  # fmt: skip

    async def _record_without_spool(self, key: str, change: Change) -> bool:
        """A billed result the journal cannot take with its bytes: journal the item
        without them, so the next run knows the vendor answered and does not pay
        again. True once committed.

        The trade-off (README "Reruns, resume and cron": the reserve goes to
        "journaling the answers already received"; a second payment only for
        "sends of unknown outcome" and a kill in the commit window). The bytes (a
        sync answer, a few hundred KB) need new journal pages the full disk no
        longer has; the row that says "answered and billed" needs a page or two
        (often inside the WAL space the failed commit already took). Without it the
        item stays ``submitting``, and the rerun sends it again: a second payment
        for an answer received. So the bytes are given up, not the answer: the item
        is recorded ``failed`` ``RESULT_LOST`` (paid for; counted in
        ``credits_spent`` and ``paid_lost``), and, as README "Expiring results"
        says of lost results, it is sent again only on ``--retry-failed``. A result
        the vendor can still give (a task id) or the journal already holds (spooled
        by an earlier run) is not lost: the row keeps ``ready`` and the next run
        collects it.
        """
        kept = isinstance(change.task_id, str)
        if not kept:
            with contextlib.suppress(Exception):  # a read: needs no space
                kept = await self.journal.has_spool(key)
        if kept:
            smaller = replace(change, spool=KEEP)
        else:
            lost = lc.ErrorInfo(
                "RESULT_LOST",
                "paid for (the vendor answered and billed it), but the disk was full and "
                "the result could not be kept; it is not sent again unless you rerun with "
                "--retry-failed",
                "permanent",
            )
            smaller = replace(
                change, status=lc.Status.FAILED, error=lost, run_status="failed",
                finished=True, spool=KEEP,
            )  # fmt: skip
        # The space a row needs may be held for a moment by another item's result
        # write, failing too and about to be removed (or by another item's bytes in the
        # same group commit): a few tries, a little apart (under a second in all).
        for wait in (0.0, 0.05, 0.2, 0.5):
            await anyio.sleep(wait)
            try:
                await self.journal.change(key, smaller)
            except DiskFullError:
                continue
            if not kept:
                log.warning(
                    "the disk is full: the result of %s was paid for and could not be "
                    "kept; it is recorded as RESULT_LOST, not sent again", key[:12],
                )  # fmt: skip
            return True
        return False

    def _unrecorded(self, key: str) -> DiskFullError:
        """Nothing at all could record what the vendor answered for ``key``: the run's
        one-line error says so (this item may be paid for twice by the next run)."""
        self._lost_answers += 1
        self._first_lost = self._first_lost or key[:12]
        where = "the journal" if self.rescue is None else f"the journal or {self.rescue.path.name}"
        error = DiskFullError(
            f"{self.journal.path}: the disk is full, and the vendor's answer for "
            f"{self._lost_answers} item(s) (first {self._first_lost}) could not be recorded "
            f"in {where}: the next run sends them again and may pay twice. Free some space "
            "and rerun"
        )
        if self.fatal is None or isinstance(self.fatal, DiskFullError):
            self.fatal = error  # the one line the run ends with names it
        log.error("%s", error)
        return error

    async def prepared_file(self, path: Path, limits: ImageLimits) -> ImagePayload:
        """A variant's extra file (face swap's template), read and checked once per
        run, not once per item (its content hash is part of every item's key). A
        file gone since is missing for every item that needs it from then on
        (``INPUT_MISSING``, retried by a rerun): one stat per item, no read."""
        key = (path, limits)
        found = self._files.get(key)
        if found is not None:
            stat_input(path)
        else:
            prepared = await anyio.to_thread.run_sync(
                prepare_payload, path, limits, self.manifest.auto_fix
            )
            found = self._files[key] = prepared.payload
        return found

    def credits_refusal(self, key: str, op: OperationSpec) -> FatalError | None:
        if self.credits.holds(key):
            return None
        refusal = self.credits.refuse(op.vendor, op.price, op.price_unit)
        if refusal is None:
            self.credits.hold(key, op.vendor, op.price)
        return refusal

    def rate_limited(self, vendor: str, exc: RateLimitedError, count: int = 1) -> None:
        """Pause every request to the vendor (at least ``Retry-After``, capped; longer
        for an item refused ``count`` times) and lower its rate (AIMD): the retry
        queues at the budget again."""
        policy = self.policies[vendor]
        wait = policy.backoff(min(count, 8), hint=exc.retry_after)
        retry_after = (
            None if exc.retry_after is None else min(exc.retry_after, policy.retry_after_max)
        )
        self.budgets[vendor].rate_limited(wait, retry_after)
        self.progress.rate_limited()

    def note_rejection(self, exc: PermanentError) -> None:
        """A streak of identical 400/415 rejections points at the request: stop starting."""
        brake = self.rejections.observe(exc)
        if brake is not None:
            self.stop_starting(brake)

    def reachability(self, vendor: str, exc: VendorError | None) -> None:
        """Stop the run (VENDOR_UNREACHABLE) when a vendor answers nothing for long
        enough. Any answer, even an error or a rate limit, proves it reachable."""
        stop = self._reach[vendor].observe(exc, time.monotonic())
        if stop is not None:
            self.stop_run(stop)
