"""``report.json`` and ``results.jsonl``, derived from the journal alone.

Both are rebuilt from the journal at the end of every run and by
``pipeline report OUTPUT_DIR``, so they always agree with it and with the files on
disk. They cover the latest run: every item it met (new, resumed, skipped, carried
over, unfinished) and every duplicate input it met, one ``results.jsonl`` line each.

What an item's line and count say follows from ``items.run_status``, its outcome
in the run that last met it:

==================  ==================  ======================================
``run_status``      line ``status``     counted in ``counts``
==================  ==================  ======================================
``succeeded``       ``succeeded``       ``succeeded``
``failed``          ``failed``          ``failed`` (this run: sets exit code 1)
``skipped``         ``skipped``         ``skipped`` (done by an earlier run)
``failed_earlier``  ``failed``          ``failed_earlier`` (``carried_over``)
none (unfinished)   ``interrupted``     ``interrupted`` (error ``INTERRUPTED``)
a duplicate         ``skipped``         ``skipped`` (and ``duplicates``)
==================  ==================  ======================================

So ``counts.total`` is the number of ``results.jsonl`` lines, and the other counts
add up to it. Spend is counted as the vendor bills: an item costs its price in the
run in which the vendor billed it (``items.billed_run``), whether or not its result
was kept; ``paid_lost`` says how many billed results were lost.

``report.json`` beyond ``counts`` and ``by_operation``: ``errors_by_code`` /
``errors_by_kind`` (this run's failures) and ``errors_earlier_by_code`` /
``errors_earlier_by_kind`` (carried over), ``error_examples`` (a few inputs per code);
``credits_spent`` (this run, as billed), ``credits_spent_total`` (the folder, to date),
``max_credits``; ``paid_lost`` (billed results lost in this run) with
``paid_lost_items`` (the first few), ``paid_lost_total`` (the folder),
``paid_not_stored`` (billed, kept for the rerun to store); ``possibly_billed`` (items
this run sent whose send had an unknown outcome) and ``possibly_billed_total``;
``poll_lag_seconds`` ``{mean, p95, tasks}`` and ``polls_per_task`` per operation
``{tasks, mean, max, p95}`` over the async tasks this run finished; ``folder_totals``
(every item in the journal by status); ``duplicates``; ``auto_fixed``; the engine's
``requests``, ``rate_budget``, ``first_poll_seconds``, ``aborted``, ``interrupted``;
``wall_time_seconds`` and ``report_seconds``.

The build streams: one query over the run's items, one ``json.dumps`` per line, and
per-line work kept to lookups (readable params are worked out once per distinct
params string), so a nightly rerun of 10^6 done items writes both files in seconds.
"""

from __future__ import annotations

import heapq
import json
import math
import sqlite3
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from pipeline.journal import (
    JOURNAL_NAME,
    PAID_LOST_CODES,
    DuplicateRow,
    Journal,
    RunRecord,
    RunRow,
    folder_counts,
    iter_run_duplicates,
    iter_run_rows,
    latest_run,
)
from pipeline.manifest import _display_name
from pipeline.operations import OPERATIONS, OperationSpec
from pipeline.outputs import atomic_open_text, atomic_write_text

if TYPE_CHECKING:
    from pipeline.htmlreport import Collector

__all__ = [
    "COUNT_KEYS",
    "INTERRUPTED",
    "LINE_FIELDS",
    "REPORT_NAME",
    "RESULTS_NAME",
    "build_reports",
    "write_report_json",
]

REPORT_NAME = "report.json"
RESULTS_NAME = "results.jsonl"

# The keys of ``counts`` and of each ``by_operation`` entry (DESIGN "Outputs").
COUNT_KEYS = ("total", "succeeded", "failed", "failed_earlier", "skipped", "interrupted")

INTERRUPTED = {
    "code": "INTERRUPTED",
    "message": "the run stopped before this item finished; rerun the manifest to resume it",
    "kind": "retryable",
}

