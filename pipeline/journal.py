"""The SQLite journal: the durable record of every work item's life.

One file, ``journal.sqlite``, in the output folder. It is the source of truth:
``results.jsonl`` and ``report.json`` are derived from it, and a rerun resumes from
it. Each item moves through::

    pending -> submitting -> submitted(task_id) -> ready -> succeeded(output)
                    \\                \\             \\-> failed(RESULT_LOST)
                     \\                \\-> failed(error, kind)
                      \\-> (sync op) succeeded | failed

``ready`` means the vendor said the task succeeded (so it is billed) and the result
is not stored yet: if the task is gone when a rerun asks, the item fails as
``RESULT_LOST`` instead of being submitted (and paid for) again.

Durability contract: every awaited write is committed (WAL, ``synchronous=FULL``)
before the call returns, so the engine can rely on "the task id is on disk before
the first poll" and "the output file exists before the item is marked succeeded".
Writes are group-committed: all writes issued while one commit is running share the
next commit, so thousands of items per second cost a few fsyncs, not thousands.

The file is recognised by ``PRAGMA application_id`` and a schema version; anything
else (another tool's database, a truncated file) raises :class:`JournalError` and is
never overwritten.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import operator
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, NamedTuple, Self, TypeVar

import anyio
import anyio.to_thread

from pipeline.errors import DiskFullError, JournalError
from pipeline.lifecycle import COLLECTABLE_STATUSES, ErrorInfo, Snapshot, Status, check_move
from pipeline.offload import run_journal, submit_journal
from pipeline.outputs import check_no_symlink

_KINDS = ("retryable", "permanent", "fatal")

__all__ = ["JOURNAL_NAME", "KEEP", "Change", "ItemRecord", "ItemState", "Journal", "RunRecord"]

JOURNAL_NAME = "journal.sqlite"
APPLICATION_ID = 0x50505031  # "PPP1": marks the file as ours
SCHEMA_VERSION = 2

_SCHEMA_V1 = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE runs (
    id INTEGER PRIMARY KEY,
    started_at REAL NOT NULL,
    finished_at REAL,
    pid INTEGER NOT NULL,
    manifest TEXT NOT NULL,
    exit_code INTEGER,
    stats TEXT
);
CREATE TABLE items (
    key TEXT PRIMARY KEY,
    operation TEXT NOT NULL,
    variant TEXT NOT NULL,
    params TEXT NOT NULL,
    input_path TEXT NOT NULL,
    input_rel TEXT NOT NULL,
    status TEXT NOT NULL,
    task_id TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    polls INTEGER NOT NULL DEFAULT 0,
    output TEXT,
    error_code TEXT,
    error_message TEXT,
    error_kind TEXT,
    changes TEXT,
    seen_run INTEGER,
    run_status TEXT,
    succeeded_run INTEGER,
    submitted_at REAL,
    finished_at REAL,
    updated_at REAL NOT NULL
);
CREATE INDEX items_seen_run ON items (seen_run);
"""

# Version 2 (this release): unknown-outcome sends, billing, poll lag, the spool of
# paid results not stored yet, duplicates met per run, and the stat cache.
_MIGRATE_V1_TO_V2 = """
ALTER TABLE items ADD COLUMN unknown_sends INTEGER NOT NULL DEFAULT 0;
ALTER TABLE items ADD COLUMN unknown_total INTEGER NOT NULL DEFAULT 0;
ALTER TABLE items ADD COLUMN billed_run INTEGER;
ALTER TABLE items ADD COLUMN poll_lag REAL;
CREATE TABLE spool (key TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE duplicates (
    run_id INTEGER NOT NULL,
    input_rel TEXT NOT NULL,
    input_path TEXT NOT NULL,
    key TEXT NOT NULL,
    PRIMARY KEY (run_id, input_rel, key)
);
CREATE TABLE files (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    dev INTEGER NOT NULL,
    hash TEXT NOT NULL,
    cached_at_ns INTEGER NOT NULL
);
"""
_SCHEMA = _SCHEMA_V1 + _MIGRATE_V1_TO_V2
# Which item stored a result at a path (:func:`output_owners`): added to journals of
# either schema when a run opens them (no version change: older releases ignore it).
_OUTPUT_INDEX = "CREATE INDEX IF NOT EXISTS items_output ON items (output)"
# Which item holds a task id (:meth:`Journal.task_holder`), added the same way.
_TASK_INDEX = "CREATE INDEX IF NOT EXISTS items_task ON items (task_id) WHERE task_id IS NOT NULL"

_ITEM_COLUMNS = (
    "key", "operation", "variant", "params", "input_path", "input_rel", "status",
    "task_id", "attempts", "polls", "output", "error_code", "error_message",
    "error_kind", "changes", "seen_run", "run_status", "succeeded_run",
    "submitted_at", "finished_at", "updated_at", "unknown_sends", "billed_run",
    "poll_lag", "unknown_total",
)  # fmt: skip


class _Keep(Enum):
    KEEP = 0


KEEP: Final = _Keep.KEEP
Keep = Literal[_Keep.KEEP]


@dataclass(frozen=True)
class Change:
    """One journal write for an item: a status (checked against the lifecycle's
    table) and the fields that change with it; ``KEEP`` leaves a field as it is."""

    status: Status
    task_id: str | Keep | None = KEEP
    attempts: int | Keep = KEEP
    unknown_sends: int | Keep = KEEP
    unknown_total: int | Keep = KEEP
    output: str | Keep | None = KEEP
    error: ErrorInfo | Keep | None = KEEP
    run_status: str | Keep | None = KEEP  # succeeded | failed | skipped | failed_earlier
    billed_run: int | Keep | None = KEEP
    succeeded_run: int | Keep = KEEP
    poll_lag: float | Keep | None = KEEP
    polls: int | Keep = KEEP
    changes: str | Keep | None = KEEP
    finished: bool = False  # set finished_at = now
    spool: bytes | Keep | None = KEEP  # bytes: keep a paid result; None: drop it

    def columns(self, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status.value, "updated_at": now}
        for name in (
            "task_id", "attempts", "unknown_sends", "unknown_total", "output", "run_status", "billed_run",
            "succeeded_run", "poll_lag", "polls", "changes",
        ):  # fmt: skip
            value = getattr(self, name)
            if value is not KEEP:
                out[name] = value
        if self.error is not KEEP:
            err = self.error
            out["error_code"] = err.code if err else None
            out["error_message"] = err.message if err else None
            out["error_kind"] = err.kind if err else None
        if self.status is Status.SUBMITTING:
            out["submitted_at"] = now
        if self.finished:
            out["finished_at"] = now
        return out


