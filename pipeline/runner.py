"""A run as a whole: lock, journal, emulator, session, providers, signals, reports.

:func:`run_job` is the library entry point (``pipeline run`` calls it). It builds
everything an :class:`pipeline.engine.Engine` needs, including the per-vendor
:class:`pipeline.lifecycle.Policy` built once from the config and the manifest,
runs it, and always writes the reports, whatever stopped the run.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import anyio
import anyio.to_thread

from pipeline import lifecycle as lc
from pipeline.budget import RateBudget
from pipeline.config import Config, ProviderConfig, api_key
from pipeline.errors import DiskFullError, FatalError, UsageError
from pipeline.htmlreport import Collector, archive_report_json
from pipeline.journal import Journal
from pipeline.lock import OutputLock
from pipeline.manifest import Manifest
from pipeline.netguard import SHARED_DOWNLOADS, guarded_session
from pipeline.outputs import DiskReserve, sweep_partial_files
from pipeline.progress import Progress, report_progress
from pipeline.providers.base import Provider, RequestStats
from pipeline.providers.http import proxy_for
from pipeline.report import build_reports, write_report_json
from pipeline.rescue import RescueLog, read_paid_lost, read_rescued

if TYPE_CHECKING:
    from pipeline.emulator import RunningEmulator
    from pipeline.engine import Engine

__all__ = [
    "EMULATOR_KEY",
    "RunOptions",
    "RunResult",
    "build_policy",
    "build_provider",
    "point_at",
    "resolve_keys",
    "run_job",
    "vendors_of",
]

log = logging.getLogger("pipeline")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_FATAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
MIN_FREE_BYTES = 1024 * 1024  # below this on the output's disk, a run does not start
EMULATOR_KEY = "emulator-key"


@dataclass(frozen=True)
class RunOptions:
    retry_failed: bool = False
    quiet: bool = False
    emulate: bool = False
    strict: bool = False  # failures carried over from earlier runs count for the exit code
    limit: int | None = None  # start at most this many new items (a trial run)
    # Tests and benchmarks: override waiting (poll interval, task deadline) for every vendor.
    poll_interval_override: float | None = None
    task_deadline_seconds: float | None = None


@dataclass
class RunResult:
    exit_code: int
    report: dict[str, Any] = field(default_factory=dict)
    message: str = ""


def vendors_of(manifest: Manifest) -> list[str]:
    return sorted({v.operation.vendor for v in manifest.variants})


def build_policy(config: Config, manifest: Manifest, vendor: str, options: RunOptions) -> lc.Policy:
    """Every limit of an item's life for one vendor, from the config and the manifest."""
    provider = config.provider(vendor)
    retry = config.retry
    interval = options.poll_interval_override or provider.poll_interval_seconds
    deadline = options.task_deadline_seconds or provider.task_deadline_seconds
    return lc.Policy(
        max_attempts=manifest.max_attempts,
        max_poll_errors=manifest.max_attempts,
        backoff_initial=retry.backoff_initial_seconds,
        backoff_max=retry.backoff_max_seconds,
        retry_after_max=retry.retry_after_max_seconds,
        poll=lc.PollPolicy(
            interval=interval, window=provider.polling_window_seconds, deadline=deadline
        ),
    )


def build_provider(
    vendor: str,
    session: aiohttp.ClientSession,
    provider_config: ProviderConfig,
    key: str,
    config: Config,
    stats: RequestStats,
    budget: RateBudget,
) -> Provider:
    """The vendor's provider, from its registry entry (imported now, not before)."""
    from pipeline.vendors import get_vendor

    factory = get_vendor(vendor).provider_factory()
    return factory(
        session, provider_config, key, config.timeouts, stats, budget.acquire,
        network=config.network,
    )  # fmt: skip


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


def _make_output_dir(manifest: Manifest) -> None:
    try:
        manifest.output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"{manifest.path}: output: cannot create {manifest.output} ({exc.strerror}); "
            "choose a writable folder"
        ) from None