# run_status -> the count it falls in; anything else (None: met, not finished) is
# "interrupted".
_CATEGORY = {
    "succeeded": "succeeded",
    "failed": "failed",
    "skipped": "skipped",
    "failed_earlier": "failed_earlier",
}
# count -> the line's ``status`` (DESIGN "Outputs": four statuses only).
_LINE_STATUS = {
    "succeeded": "succeeded",
    "failed": "failed",
    "skipped": "skipped",
    "failed_earlier": "failed",
    "interrupted": "interrupted",
}
_KINDS = frozenset({"retryable", "permanent", "fatal"})
_LOST = frozenset(PAID_LOST_CODES)
_EXAMPLES = 3  # example inputs kept per error code
_LOST_EXAMPLES = 20
_FIXED_CACHE_MAX = 4096
_WRITE_BATCH = 512
# results.jsonl is for machines: compact separators make it 6% smaller. One encoder
# for the whole build: json.dumps with options builds a new one per call.
_encode = json.JSONEncoder(separators=(",", ":")).encode
# The string encoder that encoder uses (ensure_ascii): C where available.
_encode_str = json.encoder.encode_basestring_ascii


# -- readable params --------------------------------------------------------------------


@dataclass(frozen=True)
class _OpView:
    """What the report needs of one operation, worked out once per build."""

    vendor: str | None
    price: float
    unit: str
    is_async: bool
    # enum/choice param -> vendor code -> readable name (manifest.py's own rule)
    names: dict[str, dict[int | str, str]]
    templates: tuple[str, ...]  # path params (face swap's image_template)

    @staticmethod
    def of(spec: OperationSpec | None) -> _OpView:
        if spec is None:  # an operation this release no longer knows
            return _OpView(None, 0.0, "credits", False, {}, ())
        names = {
            p.name: {code: _display_name(p, code) for code in p.choices.values()}
            for p in spec.params
            if p.kind in ("enum", "choice")
        }
        templates = tuple(p.name for p in spec.params if p.kind == "path")
        return _OpView(spec.vendor, spec.price, spec.price_unit, spec.is_async, names, templates)


@dataclass(frozen=True)
class _ParamsView:
    params: Any
    readable: Any
    template: str | None


def _params_view(op: _OpView, raw: str) -> _ParamsView:
    try:
        params = json.loads(raw)
    except ValueError:
        params = None
    if not isinstance(params, dict):
        return _ParamsView(params, params, None)
    readable: dict[str, Any] = {}
    for name, value in params.items():
        table = op.names.get(name)
        if table is not None and type(value) in (int, str):
            value = table.get(value, str(value))
        readable[name] = value
    template = next((str(params[n]) for n in op.templates if params.get(n)), None)
    return _ParamsView(params, readable, template)


# -- the build ----------------------------------------------------------------------------


def build_reports(
    output_dir: Path,
    exit_code_for: Callable[[Mapping[str, int]], int] | None = None,
    *,
    collector: Collector | None = None,
    integrity_check: bool = True,
    finishing: tuple[float, Mapping[str, Any]] | None = None,
    write_report: bool = True,
) -> dict[str, Any]:
    """Rewrite ``report.json`` and ``results.jsonl`` from the journal; return the report.

    ``write_report=False``: ``results.jsonl`` only; the caller writes ``report.json``
    last, with :func:`write_report_json` (the end of a run: ``report.html`` first, so
    the run's wall time covers every report).

    ``finishing``: ``(finished_at, stats)`` of the latest run, which is ending and
    records them (with its exit code) once the report is built: the report takes
    them from here instead of from the journal, so the end of a run makes one commit,
    not two (README "Performance").

    ``integrity_check=False``: the caller's run checked the journal when it opened it.

    Synchronous (SQLite and file I/O): call it from a worker thread in async code.
    ``exit_code_for`` decides the run's exit code from ``counts`` (the engine passes
    it at the end of a run, before it records the run as finished); otherwise the
    exit code recorded in the journal is used. With ``exit_code_for`` the wall time
    runs until ``report.json`` is written (reports included); without it, it is the
    run's recorded start-to-finish time.
    ``collector`` (a :class:`pipeline.htmlreport.Collector`) is given every line as it
    is written, for ``report.html`` without reading ``results.jsonl`` again.
    Raises :class:`pipeline.errors.JournalError` for a missing or damaged journal.
    """
    output_dir = output_dir.resolve()
    conn = Journal.open_sync(
        output_dir / JOURNAL_NAME, create=False, integrity_check=integrity_check
    )
    try:
        report = _build(conn, output_dir, exit_code_for, collector, finishing)
    finally:
        conn.close()
    if write_report:
        write_report_json(output_dir, report)
    return report


