"""The accounting in ``report.json`` and ``results.jsonl`` (issues 8, 9 and 11).

Journals are built with the real :class:`Journal` (every status change goes through
the lifecycle's table), over two runs: run 1 is "earlier", run 2 is the one reported.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import tempfile
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.journal import (
    _SCHEMA_V1,
    APPLICATION_ID,
    JOURNAL_NAME,
    Change,
    Journal,
)
from pipeline.lifecycle import STATUS_MOVES, ErrorInfo, Status
from pipeline.operations import OPERATIONS
from pipeline.report import COUNT_KEYS, LINE_FIELDS, build_reports

BEAUTY = "ailab/face-beauty-pro"
EMOTION = "ailab/emotion-editor"
SWAP = "ailab/face-swap"
SMILE = "perfectcorp/ai-smile"
NO_FACE = ErrorInfo("ERROR_NO_FACE_IN_FILE", "no face in the image", "permanent")
LOST = ErrorInfo("RESULT_LOST", "the paid result was not kept", "permanent")
NOT_IMAGE = ErrorInfo("RESULT_NOT_IMAGE", "the result is an HTML page", "permanent")
DEADLINE = ErrorInfo("TASK_DEADLINE", "task still running after 900 s", "retryable")
UNMET = "unmet"  # an item of run 1 that run 2 did not meet


@dataclass(frozen=True)
class Item:
    """One item and where the two runs leave it.

    ``outcome``: its ``run_status`` in run 2 (``None``: met, not finished), or
    ``UNMET``. ``billed_run``: the run in which the vendor billed it (1 or 2).
    """

    key: str
    outcome: str | None
    status: Status | None = None  # default: what the outcome implies
    op: str = BEAUTY
    params: str = '{"filter_type": 10, "smoothing": 70}'
    variant: str = "filter_type=sakura,smoothing=70"
    error: ErrorInfo | None = None
    billed_run: int | None = None
    unknown_sends: int = 0
    polls: int = 0
    poll_lag: float | None = None
    changes: str | None = None

    @property
    def input_rel(self) -> str:
        return f"in/{self.key}.jpg"

    @property
    def input_path(self) -> str:
        return f"/photos/{self.input_rel}"

    @property
    def output(self) -> str:
        return f"{self.op.replace('/', '-')}/{self.variant}/{self.input_rel}"

    @property
    def final(self) -> Status:
        if self.status is not None:
            return self.status
        return {
            "succeeded": Status.SUCCEEDED,
            "skipped": Status.SUCCEEDED,
            "failed": Status.FAILED,
            "failed_earlier": Status.FAILED,
        }.get(self.outcome or "", Status.SUBMITTED)


@dataclass(frozen=True)
class Dup:
    """An input of run 2 whose content ``key`` carries."""

    name: str
    key: str

    @property
    def input_rel(self) -> str:
        return f"copies/{self.name}.jpg"

    @property
    def input_path(self) -> str:
        return f"/photos/{self.input_rel}"


@dataclass
class Built:
    report: dict[str, Any]
    lines: list[dict[str, Any]]
    exit_inputs: list[dict[str, int]] = field(default_factory=list)

    def by_key(self) -> dict[str, dict[str, Any]]:
        return {x["key"]: x for x in self.lines if x["duplicate_of"] is None}


def _path(start: Status, target: Status) -> list[Status]:
    """The shortest legal status path from ``start`` to ``target`` (target last)."""
    seen = {start: [start]}
    queue = deque([start])
    while queue:
        here = queue.popleft()
        for nxt in sorted(STATUS_MOVES[here]):
            if nxt not in seen:
                seen[nxt] = [*seen[here], nxt]
                queue.append(nxt)
    if target == start:
        return [target]
    return seen[target][1:]


async def _move(
    journal: Journal, current: dict[str, Status], key: str, target: Status, **fields: Any
) -> None:
    steps = _path(current[key], target)
    for status in steps[:-1]:
        await journal.change(key, Change(status))
    await journal.change(key, Change(target, **fields))
    current[key] = target


async def _see(journal: Journal, item: Item, run_id: int) -> None:
    await journal.see(
        key=item.key,
        operation=item.op,
        variant=item.variant,
        params=item.params,
        input_path=item.input_path,
        input_rel=item.input_rel,
        run_id=run_id,
    )


async def _run_one(journal: Journal, item: Item, current: dict[str, Status]) -> None:
    """Run 2's handling of one item (run 1 has been written)."""
    if item.outcome == UNMET:
        return
    await _see(journal, item, 2)
    current.setdefault(item.key, Status.PENDING)
    if item.outcome in ("skipped", "failed_earlier"):
        await journal.skip_many([item.key], 2, item.outcome)
        return
    fields: dict[str, Any] = {
        "unknown_sends": item.unknown_sends,
        "unknown_total": item.unknown_sends,
        "polls": item.polls,
        "poll_lag": item.poll_lag,
        "changes": item.changes,
    }
    if item.billed_run == 2:
        fields["billed_run"] = 2
    if item.outcome == "succeeded":
        fields.update(output=item.output, succeeded_run=2, error=None)
    else:
        fields["error"] = item.error
    if item.outcome is not None:
        fields.update(run_status=item.outcome, finished=True)
    await _move(journal, current, item.key, item.final, **fields)