async def run_job(manifest: Manifest, config: Config, options: RunOptions) -> RunResult:
    """Run (or resume) ``manifest``. Returns the exit code and the report."""
    emulate = options.emulate or manifest.emulator
    keys = resolve_keys(manifest, config, emulate)
    from pipeline.vendors import get_vendor

    for vendor in keys:  # imported before the run's clock starts (a rerun lasts ms)
        get_vendor(vendor).provider_factory()
    _make_output_dir(manifest)
    with OutputLock(manifest.output):
        async with Journal(manifest.output) as journal:
            swept = await anyio.to_thread.run_sync(sweep_partial_files, manifest.output)
            if swept:
                log.info("removed %d partial file(s) left by an interrupted run", swept)
            await _apply_rescued(journal, manifest.output)
            run_id = await journal.begin_run(str(manifest.path), os.getpid())
            # Installed until the reports are written: later signals (the run already
            # stopping) wait unread in the stream instead of interrupting the last commits.
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as stream:
                signals = _SignalWatch(stream)
                return await _run(
                    manifest, config, options, journal, run_id, keys, emulate, signals
                )


async def _apply_rescued(journal: Journal, output: Path) -> None:
    """Task ids a run could not journal (its disk was full) go in now, before anything
    is sent: those items are polled, not sent and paid for again (pipeline.rescue).
    So do the billed sync answers it could note only there: lost, not sent again."""
    rescued = await anyio.to_thread.run_sync(read_rescued, output)
    if rescued:
        applied = await journal.apply_rescued([(r.key, r.task_id) for r in rescued])
        log.info("recovered %d task id(s) an earlier run kept aside on a full disk", applied)
    lost = await anyio.to_thread.run_sync(read_paid_lost, output)
    if lost:
        applied = await journal.apply_paid_lost([(x.key, x.run_id) for x in lost])
        if applied:
            log.warning(
                "%d result(s) an earlier run was billed for on a full disk could not be "
                "kept: recorded as RESULT_LOST, not sent again (--retry-failed pays again)",
                applied,
            )


async def _run(
    manifest: Manifest,
    config: Config,
    options: RunOptions,
    journal: Journal,
    run_id: int,
    keys: Mapping[str, str],
    emulate: bool,
    signals: _SignalWatch,
) -> RunResult:
    run = _Run(manifest, config, options, journal, run_id, keys, signals)
    try:
        await run.execute(emulate)
    except BaseException as caught:  # record what stopped it, then report below
        run.absorb(caught)
    finally:
        run.reserve.release()  # room for the reports too
        run.rescue.close()
        if run.emulator is not None:
            with anyio.CancelScope(shield=True):
                await run.emulator.close()
    with anyio.CancelScope(shield=True):
        result = await run.conclude()
    return result


