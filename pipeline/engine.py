"""The work queue: streaming inputs, bounded concurrency, one lifecycle per item.

Shape::

    producer ──(bounded stream, size = concurrency)──> workers ──> ItemDriver
      walks inputs lazily, hashes each file once           resume() the item from the
      (stat cache), expands variants into work items       journal, then drive it through
                                                           pipeline.lifecycle to the end

At most ``concurrency`` items are in flight at the vendors (sending, or a task
running), and per vendor at most as many tasks as its rate budget can keep polled
within its polling window; a few more workers (:func:`prefetch`) read the next inputs
and store finished results meanwhile, so neither waits in a vendor slot. The
rules of an item's life are in :mod:`pipeline.lifecycle`; its I/O is in
:mod:`pipeline.driver`. A fatal error cancels the workers and ends the run with
exit 3; SIGINT/SIGTERM end it with 130. Every journal write that was started is
committed (they are shielded), so the next run resumes where this one stopped.
"""

from __future__ import annotations

import functools
import json
import logging
import stat
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from pipeline import lifecycle as lc
from pipeline import logs
from pipeline.context import RunContext
from pipeline.driver import ItemDriver, mapped_output, terminal_change
from pipeline.errors import (
    FatalError,
    UsageError,
)
from pipeline.journal import ItemRecord, ItemState
from pipeline.manifest import Variant
from pipeline.offload import run_sync
from pipeline.outputs import RESULT_EXTS
from pipeline.runner import RunOptions, RunResult, run_job
from pipeline.sources import (
    Batch,
    InputSource,
    UnsettledKeys,
    WorkItem,
    settle_verdicts,
)
from pipeline.thumbnails import card_requests

__all__ = ["Engine", "RunOptions", "RunResult", "WorkItem", "prefetch", "run_job"]

log = logging.getLogger("pipeline")


def prefetch(concurrency: int) -> int:
    """Workers beyond ``concurrency``: they read and check the next inputs, and store
    finished results, while ``concurrency`` items hold the vendor slots. Bounded, as
    each holds an input's bytes."""
    return max(2, min(concurrency, 16))