@dataclass(frozen=True)
class ItemRecord:
    """One row of the items table."""

    key: str
    operation: str
    variant: str
    params: str
    input_path: str
    input_rel: str
    status: str  # pending | submitting | submitted | ready | succeeded | failed
    task_id: str | None
    attempts: int
    polls: int
    output: str | None  # relative to the output folder
    error_code: str | None
    error_message: str | None
    error_kind: str | None
    changes: str | None  # JSON list of auto-fix notes
    seen_run: int | None
    run_status: str | None  # outcome in seen_run: succeeded | failed | skipped
    succeeded_run: int | None
    submitted_at: float | None
    finished_at: float | None
    updated_at: float
    unknown_sends: int = 0
    billed_run: int | None = None
    poll_lag: float | None = None
    unknown_total: int = 0

    def snapshot(self, *, has_spool: bool = False) -> Snapshot:
        """What :func:`pipeline.lifecycle.resume` needs from this row."""
        return _snapshot(self, has_spool)


@dataclass(frozen=True)
class ItemState:
    """The columns of an item's row that say how a run takes it up again: what
    :func:`pipeline.lifecycle.resume` needs, whether this run met it, its polls.

    What a batch of inputs reads (:func:`item_states`): a rerun reads one per input,
    and the 13 other columns of an :class:`ItemRecord` (operation, params, paths,
    times) cost more than half of that read (README "Performance")."""

    key: str
    status: str
    task_id: str | None
    attempts: int
    polls: int
    output: str | None
    error_code: str | None
    error_message: str | None
    error_kind: str | None
    seen_run: int | None
    unknown_sends: int
    unknown_total: int

    def snapshot(self, *, has_spool: bool = False) -> Snapshot:
        """What :func:`pipeline.lifecycle.resume` needs from this row."""
        return _snapshot(self, has_spool)


def _snapshot(row: ItemRecord | ItemState, has_spool: bool) -> Snapshot:
    error = None
    if row.error_code is not None:
        kind = row.error_kind if row.error_kind in _KINDS else "permanent"
        error = ErrorInfo(row.error_code, row.error_message or "", kind)  # type: ignore[arg-type]
    return Snapshot(
        status=Status(row.status),
        task_id=row.task_id,
        attempts=row.attempts,
        unknown_sends=row.unknown_sends,
        error=error,
        output=row.output,
        has_spool=has_spool,
        unknown_total=row.unknown_total,
    )


@dataclass(frozen=True)
class RunRecord:
    id: int
    started_at: float
    finished_at: float | None
    pid: int
    manifest: str
    exit_code: int | None
    stats: dict[str, Any]


class _Batch:
    def __init__(self) -> None:
        self.ops: list[tuple[str, Sequence[Any]]] = []
        self.seen: list[str] = []  # keys whose "seen" row (Journal.see) is in it
        # asyncio's, not anyio's: it is set from a loop callback (Journal._committed),
        # where anyio before 4.7 cannot find its backend (no current task) and raised,
        # which stopped every later commit.
        self.done = asyncio.Event()
        self.error: BaseException | None = None