async def _write_journal(
    folder: Path, items: Sequence[Item], dups: Sequence[Dup], stats: Mapping[str, Any]
) -> None:
    current: dict[str, Status] = {}
    async with Journal(folder) as journal:
        # Run 1: what the earlier run left (done, failed for good, billed, unmet).
        run1 = await journal.begin_run("job.yaml", os.getpid())
        assert run1 == 1
        async with anyio.create_task_group() as tg:
            for item in items:
                tg.start_soon(_run_earlier, journal, item, current)
        await journal.finish_run(1, 0, {})
        run2 = await journal.begin_run("job.yaml", os.getpid())
        assert run2 == 2
        async with anyio.create_task_group() as tg:
            for item in items:
                tg.start_soon(_run_one, journal, item, current)
        for dup in dups:
            await journal.record_duplicate(2, dup.input_rel, dup.input_path, dup.key)
        await journal.finish_run(2, None, stats)


async def _run_earlier(journal: Journal, item: Item, current: dict[str, Status]) -> None:
    await _see(journal, item, 1)
    current[item.key] = Status.PENDING
    if item.outcome == "skipped":
        await _move(
            journal, current, item.key, Status.SUCCEEDED, output=item.output,
            run_status="succeeded", succeeded_run=1, billed_run=1, changes=item.changes,
            unknown_sends=item.unknown_sends, unknown_total=item.unknown_sends,
        )  # fmt: skip
    elif item.outcome == "failed_earlier":
        await _move(
            journal, current, item.key, Status.FAILED, error=item.error or NO_FACE,
            run_status="failed", billed_run=item.billed_run, unknown_sends=item.unknown_sends,
            unknown_total=item.unknown_sends,
        )  # fmt: skip
    elif item.outcome == UNMET:
        fields: dict[str, Any] = {"billed_run": item.billed_run, "run_status": "failed"}
        if item.final is Status.SUCCEEDED:
            fields.update(output=item.output, succeeded_run=1, run_status="succeeded")
        if item.final is Status.FAILED:
            fields["error"] = item.error or NO_FACE
        await _move(journal, current, item.key, item.final, **fields)
    elif item.billed_run == 1:
        # Billed in run 1, not stored then: run 2 finds it ready.
        await _move(journal, current, item.key, Status.READY, billed_run=1)


def _build(folder: Path, exit_code: int = 0) -> Built:
    seen: list[dict[str, int]] = []

    def exit_code_for(counts: Mapping[str, int]) -> int:
        seen.append(dict(counts))
        return exit_code

    report = build_reports(folder, exit_code_for)
    text = (folder / "results.jsonl").read_text(encoding="utf-8")
    lines = [json.loads(x) for x in text.splitlines()]
    # Each line is one compact JSON object, exactly as json writes it (the spliced
    # fixed part included): no duplicate keys, nothing between the halves.
    for raw, line in zip(text.splitlines(), lines, strict=True):
        assert raw == json.dumps(line, separators=(",", ":"))
        assert len(line) == len(LINE_FIELDS)
    assert json.loads((folder / "report.json").read_text()) == report
    return Built(report, lines, seen)


def _make(
    folder: Path,
    items: Sequence[Item],
    dups: Sequence[Dup] = (),
    stats: Mapping[str, Any] | None = None,
    exit_code: int = 0,
) -> Built:
    anyio.run(_write_journal, folder, items, dups, stats or {})
    return _build(folder, exit_code)