class _Run:
    """The parts of one run that outlive the engine: what is reported at the end."""

    def __init__(
        self,
        manifest: Manifest,
        config: Config,
        options: RunOptions,
        journal: Journal,
        run_id: int,
        keys: Mapping[str, str],
        signals: _SignalWatch,
    ) -> None:
        self.manifest, self.config, self.options = manifest, config, options
        self.journal, self.run_id, self.keys, self.signals = journal, run_id, keys, signals
        self.stats = RequestStats()
        self.reserve = DiskReserve(manifest.output)
        self.rescue = RescueLog(manifest.output)
        self.started = time.monotonic()
        self.interrupted = False
        self.engine: Engine | None = None
        self.budgets: dict[str, RateBudget] = {}
        self.emulator: RunningEmulator | None = None

    async def execute(self, emulate: bool) -> None:
        config, manifest = self.config, self.manifest
        if emulate:
            from pipeline.emulator import start_emulator

            self.emulator = await start_emulator()
            config = self.config = point_at(config, self.emulator.base_url)
            log.info("using the built-in emulator at %s", self.emulator.base_url)
        self.budgets = {v: RateBudget(config.provider(v).rate_limit) for v in self.keys}
        timeout = aiohttp.ClientTimeout(
            total=config.timeouts.request_seconds, connect=config.timeouts.connect_seconds
        )
        connector = aiohttp.TCPConnector(limit=max(16, manifest.concurrency * 2))
        proxy_for.cache_clear()  # the environment is read once per run
        progress_bar = not self.options.quiet and sys.stderr.isatty()
        with Progress(enabled=progress_bar, limit=self.options.limit) as progress:
            async with (
                aiohttp.ClientSession(
                    timeout=timeout,
                    connector=connector,
                    trust_env=False,  # proxies: http.proxy_for
                ) as session,
                guarded_session(timeout) as downloads,  # results: never the API session
            ):
                token = SHARED_DOWNLOADS.set(downloads)
                try:
                    await self._serve(session, progress)
                finally:
                    SHARED_DOWNLOADS.reset(token)
        self.interrupted = self.signals.received is not None

    async def _serve(self, session: aiohttp.ClientSession, progress: Progress) -> None:
        from pipeline.engine import Engine

        config, manifest, options = self.config, self.manifest, self.options
        providers = {
            v: build_provider(
                v, session, config.provider(v), key, config, self.stats, self.budgets[v]
            )
            for v, key in self.keys.items()
        }
        policies = {v: build_policy(config, manifest, v, options) for v in self.keys}
        await anyio.to_thread.run_sync(self._hold_reserve)
        await anyio.to_thread.run_sync(self.rescue.open)
        engine = self.engine = Engine(
            manifest=manifest, config=config, providers=providers, budgets=self.budgets,
            journal=self.journal, run_id=self.run_id, options=options, progress=progress,
            policies=policies, reserve=self.reserve, rescue=self.rescue,
        )  # fmt: skip
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.signals.watch, tg.cancel_scope)
            interval = config.reporting.progress_interval_seconds
            tg.start_soon(functools.partial(report_progress, progress, interval, manifest=manifest))
            try:
                await engine.run()
            finally:
                tg.cancel_scope.cancel()

    def _hold_reserve(self) -> None:
        """Refuse to start on a disk too full to store what would be paid for."""
        free = self.reserve.free_bytes()
        if free < MIN_FREE_BYTES:
            raise DiskFullError(
                f"{self.manifest.output}: only {free // 1024} KiB free on its disk; the run "
                f"needs at least {MIN_FREE_BYTES // 1024 // 1024} MiB to store results and "
                "journal them. Free some space and rerun (nothing was sent)"
            )
        self.reserve.hold()

    def absorb(self, caught: BaseException) -> None:
        """Turn what stopped the run into the report's terms, or re-raise it."""
        exc = _single(caught)
        engine = self.engine
        if isinstance(exc, UsageError):
            raise exc from None  # no input matched, a template unreadable: exit 2
        if isinstance(exc, KeyboardInterrupt | anyio.get_cancelled_exc_class()):
            self.interrupted = True
        elif isinstance(exc, OSError) and exc.errno == errno.ENOSPC and engine is not None:
            engine.fatal = DiskFullError(
                f"the disk is full ({exc.filename or 'output'}); free space and rerun"
            )
        elif isinstance(exc, DiskFullError) and engine is not None:
            engine.fatal = exc
        else:
            raise exc from None if exc is not caught else caught

    async def conclude(self) -> RunResult:
        engine = self.engine
        fatal = engine.fatal if engine else None
        run_stats: dict[str, Any] = {
            "requests": self.stats.by_vendor(),
            "duplicates": engine.duplicates if engine else 0,
            "interrupted": self.interrupted,
            "aborted": fatal.as_record() if fatal else None,
            "halted": engine.halted if engine else None,
            "elapsed_seconds": round(time.monotonic() - self.started, 3),
            "rate_budget": {v: b.summary() for v, b in self.budgets.items()},
            "first_poll_seconds": engine.estimates.first_polls() if engine else {},
            "max_credits": dict(self.manifest.max_credits),
        }
        report = await _finish(
            self.journal, self.run_id, self.manifest, run_stats, fatal, self.interrupted,
            self.options, self.config.reporting.reports_keep, list(self.keys.values()),
        )  # fmt: skip
        result = RunResult(exit_code=report["exit_code"], report=report)
        if fatal is not None:
            result.message = f"run stopped: {fatal}"
        elif engine is not None and engine.halted:
            result.message = f"run stopped: {engine.halted}"
        return result


