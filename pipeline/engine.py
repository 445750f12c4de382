"""The work queue: streaming inputs, bounded concurrency, one lifecycle per item.

Shape::

    producer ──(bounded stream, size = concurrency)──> N workers ──> journal / outputs
      walks inputs lazily, hashes each file once,         each runs one item at a time
      expands variants into work items                     through submit -> poll ->
                                                           download -> write -> commit

At most ``concurrency`` items are in flight (one per worker). The journal is written
before every step that depends on it: ``submitting`` before a submit, the task id
before the first poll, the output file before ``succeeded``. A fatal vendor error
cancels the workers and ends the run with exit 3; SIGINT/SIGTERM end it with 130.
Either way every journal write that was started is committed (they are shielded),
so the next run resumes exactly where this one stopped.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import anyio.abc
import anyio.to_thread
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from pipeline.budget import RateBudget
from pipeline.config import Config, ProviderConfig, api_key
from pipeline.credits import CreditGuard, RejectionStreak
from pipeline.errors import (
    FatalError,
    PermanentError,
    PipelineError,
    RateLimitedError,
    ResultLostError,
    RetryableError,
    VendorError,
)
from pipeline.identity import hash_file, item_key
from pipeline.images import prepare_payload, sniff_image_format
from pipeline.inputs import input_relpath, iter_inputs
from pipeline.journal import ItemRecord, Journal
from pipeline.lock import OutputLock
from pipeline.manifest import Manifest, Variant
from pipeline.operations import OPERATIONS
from pipeline.outputs import atomic_write_bytes, resolve_inside, result_relpath, sweep_partial_files
from pipeline.progress import Progress
from pipeline.providers.base import ImagePayload, Provider, RequestStats, TaskState
from pipeline.report import build_reports
from pipeline.retry import FirstPollSchedule, backoff_delay, next_poll_delay

__all__ = ["RunOptions", "RunResult", "WorkItem", "run_job"]

log = logging.getLogger("pipeline")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_FATAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EMULATOR_KEY = "emulator-key"

# Rate-limit answers don't use up attempts (vendor-protocols.md §1.8 [R]), but a run
# must not spin forever on them either.
MAX_RATE_LIMITED_RETRIES = 100
# How often a finished task's result may be fetched again after a failed download
# (fresh URL by re-polling, vendor-protocols.md §2.4 "A re-poll gives a fresh one").
MAX_RESULT_REFETCHES = 2
DOWNLOAD_TRIES = 3  # §1.7 [R]: "Try 3 times x 20 s"


@dataclass(frozen=True)
class RunOptions:
    retry_failed: bool = False
    quiet: bool = False
    emulate: bool = False
    # Tests and benchmarks: override waiting (poll interval, backoff) for every vendor.
    poll_interval_override: float | None = None
    task_deadline_seconds: float = 1800.0


@dataclass(frozen=True)
class WorkItem:
    """One input x one variant, identified by content (see :mod:`pipeline.identity`)."""

    key: str
    input_path: Path
    input_rel: str
    variant: Variant
    unreadable: str | None = None  # why the input could not be hashed, if it could not


@dataclass
class RunResult:
    exit_code: int
    report: dict[str, Any] = field(default_factory=dict)
    message: str = ""


class _ItemFailed(Exception):
    """Internal: the item ends failed with this error."""

    def __init__(self, error: VendorError, *, keep_task: bool = False) -> None:
        super().__init__(str(error))
        self.error = error
        self.keep_task = keep_task


class _TaskFailed(Exception):
    """Internal: the vendor says the task itself failed (resubmit or give up)."""

    def __init__(self, error: VendorError) -> None:
        super().__init__(str(error))
        self.error = error


class Engine:
    """Runs one manifest against a set of providers. Create via :func:`run_job`."""

    def __init__(
        self,
        *,
        manifest: Manifest,
        config: Config,
        providers: Mapping[str, Provider],
        budgets: Mapping[str, RateBudget],
        journal: Journal,
        run_id: int,
        options: RunOptions,
        progress: Progress,
    ) -> None:
        self.manifest = manifest
        self.config = config
        self.providers = providers
        self.budgets = budgets
        self.journal = journal
        self.run_id = run_id
        self.options = options
        self.progress = progress
        self.output_dir = manifest.output
        self._rng = random.Random()
        self._inflight: set[str] = set()
        self.duplicates = 0
        self.fatal: FatalError | None = None
        # Set when the run must stop starting items but let those in flight finish
        # (max_credits reached): nothing already paid for is abandoned.
        self.draining = False
        self._file_hashes: dict[Path, str] = {}
        self._first_polls: dict[str, FirstPollSchedule] = {}
        self._ready: set[str] = set()  # items in flight whose task is known to have succeeded
        self._paid_before: set[str] = set()  # resumed items billed in an earlier run
        self._uncollected = 0  # tasks of earlier runs not met yet in this run
        self._credits = CreditGuard(manifest.max_credits)
        self._rejections = RejectionStreak(config.retry.stop_after_identical_rejections)

    # -- scheduling ---------------------------------------------------------------------

    async def run(self) -> None:
        for name, (unpaid, ready) in (await self.journal.live_tasks()).items():
            self._uncollected += unpaid + ready
            spec = OPERATIONS.get(name)
            if spec is not None and self._credits.caps:
                # Tasks of earlier runs are billed when they succeed, whichever run
                # meets them: hold their price from the start so new submits can't
                # crowd them out.
                self._credits.reserve_pool(spec.vendor, spec.price * unpaid)
        send: MemoryObjectSendStream[WorkItem]
        receive: MemoryObjectReceiveStream[WorkItem]
        send, receive = anyio.create_memory_object_stream[WorkItem](self.manifest.concurrency)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._produce, send)
            for _ in range(self.manifest.concurrency):
                tg.start_soon(self._work, receive.clone(), tg)
            receive.close()

    async def _produce(self, send: MemoryObjectSendStream[WorkItem]) -> None:
        for variant in self.manifest.variants:
            for name, path in variant.files.items():
                try:
                    self._file_hashes[path] = await anyio.to_thread.run_sync(hash_file, path)
                except OSError as exc:
                    raise PipelineError(f"{path}: cannot read {name}: {exc.strerror}") from None
        async with send:
            paths = iter_inputs(self.manifest.base_dir, self.manifest.inputs, self.output_dir)
            while True:
                batch = await anyio.to_thread.run_sync(_take, paths, 64)
                if not batch:
                    break
                for path in batch:
                    if self.draining and self._uncollected <= 0:
                        return  # nothing left that is paid for or running at a vendor
                    for item in await self._items_for(path):
                        await send.send(item)
                        self.progress.discovered(1)

    async def _items_for(self, path: Path) -> list[WorkItem]:
        rel = input_relpath(self.manifest.base_dir, path)
        try:
            content = await anyio.to_thread.run_sync(hash_file, path)
            unreadable = None
        except OSError as exc:
            content = "unreadable:" + str(path)
            unreadable = f"{path}: cannot read the input file ({exc.strerror}); check it exists and is readable"
        items = []
        for variant in self.manifest.variants:
            hashes = {k: self._file_hashes[p] for k, p in variant.files.items()}
            key = item_key(content, variant.operation.name, variant.params, hashes)
            items.append(WorkItem(key, path, rel, variant, unreadable))
        return items

    async def _work(
        self, receive: MemoryObjectReceiveStream[WorkItem], tg: anyio.abc.TaskGroup
    ) -> None:
        async with receive:
            async for item in receive:
                try:
                    await self._process(item)
                except FatalError as exc:
                    if self.fatal is None:
                        self.fatal = exc
                        log.error("stopping the run: %s", exc)
                    tg.cancel_scope.cancel()
                    return

    # -- one item ---------------------------------------------------------------------------

    async def _process(self, item: WorkItem) -> None:
        if item.key in self._inflight:
            self.duplicates += 1
            log.info("%s: same content as an item in flight; not sent twice", item.input_rel)
            return
        self._inflight.add(item.key)
        try:
            rec = await self.journal.lookup(item.key)
            if _collectable(rec) and rec is not None and rec.seen_run != self.run_id:
                self._uncollected -= 1
            if self.draining and not (
                _collectable(rec) or (rec is not None and rec.status == "succeeded")
            ):
                return  # not started: a rerun picks it up (created tasks are still collected)
            if rec is not None and rec.seen_run == self.run_id:
                self.duplicates += 1
                log.info("%s: same content as an input already handled in this run", item.input_rel)
                return
            await self.journal.see(
                key=item.key,
                operation=item.variant.operation.name,
                variant=item.variant.label,
                params=json.dumps(dict(item.variant.params), sort_keys=True),
                input_path=str(item.input_path),
                input_rel=item.input_rel,
                run_id=self.run_id,
            )
            if await self._already_done(item, rec):
                return
            self.progress.started()
            try:
                await self._lifecycle(item, rec)
            finally:
                self.progress.stopped()
        finally:
            self._inflight.discard(item.key)

    async def _already_done(self, item: WorkItem, rec: ItemRecord | None) -> bool:
        if rec is None:
            return False
        if rec.status == "succeeded" and rec.output:
            if (self.output_dir / rec.output).is_file():
                await self.journal.update(item.key, run_status="skipped")
                self.progress.skipped()
                return True
            log.warning(
                "%s: journal says done but %s is missing; fetching it again",
                item.input_rel,
                rec.output,
            )
            return False
        if (
            rec.status == "failed"
            and rec.error_kind == "permanent"
            and not self.options.retry_failed
        ):
            await self.journal.update(item.key, run_status="failed")
            self.progress.failed()
            return True
        return False

    async def _lifecycle(self, item: WorkItem, rec: ItemRecord | None) -> None:
        op = item.variant.operation
        # A task already created (resumed) will be charged if it succeeds: count it.
        # One the vendor already said had succeeded was paid for in an earlier run.
        if _collectable(rec) and rec is not None and rec.status != "ready":
            self._credits.claim(item.key, op.vendor, op.price)
        if rec is not None and rec.status in PAID_STATUSES:
            self._paid_before.add(item.key)
        try:
            await self._lifecycle_steps(item, rec)
        finally:
            self._credits.release(item.key)
            self._ready.discard(item.key)
            self._paid_before.discard(item.key)

    async def _lifecycle_steps(self, item: WorkItem, rec: ItemRecord | None) -> None:
        op = item.variant.operation
        provider = self.providers[op.vendor]
        attempts = rec.attempts if rec else 0
        if self.options.retry_failed and rec is not None and rec.status == "failed":
            attempts = 0
        task_id = (
            rec.task_id
            if rec is not None and rec.status in {"submitted", "ready", "failed", "succeeded"}
            else None
        )
        payload: ImagePayload | None = None
        files: dict[str, ImagePayload] = {}
        changes: list[str] = []
        last_error: VendorError | None = None
        rate_limited = 0
        # When the current task was created, for learning task durations (None when
        # resumed from an earlier run: its age is unknown).
        submitted_mono: float | None = None
        resumed_age = max(0.0, time.time() - rec.updated_at) if rec is not None else None
        # The vendor already said this task succeeded (and billed it): if it is gone
        # now, the result is lost, and submitting again would pay twice.
        result_ready = rec is not None and rec.status in PAID_STATUSES
        try:
            if item.unreadable:
                raise _ItemFailed(PermanentError(item.unreadable, code="INPUT_UNREADABLE"))
            while True:
                if task_id is None:
                    if attempts >= self.manifest.max_attempts:
                        assert last_error is not None
                        raise _ItemFailed(last_error)
                    if payload is None:
                        payload, files, changes = await self._prepare(item)
                    if self.draining and self.fatal is not None:
                        raise _ItemFailed(
                            FatalError(
                                f"not sent: the run is stopping ({self.fatal.code}); "
                                f"a rerun sends it",
                                code="NOT_SENT",
                                vendor=op.vendor,
                            )
                        )
                    if not self._credits.holds(item.key):
                        refusal = self._credits.refuse(op.vendor, op.price, op.price_unit)
                        if refusal is not None:
                            self._stop_starting(refusal)
                            raise _ItemFailed(refusal)
                        self._credits.hold(item.key, op.vendor, op.price)
                    attempts += 1
                    await self.journal.update(
                        item.key,
                        status="submitting",
                        attempts=attempts,
                        submitted_at=time.time(),
                        task_id=None,
                        changes=json.dumps(changes) if changes else None,
                    )
                    try:
                        # The billable request itself is shielded by the provider (see
                        # VendorClient._call): once it is on the wire, Ctrl-C waits for
                        # its answer, bounded by the request timeout. Waiting for the
                        # rate budget before it is not shielded, so Ctrl-C is prompt.
                        # No checkpoint lies between that answer and this shield, so a
                        # created task's id or a paid sync result always reaches the
                        # journal instead of being paid for again.
                        submitted = await provider.submit(
                            op.name, payload, item.variant.params, files
                        )
                        with anyio.CancelScope(shield=True):
                            if submitted.task_id:
                                await self.journal.update(
                                    item.key, status="submitted", task_id=submitted.task_id
                                )
                            elif submitted.image is not None:
                                # A sync result is paid for the moment it arrives: store
                                # it even if the run is being stopped around us.
                                await self._succeed(item, submitted.image, attempts)
                    except RateLimitedError as exc:
                        attempts -= 1  # rate limits don't use up attempts
                        rate_limited += 1
                        last_error = exc
                        if rate_limited > MAX_RATE_LIMITED_RETRIES:
                            raise _ItemFailed(exc) from None
                        await self._rate_limited(op.vendor, exc, rate_limited)
                        continue
                    except RetryableError as exc:
                        last_error = exc
                        log.info("%s: %s (attempt %d, will retry)", item.input_rel, exc, attempts)
                        await self._backoff(attempts)
                        continue
                    except PermanentError as exc:
                        brake = self._note_rejection(exc)
                        if brake is not None:
                            self._stop_starting(brake)
                        raise _ItemFailed(exc) from None
                    self._rejections.reset()
                    submitted_mono = time.monotonic()
                    if submitted.image is not None:
                        return  # stored above, inside the shield
                    if not submitted.task_id:
                        last_error = RetryableError(
                            "submit answered without a task id or result",
                            code="NO_TASK_ID",
                            vendor=op.vendor,
                        )
                        await self._backoff(attempts)
                        continue
                    # The task id was committed above, before the first poll: from here
                    # on a crash resumes polling this id instead of paying again.
                    task_id = submitted.task_id
                try:
                    data = await self._await_result(
                        item, provider, task_id, submitted_mono, resumed_age, result_ready
                    )
                    resumed_age = None
                except _TaskFailed as failed:
                    resumed_age = None
                    last_error = failed.error
                    if failed.error.kind != "retryable":
                        raise _ItemFailed(failed.error) from None
                    log.info(
                        "%s: task %s failed: %s; submitting again",
                        item.input_rel,
                        task_id,
                        failed.error,
                    )
                    task_id = None
                    await self.journal.update(item.key, status="pending", task_id=None)
                    await self._backoff(attempts)
                    continue
                await self._succeed(item, data, attempts)
                return
        except _ItemFailed as failed:
            await self._fail(item, failed.error, attempts, task_id if failed.keep_task else None)
        except FatalError as exc:
            # The run stops; the item keeps its task id so a rerun resumes it.
            await self._fail(item, exc, attempts, task_id)
            raise

    async def _prepare(
        self, item: WorkItem
    ) -> tuple[ImagePayload, dict[str, ImagePayload], list[str]]:
        limits = item.variant.operation.limits
        auto_fix = self.manifest.auto_fix
        try:
            prepared = await anyio.to_thread.run_sync(
                prepare_payload, item.input_path, limits, auto_fix
            )
            files = {}
            for name, path in item.variant.files.items():
                extra = await anyio.to_thread.run_sync(prepare_payload, path, limits, auto_fix)
                files[name] = extra.payload
        except PermanentError as exc:
            raise _ItemFailed(exc) from None
        return prepared.payload, files, list(prepared.changes)

    async def _await_result(
        self,
        item: WorkItem,
        provider: Provider,
        task_id: str,
        submitted_mono: float | None,
        resumed_age: float | None,
        result_ready: bool = False,
    ) -> bytes:
        """Poll ``task_id`` until it ends; return the result bytes.

        The first poll of a new task waits for the duration learned from this
        operation's earlier tasks (:class:`FirstPollSchedule`); later polls come at
        the vendor's interval, or later when the vendor says so. A task resumed from
        an earlier run is polled as soon as the interval since its last journaled
        step has passed.
        """
        op = item.variant.operation
        vendor = op.vendor
        interval = self._poll_interval(self.config.provider(vendor))
        schedule = self._first_polls.get(op.name)
        if schedule is None:
            maximum = max(interval, self.options.task_deadline_seconds / 4)
            schedule = self._first_polls[op.name] = FirstPollSchedule(interval, maximum)
        deadline = time.monotonic() + self.options.task_deadline_seconds
        poll_errors = 0
        rate_limited = 0
        refetches = 0
        answered_polls = 0
        last_running: float | None = None
        if submitted_mono is not None:
            delay = schedule.first_delay() - (time.monotonic() - submitted_mono)
        elif resumed_age is not None:
            delay = interval - resumed_age
        else:
            delay = interval
        while True:
            if time.monotonic() > deadline:
                raise _ItemFailed(
                    RetryableError(
                        f"task {task_id} still running after {self.options.task_deadline_seconds:g} s; "
                        "rerun to resume polling it",
                        code="TASK_DEADLINE",
                        vendor=vendor,
                    ),
                    keep_task=True,
                )
            if delay > 0:
                await anyio.sleep(delay)
            delay = interval
            try:
                state: TaskState = await provider.poll(op.name, task_id)
            except RateLimitedError as exc:
                rate_limited += 1
                if rate_limited > MAX_RATE_LIMITED_RETRIES:
                    raise _ItemFailed(exc, keep_task=True) from None
                await self._rate_limited(vendor, exc, rate_limited)
                continue
            except RetryableError as exc:
                # The poll request failed, not the task: ask again about the same id
                # (resubmitting could pay twice, vendor-protocols.md Q16/Q17).
                poll_errors += 1
                if poll_errors >= self.manifest.max_attempts:
                    raise _ItemFailed(exc, keep_task=True) from None
                delay = max(interval, self._backoff_seconds(poll_errors))
                continue
            finally:
                await self.journal.add_polls(item.key)
            poll_errors = 0
            answered_polls += 1
            if state.state == "running":
                if submitted_mono is not None:
                    last_running = time.monotonic() - submitted_mono
                delay = next_poll_delay(interval, state.poll_after)
                continue
            if submitted_mono is not None and refetches == 0:
                schedule.observe(done_at_first_poll=answered_polls == 1, running_until=last_running)
            if state.state == "failed":
                assert state.error is not None
                if result_ready:
                    # It succeeded (an earlier poll said so) and now the vendor has
                    # reclaimed it: AILab drops task and result 24 h after completion
                    # (vendor-protocols.md §1.5/§1.7). Never resubmit: that pays twice.
                    raise _ItemFailed(
                        self._result_lost(task_id, vendor, state.error.message), keep_task=True
                    )
                raise _TaskFailed(state.error)
            if not result_ready:
                # Journaled before the download: a rerun that finds the task gone
                # knows it was paid for and must not be submitted again.
                await self.journal.update(item.key, status="ready")
                self._ready.add(item.key)
                result_ready = True
            if state.image is not None:
                return state.image
            if not state.result_url:
                if result_ready:
                    raise _ItemFailed(
                        self._result_lost(task_id, vendor, "succeeded without a result"),
                        keep_task=True,
                    )
                raise _TaskFailed(
                    RetryableError(
                        "task succeeded without a result", code="NO_RESULT", vendor=vendor
                    )
                )
            try:
                return await self._download(provider, state.result_url, vendor)
            except PermanentError as exc:
                refetches += 1
                if refetches > MAX_RESULT_REFETCHES:
                    raise _ItemFailed(
                        self._result_lost(task_id, vendor, exc.message), keep_task=True
                    ) from None
                log.info("%s: result URL failed (%s); asking the vendor again", item.input_rel, exc)
                continue  # re-poll for a fresh URL (§2.4)
            except RetryableError as exc:
                raise _ItemFailed(exc, keep_task=True) from None

    @staticmethod
    def _result_lost(task_id: str, vendor: str, detail: str) -> ResultLostError:
        return ResultLostError(
            f"task {task_id} succeeded and was paid for, but its result could not be "
            f"downloaded ({detail}); the vendor no longer serves it. It is not submitted "
            f"again on its own: rerun with --retry-failed to pay for it once more",
            code="RESULT_LOST",
            vendor=vendor,
        )

    async def _download(self, provider: Provider, url: str, vendor: str) -> bytes:
        last: RetryableError | None = None
        for attempt in range(1, DOWNLOAD_TRIES + 1):
            try:
                return await provider.download(url)
            except RetryableError as exc:
                last = exc
                if attempt < DOWNLOAD_TRIES:
                    await anyio.sleep(self._backoff_seconds(attempt))
        assert last is not None
        raise last

    def _poll_interval(self, provider_config: ProviderConfig) -> float:
        if self.options.poll_interval_override is not None:
            return self.options.poll_interval_override
        return provider_config.poll_interval_seconds

    def _backoff_seconds(self, failures: int, hint: float | None = None) -> float:
        retry = self.config.retry
        return backoff_delay(
            failures,
            initial=retry.backoff_initial_seconds,
            maximum=retry.backoff_max_seconds,
            rng=self._rng,
            hint=hint,
        )

    async def _backoff(self, failures: int) -> None:
        await anyio.sleep(self._backoff_seconds(failures))

    async def _rate_limited(self, vendor: str, exc: RateLimitedError, count: int) -> None:
        """Back off (at least ``Retry-After``) and lower the vendor's rate (AIMD).

        The pause holds every request to that vendor, so the retry simply queues at
        the budget again; the rate cut keeps the run from provoking the next 429.
        """
        wait = self._backoff_seconds(count, hint=exc.retry_after)
        self.budgets[vendor].rate_limited(wait, exc.retry_after)
        self.progress.rate_limited()

    def _note_rejection(self, exc: PermanentError) -> FatalError | None:
        """Count a vendor rejection; a streak of identical 400/415s stops the run."""
        streak = self._rejections.add(exc)
        if streak is None:
            return None
        return FatalError(
            f"{streak} items in a row were rejected with {exc.vendor} {exc.code} "
            f"(HTTP {exc.http_status}): that points at the request or its params, not "
            f"the inputs, so the run stops instead of sending the rest; check the "
            f"manifest's params (last answer: {exc.message})",
            code="REPEATED_REJECTION",
            vendor=exc.vendor,
        )

    def _stop_starting(self, reason: FatalError) -> None:
        """Start no more items; let those in flight finish; the run ends with exit 3."""
        if self.fatal is None:
            self.fatal = reason
            log.error("stopping the run: %s", reason)
        self.draining = True

    def poll_schedule(self) -> dict[str, float]:
        """The first-poll delay learned per operation (seconds), for the report."""
        return {op: round(s.first_delay(), 3) for op, s in sorted(self._first_polls.items())}

    async def _succeed(self, item: WorkItem, data: bytes, attempts: int) -> None:
        op = item.variant.operation
        if item.key not in self._paid_before:
            self._credits.spend(op.vendor, op.price)
        # Spent now, no longer held: never counted twice while the file is written.
        self._credits.release(item.key)
        ext = sniff_image_format(data) or "jpg"
        rel = result_relpath(item.variant.operation.name, item.variant.label, item.input_rel, ext)
        target = resolve_inside(self.output_dir, rel)
        # The file is complete under its final name before the journal says so.
        await anyio.to_thread.run_sync(atomic_write_bytes, target, data)
        await self.journal.update(
            item.key,
            status="succeeded",
            output=rel,
            attempts=attempts,
            run_status="succeeded",
            succeeded_run=self.run_id,
            finished_at=time.time(),
            error_code=None,
            error_message=None,
            error_kind=None,
        )
        self.progress.succeeded()

    async def _fail(
        self, item: WorkItem, error: VendorError, attempts: int, task_id: str | None
    ) -> None:
        log.warning(
            "%s [%s %s]: %s", item.input_rel, item.variant.operation.name, item.variant.label, error
        )
        # A task the vendor already finished (and billed) stays "ready" so a rerun
        # fetches its result instead of ever submitting it again.
        ready = task_id is not None and item.key in self._ready and error.kind != "permanent"
        await self.journal.update(
            item.key,
            status="ready" if ready else "failed",
            task_id=task_id,
            attempts=attempts,
            error_code=error.code,
            error_message=error.message,
            error_kind=error.kind,
            run_status="failed",
            finished_at=time.time(),
        )
        self.progress.failed()


PAID_STATUSES = frozenset({"ready", "succeeded"})  # the vendor said the task succeeded


def _collectable(rec: ItemRecord | None) -> bool:
    """Whether the item has a task at the vendor that a run will still collect
    (the same rows as :meth:`Journal.live_tasks`)."""
    if rec is None or rec.task_id is None:
        return False
    if rec.status in {"submitted", "ready"}:
        return True
    return rec.status == "failed" and rec.error_kind != "permanent"


def _take(paths: Iterator[Path], n: int) -> list[Path]:
    out = []
    for path in paths:
        out.append(path)
        if len(out) >= n:
            break
    return out


# -- the run as a whole ------------------------------------------------------------------------


def vendors_of(manifest: Manifest) -> list[str]:
    return sorted({v.operation.vendor for v in manifest.variants})


def build_provider(
    vendor: str,
    session: aiohttp.ClientSession,
    provider_config: ProviderConfig,
    key: str,
    config: Config,
    stats: RequestStats,
    budget: RateBudget,
) -> Provider:
    if vendor == "ailab":
        from pipeline.providers.ailab import AILabProvider

        return AILabProvider(session, provider_config, key, config.timeouts, stats, budget.acquire)
    from pipeline.providers.perfectcorp import PerfectCorpProvider

    return PerfectCorpProvider(
        session, provider_config, key, config.timeouts, stats, budget.acquire
    )


def resolve_keys(manifest: Manifest, config: Config, emulate: bool) -> dict[str, str]:
    """API keys of the vendors this manifest uses; ConfigError names a missing variable."""
    keys = {}
    for vendor in vendors_of(manifest):
        if emulate:
            var = config.provider(vendor).api_key_env
            keys[vendor] = os.environ.get(var, "").strip() or EMULATOR_KEY
        else:
            keys[vendor] = api_key(config, vendor)
    return keys


def point_at(config: Config, base_url: str) -> Config:
    """A copy of ``config`` with every provider's base URL set to ``base_url``."""
    providers = {
        name: p.model_copy(update={"base_url": base_url}) for name, p in config.providers.items()
    }
    return config.model_copy(update={"providers": providers})