def _counts(**given: int) -> dict[str, int]:
    out = dict.fromkeys(COUNT_KEYS, 0)
    out.update(given)
    out["total"] = sum(v for k, v in out.items() if k != "total")
    return out


# -- every outcome, exactly ---------------------------------------------------------------


def test_every_outcome_has_its_status_count_and_error(tmp_path: Path) -> None:
    items = [
        Item("ok", "succeeded", billed_run=2, polls=3, poll_lag=0.25),
        Item("bad", "failed", error=NO_FACE),
        Item("old", "failed_earlier", error=NO_FACE),
        Item("done", "skipped"),
        Item("open", None, status=Status.SUBMITTED, polls=1),
        Item("gone", UNMET, status=Status.SUCCEEDED, billed_run=1),
    ]
    built = _make(tmp_path, items, [Dup("copy", "done")], exit_code=1)
    report, by_key = built.report, built.by_key()
    expected = _counts(succeeded=1, failed=1, failed_earlier=1, skipped=2, interrupted=1)
    assert report["counts"] == expected
    assert built.exit_inputs == [expected]
    assert report["exit_code"] == 1
    assert report["by_operation"] == {BEAUTY: expected}
    assert report["errors_by_code"] == {"ERROR_NO_FACE_IN_FILE": 1}
    assert report["errors_by_kind"] == {"permanent": 1}
    assert report["errors_earlier_by_code"] == {"ERROR_NO_FACE_IN_FILE": 1}
    assert report["errors_earlier_by_kind"] == {"permanent": 1}
    assert report["error_examples"] == {"ERROR_NO_FACE_IN_FILE": ["in/bad.jpg", "in/old.jpg"]}
    assert report["duplicates"] == 1
    assert len(built.lines) == expected["total"] and "gone" not in by_key
    assert [x["status"] for x in built.lines if x["duplicate_of"]] == ["skipped"]
    assert {k: by_key[k]["status"] for k in by_key} == {
        "ok": "succeeded", "bad": "failed", "old": "failed", "done": "skipped",
        "open": "interrupted",
    }  # fmt: skip
    assert by_key["old"]["carried_over"] is True
    assert by_key["old"]["error"] == {
        "code": "ERROR_NO_FACE_IN_FILE", "message": "no face in the image", "kind": "permanent",
    }  # fmt: skip
    assert [k for k in by_key if by_key[k]["carried_over"]] == ["old"]
    assert by_key["open"]["error"]["code"] == "INTERRUPTED"
    assert by_key["open"]["error"]["kind"] == "retryable"
    assert by_key["open"]["output"] is None and by_key["open"]["task_id"] is None
    # The folder as a whole: what each item's status is now, whichever run met it.
    assert report["folder_totals"] == {
        "total": 6, "pending": 0, "submitting": 0, "submitted": 1, "ready": 0,
        "succeeded": 3, "failed": 2,
    }  # fmt: skip


def test_a_succeeded_line_in_full(tmp_path: Path) -> None:
    item = Item(
        "ok", "succeeded", billed_run=2, polls=2, poll_lag=0.5, unknown_sends=1,
        changes='["rotated upright (EXIF)"]',
    )  # fmt: skip
    built = _make(tmp_path, [item])
    out = tmp_path.resolve()
    assert built.lines == [
        {
            "key": "ok",
            "input": "/photos/in/ok.jpg",
            "input_rel": "in/ok.jpg",
            "operation": BEAUTY,
            "variant": item.variant,
            "params": {"filter_type": 10, "smoothing": 70},
            "params_readable": {"filter_type": "sakura", "smoothing": 70},
            "template": None,
            "status": "succeeded",
            "output": str(out / item.output),
            "output_rel": item.output,
            "attempts": 0,
            "polls": 2,
            "task_id": None,
            "error": None,
            "carried_over": False,
            "billed": True,
            "possibly_billed": True,
            "changes": ["rotated upright (EXIF)"],
            "duplicate_of": None,
        }
    ]
    assert set(built.lines[0]) == set(LINE_FIELDS)
    assert built.report["auto_fixed"] == 1
    assert built.report["possibly_billed"] == 1