def write_report_json(output_dir: Path, report: Mapping[str, Any]) -> None:
    """Write ``report`` as ``report.json`` (atomically, durably)."""
    atomic_write_text(output_dir / REPORT_NAME, json.dumps(report, indent=2, sort_keys=True) + "\n")


@dataclass
class _Tally:
    """Everything ``report.json`` counts, filled line by line."""

    counts: Counter[tuple[str, str]] = field(default_factory=Counter)  # (op, count)
    errors: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (count, code, kind)
    examples: dict[str, list[str]] = field(default_factory=dict)
    credits: dict[str, float] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    paid_lost: list[dict[str, str]] = field(default_factory=list)
    paid_lost_count: int = 0
    paid_not_stored: int = 0
    possibly_billed: int = 0
    duplicates: int = 0
    auto_fixed: int = 0
    poll_lags: array[float] = field(default_factory=lambda: array("d"))
    polls: dict[str, Counter[int]] = field(default_factory=dict)


# The fields of every results.jsonl line (DESIGN "Outputs"). Those that follow from
# the item's variant and outcome are "fixed": serialised once per distinct
# (operation, variant, params, outcome) and spliced before the rest of the line.
FIXED_FIELDS = (
    "operation", "variant", "params", "params_readable", "template", "status",
    "carried_over", "duplicate_of",
)  # fmt: skip
ITEM_FIELDS = (
    "key", "input", "input_rel", "output", "output_rel", "attempts", "polls", "task_id",
    "error", "billed", "possibly_billed", "changes",
)  # fmt: skip
LINE_FIELDS = FIXED_FIELDS + ITEM_FIELDS


def _error_fields(row: RunRow) -> dict[str, Any]:
    """The ``error`` of a results line for an item that failed (or is failing)."""
    code = row.error_code or "UNKNOWN"
    kind = row.error_kind if row.error_kind in _KINDS else "permanent"
    return {"code": code, "message": row.error_message or "", "kind": kind}


