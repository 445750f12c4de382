"""``report.json`` and ``results.jsonl``, derived from the journal alone.

Both are rebuilt from the journal at the end of every run and by
``pipeline report OUTPUT_DIR``, so they always agree with it and with the files on
disk. The report covers the latest run: the items it met (new, resumed, skipped).
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pipeline.journal import JOURNAL_NAME, ItemRecord, Journal, iter_run_items, latest_run
from pipeline.operations import OPERATIONS
from pipeline.outputs import atomic_open_text, atomic_write_text

__all__ = ["REPORT_NAME", "RESULTS_NAME", "build_reports", "item_result"]

REPORT_NAME = "report.json"
RESULTS_NAME = "results.jsonl"

INTERRUPTED = {
    "code": "INTERRUPTED",
    "message": "the run stopped before this item finished; rerun the manifest to resume it",
    "kind": "retryable",
}


def item_result(rec: ItemRecord, output_dir: Path) -> dict[str, Any]:
    """One ``results.jsonl`` line for a journal row."""
    status = rec.run_status
    error: dict[str, Any] | None = None
    if status is None:
        # Met by the run but not finished (interrupted, or aborted by a fatal error).
        status = "failed"
        error = dict(INTERRUPTED)
    elif status == "failed":
        error = {
            "code": rec.error_code or "UNKNOWN",
            "message": rec.error_message or "",
            "kind": rec.error_kind or "permanent",
        }
    output = str(output_dir / rec.output) if rec.output and status != "failed" else None
    return {
        "key": rec.key,
        "input": rec.input_path,
        "input_rel": rec.input_rel,
        "operation": rec.operation,
        "variant": rec.variant,
        "params": json.loads(rec.params),
        "status": status,
        "output": output,
        "attempts": rec.attempts,
        "polls": rec.polls,
        "task_id": rec.task_id,
        "error": error,
        "changes": json.loads(rec.changes) if rec.changes else [],
    }


def build_reports(
    output_dir: Path, exit_code_for: Callable[[Mapping[str, int]], int] | None = None
) -> dict[str, Any]:
    """Rewrite ``report.json`` and ``results.jsonl`` from the journal; return the report.

    Synchronous (SQLite and file I/O): call it from a worker thread in async code.
    ``exit_code_for`` decides the run's exit code from the counts (the engine passes
    it at the end of a run); otherwise the exit code recorded in the journal is used.
    Raises :class:`pipeline.errors.JournalError` for a missing or damaged journal.
    """
    output_dir = output_dir.resolve()
    conn = Journal.open_sync(output_dir / JOURNAL_NAME, create=False)
    try:
        return _build(conn, output_dir, exit_code_for)
    finally:
        conn.close()


def _build(
    conn: sqlite3.Connection,
    output_dir: Path,
    exit_code_for: Callable[[Mapping[str, int]], int] | None,
) -> dict[str, Any]:
    run = latest_run(conn)
    counts: Counter[str] = Counter()
    by_op: dict[str, Counter[str]] = defaultdict(Counter)
    errors: Counter[str] = Counter()
    error_kinds: Counter[str] = Counter()
    credits: dict[str, float] = defaultdict(float)
    polls_by_op: dict[str, list[int]] = defaultdict(list)
    auto_fixed = 0
    with atomic_open_text(output_dir / RESULTS_NAME) as handle:
        if run is not None:
            for rec in iter_run_items(conn, run.id):
                line = item_result(rec, output_dir)
                handle.write(json.dumps(line, sort_keys=True) + "\n")
                status = line["status"]
                counts[status] += 1
                by_op[rec.operation][status] += 1
                if line["error"]:
                    errors[line["error"]["code"]] += 1
                    error_kinds[line["error"]["kind"]] += 1
                if line["changes"]:
                    auto_fixed += 1
                spec = OPERATIONS.get(rec.operation)
                if status == "succeeded" and spec is not None:
                    credits[spec.vendor] += spec.price
                    if spec.is_async and rec.polls:
                        polls_by_op[rec.operation].append(rec.polls)
    stats = run.stats if run else {}
    summary = {
        "total": sum(counts.values()),
        "succeeded": counts["succeeded"],
        "failed": counts["failed"],
        "skipped": counts["skipped"],
    }
    report: dict[str, Any] = {
        "run_id": run.id if run else None,
        "manifest": run.manifest if run else None,
        "output_dir": str(output_dir),
        "started_at": run.started_at if run else None,
        "finished_at": run.finished_at if run else None,
        "wall_time_seconds": round((run.finished_at or run.started_at) - run.started_at, 3)
        if run
        else 0.0,
        "exit_code": run.exit_code if run else None,
        "counts": summary,
        "by_operation": {
            op: {
                "total": sum(c.values()),
                "succeeded": c["succeeded"],
                "failed": c["failed"],
                "skipped": c["skipped"],
            }
            for op, c in sorted(by_op.items())
        },
        "errors_by_code": dict(sorted(errors.items())),
        "errors_by_kind": dict(sorted(error_kinds.items())),
        "requests": stats.get("requests", {}),
        "rate_budget": stats.get("rate_budget", {}),
        "first_poll_seconds": stats.get("first_poll_seconds", {}),
        "credits_spent": {
            vendor: {"amount": amount, "unit": "units" if vendor == "perfectcorp" else "credits"}
            for vendor, amount in sorted(credits.items())
        },
        "polls_per_task": {
            op: {
                "tasks": len(values),
                "mean": round(sum(values) / len(values), 3),
                "max": max(values),
            }
            for op, values in sorted(polls_by_op.items())
        },
        "auto_fixed": auto_fixed,
        "aborted": stats.get("aborted"),
        "interrupted": bool(stats.get("interrupted", False)),
        "duplicates_skipped": stats.get("duplicates", 0),
    }
    if exit_code_for is not None:
        report["exit_code"] = exit_code_for(summary)
    atomic_write_text(output_dir / REPORT_NAME, json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report