def test_interrupted_items_are_not_failures(tmp_path: Path) -> None:
    statuses = [Status.PENDING, Status.SUBMITTING, Status.SUBMITTED, Status.READY]
    items = [Item(f"i{n}", None, status=s) for n, s in enumerate(statuses)]
    built = _make(tmp_path, items, exit_code=130)
    assert built.report["counts"] == _counts(interrupted=4)
    assert built.exit_inputs == [_counts(interrupted=4)]
    assert built.report["errors_by_code"] == {} and built.report["errors_by_kind"] == {}
    assert {x["status"] for x in built.lines} == {"interrupted"}
    assert {x["error"]["code"] for x in built.lines} == {"INTERRUPTED"}
    assert all(x["output"] is None for x in built.lines)
    # A billed result not stored yet (ready) is waiting for the rerun, not lost.
    assert built.report["paid_not_stored"] == 1 and built.report["paid_lost"] == 0


# -- spend as the vendor bills --------------------------------------------------------------


def test_spend_counts_every_item_billed_in_this_run_including_lost(tmp_path: Path) -> None:
    items = [
        Item("ok", "succeeded", billed_run=2),
        Item("lost", "failed", error=LOST, billed_run=2),
        Item(
            "html",
            "failed",
            error=NOT_IMAGE,
            billed_run=2,
            op=SWAP,
            params="{}",
            variant="image_template=face",
        ),
        # Billed in run 1 (ready), stored by run 2: paid for in run 1.
        Item("late", "succeeded", billed_run=1),
        # Billed in run 1 and lost in run 2: lost now, paid for then.
        Item("late-lost", "failed", error=LOST, billed_run=1),
        # Refused by the vendor: not billed.
        Item("bad", "failed", error=NO_FACE),
        # A billed result that is still being stored: billed, not lost.
        Item(
            "pending",
            "failed",
            status=Status.READY,
            error=DEADLINE,
            billed_run=2,
            op=SMILE,
            params='{"expression_type": "closed_mouth_smile"}',
            variant="expression_type=closed_mouth_smile",
        ),
        Item("old-lost", "failed_earlier", error=LOST),
        Item("gone-lost", UNMET, status=Status.FAILED, error=NOT_IMAGE, billed_run=1),
    ]
    built = _make(tmp_path, items)
    report = built.report
    beauty, swap, smile = (OPERATIONS[op].price for op in (BEAUTY, SWAP, SMILE))
    assert report["credits_spent"] == {
        "ailab": {"amount": 2 * beauty + swap, "unit": "credits"},
        "perfectcorp": {"amount": smile, "unit": "units"},
    }
    assert report["paid_lost"] == 3  # lost, html, late-lost
    assert report["paid_lost_total"] == 5  # and old-lost, gone-lost
    assert sorted(x["input_rel"] for x in report["paid_lost_items"]) == [
        "in/html.jpg", "in/late-lost.jpg", "in/lost.jpg",
    ]  # fmt: skip
    assert report["paid_not_stored"] == 1
    billed = {x["key"]: x["billed"] for x in built.lines}
    assert billed == {
        "ok": True, "lost": True, "html": True, "late": True, "late-lost": True,
        "bad": False, "pending": True, "old-lost": True,
    }  # fmt: skip
    # Spend to date over the folder: every billed item once, whichever run.
    assert report["credits_spent_total"] == {
        "ailab": {"amount": 6 * beauty + swap, "unit": "credits"},
        "perfectcorp": {"amount": smile, "unit": "units"},
    }


def test_possibly_billed_counts_this_runs_unknown_sends(tmp_path: Path) -> None:
    items = [
        Item(
            "maybe",
            "failed",
            error=ErrorInfo("OUTCOME_UNKNOWN", "timed out", "retryable"),
            unknown_sends=2,
            op=EMOTION,
            params='{"service_choice": 12}',
            variant="service_choice=big_grin",
        ),
        Item("sent-twice", "succeeded", billed_run=2, unknown_sends=1),
        Item("clean", "succeeded", billed_run=2),
        Item("cut", None, status=Status.SUBMITTING, unknown_sends=1),
    ]
    built = _make(tmp_path, items)
    assert built.report["possibly_billed"] == 3
    assert built.report["possibly_billed_total"] == 3
    flags = {x["key"]: x["possibly_billed"] for x in built.lines}
    assert flags == {"maybe": True, "sent-twice": True, "clean": False, "cut": True}