class _Lines:
    """Turns journal rows into ``results.jsonl`` lines and tallies them.

    A line is ``fixed + "," + encode(rest)[1:]`` where ``fixed`` is the cached
    serialisation of the fixed fields without its closing brace: one ``json.dumps``
    of twelve fields per line instead of twenty with two nested objects. The line is
    the same JSON object either way (tests parse every line).
    """

    def __init__(self, output_dir: Path, tally: _Tally, collector: Collector | None = None) -> None:
        self.prefix = str(output_dir) + "/"
        self.tally = tally
        self.collector = collector
        self.ops: dict[str, _OpView] = {}
        self.fixed: dict[tuple[str, str, str, str, str | None], str] = {}

    def _op(self, name: str) -> _OpView:
        view = self.ops.get(name)
        if view is None:
            view = self.ops[name] = _OpView.of(OPERATIONS.get(name))
            if view.vendor is not None:
                self.tally.credits.setdefault(view.vendor, 0)
                self.tally.units[view.vendor] = view.unit
        return view

    def _fixed(self, op: _OpView, row: RunRow, count: str, duplicate_of: str | None = None) -> str:
        cache_key = (row.operation, row.variant, row.params, count, duplicate_of)
        fixed = self.fixed.get(cache_key)
        if fixed is None:
            if len(self.fixed) >= _FIXED_CACHE_MAX:
                self.fixed.clear()  # bounded, whatever the journal holds
            pv = _params_view(op, row.params)
            fixed = _encode(
                {
                    "operation": row.operation,
                    "variant": row.variant,
                    "params": pv.params,
                    "params_readable": pv.readable,
                    "template": pv.template,
                    "status": _LINE_STATUS[count],
                    "carried_over": count == "failed_earlier",
                    "duplicate_of": duplicate_of,
                }
            )[:-1]
            self.fixed[cache_key] = fixed
        return fixed

    def item(self, row: RunRow) -> str:
        """The line of an item the run met (no newline), tallied."""
        tally = self.tally
        op = self._op(row.operation)
        count = _CATEGORY.get(row.run_status or "", "interrupted")
        tally.counts[(row.operation, count)] += 1
        error: dict[str, Any] | None = None
        output: str | None = None
        if count == "succeeded" or count == "skipped":
            output = row.output
        elif count == "interrupted":
            error = INTERRUPTED
        else:
            error = self._error(row, count)
        if row.billed_here and op.vendor is not None:
            tally.credits[op.vendor] += op.price
        if count != "skipped" and count != "failed_earlier":  # this run worked on it
            if row.unknown_total:
                tally.possibly_billed += 1
            if row.status == "ready":
                tally.paid_not_stored += 1
            if op.is_async and count != "interrupted":
                if row.poll_lag is not None:
                    tally.poll_lags.append(row.poll_lag)
                if row.polls:
                    tally.polls.setdefault(row.operation, Counter())[row.polls] += 1
        changes = json.loads(row.changes) if row.changes and row.changes != "[]" else []
        if changes:
            tally.auto_fixed += 1
        if self.collector is not None:
            self.collector.add(
                status=_LINE_STATUS[count], carried=count == "failed_earlier",
                operation=row.operation, variant=row.variant, input_rel=row.input_rel,
                input_path=row.input_path, key=row.key, output_rel=output or None,
                error=error, changes=changes, duplicate_of=None, task_id=row.task_id,
            )  # fmt: skip
        rest = self._rest(
            row.key,
            row.input_path,
            row.input_rel,
            output,
            error,
            attempts=row.attempts,
            polls=row.polls,
            task_id=row.task_id,
            billed=bool(row.billed),
            possibly_billed=row.unknown_total > 0,
            changes=changes,
        )
        return self._fixed(op, row, count) + "," + rest

    def _rest(
        self,
        key: str,
        input_path: str,
        input_rel: str,
        output: str | None,
        error: dict[str, Any] | None,
        *,
        attempts: int = 0,
        polls: int = 0,
        task_id: str | None = None,
        billed: bool = False,
        possibly_billed: bool = False,
        changes: list[Any] | None = None,
    ) -> str:
        """A line's fields after the fixed ones, encoded, without the opening brace
        (the defaults: an input that sent nothing).

        Spliced from the encoding of each value (the C string encoder ``json`` uses):
        the same text as ``_encode`` of the dict, at a third of the cost.
        """
        text = _encode_str
        if output:
            out = text(self.prefix + output)
            out_rel = text(output)
        else:
            out = out_rel = "null"
        return (
            f'"key":{text(key)},"input":{text(input_path)},"input_rel":{text(input_rel)},'
            f'"output":{out},"output_rel":{out_rel},"attempts":{int(attempts)},'
            f'"polls":{int(polls)},"task_id":{"null" if task_id is None else text(task_id)},'
            f'"error":{"null" if error is None else _encode(error)},'
            f'"billed":{"true" if billed else "false"},'
            f'"possibly_billed":{"true" if possibly_billed else "false"},'
            f'"changes":{_encode(changes) if changes else "[]"}}}'
        )

    def _error(self, row: RunRow, count: str) -> dict[str, Any]:
        error = _error_fields(row)
        code, kind = error["code"], error["kind"]
        tally = self.tally
        tally.errors[(count, code, kind)] += 1
        examples = tally.examples.setdefault(code, [])
        if len(examples) < _EXAMPLES:
            examples.append(row.input_rel)
        if count == "failed" and code in _LOST and row.status == "failed":
            tally.paid_lost_count += 1
            if len(tally.paid_lost) < _LOST_EXAMPLES:
                tally.paid_lost.append(
                    {"input_rel": row.input_rel, "operation": row.operation, "code": code}
                )
        return error

    def duplicate(self, dup: DuplicateRow) -> str:
        """The line of a duplicate input: it shares its carrier's output, sent nothing."""
        self.tally.duplicates += 1
        carrier = dup.carrier
        output: str | None = None
        error: dict[str, Any] | None = None
        if carrier is None:
            # Its carrier never got a row (the run stopped first): still a line.
            self.tally.counts[("", "skipped")] += 1
            fixed = _encode(
                {**dict.fromkeys(FIXED_FIELDS), "status": "skipped", "carried_over": False}
            )[:-1]
            operation = variant = ""
            count = "skipped"
        else:
            # A duplicate shares its carrier's outcome: done (skipped, same output), or
            # failed / not finished with the same error.
            count = _CATEGORY.get(carrier.run_status or "", "interrupted")
            if count in ("succeeded", "skipped"):
                count, output = "skipped", carrier.output
            elif count == "interrupted":
                error = INTERRUPTED
            else:
                error = _error_fields(carrier)
            self.tally.counts[(carrier.operation, count)] += 1
            op = self._op(carrier.operation)
            fixed = self._fixed(op, carrier, count, carrier.input_path)
            operation, variant = carrier.operation, carrier.variant
        if self.collector is not None:
            self.collector.add(
                status=_LINE_STATUS[count], carried=count == "failed_earlier",
                operation=operation, variant=variant, input_rel=dup.input_rel,
                input_path=dup.input_path, key=dup.key, output_rel=output or None,
                error=error, changes=None,
                duplicate_of=carrier.input_path if carrier is not None else None, task_id=None,
            )  # fmt: skip
        return fixed + "," + self._rest(dup.key, dup.input_path, dup.input_rel, output, error)