async def _finish(
    journal: Journal,
    run_id: int,
    manifest: Manifest,
    run_stats: dict[str, Any],
    fatal: FatalError | None,
    interrupted: bool,
    options: RunOptions,
    reports_keep: int = 30,
    secrets: list[str] | None = None,
) -> dict[str, Any]:
    secrets = secrets or []

    def exit_code_for(counts: Mapping[str, int]) -> int:
        if interrupted:
            return EXIT_INTERRUPTED
        if fatal is not None:
            return EXIT_FATAL
        # An item left unfinished by a run nobody stopped met an unexpected error
        # (logged): that run did not do everything it was asked, so it is not 0.
        failed = counts.get("failed", 0) + counts.get("interrupted", 0)
        if options.strict:
            failed += counts.get("failed_earlier", 0)
        return EXIT_FAILED if failed else EXIT_OK

    await journal.flush()  # every item's write, before the report reads them
    # report.html is gathered while results.jsonl is written, not read back from it.
    collector = Collector(manifest.output)
    finished_at = time.time()
    try:
        report = await anyio.to_thread.run_sync(
            functools.partial(
                build_reports,
                manifest.output,
                exit_code_for,
                collector=collector,
                integrity_check=False,  # checked when this run opened the journal
                finishing=(finished_at, run_stats),
                write_report=False,  # last, below: its wall time covers every report
            )
        )
    except BaseException as exc:
        # No report: the run's end and what it did are recorded all the same.
        with anyio.CancelScope(shield=True):
            await journal.finish_run(run_id, None, run_stats, finished_at=finished_at)
            await journal.flush()
        if not isinstance(exc, OSError) or exc.errno != errno.ENOSPC:
            raise
        raise DiskFullError(
            f"{manifest.output}: the disk is full: the reports could not be written (the "
            f"journal has every result); free some space, then run `pipeline report "
            f"{manifest.output}`"
        ) from None
    await anyio.to_thread.run_sync(
        _write_html, manifest.output, report, reports_keep, secrets, collector
    )
    # report.html shows the wall time up to its own writing; report.json, written
    # last, the whole run's (README "Outputs").
    started_at = report.get("started_at")
    if isinstance(started_at, float | int):
        report["wall_time_seconds"] = round(time.time() - started_at, 3)
    report["report_seconds"] = round(time.time() - finished_at, 3)
    try:
        await anyio.to_thread.run_sync(_write_report_json, manifest.output, report)
    except OSError as exc:
        failure: Exception = exc
        if exc.errno == errno.ENOSPC:
            failure = DiskFullError(
                f"{manifest.output}: the disk is full: report.json could not be written "
                f"(the journal has every result); free some space, then run `pipeline "
                f"report {manifest.output}`"
            )
        # The run ends with exit 3, and its record says so: `pipeline status` and a
        # later `pipeline report` tell what the run's last line told.
        aborted = failure.as_record() if isinstance(failure, DiskFullError) else None
        with anyio.CancelScope(shield=True):
            await journal.finish_run(
                run_id, EXIT_FATAL, {**run_stats, "aborted": aborted}, finished_at=finished_at
            )
            await journal.flush()
        if failure is exc:
            raise
        raise failure from None
    # Recorded last, with the exit code the run ends with.
    await journal.finish_run(run_id, report["exit_code"], run_stats, finished_at=finished_at)
    await journal.flush()
    return report


def _write_report_json(output: Path, report: dict[str, Any]) -> None:
    write_report_json(output, report)
    try:
        archive_report_json(output, report)
    except OSError as exc:  # the archived copy, like report.html, never fails the run
        log.warning("could not write %s/reports: %s", output, exc.strerror or exc)


def _write_html(
    output: Path,
    report: dict[str, Any],
    keep: int,
    secrets: list[str],
    collected: Collector | None = None,
) -> None:
    """``report.html`` and ``reports/``: a page that can't be written never fails the run.

    ``collected``: the lines gathered while ``results.jsonl`` was written; without
    it the page reads ``results.jsonl``.
    """
    from pipeline.htmlreport import iter_results, write_html_report

    try:
        write_html_report(
            output, report, iter_results(output / "results.jsonl") if collected is None else (),
            reports_keep=keep, secrets=secrets, collected=collected, archive_json=False,
        )  # fmt: skip
    except OSError as exc:
        log.warning("could not write %s/report.html: %s", output, exc.strerror or exc)


def _single(exc: BaseException) -> BaseException:
    """The one real error inside (nested) task-group exception groups, else ``exc``."""
    while isinstance(exc, BaseExceptionGroup):
        real = [e for e in exc.exceptions if not isinstance(e, anyio.get_cancelled_exc_class())]
        if len(real) != 1:
            return exc
        exc = real[0]
    return exc


class _SignalWatch:
    """Turns SIGINT/SIGTERM into a clean cancellation of the run (exit 130).

    The signal handlers stay installed until the reports are written (see
    :func:`_run`): a second Ctrl-C while the run stops is noted, not delivered as
    KeyboardInterrupt into the middle of the last journal commits.
    """

    def __init__(self, stream: AsyncIterator[int]) -> None:
        self.received: str | None = None
        self._stream = stream

    async def watch(self, scope: anyio.CancelScope) -> None:
        async for signum in self._stream:
            name = signal.Signals(signum).name
            if self.received is None:
                self.received = name
                log.warning("received %s: stopping; every finished step is journaled", name)
                scope.cancel()
                return