def test_max_credits_and_engine_stats_pass_through(tmp_path: Path) -> None:
    stats = {
        "requests": {"ailab": {"submit": 1, "poll": 2}},
        "rate_budget": {"ailab": {"sent": 3}},
        "first_poll_seconds": {BEAUTY: 0.5},
        "max_credits": {"ailab": 100},
        "aborted": {"code": "ERROR_NOT_ENOUGH_CREDITS", "kind": "fatal", "message": "x"},
        "interrupted": False,
        "duplicates": 0,
    }
    built = _make(tmp_path, [Item("ok", "succeeded", billed_run=2)], stats=stats)
    report = built.report
    for key in ("requests", "rate_budget", "first_poll_seconds", "max_credits", "aborted"):
        assert report[key] == stats[key], key
    assert report["interrupted"] is False
    assert report["wall_time_seconds"] >= 0 and report["report_seconds"] >= 0


# -- polling figures ----------------------------------------------------------------------


def test_poll_lag_and_polls_per_task(tmp_path: Path) -> None:
    lags = [0.1 * n for n in range(1, 21)]  # 0.1 .. 2.0
    items = [
        Item(f"t{n:02d}", "succeeded", billed_run=2, polls=1 + n % 4, poll_lag=lag)
        for n, lag in enumerate(lags)
    ]
    items += [
        Item("failed", "failed", error=DEADLINE, polls=9, poll_lag=None),
        Item("open", None, polls=7, poll_lag=5.0),  # unfinished: not counted
        Item("done", "skipped", polls=50),  # an earlier run's task: not counted
        Item(
            "sync",
            "succeeded",
            billed_run=2,
            op=EMOTION,
            params='{"service_choice": 12}',
            variant="service_choice=big_grin",
            polls=0,
            poll_lag=None,
        ),
    ]
    report = _make(tmp_path, items).report
    assert report["poll_lag_seconds"] == {
        "mean": round(sum(lags) / 20, 3),
        "p95": 1.9,  # nearest rank: the 19th of 20
        "tasks": 20,
    }
    polls = [1 + n % 4 for n in range(20)] + [9]
    assert report["polls_per_task"] == {
        BEAUTY: {
            "tasks": 21,
            "mean": round(sum(polls) / 21, 3),
            "max": 9,
            "p95": sorted(polls)[math.ceil(0.95 * 21) - 1],
        }
    }


def test_no_poll_lag_gives_nulls(tmp_path: Path) -> None:
    report = _make(tmp_path, [Item("done", "skipped")]).report
    assert report["poll_lag_seconds"] == {"mean": None, "p95": None, "tasks": 0}
    assert report["polls_per_task"] == {}


# -- readable params and templates ------------------------------------------------------------


def test_params_readable_and_template(tmp_path: Path) -> None:
    items = [
        Item(
            "emo",
            "succeeded",
            billed_run=2,
            op=EMOTION,
            params='{"service_choice": 12}',
            variant="service_choice=big_grin",
        ),
        Item(
            "smile",
            "succeeded",
            billed_run=2,
            op=SMILE,
            params='{"expression_type": "smile_with_teeth_visible"}',
            variant="t",
        ),
        Item(
            "swap",
            "succeeded",
            billed_run=2,
            op=SWAP,
            params='{"image_template": "/faces/ana.jpg"}',
            variant="image_template=ana",
        ),
        Item(
            "swap-old",
            "succeeded",
            billed_run=2,
            op=SWAP,
            params="{}",
            variant="image_template=bob",
        ),
        Item(
            "odd",
            "succeeded",
            billed_run=2,
            op=EMOTION,
            params='{"service_choice": 99}',
            variant="service_choice=99",
        ),
        Item(
            "retired",
            "succeeded",
            billed_run=2,
            op="ailab/retired-op",
            params='{"x": 1}',
            variant="x=1",
        ),
    ]
    by_key = _make(tmp_path, items).by_key()
    assert by_key["emo"]["params_readable"] == {"service_choice": "big_grin"}
    assert by_key["emo"]["params"] == {"service_choice": 12}
    assert by_key["smile"]["params_readable"] == {"expression_type": "smile_with_teeth_visible"}
    assert by_key["swap"]["template"] == "/faces/ana.jpg"
    assert by_key["swap"]["params_readable"] == {"image_template": "/faces/ana.jpg"}
    assert by_key["swap-old"]["template"] is None  # journals that did not record it
    assert by_key["odd"]["params_readable"] == {"service_choice": "99"}
    assert by_key["retired"]["params_readable"] == {"x": 1}
    assert by_key["emo"]["template"] is None