class Engine(RunContext):
    """Runs one manifest against a set of providers. Create via :func:`run_job`.

    The state and services shared with the driver are in :class:`RunContext`; this
    class is the work queue: inputs in, one worker per item in flight.
    """

    # Items met only in the journal: an earlier run's task for an input this run did
    # not meet. Collected, never sent again (their input is not this run's to send).
    _collect_only: set[str]

    # -- scheduling -------------------------------------------------------------------

    async def run(self) -> None:
        self._collect_only = set()
        source = InputSource(self.manifest, self.journal, self.progress)
        send, receive = anyio.create_memory_object_stream[WorkItem](self.manifest.concurrency)
        cap = self.manifest.concurrency + prefetch(self.manifest.concurrency)
        try:
            async with anyio.create_task_group() as tg:
                self._scope = tg.cancel_scope
                started = 0

                def one_more_worker() -> None:
                    # Workers start as items come, up to the cap: a rerun that settles
                    # every item in bulk starts none (80 at concurrency 64 were 3 ms
                    # of a 55 ms rerun, README "Performance").
                    nonlocal started
                    if started < cap:
                        started += 1
                        tg.start_soon(self._work, receive.clone())

                counted = anyio.Event()
                tg.start_soon(self._count_live_tasks, counted)
                tg.start_soon(self._produce, source, send, receive, one_more_worker, counted)
        finally:
            self.result_folders.close()
        if self.usage_error is not None:
            raise self.usage_error

    async def _count_live_tasks(self, counted: anyio.Event) -> None:
        """Count the tasks earlier runs left at the vendors (and hold their price), while
        the first inputs are read: a scan of the whole journal (50 ms measured at 10^5
        items, 1 ms of a 50 ms rerun of 10^3), which no item needs until one starts."""
        from pipeline.operations import OPERATIONS

        for name, (unpaid, ready) in (await self.journal.live_tasks()).items():
            self._uncollected += unpaid + ready
            spec = OPERATIONS.get(name)
            if spec is not None and self.credits.caps:
                # Tasks of earlier runs are billed when they succeed, whichever run
                # meets them: hold their price so new submits can't crowd them out.
                self.credits.reserve_pool(spec.vendor, spec.price * unpaid)
        counted.set()

    async def _produce(
        self,
        source: InputSource,
        send: MemoryObjectSendStream[WorkItem],
        receive: MemoryObjectReceiveStream[WorkItem],
        one_more_worker: Callable[[], None],
        counted: anyio.Event,
    ) -> None:
        try:
            await self._feed(source, send, one_more_worker, counted)
        except UsageError as exc:  # no input matched, a template unreadable: exit 2
            self.usage_error = exc
        finally:
            receive.close()  # the workers hold clones; no more are made

    async def _feed(
        self,
        source: InputSource,
        send: MemoryObjectSendStream[WorkItem],
        one_more_worker: Callable[[], None],
        counted: anyio.Event,
    ) -> None:
        # Settlement writes are not waited for one by one: they commit (group-committed)
        # while the next batch is read; the task group waits for the last of them, so
        # every one is committed before the run reports. Until a batch's write is
        # committed, its keys are in ``unsettled`` (a later batch read before that
        # commit still has the old rows: a content duplicate must not pass for new).
        # What an earlier run left each item as is judged in the thread that reads
        # the batch (a stat per output and lifecycle.resume: pure, thread-safe).
        unsettled = UnsettledKeys()
        # At most this many settlement writes queued: the feed must not run ahead of
        # the commits and hold a million rows in memory waiting for them.
        room = anyio.Semaphore(4)
        judge = functools.partial(
            settle_verdicts, output_dir=self.output_dir, run_id=self.run_id,
            policies=self.policies, retry_failed=self.options.retry_failed,
        )  # fmt: skip
        async with send, anyio.create_task_group() as writes:
            async for batch in source.batches(judge):
                unsettled.next_batch()
                rest = await self._settle_done(batch, writes=writes, unsettled=unsettled, room=room)
                for item in rest:
                    if not counted.is_set():  # no item starts before the tasks are counted
                        await counted.wait()
                    if self.stopping and self._uncollected <= 0:
                        return  # nothing left that is paid for or running at a vendor
                    self._queued.add(item.key)
                    one_more_worker()
                    await send.send(item)
            await counted.wait()
            for item in await self._uncollected_elsewhere():
                if self.stopping and self._uncollected <= 0:
                    return
                self._queued.add(item.key)
                one_more_worker()
                await send.send(item)

    async def _uncollected_elsewhere(self) -> list[WorkItem]:
        """The tasks earlier runs created for inputs this run did not meet: deleted,
        edited, or left out of the manifest since, and the paid results they kept in
        the spool. Each is still running or billed at its vendor (or paid for, in the
        journal), and nothing else would ever collect it: the result is fetched
        (to a name of its own, ``displaced``: its input's name may be another item's
        now), a failure is not sent again (collect only). A vendor this run has no
        provider for is left for a run that has (said in the log)."""
        from pipeline.operations import OPERATIONS

        if self._uncollected <= 0 and not await self.journal.any_spool():
            return []  # none left (a rerun of done items does not scan the journal again)
        items: list[WorkItem] = []
        left: Counter[str] = Counter()
        for (
            state,
            operation,
            label,
            params,
            input_path,
            input_rel,
        ) in await self.journal.uncollected_elsewhere(self.run_id):
            if state.key in self._met or state.key in self._queued:
                continue
            spec = OPERATIONS.get(operation)
            if spec is None or spec.vendor not in self.providers:
                left[operation] += 1
                continue
            try:
                given = json.loads(params)
            except ValueError:
                given = {}
            variant = Variant(spec, given if isinstance(given, dict) else {}, label=label)
            items.append(WorkItem(state.key, input_path, input_rel, variant, None, state, True))
            self._collect_only.add(state.key)
        if items:
            log.info(
                "%d task(s) or kept result(s) of earlier runs for inputs this run does not meet "
                "(deleted, edited or left out of the manifest): collected, not sent again",
                len(items),
            )  # fmt: skip
        for operation, count in sorted(left.items()):
            log.warning(
                "%d task(s) of earlier runs for %s are not collected: this manifest does not "
                "use its vendor; a run of a manifest that does collects them", count, operation,
            )  # fmt: skip
        return items

    def _policy(self, item: WorkItem) -> lc.Policy:
        policy = self.policies[item.variant.operation.vendor]
        if item.key in self._collect_only:
            return replace(policy, max_attempts=0)  # a failed task is not sent again
        return policy

    async def _settle_done(
        self,
        batch: Batch,
        *,
        writes: anyio.abc.TaskGroup,
        unsettled: UnsettledKeys,
        room: anyio.Semaphore,
    ) -> list[WorkItem]:
        """Settle in bulk what needs no worker: items done (output on disk) or failed for
        good in earlier runs, and content duplicates; return the rest.

        The batch brings its verdicts (:func:`settle_verdicts`, judged in the thread
        that read it: one stat per output), and the batch's journal writes run in
        ``writes`` (the caller waits for them there), ``unsettled`` holding their keys
        until committed and ``room`` bounding how many are queued; so a rerun over a
        million done items costs seconds, not hours.
        """
        run_id, queued, pending = self.run_id, self._queued, unsettled.holds
        verdicts = batch.verdicts
        assert verdicts is not None, "InputSource.batches was given the judge"
        settled: list[tuple[str, str, str, str]] = []
        duplicates: list[tuple[str, str, str]] = []
        rest: list[WorkItem] = []
        met: set[str] = set()
        skipped = carried = 0
        for item, verdict in zip(batch, verdicts, strict=True):
            key, rec = item.key, item.record
            if key in met or key in queued or (rec and rec.seen_run == run_id) or pending(key):
                duplicates.append((item.input_rel, item.input_text, key))
            elif verdict is None:
                rest.append(item)
            else:
                settled.append((key, item.input_text, item.input_rel, verdict))
                if verdict == "skipped":
                    skipped += 1
                else:
                    carried += 1
            met.add(key)
        if settled:
            entry = unsettled.add({k for k, *_ in settled})
            await room.acquire()

            async def settle(rows: list[tuple[str, str, str, str]] = settled) -> None:
                try:
                    await self.journal.settle_many(rows, run_id)
                finally:
                    room.release()
                unsettled.committed(entry)

            writes.start_soon(settle)
        if skipped:
            self.progress.skipped(skipped)
        if carried:
            self.progress.carried_over(carried)
        self.duplicates += len(duplicates)
        if duplicates:
            writes.start_soon(self.journal.record_duplicates, run_id, duplicates)
        return rest

    async def _work(self, receive: MemoryObjectReceiveStream[WorkItem]) -> None:
        async with receive:
            async for item in receive:
                try:
                    await self._process(item)
                except FatalError as exc:
                    self.stop_run(exc)
                    return
                except Exception as exc:  # a bug: this item stops where it is journaled
                    log.error(
                        "%s: unexpected error, the item is left as journaled (a rerun "
                        "resumes it): %s: %s", item.input_rel, type(exc).__name__, exc,
                    )  # fmt: skip
                    log.debug("the unexpected error in full", exc_info=True)
                    self.progress.failed()

    # -- one item -----------------------------------------------------------------------

    async def _process(self, item: WorkItem) -> None:
        try:
            if item.key in self._inflight:
                await self._duplicate(item)
                return
            self._inflight.add(item.key)
            try:
                await self._start(item)
            finally:
                self._inflight.discard(item.key)
        finally:
            self._queued.discard(item.key)

    async def _start(self, item: WorkItem) -> None:
        # The row read with the batch is current unless this run met the key since
        # (another input of the same content): then read it again.
        rec = await self.journal.lookup(item.key) if item.key in self._met else item.record
        if rec is not None:
            self.journal.remember(rec)
        if rec is not None and rec.seen_run == self.run_id:
            await self._duplicate(item)
            return
        snap = None
        if rec is not None:
            spooled = rec.status == "ready" and await self.journal.has_spool(item.key)
            snap = rec.snapshot(has_spool=spooled)
            if lc.collectable(snap.status, snap.task_id, snap.error.kind if snap.error else None):
                self._uncollected -= 1
        state = lc.resume(
            snap,
            self._policy(item),
            time.monotonic(),
            retry_failed=self.options.retry_failed,
            output_exists=bool(rec and rec.output and (self.output_dir / rec.output).is_file()),
            unjournaled_output=await self._unjournaled(item, rec),
        )
        if self.stopping and isinstance(state, lc.Prepare):
            return  # not started: a rerun picks it up (created tasks are still collected)
        if isinstance(state, lc.Prepare) and self.options.limit is not None:
            if self.started_new >= self.options.limit:
                return  # --limit: left for a later run, not met by this one
            self.started_new += 1
        await self._see(item)
        if isinstance(state, lc.Skipped | lc.CarriedOver):
            await self._carry(item, state)
            return
        await self._drive(item, rec, state)

    async def _unjournaled(self, item: WorkItem, rec: ItemRecord | ItemState | None) -> str | None:
        """A sync result written by a run killed before it journaled it, if any: a file
        at the item's own result path (never another item's: see ``displaced``), written
        after the checkpoint the killed run made before its send. An older file there
        is no answer to that send (a photo replaced under the same name, say)."""
        if rec is None or rec.status != "submitting" or item.variant.operation.is_async:
            return None
        full = await self.journal.lookup(item.key)
        if full is None:
            return None
        # File times come from the kernel's coarse clock, a tick behind time.time().
        checkpoint = full.updated_at - 1.0

        def look() -> str | None:
            for ext in RESULT_EXTS:
                rel = mapped_output(item, ext)
                try:
                    st = (self.output_dir / rel).lstat()
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and st.st_mtime >= checkpoint:
                    return rel
            return None

        return await anyio.to_thread.run_sync(look)

    async def _see(self, item: WorkItem) -> None:
        self._met.add(item.key)
        await self.journal.see(
            key=item.key,
            operation=item.variant.operation.name,
            variant=item.variant.label,
            # Files (face swap's template) by path, so reports can name them; the key
            # holds them by content.
            params=json.dumps(
                {**item.variant.params, **{k: str(p) for k, p in item.variant.files.items()}},
                sort_keys=True,
            ),
            input_path=str(item.input_path),
            input_rel=item.input_rel,
            run_id=self.run_id,
        )

    async def _duplicate(self, item: WorkItem) -> None:
        self.duplicates += 1
        log.info("%s: same content as another input of this run; not sent twice", item.input_rel)
        await self.journal.record_duplicate(
            self.run_id, item.input_rel, str(item.input_path), item.key
        )

    async def _carry(self, item: WorkItem, state: lc.Skipped | lc.CarriedOver) -> None:
        if isinstance(state, lc.Skipped):
            await self.journal.skip_many([item.key], self.run_id, "skipped")
            self.progress.skipped()
        else:
            await self.journal.skip_many([item.key], self.run_id, "failed_earlier")
            self.progress.carried_over()

    async def _drive(
        self, item: WorkItem, rec: ItemRecord | ItemState | None, state: lc.State
    ) -> None:
        op = item.variant.operation
        driver = ItemDriver(self, item, self._policy(item))
        driver.recorded_output = rec.output if rec is not None else None
        driver.billed_before = rec is not None and rec.status in ("ready", "succeeded")
        if isinstance(state, lc.Poll) and not state.billed:
            # A task already created will be charged if it succeeds: count it.
            self.credits.claim(item.key, op.vendor, op.price)
        self.progress.started()
        thumbnail = self._gallery_room > 0
        self._gallery_room -= thumbnail
        try:
            final = await driver.run(state, polls_before=rec.polls if rec else 0)
        finally:
            self.credits.release(item.key)
            self.progress.stopped()
        if thumbnail and isinstance(final, lc.Succeeded):
            await self._thumbnail(item, final.output)

    async def _thumbnail(self, item: WorkItem, output_rel: str) -> None:
        """Make the report's thumbnails of an item that just succeeded, now.

        The gallery of ``report.html`` shows this run's first results (in journal
        order, which is the order items are driven), and each costs about a
        millisecond of decoding and encoding. Made at the end, that is 0.3 s of a
        run's wall time at 200 items (bench/pace.py async, C=8); made here, it is
        spent while the run waits on the vendors. Only the first ``GALLERY_MAX``
        items driven get one, so a large run pays for no more than one page; the
        report makes any it still misses. A cache: failing is not an error.
        """

        def make() -> None:
            card = card_requests(item.input_path, self.output_dir, output_rel, item.key)
            self.thumbnails.ensure([req for req in card if req is not None], workers=1)

        await run_sync(make)

    async def finish_item(self, driver: ItemDriver, state: lc.State) -> None:
        """Journal a terminal state, count it, and stop the run if it was fatal."""
        item = driver.item
        change = terminal_change(state, driver.held, run_id=self.run_id)
        if change is not None:
            await self.record(item.key, change)
        if isinstance(state, lc.Succeeded):
            self.progress.succeeded()
        elif isinstance(state, lc.Failed):
            self._count_failure(item, state)
        if isinstance(state, lc.Succeeded | lc.Failed):
            halt = self.failures.observe(isinstance(state, lc.Failed))
            if halt is not None:
                self.stop_starting(None, halt)

    def _count_failure(self, item: WorkItem, state: lc.Failed) -> None:
        error = state.error
        log.warning(
            "%s [%s %s]: %s: %s",
            item.input_rel, item.variant.operation.name, item.variant.label, error.code, error.message,
            extra=logs.fields(
                "item", input=item.input_rel, operation=item.variant.operation.name,
                variant=item.variant.label, code=error.code, kind=error.kind,
            ),
        )  # fmt: skip
        self.progress.failed()
        # These stop the run softly (already draining): the rest in flight may finish.
        if error.kind == "fatal" and error.code not in ("NOT_SENT", "MAX_CREDITS"):
            raise FatalError(error.message, code=error.code, vendor=item.variant.operation.vendor)
