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

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.abc
import anyio.to_thread

from pipeline.errors import JournalError

__all__ = ["JOURNAL_NAME", "ItemRecord", "Journal", "RunRecord"]

JOURNAL_NAME = "journal.sqlite"
APPLICATION_ID = 0x50505031  # "PPP1": marks the file as ours
SCHEMA_VERSION = 1

_SCHEMA = """
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

_ITEM_COLUMNS = (
    "key", "operation", "variant", "params", "input_path", "input_rel", "status",
    "task_id", "attempts", "polls", "output", "error_code", "error_message",
    "error_kind", "changes", "seen_run", "run_status", "succeeded_run",
    "submitted_at", "finished_at", "updated_at",
)  # fmt: skip
_UPDATABLE = frozenset(_ITEM_COLUMNS) - {"key"}


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
        self.done = anyio.Event()
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
        self._batch = _Batch()
        self._wake = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self.commits = 0

    # -- opening ------------------------------------------------------------------

    @staticmethod
    def open_sync(path: Path, *, create: bool) -> sqlite3.Connection:
        """Open (or create) a journal file and check it is ours and intact."""
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
            Journal._check(conn, path)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA busy_timeout = 5000")
        except JournalError:
            conn.close()
            raise
        except sqlite3.Error as exc:
            conn.close()
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
    def _check(conn: sqlite3.Connection, path: Path) -> None:
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise JournalError(
                f"{path}: not a readable journal ({exc}); it may be truncated or another "
                "tool's file. Move it aside and rerun. It was not modified."
            ) from None
        if app_id != APPLICATION_ID:
            raise JournalError(
                f"{path}: this SQLite file is not a portrait-pipeline journal (application_id "
                f"{app_id}); choose another output folder or move the file aside"
            )
        if version != SCHEMA_VERSION:
            raise JournalError(
                f"{path}: journal schema version {version} is not the supported "
                f"{SCHEMA_VERSION}; use the portrait-pipeline version that wrote it"
            )
        try:
            result = conn.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            result = str(exc)
        if result != "ok":
            raise JournalError(
                f"{path}: the journal failed its integrity check ({result}); restore it from "
                "a backup or move it aside. It was not modified."
            )

    async def __aenter__(self) -> Self:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = await anyio.to_thread.run_sync(lambda: self.open_sync(self.path, create=True))
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._writer)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._tg is not None
        with anyio.CancelScope(shield=True):
            await self.flush()
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(None, None, None)
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    # -- the group-commit writer ------------------------------------------------------

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            batch, self._batch = self._batch, _Batch()
            if batch.ops:
                try:
                    await anyio.to_thread.run_sync(self._apply, batch.ops)
                    self.commits += 1
                except BaseException as exc:  # surfaced to every waiter of the batch
                    batch.error = exc
            batch.done.set()

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
        batch = self._batch
        batch.ops.append((sql, params))
        self._wake.set()
        # Shielded: a cancelled caller must not leave the caller unsure whether its
        # transition (say, a task id) was committed; it waits for the commit.
        with anyio.CancelScope(shield=True):
            await batch.done.wait()
        if batch.error is not None:
            raise JournalError(f"{self.path}: journal write failed: {batch.error}")

    async def flush(self) -> None:
        """Wait until every write issued so far is committed."""
        if self._batch.ops:
            batch = self._batch
            self._wake.set()
            await batch.done.wait()

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise JournalError(f"{self.path}: journal is closed")
        return self._conn

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        def run() -> list[tuple[Any, ...]]:
            with self._lock:
                return self._require().execute(sql, params).fetchall()

        return await anyio.to_thread.run_sync(run)

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
        self, run_id: int, exit_code: int | None, stats: Mapping[str, Any]
    ) -> None:
        await self._write(
            "UPDATE runs SET finished_at = ?, exit_code = ?, stats = ? WHERE id = ?",
            (time.time(), exit_code, json.dumps(stats, sort_keys=True), run_id),
        )

    async def save_run_stats(self, run_id: int, stats: Mapping[str, Any]) -> None:
        await self._write(
            "UPDATE runs SET stats = ? WHERE id = ?", (json.dumps(stats, sort_keys=True), run_id)
        )

    # -- items ----------------------------------------------------------------------------

    async def lookup(self, key: str) -> ItemRecord | None:
        rows = await self._read(
            f"SELECT {', '.join(_ITEM_COLUMNS)} FROM items WHERE key = ?", (key,)
        )
        return ItemRecord(*rows[0]) if rows else None

    async def live_tasks(self) -> dict[str, tuple[int, int]]:
        """Tasks created by earlier runs and not collected yet, per operation, as
        ``(not yet known to have succeeded, ready)``. The vendor bills each one that
        succeeds, whichever run collects it; ``ready`` ones are billed already."""
        rows = await self._read(
            "SELECT operation, SUM(status != 'ready'), SUM(status = 'ready') FROM items"
            " WHERE task_id IS NOT NULL AND (status IN ('submitted', 'ready')"
            " OR (status = 'failed' AND error_kind != 'permanent'))"
            " GROUP BY operation",
            (),
        )
        return {str(op): (int(unpaid), int(ready)) for op, unpaid, ready in rows}

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
        """Record that this run met the item (inserting it as pending if new)."""
        now = time.time()
        await self._write(
            "INSERT INTO items (key, operation, variant, params, input_path, input_rel, status,"
            " seen_run, updated_at) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?)"
            " ON CONFLICT(key) DO UPDATE SET input_path = excluded.input_path,"
            " input_rel = excluded.input_rel, seen_run = excluded.seen_run, run_status = NULL,"
            " updated_at = excluded.updated_at",
            (key, operation, variant, params, input_path, input_rel, run_id, now),
        )

    async def update(self, key: str, **fields: Any) -> None:
        """Set ``fields`` on the item; committed when this returns."""
        unknown = set(fields) - _UPDATABLE
        if unknown:
            raise ValueError(f"unknown journal columns: {sorted(unknown)}")
        fields["updated_at"] = time.time()
        names = sorted(fields)
        await self._write(
            f"UPDATE items SET {', '.join(f'{n} = ?' for n in names)} WHERE key = ?",
            [fields[n] for n in names] + [key],
        )

    async def add_polls(self, key: str, n: int = 1) -> None:
        await self._write(
            "UPDATE items SET polls = polls + ?, updated_at = ? WHERE key = ?",
            (n, time.time(), key),
        )


# -- reading for reports (synchronous; report.py runs these in a thread) ---------------------


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
