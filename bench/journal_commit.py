"""Group-commit throughput of the journal, against one commit per write.

    python bench/journal_commit.py --items 20000 --writers 64 --baseline-items 2000

``--writers`` coroutines share one :class:`pipeline.journal.Journal` and take every item
through the transitions a real async item makes: ``see`` (insert as pending),
``submitting``, ``submitted`` + task id, one poll counted, ``succeeded`` + output. Each
call returns only once its write is committed (WAL, ``synchronous=FULL``), exactly as
the engine uses it; the journal groups the writes waiting at the same time into one
commit. The baseline is the same journal with each write committed on its own
(same connection, same SQL, same worker threads), on fewer items because it is slow.
The journal lives in a temporary folder on the disk holding ``--dir`` (default: the
system temporary folder), so the fsyncs are real.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.journal import JOURNAL_NAME, Change, Journal
from pipeline.lifecycle import Status

TRANSITIONS_PER_ITEM = 4  # see, submitting, submitted, succeeded


class OneCommitPerWrite(Journal):
    """The naive journal: every write is its own transaction and its own fsync."""

    async def _write_many(self, ops: Sequence[tuple[str, Sequence[Any]]]) -> None:
        await anyio.to_thread.run_sync(self._apply, list(ops))
        self.commits += 1


async def _item(journal: Journal, run_id: int, i: int) -> None:
    key = f"{i:064x}"
    await journal.see(
        key=key,
        operation="ailab/face-swap",
        variant="image_template=template",
        params='{"image_template": "template.jpg"}',
        input_path=f"/data/in/{i % 100:02d}/p{i:07d}.jpg",
        input_rel=f"in/{i % 100:02d}/p{i:07d}.jpg",
        run_id=run_id,
    )
    await journal.change(key, Change(Status.SUBMITTING, attempts=1))
    await journal.change(key, Change(Status.SUBMITTED, task_id=f"task-{i:040x}"))
    await journal.change(
        key,
        Change(
            Status.SUCCEEDED,
            output=f"ailab-face-swap/image_template=template/in/p{i:07d}.jpg",
            run_status="succeeded",
            succeeded_run=run_id,
            billed_run=run_id,
            polls=1,
            finished=True,
        ),
    )


async def _measure(
    journal_class: type[Journal], folder: Path, items: int, writers: int
) -> tuple[float, int]:
    """(seconds, commits) to take ``items`` through their transitions with ``writers``."""
    async with journal_class(folder) as journal:
        run_id = await journal.begin_run("bench.yaml", 0)
        next_item = iter(range(items))

        async def writer() -> None:
            for i in next_item:  # shared iterator: each writer takes the next item
                await _item(journal, run_id, i)

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(writers):
                tg.start_soon(writer)
        elapsed = time.perf_counter() - start
        commits = journal.commits
    conn = sqlite3.connect(folder / JOURNAL_NAME)
    try:
        done = conn.execute(
            "SELECT count(*) FROM items WHERE status = 'succeeded' AND polls = 1"
        ).fetchone()[0]
    finally:
        conn.close()
    assert done == items, f"{done} of {items} items reached succeeded"
    return elapsed, commits


def _line(label: str, items: int, writers: int, elapsed: float, commits: int) -> str:
    writes = items * TRANSITIONS_PER_ITEM
    return (
        f"{label}: {items} items x {TRANSITIONS_PER_ITEM} transitions = {writes} committed "
        f"writes by {writers} writers in {elapsed:.2f} s = {writes / elapsed:,.0f} "
        f"transitions/s = {items / elapsed:,.0f} items/s; {commits} commits "
        f"({writes / max(commits, 1):.1f} writes/commit)"
    )


async def main(items: int, writers: int, baseline_items: int, where: str | None) -> None:
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        root = Path(tmp)
        elapsed, commits = await _measure(Journal, root / "group", items, writers)
        print(_line("group commit", items, writers, elapsed, commits), flush=True)
        group_rate = items * TRANSITIONS_PER_ITEM / elapsed
        if baseline_items > 0:
            b_elapsed, b_commits = await _measure(
                OneCommitPerWrite, root / "naive", baseline_items, writers
            )
            print(_line("one commit per write", baseline_items, writers, b_elapsed, b_commits))
            naive_rate = baseline_items * TRANSITIONS_PER_ITEM / b_elapsed
            print(f"group commit is {group_rate / naive_rate:.1f}x the one-commit-per-write rate")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--writers", type=int, default=64)
    parser.add_argument(
        "--baseline-items", type=int, default=2000, help="0 skips the one-commit-per-write run"
    )
    parser.add_argument("--dir", default=None, help="folder for the temporary journals")
    args = parser.parse_args()
    anyio.run(main, args.items, args.writers, args.baseline_items, args.dir)