# -- duplicates -------------------------------------------------------------------------------


def test_duplicates_share_the_output_of_the_input_that_carries_them(tmp_path: Path) -> None:
    items = [
        Item("done", "skipped"),
        Item("new", "succeeded", billed_run=2),
        Item("bad", "failed", error=NO_FACE),
    ]
    dups = [Dup("a", "done"), Dup("b", "done"), Dup("c", "new"), Dup("d", "bad"),
            Dup("e", "nobody")]  # fmt: skip
    built = _make(tmp_path, items, dups)
    out = tmp_path.resolve()
    lines = {x["input_rel"]: x for x in built.lines if x["input_rel"].startswith("copies/")}
    assert len(lines) == 5
    a = lines["copies/a.jpg"]
    assert a["duplicate_of"] == "/photos/in/done.jpg" and a["key"] == "done"
    assert a["output_rel"] == items[0].output and a["output"] == str(out / items[0].output)
    assert a["status"] == "skipped" and a["attempts"] == 0 and a["billed"] is False
    assert a["params_readable"] == {"filter_type": "sakura", "smoothing": 70}
    assert lines["copies/c.jpg"]["output_rel"] == items[1].output
    assert lines["copies/d.jpg"]["output"] is None  # its carrier failed
    assert lines["copies/d.jpg"]["duplicate_of"] == "/photos/in/bad.jpg"
    assert (
        lines["copies/e.jpg"]["duplicate_of"] is None and lines["copies/e.jpg"]["operation"] is None
    )
    report = built.report
    assert report["duplicates"] == 5
    # The duplicate of the failed input shares its outcome (issue 8 point 5).
    d = lines["copies/d.jpg"]
    assert d["status"] == "failed" and d["error"]["code"] == "ERROR_NO_FACE_IN_FILE"
    assert report["counts"] == _counts(succeeded=1, failed=2, skipped=5)
    assert report["by_operation"][BEAUTY] == _counts(succeeded=1, failed=2, skipped=4)
    # Duplicates send nothing: no spend, no errors of their own.
    assert report["credits_spent"]["ailab"]["amount"] == OPERATIONS[BEAUTY].price
    assert report["errors_by_code"] == {"ERROR_NO_FACE_IN_FILE": 1}


# -- journals without a run, and of the previous release ------------------------------------


def test_a_journal_without_runs_gives_empty_reports(tmp_path: Path) -> None:
    Journal.open_sync(tmp_path / JOURNAL_NAME, create=True).close()
    built = _build(tmp_path)
    assert built.lines == []
    assert built.report["counts"] == _counts()
    assert built.report["run_id"] is None and built.exit_inputs == [_counts()]


def test_a_schema_1_journal_is_reported_as_its_release_left_it(tmp_path: Path) -> None:
    path = tmp_path / JOURNAL_NAME
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(
        "BEGIN;" + _SCHEMA_V1 + f"PRAGMA application_id = {APPLICATION_ID};"
        "PRAGMA user_version = 1; COMMIT;"
    )
    conn.execute("INSERT INTO runs VALUES (1, 100.0, 160.5, 1, 'job.yaml', 1, '{}')")
    columns = (
        "key, operation, variant, params, input_path, input_rel, status, task_id, attempts,"
        " output, error_code, error_message, error_kind, seen_run, run_status, succeeded_run,"
        " updated_at"
    )
    rows = [
        ("ok", BEAUTY, "v", "{}", "/p/ok.jpg", "ok.jpg", "succeeded", "T1", 1, "o/ok.jpg",
         None, None, None, 1, "succeeded", 1, 0),
        ("lost", BEAUTY, "v", "{}", "/p/lost.jpg", "lost.jpg", "failed", "T2", 1, None,
         "RESULT_LOST", "expired", "permanent", 1, "failed", None, 0),
        ("open", BEAUTY, "v", "{}", "/p/open.jpg", "open.jpg", "submitted", "T3", 1, None,
         None, None, None, 1, None, None, 0),
    ]  # fmt: skip
    conn.executemany(f"INSERT INTO items ({columns}) VALUES ({', '.join('?' * 17)})", rows)
    conn.close()
    report = build_reports(tmp_path)
    assert report["counts"] == _counts(succeeded=1, failed=1, interrupted=1)
    assert report["exit_code"] == 1 and report["wall_time_seconds"] == 60.5
    # Before billed_run existed, an item was billed in the run it succeeded in.
    assert report["credits_spent"] == {
        "ailab": {"amount": OPERATIONS[BEAUTY].price, "unit": "credits"}
    }
    assert report["paid_lost"] == 1 and report["paid_lost_total"] == 1
    text = (tmp_path / "results.jsonl").read_text()
    lines = {x["key"]: x for x in map(json.loads, text.splitlines())}
    assert lines["lost"]["billed"] is True and lines["open"]["billed"] is False