def _write_lines(handle: IO[str], lines: Iterable[str]) -> None:
    batch: list[str] = []
    for line in lines:
        batch.append(line)
        if len(batch) >= _WRITE_BATCH:
            batch.append("")
            handle.write("\n".join(batch))
            batch.clear()
    if batch:
        batch.append("")
        handle.write("\n".join(batch))


def _build(
    conn: sqlite3.Connection,
    output_dir: Path,
    exit_code_for: Callable[[Mapping[str, int]], int] | None,
    collector: Collector | None = None,
    finishing: tuple[float, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    built = time.time()
    run = latest_run(conn)
    if run is not None and finishing is not None:
        finished_at, stats = finishing
        # As the journal gives them back once recorded (JSON: tuples become lists).
        run = replace(run, finished_at=finished_at, stats=json.loads(json.dumps(stats)))
    tally = _Tally()
    lines = _Lines(output_dir, tally, collector)
    with atomic_open_text(output_dir / RESULTS_NAME) as handle:
        if run is not None:
            _write_lines(handle, map(lines.item, iter_run_rows(conn, run.id)))
            _write_lines(handle, map(lines.duplicate, iter_run_duplicates(conn, run.id)))
    report = _report(conn, run, output_dir, tally)
    if exit_code_for is not None:
        report["exit_code"] = exit_code_for(report["counts"])
        if run is not None:
            report["wall_time_seconds"] = round(time.time() - run.started_at, 3)
    report["report_seconds"] = round(time.time() - built, 3)
    return report


def _report(
    conn: sqlite3.Connection, run: RunRecord | None, output_dir: Path, tally: _Tally
) -> dict[str, Any]:
    stats = run.stats if run else {}
    by_op: dict[str, dict[str, int]] = {}
    for (op, count), n in tally.counts.items():
        entry = by_op.setdefault(op or "(unknown)", dict.fromkeys(COUNT_KEYS, 0))
        entry[count] += n
        entry["total"] += n
    counts = dict.fromkeys(COUNT_KEYS, 0)
    for entry in by_op.values():
        for key in COUNT_KEYS:
            counts[key] += entry[key]
    folder = folder_counts(conn)
    wall = (run.finished_at or run.started_at) - run.started_at if run else 0.0
    return {
        "run_id": run.id if run else None,
        "manifest": run.manifest if run else None,
        "output_dir": str(output_dir),
        "started_at": run.started_at if run else None,
        "finished_at": run.finished_at if run else None,
        "wall_time_seconds": round(wall, 3),
        "exit_code": run.exit_code if run else None,
        "counts": counts,
        "by_operation": dict(sorted(by_op.items())),
        "errors_by_code": _errors(tally, "failed", 1),
        "errors_by_kind": _errors(tally, "failed", 2),
        "errors_earlier_by_code": _errors(tally, "failed_earlier", 1),
        "errors_earlier_by_kind": _errors(tally, "failed_earlier", 2),
        "error_examples": dict(sorted(tally.examples.items())),
        "requests": stats.get("requests", {}),
        "rate_budget": stats.get("rate_budget", {}),
        "first_poll_seconds": stats.get("first_poll_seconds", {}),
        "credits_spent": {
            vendor: {"amount": amount, "unit": tally.units[vendor]}
            for vendor, amount in sorted(tally.credits.items())
        },
        "max_credits": stats.get("max_credits", {}),
        "paid_lost": tally.paid_lost_count,
        "paid_lost_items": tally.paid_lost,
        "paid_lost_total": folder.paid_lost,
        "paid_not_stored": tally.paid_not_stored,
        "possibly_billed": tally.possibly_billed,
        "possibly_billed_total": folder.possibly_billed,
        "poll_lag_seconds": _lag(tally.poll_lags),
        "polls_per_task": {op: _spread(hist) for op, hist in sorted(tally.polls.items())},
        "auto_fixed": tally.auto_fixed,
        "aborted": stats.get("aborted"),
        "interrupted": bool(stats.get("interrupted", False)),
        "duplicates": tally.duplicates,
        # Journals of the previous release counted duplicates in the run's stats only.
        "duplicates_skipped": tally.duplicates or stats.get("duplicates", 0),
        "folder_totals": {"total": folder.total, **folder.by_status},
        "credits_spent_total": _folder_spend(folder.billed),
    }


def _errors(tally: _Tally, count: str, part: int) -> dict[str, int]:
    out: Counter[str] = Counter()
    for key, n in tally.errors.items():
        if key[0] == count:
            out[key[part]] += n
    return dict(sorted(out.items()))


def _folder_spend(billed: Mapping[str, int]) -> dict[str, dict[str, Any]]:
    """Spend to date per vendor: the price of every item billed, in any run."""
    spend: dict[str, dict[str, Any]] = {}
    for name, n in sorted(billed.items()):
        spec = OPERATIONS.get(name)
        if spec is not None and n:
            entry = spend.setdefault(spec.vendor, {"amount": 0, "unit": spec.price_unit})
            entry["amount"] += spec.price * n
    return dict(sorted(spend.items()))


def _lag(values: array[float]) -> dict[str, Any]:
    """``{mean, p95, tasks}`` of poll lags (seconds); nulls when there are none."""
    n = len(values)
    if not n:
        return {"mean": None, "p95": None, "tasks": 0}
    # Nearest-rank p95 from the top 5% only: bounded memory on a 10^6-task run.
    rank = math.ceil(0.95 * n)
    p95 = min(heapq.nlargest(n - rank + 1, values))
    return {"mean": round(sum(values) / n, 3), "p95": round(p95, 3), "tasks": n}


def _spread(hist: Mapping[int, int]) -> dict[str, Any]:
    """``{tasks, mean, max, p95}`` of polls per task, from a histogram."""
    tasks = sum(hist.values())
    rank = math.ceil(0.95 * tasks)
    seen = 0
    p95 = 0
    for polls in sorted(hist):
        seen += hist[polls]
        if seen >= rank:
            p95 = polls
            break
    total = sum(polls * n for polls, n in hist.items())
    return {"tasks": tasks, "mean": round(total / tasks, 3), "max": max(hist), "p95": p95}