class Journal:
    """Async facade over one SQLite connection, with group commit.

    Use as ``async with Journal(path) as journal:``. All SQLite work runs in worker
    threads under one lock; the event loop never blocks on disk.
    """

    def __init__(self, output_dir: Path) -> None:
        self.path = output_dir / JOURNAL_NAME
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._batch = _Batch()  # the writes queued for the next commit
        self._committing = False  # a commit is running on the journal's thread
        self.commits = 0
        # The last status written (or read) per item met by this run: every change is
        # checked against the lifecycle's table before it is queued.
        self._status: dict[str, Status] = {}
        # Rows :meth:`see` queued and not yet committed (or whose commit failed).
        self._unconfirmed: dict[str, tuple[_Batch, list[tuple[str, Sequence[Any]]]]] = {}
        self._last: _Batch | None = None  # the newest batch that was given writes

    # -- opening ------------------------------------------------------------------

    @staticmethod
    def open_sync(path: Path, *, create: bool, integrity_check: bool = True) -> sqlite3.Connection:
        """Open (or create) a journal file and check it is ours and intact.

        ``integrity_check=False`` skips ``PRAGMA quick_check`` (it reads every page:
        seconds at 10^6 items) for a second connection of a run whose own connection
        checked the file when it opened it."""
        try:
            # SQLite would follow a planted link (or its -wal/-shm sidecars).
            check_no_symlink(path, sqlite=True)
        except OSError as exc:
            raise JournalError(str(exc)) from None
        existed = path.exists()
        if not existed and not create:
            raise JournalError(f"{path}: no journal here; run `pipeline run` on a manifest first")
        if existed and path.stat().st_size == 0:
            raise JournalError(
                f"{path}: the journal file is empty (truncated?); move it aside and rerun, "
                "or restore it from a backup"
            )
        if not existed:
            Journal._create(path)
        try:
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise JournalError(f"{path}: cannot open the journal: {exc}") from None
        try:
            Journal._check(conn, path, integrity_check=integrity_check)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA busy_timeout = 5000")
        except JournalError:
            conn.close()
            raise
        except sqlite3.Error as exc:
            conn.close()
            _refuse_if_disk_full(path, exc)
            raise JournalError(
                f"{path}: the journal is damaged ({exc}); move it aside and rerun, or restore "
                "it from a backup. It was not modified."
            ) from None
        return conn

    @staticmethod
    def _create(path: Path) -> None:
        """Build a new journal beside ``path`` and rename it into place.

        A kill during creation then leaves either no journal or a complete one,
        never a schema-less file that the next run would have to refuse.
        """
        tmp = path.with_name(f".{path.name}.{os.getpid()}.init")
        tmp.unlink(missing_ok=True)
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.executescript(
                "BEGIN;"
                + _SCHEMA
                + f"PRAGMA application_id = {APPLICATION_ID};"
                + f"PRAGMA user_version = {SCHEMA_VERSION};"
                + "COMMIT;"
            )
            conn.execute(
                "INSERT INTO meta VALUES ('app', 'portrait-pipeline'), ('created', ?)",
                (str(time.time()),),
            )
        finally:
            conn.close()
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    @staticmethod
    def _check(conn: sqlite3.Connection, path: Path, *, integrity_check: bool = True) -> None:
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            _refuse_if_disk_full(path, exc)
            raise JournalError(
                f"{path}: not a readable journal ({exc}); it may be truncated or another "
                "tool's file. Move it aside and rerun. It was not modified."
            ) from None
        if app_id != APPLICATION_ID:
            raise JournalError(
                f"{path}: this SQLite file is not a portrait-pipeline journal (application_id "
                f"{app_id}); choose another output folder or move the file aside"
            )
        if version == 1:
            Journal._migrate_v1(conn, path)
            version = SCHEMA_VERSION
        if version != SCHEMA_VERSION:
            raise JournalError(
                f"{path}: journal schema version {version} is not the supported "
                f"{SCHEMA_VERSION}; use the portrait-pipeline version that wrote it"
            )
        if not integrity_check:
            return
        try:
            result = conn.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            result = str(exc)
        if result != "ok":
            raise JournalError(
                f"{path}: the journal failed its integrity check ({result}); restore it from "
                "a backup or move it aside. It was not modified."
            )

    @staticmethod
    def _migrate_v1(conn: sqlite3.Connection, path: Path) -> None:
        """Bring a journal of the previous release (schema 1) to schema 2, in one
        transaction: a crash leaves it at 1 or at 2, never between."""
        try:
            conn.executescript(
                "BEGIN IMMEDIATE;"
                + _MIGRATE_V1_TO_V2
                + f"PRAGMA user_version = {SCHEMA_VERSION};"
                + "COMMIT;"
            )
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise JournalError(
                f"{path}: cannot upgrade the journal from schema 1 ({exc}); it was not "
                "modified. Free some disk space, or use the previous release to finish"
            ) from None

    async def __aenter__(self) -> Self:
        self.path.parent.mkdir(parents=True, exist_ok=True)

        def open_for_the_run() -> sqlite3.Connection:
            conn = self.open_sync(self.path, create=True)
            try:
                conn.execute(_OUTPUT_INDEX)  # once per journal: about a second at 10^6 rows
                conn.execute(_TASK_INDEX)
            except sqlite3.Error as exc:
                conn.close()
                _refuse_if_disk_full(self.path, exc)
                raise JournalError(f"{self.path}: cannot index the journal: {exc}") from None
            return conn

        self._conn = await anyio.to_thread.run_sync(open_for_the_run)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with anyio.CancelScope(shield=True):
            await self.flush()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    # -- the group commit -----------------------------------------------------------------

    # Commits chain by callbacks, not through a writer task: a write queued while no
    # commit runs goes to the journal's thread at once, the writes queued meanwhile go
    # together when it ends, and its end wakes the waiters from the callback: two
    # turns of the event loop fewer per commit than a writer task took. At
    # concurrency 64 the checkpoint before each billable send still waits about 3 ms
    # (median) for a commit of 0.4 ms: the turns that remain are the loop's own, busy
    # with a wave of items (bench/pace.py async, README "Performance").

    def _commit_next(self) -> None:
        """Hand the queued writes to the journal's thread as one transaction (on the
        event loop's thread, with no commit running). If it cannot take them (the
        interpreter is shutting down), their waiters hear so, as of a failed commit,
        and the next write tries again."""
        batch, self._batch = self._batch, _Batch()  # never empty: see _enqueue
        try:
            loop = asyncio.get_running_loop()
            future = submit_journal(self._apply, batch.ops)
        except BaseException as exc:
            batch.error, batch.ops = exc, []
            batch.done.set()
            return
        self._committing = True

        def wake(done: Future[None]) -> None:  # on the journal's thread
            # A closed loop (RuntimeError): the commit stands, and nobody waits for it.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._committed, batch, done)

        future.add_done_callback(wake)

    def _committed(self, batch: _Batch, future: Future[None]) -> None:
        """The end of ``batch``'s commit (on the event loop's thread): wake its waiters,
        then commit what was queued meanwhile."""
        try:
            future.result()
        except BaseException as exc:  # surfaced to every waiter of the batch
            batch.error = exc
        else:
            self.commits += 1
            # Committed: nothing left to confirm. A failed batch's rows stay for the
            # item's next change to write again.
            for key in batch.seen:
                if self._unconfirmed.get(key, (None,))[0] is batch:
                    del self._unconfirmed[key]
        finally:
            batch.ops = []  # a failed batch outlives its commit: not its data
            batch.done.set()
            self._committing = False
            if self._batch.ops:
                self._commit_next()

    def _apply(self, ops: list[tuple[str, Sequence[Any]]]) -> None:
        with self._lock:
            conn = self._require()
            conn.execute("BEGIN IMMEDIATE")
            try:
                for sql, params in ops:
                    conn.execute(sql, params)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    async def _write(self, sql: str, params: Sequence[Any]) -> None:
        await self._write_many([(sql, params)])

    async def _write_many(self, ops: Sequence[tuple[str, Sequence[Any]]]) -> None:
        """Queue writes that commit together (one transaction); return once committed.

        Shielded: a cancelled caller must not be left unsure whether its transition
        (say, a task id) was committed; it waits for the commit.
        """
        if ops:
            await self._confirm(self._enqueue(ops))

    def _enqueue(self, ops: Sequence[tuple[str, Sequence[Any]]]) -> _Batch:
        """Queue writes for the next group commit without waiting for it (``ops`` not
        empty: :meth:`_write_many` returns at once for none)."""
        batch = self._last = self._batch
        batch.ops.extend(ops)
        if not self._committing:
            self._commit_next()
        return batch

    async def _confirm(self, batch: _Batch) -> None:
        """Wait for ``batch``'s commit; raise what it met."""
        with anyio.CancelScope(shield=True):
            await batch.done.wait()
        if batch.error is not None:
            error = batch.error
            if _disk_full(error):
                raise DiskFullError(
                    f"{self.path}: the disk is full; the journal cannot record more. Free "
                    "some space and rerun: everything committed so far is kept"
                )
            raise JournalError(f"{self.path}: journal write failed: {error}")

    async def flush(self) -> None:
        """Wait until every write issued so far is committed."""
        batch = self._last
        if batch is not None and not batch.done.is_set():
            await batch.done.wait()  # committing, or next when the one running ends

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise JournalError(f"{self.path}: journal is closed")
        return self._conn

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        def run() -> list[tuple[Any, ...]]:
            with self._lock:
                return self._require().execute(sql, params).fetchall()

        return await run_journal(run)

    # -- runs ---------------------------------------------------------------------------

    async def begin_run(self, manifest: str, pid: int) -> int:
        def run() -> int:
            with self._lock:
                cur = self._require().execute(
                    "INSERT INTO runs (started_at, pid, manifest) VALUES (?, ?, ?)",
                    (time.time(), pid, manifest),
                )
                assert cur.lastrowid is not None
                return cur.lastrowid

        return await anyio.to_thread.run_sync(run)

    async def finish_run(
        self,
        run_id: int,
        exit_code: int | None,
        stats: Mapping[str, Any],
        *,
        finished_at: float | None = None,
    ) -> None:
        """Record the run's end (``finished_at``: now unless given), exit code and stats."""
        await self._write(
            "UPDATE runs SET finished_at = ?, exit_code = ?, stats = ? WHERE id = ?",
            (
                time.time() if finished_at is None else finished_at,
                exit_code,
                json.dumps(stats, sort_keys=True),
                run_id,
            ),
        )

    async def save_run_stats(self, run_id: int, stats: Mapping[str, Any]) -> None:
        await self._write(
            "UPDATE runs SET stats = ? WHERE id = ?", (json.dumps(stats, sort_keys=True), run_id)
        )

    # -- items ----------------------------------------------------------------------------

    async def lookup(self, key: str) -> ItemRecord | None:
        """The item's row as committed, after every write queued so far (``see``)."""
        await self.flush()
        found = await self.lookup_many([key])
        return found.get(key)

    def remember(self, rec: ItemRecord | ItemState) -> None:
        """Take ``rec`` (read with ``track=False``) as the item's status before its
        first :meth:`change` of this run."""
        self._status.setdefault(rec.key, Status(rec.status))

    async def lookup_many(
        self, keys: Sequence[str], *, track: bool = True
    ) -> dict[str, ItemRecord]:
        """The rows of ``keys`` that exist, in one read per 500 keys.

        ``track=False`` for bulk reads that never lead to :meth:`change` by themselves
        (an item sent on is :meth:`remember`-ed when it starts): the status of every
        item looked up is otherwise remembered for the run, 10^6 entries on a rerun.
        """

        def run() -> dict[str, ItemRecord]:
            with self._lock:
                return item_records(self._require(), keys)

        out = await run_journal(run)
        if track:
            for rec in out.values():
                # Never over what this run wrote itself: an item in flight is ahead
                # of a row read while its newest change was still being committed.
                self._status.setdefault(rec.key, Status(rec.status))
        return out

    async def task_holder(
        self, vendor: str, task_id: str, key: str, *, stored_only: bool = False
    ) -> str | None:
        """The input (``input_rel``) of an item other than ``key`` whose row holds
        ``vendor``'s ``task_id``, else None: committed rows (RunContext.claim_task
        covers this run's sends). ``stored_only``: only an item that stored its result.
        Task ids are per vendor: the same text at another vendor is another task."""
        rows = await self._read(
            "SELECT input_rel, operation, status FROM items WHERE task_id = ? AND key != ?",
            (task_id, key),
        )
        for input_rel, operation, status in rows:
            if operation.split("/", 1)[0] != vendor:  # names are "<vendor>/<operation>"
                continue
            if stored_only and status != Status.SUCCEEDED.value:
                continue
            return str(input_rel)
        return None

    async def has_spool(self, key: str) -> bool:
        rows = await self._read("SELECT 1 FROM spool WHERE key = ?", (key,))
        return bool(rows)

    async def any_spool(self) -> bool:
        """Whether any paid result waits in the spool (usually none: one read)."""
        return bool(await self._read("SELECT 1 FROM spool LIMIT 1"))

    async def load_spool(self, key: str) -> bytes | None:
        rows = await self._read("SELECT data FROM spool WHERE key = ?", (key,))
        return bytes(rows[0][0]) if rows else None

    async def live_tasks(self) -> dict[str, tuple[int, int]]:
        """Tasks created by earlier runs and not collected yet, per operation, as
        ``(not yet known to have succeeded, ready)``. The vendor bills each one that
        succeeds, whichever run collects it; ``ready`` ones are billed already.
        The rows are those :func:`pipeline.lifecycle.collectable` accepts."""
        statuses = ", ".join(f"'{s.value}'" for s in sorted(COLLECTABLE_STATUSES))
        rows = await self._read(
            "SELECT operation, SUM(status != 'ready'), SUM(status = 'ready') FROM items"
            f" WHERE task_id IS NOT NULL AND (status IN ({statuses})"
            " OR (status = 'failed' AND error_kind IS NOT NULL AND error_kind != 'permanent'))"
            " GROUP BY operation",
            (),
        )
        return {str(op): (int(unpaid), int(ready)) for op, unpaid, ready in rows}

    async def uncollected_elsewhere(
        self, run_id: int
    ) -> list[tuple[ItemState, str, str, str, str, str]]:
        """The tasks :meth:`live_tasks` counts, and the paid results kept in the spool,
        whose items this run has not met (as far as committed): ``(state, operation,
        variant, params, input_path, input_rel)``."""
        statuses = ", ".join(f"'{s.value}'" for s in sorted(COLLECTABLE_STATUSES))
        rows = await self._read(
            f"SELECT {', '.join(_STATE_COLUMNS)}, operation, variant, params, input_path,"
            " input_rel FROM items WHERE (task_id IS NOT NULL AND (status IN"
            f" ({statuses}) OR (status = 'failed' AND error_kind IS NOT NULL AND"
            " error_kind != 'permanent')) OR (status = 'ready' AND task_id IS NULL AND"
            " key IN (SELECT key FROM spool))) AND (seen_run IS NULL OR seen_run != ?)",
            (run_id,),
        )
        cut = len(_STATE_COLUMNS)
        return [(_state_of(row[:cut]), *row[cut:]) for row in rows]

    async def see(
        self,
        *,
        key: str,
        operation: str,
        variant: str,
        params: str,
        input_path: str,
        input_rel: str,
        run_id: int,
    ) -> None:
        """Record that this run met the item (inserting it as pending if new).

        Queued, not awaited: nothing outside is done on the strength of this row
        alone. The item's next :meth:`change` commits after it (batches commit in
        order) and confirms it, re-applying it if its commit failed.
        """
        now = time.time()
        self._status.setdefault(key, Status.PENDING)
        ops: list[tuple[str, Sequence[Any]]] = [(
            "INSERT INTO items (key, operation, variant, params, input_path, input_rel, status,"
            " seen_run, updated_at) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?)"
            " ON CONFLICT(key) DO UPDATE SET input_path = excluded.input_path,"
            " params = excluded.params,"
            " input_rel = excluded.input_rel, seen_run = excluded.seen_run, run_status = NULL,"
            " updated_at = excluded.updated_at",
            (key, operation, variant, params, db_text(input_path), db_text(input_rel), run_id, now),
        )]  # fmt: skip
        batch = self._enqueue(ops)
        batch.seen.append(key)
        self._unconfirmed[key] = (batch, ops)

    async def skip_many(self, keys: Sequence[str], run_id: int, run_status: str) -> None:
        """Mark items this run met and left as they were (done, or failed for good)."""
        if not keys:
            return
        now = time.time()
        ops = [
            (
                "UPDATE items SET seen_run = ?, run_status = ?, updated_at = ? WHERE key = ?",
                (run_id, run_status, now, key),
            )
            for key in keys
        ]
        await self._write_many(ops)

    async def settle_many(self, rows: Sequence[tuple[str, str, str, str]], run_id: int) -> None:
        """Items met by this run and left as they were: ``(key, input_path, input_rel,
        run_status)`` with run_status ``skipped`` or ``failed_earlier``; one commit.

        One ``UPDATE ... FROM (VALUES ...)`` per 512 rows where SQLite has it (3.33):
        the rows are applied in C, not one Python call each while a rerun's next
        batch is being read in another thread.
        """
        if not rows:
            return
        now = time.time()
        if sqlite3.sqlite_version_info < (3, 33):
            await self._write_many(
                [
                    (
                        "UPDATE items SET seen_run = ?, run_status = ?, input_path = ?,"
                        " input_rel = ?, updated_at = ? WHERE key = ?",
                        (run_id, how, db_text(path), db_text(rel), now, key),
                    )
                    for key, path, rel, how in rows
                ]
            )
            return
        ops: list[tuple[str, Sequence[Any]]] = []
        for start in range(0, len(rows), _SETTLE_CHUNK):
            chunk = rows[start : start + _SETTLE_CHUNK]
            params: list[Any] = [run_id, now]
            for key, path, rel, how in chunk:
                params += (key, how, db_text(path), db_text(rel))
            ops.append((_settle_sql(len(chunk)), params))
        await self._write_many(ops)

    async def record_duplicate(
        self, run_id: int, input_rel: str, input_path: str, key: str
    ) -> None:
        """An input whose content (for this variant) another input of the run carries."""
        await self.record_duplicates(run_id, [(input_rel, input_path, key)])

    async def record_duplicates(self, run_id: int, rows: Sequence[tuple[str, str, str]]) -> None:
        """``(input_rel, input_path, key)`` duplicates met by the run, in one commit."""
        if rows:
            await self._write_many(
                [
                    (
                        "INSERT OR IGNORE INTO duplicates (run_id, input_rel, input_path, key)"
                        " VALUES (?, ?, ?, ?)",
                        (run_id, db_text(rel), db_text(path), key),
                    )
                    for rel, path, key in rows
                ]
            )

    async def change(self, key: str, change: Change) -> None:
        """Apply one lifecycle step to the item; committed when this returns.

        Raises :class:`pipeline.lifecycle.IllegalMove` (before writing anything) if
        the status change is not in the lifecycle's table.
        """
        check_move(self._status.get(key), change.status)
        cols = change.columns(time.time())
        names = sorted(cols)
        ops: list[tuple[str, Sequence[Any]]] = [
            (
                f"UPDATE items SET {', '.join(f'{n} = ?' for n in names)} WHERE key = ?",
                [cols[n] for n in names] + [key],
            )
        ]
        if isinstance(change.spool, bytes):
            ops.append(
                ("INSERT OR REPLACE INTO spool (key, data) VALUES (?, ?)", (key, change.spool))
            )
        elif change.spool is None:
            ops.append(("DELETE FROM spool WHERE key = ?", (key,)))
        self._status[key] = change.status
        seen = self._unconfirmed.pop(key, None)
        if seen is not None and seen[0] is not self._batch:
            # The row was queued in an earlier batch: if that commit failed, write it
            # again with this change, or the change would update no row.
            with anyio.CancelScope(shield=True):
                await seen[0].done.wait()
            if seen[0].error is None:
                seen = None
            else:
                ops = [*seen[1], *ops]
        batch = self._enqueue(ops)
        try:
            await self._confirm(batch)
        except BaseException:
            if seen is not None:  # still unwritten: the next change carries it again
                self._unconfirmed[key] = (batch, seen[1])
            raise
        if change.finished and self._status.get(key) is change.status:
            # Done for this run: a later change (an input of the same content) reads
            # the row again first. Keeps the map at the items in flight, not 10^6.
            del self._status[key]

    async def apply_rescued(self, rescued: Sequence[tuple[str, str]]) -> int:
        """Record ``(key, task_id)`` pairs a run kept in its rescue file (see
        :mod:`pipeline.rescue`) for items still ``submitting`` with no task id; returns
        how many were applied. The others already moved on."""
        return await self._apply_to_submitting(
            [(key, Change(Status.SUBMITTED, task_id=task_id)) for key, task_id in rescued]
        )

    async def apply_paid_lost(self, lost: Sequence[tuple[str, int]]) -> int:
        """Record ``(key, run_id)`` sync answers a run was billed for on a full disk and
        could note only in its rescue file (:func:`pipeline.rescue.read_paid_lost`), for
        items still ``submitting``: failed ``RESULT_LOST``, paid for in that run, never
        sent again on their own (an unknown outcome would be). Returns how many."""
        error = ErrorInfo(
            "RESULT_LOST",
            "paid for in an earlier run, whose disk was full: the result could not be "
            "kept; rerun with --retry-failed to pay for it once more",
            "permanent",
        )
        return await self._apply_to_submitting(
            [
                (key, Change(
                    Status.FAILED, error=error, billed_run=run_id, run_status="failed",
                    finished=True,
                ))
                for key, run_id in lost
            ]
        )  # fmt: skip

    async def _apply_to_submitting(self, changes: Sequence[tuple[str, Change]]) -> int:
        """Apply each ``(key, change)`` whose item is still ``submitting`` with no task
        id (what the rescue file speaks of); the others moved on. Returns how many."""
        found = await self.lookup_many([key for key, _ in changes])
        applied = 0
        for key, change in changes:
            rec = found.get(key)
            if rec is None or rec.status != Status.SUBMITTING.value or rec.task_id:
                continue
            await self.change(key, change)
            applied += 1
        return applied

    # -- the stat cache -------------------------------------------------------------------

    async def cached_hashes(self, paths: Sequence[str]) -> dict[str, tuple[Any, ...]]:
        """``db_text(path) -> (size, mtime_ns, ctime_ns, inode, dev, cached_at_ns, hash)``
        for the paths the stat cache knows."""

        def run() -> dict[str, tuple[Any, ...]]:
            with self._lock:
                return cached_hash_rows(self._require(), [db_text(p) for p in paths])

        return await run_journal(run)

    async def cache_hashes(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Store ``(path, size, mtime_ns, ctime_ns, inode, dev, hash, cached_at_ns)`` rows."""
        if rows:
            await self._write_many(
                [
                    ("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)
                    for row in rows
                ]
            )

    async def add_polls(self, key: str, n: int = 1) -> None:
        await self._write(
            "UPDATE items SET polls = polls + ?, updated_at = ? WHERE key = ?",
            (n, time.time(), key),
        )


def db_text(text: str) -> str:
    """``text`` as SQLite can store it: a file name that is not valid UTF-8 carries
    lone surrogates (``surrogateescape``); those bytes are kept as ``\\xNN``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text


# Below this many free bytes an SQLite I/O error on open is a full disk, not damage.
_LOW_SPACE = 1024 * 1024


def _refuse_if_disk_full(path: Path, exc: BaseException) -> None:
    """SQLite answers "disk I/O error" when it has no room for its -wal/-shm files:
    say the disk is full (exit 3; the journal and what it holds are fine), never that
    the journal is damaged (advice that would lose every paid task id)."""
    try:
        st = os.statvfs(path.parent)
        low = st.f_bavail * st.f_frsize < _LOW_SPACE
    except OSError:
        low = False
    if _disk_full(exc) or (low and "i/o" in str(exc).lower()):
        raise DiskFullError(
            f"{path.parent}: the disk is full ({exc}); free some space and rerun. The "
            "journal is intact: everything paid for is kept"
        ) from None


def _disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    return isinstance(error, sqlite3.OperationalError) and "full" in str(error).lower()


# -- reading for reports (synchronous; report.py runs these in a thread) ---------------------


# Keys or paths per ``IN (...)`` query: well under SQLite's parameter limit.
_IN_CHUNK = 500
_ITEM_SELECT = f"SELECT {', '.join(_ITEM_COLUMNS)} FROM items WHERE key IN "
_STATE_COLUMNS = tuple(f.name for f in fields(ItemState))
_STATE_SELECT = f"SELECT {', '.join(_STATE_COLUMNS)} FROM items WHERE key IN "
_OWNER_SELECT = "SELECT output, key FROM items WHERE output IN "
_FILES_SELECT = (
    "SELECT path, size, mtime_ns, ctime_ns, inode, dev, cached_at_ns, hash FROM files"
    " WHERE path IN "
)


_SETTLE_CHUNK = 512  # x 4 parameters: well under SQLite's limit (32766 from 3.32)


def _settle_sql(n: int) -> str:
    values = ",".join(("(?,?,?,?)",) * n)
    return (
        "UPDATE items SET seen_run = ?, updated_at = ?, run_status = v.column2,"
        " input_path = v.column3, input_rel = v.column4"
        f" FROM (VALUES {values}) AS v WHERE items.key = v.column1"
    )


def _marks(n: int) -> str:
    return "(" + ",".join("?" * n) + ")"


def open_reader(path: Path) -> sqlite3.Connection:
    """A read-only connection to the journal at ``path``, for a thread that only reads.

    WAL lets it read while the journal's own connection commits (and fsyncs), so a
    reader never waits on the writer; each statement sees the last commit.
    """
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        conn.execute("PRAGMA query_only = ON")
    except BaseException:
        conn.close()
        raise
    return conn


_Row = TypeVar("_Row")


def _maker(cls: type[_Row], names: Sequence[str]) -> Callable[[Sequence[Any]], _Row]:
    """``row -> cls(*row)`` for a frozen dataclass whose fields are ``names``, in
    order, at a third of its cost: a frozen dataclass's ``__init__`` sets each field
    with its own ``object.__setattr__``, and a rerun reads 10^6 rows."""
    new = object.__new__

    def make(row: Sequence[Any]) -> _Row:
        built: _Row = new(cls)
        built.__dict__.update(zip(names, row, strict=True))
        return built

    return make


_record_of = _maker(ItemRecord, _ITEM_COLUMNS)  # a row of _ITEM_COLUMNS -> ItemRecord
_state_of = _maker(ItemState, _STATE_COLUMNS)


def _by_first_column(
    conn: sqlite3.Connection,
    select: str,
    values: Sequence[str],
    make: Callable[[Sequence[Any]], _Row],
) -> dict[str, _Row]:
    """``row[0] -> make(row)`` for the rows of ``select + "(?, ...)"`` matching any
    of ``values`` (any number: one query per :data:`_IN_CHUNK`)."""
    out: dict[str, _Row] = {}
    for start in range(0, len(values), _IN_CHUNK):
        chunk = values[start : start + _IN_CHUNK]
        for row in conn.execute(select + _marks(len(chunk)), chunk):
            out[row[0]] = make(row)
    return out


def item_states(conn: sqlite3.Connection, keys: Sequence[str]) -> dict[str, ItemState]:
    """``key -> ItemState`` of the ``keys`` (any number) that have a row."""
    return _by_first_column(conn, _STATE_SELECT, keys, _state_of)


def item_records(conn: sqlite3.Connection, keys: Sequence[str]) -> dict[str, ItemRecord]:
    """``key -> ItemRecord`` of the ``keys`` (any number) that have a row."""
    return _by_first_column(conn, _ITEM_SELECT, keys, _record_of)


def output_owners(conn: sqlite3.Connection, outputs: Sequence[str]) -> dict[str, str]:
    """``output -> key`` of the items whose recorded result path is one of
    ``outputs`` (any number; result paths are ASCII-safe, never :func:`db_text`-ed)."""
    return _by_first_column(conn, _OWNER_SELECT, outputs, operator.itemgetter(1))


def any_cached_hash(conn: sqlite3.Connection) -> bool:
    """Whether the stat cache holds any file (a first run in this folder: none)."""
    return conn.execute("SELECT 1 FROM files LIMIT 1").fetchone() is not None


def cached_hash_rows(conn: sqlite3.Connection, paths: Sequence[str]) -> dict[str, tuple[Any, ...]]:
    """The stat cache's ``db_text(path) -> (size, mtime_ns, ctime_ns, inode, dev,
    cached_at_ns, hash)`` of the ``paths`` (already :func:`db_text`) it knows."""
    return _by_first_column(conn, _FILES_SELECT, paths, operator.itemgetter(slice(1, None)))


def latest_run(conn: sqlite3.Connection) -> RunRecord | None:
    row = conn.execute(
        "SELECT id, started_at, finished_at, pid, manifest, exit_code, stats FROM runs"
        " ORDER BY id DESC LIMIT 1"
    ).fetchone()
    if row is None:
        return None
    run_id, started, finished, pid, manifest, exit_code, stats = row
    return RunRecord(
        id=run_id,
        started_at=started,
        finished_at=finished,
        pid=pid,
        manifest=manifest,
        exit_code=exit_code,
        stats=json.loads(stats) if stats else {},
    )


def iter_run_items(conn: sqlite3.Connection, run_id: int) -> Iterator[ItemRecord]:
    """Every item the run met, in a stable order, streamed."""
    cur = conn.execute(
        f"SELECT {', '.join(_ITEM_COLUMNS)} FROM items WHERE seen_run = ? ORDER BY input_rel,"
        " operation, variant",
        (run_id,),
    )
    for row in cur:
        yield ItemRecord(*row)


# Report reading streams every item a run met (10^6 on a nightly rerun of a big
# folder), so its rows are named tuples: a fraction of an ItemRecord's cost per row.

# Error codes of a result the vendor billed and that is gone for good.
PAID_LOST_CODES: Final = ("RESULT_LOST", "RESULT_NOT_IMAGE")
_LOST_SQL = "(" + ", ".join(f"'{code}'" for code in PAID_LOST_CODES) + ")"
# Whether the vendor billed the item, in any run. ``billed_run`` is written from schema 2
# on; rows of a schema-1 journal are billed if they ever succeeded, are ``ready``
# (the vendor said the task succeeded) or lost a paid result.
_BILLED_SQL = (
    "(billed_run IS NOT NULL OR succeeded_run IS NOT NULL OR status = 'ready'"
    f" OR (status = 'failed' AND error_code IN {_LOST_SQL}))"
)
# Whether the vendor billed it in run ``:run`` (schema-1 rows: the run it succeeded in).
_BILLED_IN_RUN_SQL = "(billed_run = :run OR (billed_run IS NULL AND succeeded_run = :run))"


class RunRow(NamedTuple):
    """What a report needs of one item (see :func:`iter_run_rows`)."""

    key: str
    operation: str
    variant: str
    params: str  # JSON object of vendor codes (and path params, when recorded)
    input_path: str
    input_rel: str
    status: str  # a :class:`Status` value
    task_id: str | None
    attempts: int
    polls: int
    output: str | None  # relative to the output folder
    error_code: str | None
    error_message: str | None
    error_kind: str | None
    changes: str | None  # JSON list of auto-fix notes
    run_status: str | None  # succeeded | failed | skipped | failed_earlier | None (unfinished)
    unknown_total: int  # sends of unknown outcome ever made for it (possibly billed)
    poll_lag: float | None
    billed: int  # 1: the vendor billed it (in any run)
    billed_here: int  # 1: the vendor billed it in the run being read


_RUN_ROW_SQL = ", ".join(
    [*RunRow._fields[:-2], f"{_BILLED_SQL} AS billed", f"{_BILLED_IN_RUN_SQL} AS billed_here"]
)


def iter_run_rows(conn: sqlite3.Connection, run_id: int) -> Iterator[RunRow]:
    """Every item run ``run_id`` met, in the order the journal first recorded them
    (stable across reruns; new items come last); one query, streamed.

    Not sorted by name: sorting 10^6 rows costs SQLite more than reading them (an
    external merge through temporary files), and a nightly rerun must stay fast.
    """
    cur = conn.execute(
        f"SELECT {_RUN_ROW_SQL} FROM items WHERE seen_run = :run ORDER BY rowid",
        {"run": run_id},
    )
    return map(RunRow._make, cur)


class DuplicateRow(NamedTuple):
    """An input met in a run whose content (for that variant) another input carries."""

    input_rel: str
    input_path: str
    key: str
    carrier: RunRow | None  # the item that carries it; None if it has no row


def iter_run_duplicates(conn: sqlite3.Connection, run_id: int) -> Iterator[DuplicateRow]:
    """The duplicates run ``run_id`` met, each with its carrying item, by input."""
    # The billing expressions name only columns the duplicates table lacks.
    cur = conn.execute(
        "SELECT d.input_rel, d.input_path, d.key, i.key IS NOT NULL,"
        f" {', '.join(f'i.{name}' for name in RunRow._fields[:-2])},"
        f" {_BILLED_SQL}, {_BILLED_IN_RUN_SQL}"
        " FROM duplicates d LEFT JOIN items i ON i.key = d.key"
        " WHERE d.run_id = :run ORDER BY d.input_rel, d.key",
        {"run": run_id},
    )
    for row in cur:
        carrier = RunRow._make(row[4:]) if row[3] else None
        yield DuplicateRow(row[0], row[1], row[2], carrier)


@dataclass(frozen=True)
class FolderCounts:
    """Every item in the journal, whichever run met it last."""

    by_status: dict[str, int]  # Status value -> items
    billed: dict[str, int]  # operation -> items the vendor billed (in any run)
    paid_lost: int  # billed, and the result is gone for good (PAID_LOST_CODES)
    possibly_billed: int  # a send whose outcome is unknown is on record

    @property
    def total(self) -> int:
        return sum(self.by_status.values())


def folder_counts(conn: sqlite3.Connection) -> FolderCounts:
    """Totals over the whole journal, in one aggregate query."""
    rows = conn.execute(
        f"SELECT operation, status, COUNT(*), SUM({_BILLED_SQL}),"
        f" SUM(status = 'failed' AND error_code IN {_LOST_SQL}), SUM(unknown_total > 0)"
        " FROM items GROUP BY operation, status"
    ).fetchall()
    by_status = {status.value: 0 for status in Status}
    billed: dict[str, int] = {}
    lost = unknown = 0
    for operation, status, n, n_billed, n_lost, n_unknown in rows:
        by_status[status] = by_status.get(status, 0) + n
        billed[operation] = billed.get(operation, 0) + n_billed
        lost += n_lost
        unknown += n_unknown
    return FolderCounts(by_status, billed, lost, unknown)


def mean_polls_per_task(conn: sqlite3.Connection) -> dict[str, float]:
    """Polls per task the folder's succeeded async items took, per operation."""
    return {
        str(op): float(mean)
        for op, mean in conn.execute(
            "SELECT operation, AVG(polls) FROM items"
            " WHERE status = 'succeeded' AND polls > 0 GROUP BY operation"
        )
    }


def succeeded_output(conn: sqlite3.Connection, key: str) -> str | None:
    """The recorded output of ``key`` if it succeeded, else None."""
    row = conn.execute(
        "SELECT output FROM items WHERE key = ? AND status = 'succeeded'", (key,)
    ).fetchone()
    return str(row[0]) if row is not None and row[0] else None


def run_count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0])


def failure_counts(
    conn: sqlite3.Connection,
) -> Iterator[tuple[str | None, str | None, str, int]]:
    """``(error_code, error_kind, operation, items)`` over the folder's failed items."""
    yield from conn.execute(
        "SELECT error_code, error_kind, operation, COUNT(*) FROM items WHERE status = 'failed'"
        " GROUP BY error_code, error_kind, operation"
    )


def failure_examples(
    conn: sqlite3.Connection, code: str | None, kind: str | None, limit: int
) -> list[tuple[str, str | None]]:
    """``(input_rel, error_message)`` of the first failed items with that code and kind."""
    return [
        (str(rel), msg)
        for rel, msg in conn.execute(
            "SELECT input_rel, error_message FROM items WHERE status = 'failed'"
            " AND error_code IS ? AND error_kind IS ? ORDER BY rowid LIMIT ?",
            (code, kind, limit),
        )
    ]
