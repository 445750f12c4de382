"""A journal of the previous release resumes (issue 10 point 4), and the run-wide
brakes of issue 11 point 5 stop a run that can only fail."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.emulator import RunningEmulator
from pipeline.engine import RunOptions, run_job
from pipeline.journal import JOURNAL_NAME, SCHEMA_VERSION
from pipeline.manifest import load_manifest
from tests.conftest import fast_config

SMILE = [{"op": "perfectcorp/ai-smile", "params": {"expression_type": "closed_mouth_smile"}}]
EMOTION = [{"op": "ailab/emotion-editor", "params": {"service_choice": "big_grin"}}]


async def _run(manifest_path: Path, config: Any, **options: Any) -> tuple[int, dict[str, Any]]:
    manifest = load_manifest(manifest_path)
    result = await run_job(manifest, config, RunOptions(quiet=True, **options))
    return result.exit_code, result.report


def _downgrade_to_schema_1(journal: Path) -> None:
    """Turn a journal into what the previous release wrote: schema 1, and a task kept
    after TASK_DEADLINE recorded as ``failed`` with a retryable error and its task id."""
    conn = sqlite3.connect(journal)
    try:
        conn.execute(
            "UPDATE items SET status = 'failed', error_kind = 'retryable'"
            " WHERE status = 'submitted' AND task_id IS NOT NULL"
        )
        for column in ("unknown_sends", "unknown_total", "billed_run", "poll_lag"):
            conn.execute(f"ALTER TABLE items DROP COLUMN {column}")
        for table in ("spool", "duplicates", "files"):
            conn.execute(f"DROP TABLE {table}")
        conn.execute("PRAGMA user_version = 1")
        conn.commit()
    finally:
        conn.close()


async def test_a_previous_release_journal_is_upgraded_and_its_tasks_collected(
    emulator_factory: Callable[..., Any],
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
    tmp_path: Path,
) -> None:
    # Run 1 gives up waiting (TASK_DEADLINE) with the task ids kept; the journal is then
    # rewritten as the previous release would have left it.
    emu: RunningEmulator = await emulator_factory(task_seconds=1.0)
    portraits(3)
    config = fast_config(emu.base_url)
    manifest = write_manifest(SMILE, concurrency=3)
    code, _ = await _run(manifest, config, task_deadline_seconds=0.2)
    assert code == 1
    journal = tmp_path / "out" / JOURNAL_NAME
    _downgrade_to_schema_1(journal)
    submits = emu.stats()["perfectcorp"]["submits"]
    assert submits == 3
    # Run 2 (this release): the journal is migrated, the three tasks are collected.
    code, report = await _run(manifest, config)
    assert code == 0, report["errors_by_code"]
    assert report["counts"]["succeeded"] == 3
    assert emu.stats()["perfectcorp"]["submits"] == submits, "a kept task was paid again"
    assert emu.stats()["perfectcorp"]["charged"] == 3
    conn = sqlite3.connect(journal)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        statuses = {s for (s,) in conn.execute("SELECT status FROM items")}
    finally:
        conn.close()
    assert statuses == {"succeeded"}


async def test_max_failure_ratio_stops_starting_items(
    emulator_factory: Callable[..., Any],
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
    tmp_path: Path,
) -> None:
    emu: RunningEmulator = await emulator_factory(permanent_error_rate=1.0)
    portraits(30)
    manifest = write_manifest(
        EMOTION, concurrency=1, max_failure_ratio=0.5, min_items_for_failure_ratio=5
    )
    code, report = await _run(manifest, fast_config(emu.base_url))
    assert code == 1
    # The fifth failure crosses the ratio; nothing is started after it.
    assert report["counts"]["failed"] == 5
    assert report["counts"]["interrupted"] + report["counts"]["failed"] <= 30
    lines = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert sum(x["status"] == "failed" for x in lines) == 5
    assert emu.stats()["ailab"]["requests"] <= 6


async def test_an_unreachable_vendor_stops_the_run(
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    import socket

    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    portraits(20)
    config = fast_config(f"http://127.0.0.1:{port}")
    network = config.network.model_copy(update={"unreachable_after_requests": 4})
    config = config.model_copy(update={"network": network})
    code, report = await _run(write_manifest(EMOTION, concurrency=2, max_attempts=10), config)
    assert code == 3
    assert report["aborted"]["code"] == "VENDOR_UNREACHABLE"
    assert f"127.0.0.1:{port}" in report["aborted"]["message"]
    assert report["requests"]["ailab"]["submit"] <= 8  # not 20 items x 10 attempts