# -- property: random mixes of states ---------------------------------------------------------

_OPS = {
    BEAUTY: ('{"filter_type": 10, "smoothing": 70}', "filter_type=sakura,smoothing=70"),
    EMOTION: ('{"service_choice": 14}', "service_choice=cool_pose"),
    SWAP: ('{"image_template": "/faces/t.jpg"}', "image_template=t"),
    SMILE: ('{"expression_type": "closed_mouth_smile"}', "expression_type=closed_mouth_smile"),
}
_ERRORS = [NO_FACE, LOST, NOT_IMAGE, DEADLINE, ErrorInfo("E_X", "odd", "retryable")]


@st.composite
def _item(draw: st.DrawFn, key: str) -> Item:
    outcome = draw(st.sampled_from(["succeeded", "failed", "skipped", "failed_earlier", None,
                                    UNMET]))  # fmt: skip
    status: Status | None = None
    billed: int | None = draw(st.sampled_from([None, 1, 2]))
    error = draw(st.sampled_from(_ERRORS))
    if outcome == "succeeded":
        billed = billed or 2
    elif outcome == "skipped":
        billed = 1
    elif outcome == "failed":
        status = draw(st.sampled_from([Status.FAILED, Status.READY, Status.SUBMITTED]))
    elif outcome == "failed_earlier":
        error = ErrorInfo(error.code, error.message, "permanent")
        billed = None
    elif outcome is None:
        status = draw(st.sampled_from(list(Status)))
    else:
        status = draw(st.sampled_from(list(Status)))
        billed = None if billed == 2 else billed
    if billed == 1 and status in (
        Status.PENDING, Status.SUBMITTING, Status.SUBMITTED,
    ):  # fmt: skip
        billed = None  # billed in run 1 means ready at least: never back to pending
    op = draw(st.sampled_from(sorted(_OPS)))
    params, variant = _OPS[op]
    return Item(
        key, outcome, status=status, op=op, params=params, variant=variant, error=error,
        billed_run=billed, unknown_sends=draw(st.integers(0, 2)),
        polls=draw(st.integers(0, 4)),
        poll_lag=draw(st.none() | st.floats(0, 30, allow_nan=False).map(lambda x: round(x, 3))),
    )  # fmt: skip


@st.composite
def _world(draw: st.DrawFn) -> tuple[list[Item], list[Dup]]:
    n = draw(st.integers(0, 12))
    items = [draw(_item(f"k{i:02d}")) for i in range(n)]
    met = [x.key for x in items if x.outcome != UNMET]
    dups: list[Dup] = []
    if met:
        carriers = draw(st.lists(st.sampled_from(met), max_size=4))
        dups = [Dup(f"d{i}", key) for i, key in enumerate(carriers)]
    return items, dups