async def run_job(manifest: Manifest, config: Config, options: RunOptions) -> RunResult:
    """Run (or resume) ``manifest``. Returns the exit code and the report."""
    emulate = options.emulate or manifest.emulator
    keys = resolve_keys(manifest, config, emulate)
    manifest.output.mkdir(parents=True, exist_ok=True)
    with OutputLock(manifest.output):
        async with Journal(manifest.output) as journal:
            swept = await anyio.to_thread.run_sync(sweep_partial_files, manifest.output)
            if swept:
                log.info("removed %d partial file(s) left by an interrupted run", swept)
            run_id = await journal.begin_run(str(manifest.path), os.getpid())
            stats = RequestStats()
            started = time.monotonic()
            result = RunResult(exit_code=EXIT_OK)
            interrupted = False
            engine: Engine | None = None
            budgets: dict[str, RateBudget] = {}
            emulator = None
            try:
                if emulate:
                    from pipeline.emulator import start_emulator

                    emulator = await start_emulator()
                    config = point_at(config, emulator.base_url)
                    log.info("using the built-in emulator at %s", emulator.base_url)
                budgets = {v: RateBudget(config.provider(v).rate_limit) for v in keys}
                timeout = aiohttp.ClientTimeout(
                    total=config.timeouts.request_seconds, connect=config.timeouts.connect_seconds
                )
                connector = aiohttp.TCPConnector(limit=max(16, manifest.concurrency * 2))
                with Progress(enabled=not options.quiet and sys.stderr.isatty()) as progress:
                    async with aiohttp.ClientSession(
                        timeout=timeout, connector=connector
                    ) as session:
                        providers = {
                            v: build_provider(
                                v, session, config.provider(v), keys[v], config, stats, budgets[v]
                            )
                            for v in keys
                        }
                        engine = Engine(
                            manifest=manifest,
                            config=config,
                            providers=providers,
                            budgets=budgets,
                            journal=journal,
                            run_id=run_id,
                            options=options,
                            progress=progress,
                        )
                        signals = _SignalWatch()
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(signals.watch, tg.cancel_scope)
                            try:
                                await engine.run()
                            finally:
                                tg.cancel_scope.cancel()
                        interrupted = signals.received is not None
            except BaseException as exc:  # record, then re-raise below
                if isinstance(exc, KeyboardInterrupt | anyio.get_cancelled_exc_class()):
                    interrupted = True
                else:
                    raise
            finally:
                if emulator is not None:
                    with anyio.CancelScope(shield=True):
                        await emulator.close()
                fatal = engine.fatal if engine else None
                run_stats: dict[str, Any] = {
                    "requests": stats.by_vendor(),
                    "duplicates": engine.duplicates if engine else 0,
                    "interrupted": interrupted,
                    "aborted": fatal.as_record() if fatal else None,
                    "elapsed_seconds": round(time.monotonic() - started, 3),
                    "rate_budget": {v: b.summary() for v, b in budgets.items()},
                    "first_poll_seconds": engine.poll_schedule() if engine else {},
                }
                with anyio.CancelScope(shield=True):
                    report = await _finish(journal, run_id, manifest, run_stats, fatal, interrupted)
                result = RunResult(exit_code=report["exit_code"], report=report)
                if fatal is not None:
                    result.message = f"run stopped: {fatal}"
    return result


async def _finish(
    journal: Journal,
    run_id: int,
    manifest: Manifest,
    run_stats: dict[str, Any],
    fatal: FatalError | None,
    interrupted: bool,
) -> dict[str, Any]:
    def exit_code_for(counts: Mapping[str, int]) -> int:
        if interrupted:
            return EXIT_INTERRUPTED
        if fatal is not None:
            return EXIT_FATAL
        return EXIT_FAILED if counts["failed"] else EXIT_OK

    await journal.finish_run(run_id, None, run_stats)
    await journal.flush()
    report = await anyio.to_thread.run_sync(build_reports, manifest.output, exit_code_for)
    await journal.finish_run(run_id, report["exit_code"], run_stats)
    await journal.flush()
    return report


class _SignalWatch:
    """Turns SIGINT/SIGTERM into a clean cancellation of the run (exit 130)."""

    def __init__(self) -> None:
        self.received: str | None = None

    async def watch(self, scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                self.received = signal.Signals(signum).name
                log.warning(
                    "received %s: stopping; every finished step is journaled", self.received
                )
                scope.cancel()
                return