_EXPECTED_STATUS = {
    "succeeded": "succeeded", "failed": "failed", "skipped": "skipped",
    "failed_earlier": "failed", None: "interrupted",
}  # fmt: skip


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_world())
def test_random_mixes_account_for_every_item_once(world: tuple[list[Item], list[Dup]]) -> None:
    items, dups = world
    # A RAM-backed folder where there is one: the journal's fsyncs cost nothing there.
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(dir=shm) as tmp:
        built = _make(Path(tmp), items, dups)
    report, lines = built.report, built.lines
    met = [x for x in items if x.outcome != UNMET]
    counts = report["counts"]
    # Counts add up, to the lines written and to what was met.
    assert counts["total"] == len(lines) == len(met) + len(dups)
    assert sum(counts[k] for k in COUNT_KEYS if k != "total") == counts["total"]
    assert built.exit_inputs == [counts]
    for key in COUNT_KEYS:
        assert sum(e[key] for e in report["by_operation"].values()) == counts[key]
    expected = Counter(x.outcome or "interrupted" for x in met)
    # A duplicate shares its carrier's outcome (issue 8 point 5): done -> skipped.
    by_key = {x.key: x for x in met}
    for d in dups:
        carrier = by_key.get(d.key)
        shared = (carrier.outcome or "interrupted") if carrier is not None else "skipped"
        expected["skipped" if shared in ("succeeded", "skipped") else shared] += 1
    assert {k: counts[k] for k in COUNT_KEYS if k != "total"} == {
        k: expected[k] for k in COUNT_KEYS if k != "total"
    }
    # Every item met has exactly one line, with the status its outcome implies.
    own = Counter(x["key"] for x in lines if x["duplicate_of"] is None)
    assert own == Counter(x.key for x in met)
    by_key = built.by_key()
    for x in met:
        line = by_key[x.key]
        assert line["status"] == _EXPECTED_STATUS[x.outcome]
        assert line["carried_over"] is (x.outcome == "failed_earlier")
        assert (line["output"] is not None) is (x.outcome in ("succeeded", "skipped"))
        assert line["possibly_billed"] is (x.unknown_sends > 0)
        assert set(line) == set(LINE_FIELDS)
    # Possibly billed: the items this run sent (not those it left as they were).
    worked = [x for x in met if x.outcome not in ("skipped", "failed_earlier")]
    assert report["possibly_billed"] == sum(x.unknown_sends > 0 for x in worked)
    # Every duplicate has its line.
    dup_lines = Counter(
        (x["input_rel"], x["duplicate_of"]) for x in lines if x["duplicate_of"] is not None
    )
    carriers = {x.key: x for x in met}
    assert dup_lines == Counter((d.input_rel, carriers[d.key].input_path) for d in dups)
    # Spend: the price of every item billed in this run, per vendor met.
    spend: dict[str, float] = {}
    for x in met:
        spec = OPERATIONS[x.op]
        spend[spec.vendor] = spend.get(spec.vendor, 0) + (spec.price if x.billed_run == 2 else 0)
    assert {v: e["amount"] for v, e in report["credits_spent"].items()} == spend
    assert report["folder_totals"]["total"] == len(items)
    errors = Counter(x.error.code for x in met if x.outcome == "failed" and x.error)
    assert report["errors_by_code"] == dict(errors)


def test_the_journal_is_the_only_input(tmp_path: Path) -> None:
    """Rebuilding twice gives the same files (no state kept between builds)."""
    items = [Item("ok", "succeeded", billed_run=2), Item("bad", "failed", error=NO_FACE)]
    first = _make(tmp_path, items)
    again = _build(tmp_path)
    assert again.lines == first.lines
    for key in ("counts", "credits_spent", "errors_by_code", "folder_totals"):
        assert again.report[key] == first.report[key]


@pytest.mark.parametrize("n", [0, 1, 700])
def test_many_lines_stream_in_batches(tmp_path: Path, n: int) -> None:
    # 700 crosses the writer's batch size: no line lost or merged at the seam.
    items = [Item(f"k{i:04d}", "skipped") for i in range(n)]
    built = _make(tmp_path, items)
    assert [x["key"] for x in built.lines] == [x.key for x in items]
    text = (tmp_path / "results.jsonl").read_text()
    assert text.count("\n") == n and (n == 0 or text.endswith("}\n"))


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=30),
        min_size=1,
        max_size=5,
        unique=True,
    )
)
def test_hostile_names_each_stay_one_json_line(names: list[str]) -> None:
    # Quotes, backslashes, newlines, NUL, RTL marks, emoji: one line per item, intact.
    items = [Item(name, "succeeded", billed_run=2) for name in names]
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(dir=shm) as tmp:
        built = _make(Path(tmp), items)
    assert sorted(x["key"] for x in built.lines) == sorted(names)
    for line in built.lines:
        assert line["input_rel"] == f"in/{line['key']}.jpg"
        assert line["output_rel"].endswith(line["input_rel"])
