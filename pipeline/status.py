"""What ``pipeline status OUTPUT_DIR`` and ``pipeline ops`` print.

``status`` reads the journal only (never the lock, which a starting cron run must
find free): the items of every run by state, spend to date, failures by code with
example inputs and what each code means, and the command to run next. ``ops`` prints
every operation from :data:`pipeline.operations.OPERATIONS`: its params with their
ranges and every enum name, its input limits and its price.
"""

from __future__ import annotations

import errno
import os
import shlex
import sqlite3
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pipeline.errors import UsageError
from pipeline.htmlreport import explain_code
from pipeline.journal import (
    JOURNAL_NAME,
    FolderCounts,
    Journal,
    RunRecord,
    failure_counts,
    failure_examples,
    folder_counts,
    latest_run,
    run_count,
)
from pipeline.lock import LOCK_NAME
from pipeline.logs import format_amount, format_duration, format_spend
from pipeline.operations import OPERATIONS, OperationSpec, ParamSpec

__all__ = ["FailureGroup", "FolderStatus", "ops_lines", "read_status", "status_lines"]

EXAMPLES = 3
_WIDTH = 100
_UNFINISHED = ("pending", "submitting", "submitted", "ready")


@dataclass(frozen=True)
class FailureGroup:
    """Items that failed with one code and kind (across every run)."""

    code: str
    kind: str  # retryable | permanent | fatal
    count: int
    operations: tuple[str, ...]
    examples: tuple[str, ...]  # input_rel of up to EXAMPLES items
    message: str  # the first example's error message

    @property
    def vendor(self) -> str | None:
        # The operation's vendor; the name's prefix for one this release no longer knows.
        vendors = {
            spec.vendor if (spec := OPERATIONS.get(op)) is not None else op.split("/", 1)[0]
            for op in self.operations
        }
        return vendors.pop() if len(vendors) == 1 else None


@dataclass(frozen=True)
class FolderStatus:
    output_dir: Path
    counts: FolderCounts
    failures: tuple[FailureGroup, ...]
    last_run: RunRecord | None
    runs: int
    running_pid: int | None  # a run holds the folder now (as far as can be told)
    # (manifest, n): the unfinished items by the manifest of the run that last met
    # them, that run's newest first.
    unfinished_by_manifest: tuple[tuple[str, int], ...] = ()

    @property
    def unfinished(self) -> int:
        return sum(self.counts.by_status.get(s, 0) for s in _UNFINISHED)

    def spend(self) -> dict[str, dict[str, float | str]]:
        """Spend to date per vendor: the price of every item billed, in any run."""
        spend: dict[str, dict[str, float | str]] = {}
        for name, n in sorted(self.counts.billed.items()):
            spec = OPERATIONS.get(name)
            if spec is not None and n:
                entry = spend.setdefault(spec.vendor, {"amount": 0.0, "unit": spec.price_unit})
                entry["amount"] = float(entry["amount"]) + spec.price * n
        return spend


# -- reading (read only; no function of pipeline.journal gives these) ------------------------


def _failure_groups(conn: sqlite3.Connection) -> tuple[FailureGroup, ...]:
    """Failed items grouped by (code, kind), largest first, with example inputs.

    One aggregate scan, then one short query per code (LIMIT, in journal order).
    """
    groups: dict[tuple[str | None, str | None], tuple[int, set[str]]] = {}
    for code, kind, operation, n in failure_counts(conn):
        count, ops = groups.get((code, kind), (0, set()))
        ops.add(operation)
        groups[(code, kind)] = (count + n, ops)
    out = []
    for (code, kind), (count, ops) in groups.items():
        rows = failure_examples(conn, code, kind, EXAMPLES)
        out.append(
            FailureGroup(
                code=code or "UNKNOWN",
                kind=kind if kind in ("retryable", "permanent", "fatal") else "permanent",
                count=count,
                operations=tuple(sorted(ops)),
                examples=tuple(str(r[0]) for r in rows),
                message=str(rows[0][1] or "") if rows else "",
            )
        )
    out.sort(key=lambda g: (-g.count, g.code))
    return tuple(out)


def _unfinished_by_manifest(conn: sqlite3.Connection) -> tuple[tuple[str, int], ...]:
    """The unfinished items by the manifest of the run that last met them: a run of
    that manifest uses their vendors, so it collects them (one aggregate scan)."""
    marks = ",".join("?" * len(_UNFINISHED))
    rows = conn.execute(
        "SELECT runs.manifest, COUNT(*), MAX(runs.id) FROM items JOIN runs ON runs.id = "
        f"items.seen_run WHERE items.status IN ({marks}) GROUP BY runs.manifest "
        "ORDER BY MAX(runs.id) DESC",
        _UNFINISHED,
    ).fetchall()
    return tuple((str(manifest), int(n)) for manifest, n, _ in rows)


def _lock_pid(output_dir: Path) -> int | None:
    """The pid written in the lock file, if that process is alive. Reads the file only:
    taking the lock, even for an instant, could make a starting run exit 3."""
    try:
        fd = os.open(output_dir / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        text = os.read(fd, 64).decode("ascii", "replace").strip()
    except OSError:
        return None
    finally:
        os.close(fd)
    if not text.isdigit():
        return None
    pid = int(text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    except OSError as exc:  # pragma: no cover - other errnos mean "can't tell"
        return pid if exc.errno == errno.EPERM else None
    return pid


def read_status(output_dir: Path) -> FolderStatus:
    """Everything ``pipeline status`` prints, from the folder's journal.

    Raises :class:`UsageError` for a missing folder and
    :class:`pipeline.errors.JournalError` (exit 2) for a missing or damaged journal.
    """
    if not output_dir.is_dir():
        raise UsageError(f"{output_dir}: no such output folder; pass the manifest's output folder")
    output_dir = output_dir.resolve()
    conn = Journal.open_sync(output_dir / JOURNAL_NAME, create=False)
    try:
        counts = folder_counts(conn)
        failures = _failure_groups(conn)
        run = latest_run(conn)
        runs = run_count(conn)
        some = any(counts.by_status.get(s) for s in _UNFINISHED)
        unfinished = _unfinished_by_manifest(conn) if some else ()
    finally:
        conn.close()
    pid = _lock_pid(output_dir)
    running = pid if pid is not None and run is not None and run.finished_at is None else None
    return FolderStatus(output_dir, counts, failures, run, runs, running, unfinished)


# -- writing -----------------------------------------------------------------------------


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def _run_line(st: FolderStatus) -> str:
    run = st.last_run
    if run is None:
        return "runs: none recorded yet"
    text = f"last run: #{run.id} of {st.runs}, {run.manifest}, started {_when(run.started_at)}"
    if st.running_pid is not None:
        return f"{text}, still running (pid {st.running_pid})"
    if run.finished_at is None:
        return f"{text}, stopped without finishing (killed?): a rerun resumes it"
    took = format_duration(run.finished_at - run.started_at)
    code = "unknown" if run.exit_code is None else str(run.exit_code)
    return f"{text}, took {took}, exit {code}"


def _items_line(st: FolderStatus) -> str:
    by = st.counts.by_status
    parts = [f"{by.get('succeeded', 0)} succeeded", f"{by.get('failed', 0)} failed"]
    if st.unfinished:
        paid = by.get("ready", 0)
        extra = f" ({paid} paid for, result not stored yet)" if paid else ""
        parts.append(f"{st.unfinished} not finished{extra}")
    return f"items (all runs): {st.counts.total}: " + ", ".join(parts)


def _next_lines(st: FolderStatus) -> list[str]:
    run = st.last_run
    manifest = shlex.quote(run.manifest) if run is not None else "MANIFEST"
    out: list[str] = []
    if st.running_pid is not None:
        out.append(f"  wait: a run (pid {st.running_pid}) is using this folder now")
    again = [g for g in st.failures if g.kind != "permanent"]
    permanent = [g for g in st.failures if g.kind == "permanent"]
    reasons = []
    # Items an earlier manifest's run left unfinished: the last manifest may not use
    # their vendor, and then its runs leave them (README "Reruns, resume and cron").
    elsewhere = [(m, n) for m, n in st.unfinished_by_manifest if run is None or m != run.manifest]
    for other, n in elsewhere:
        out.append(
            f"  pipeline run {shlex.quote(other)}    # resumes the {n} unfinished item(s) "
            "a run of it left"
        )
    here = st.unfinished - sum(n for _, n in elsewhere)
    if here > 0:
        reasons.append(f"resumes the {here} unfinished item(s)")
    if again:
        reasons.append(f"retries the {sum(g.count for g in again)} retryable failure(s)")
    if reasons:
        out.append(f"  pipeline run {manifest}    # {' and '.join(reasons)}")
    if permanent:
        n = sum(g.count for g in permanent)
        lost = sum(g.count for g in permanent if g.code in ("RESULT_LOST", "RESULT_NOT_IMAGE"))
        note = f"; {lost} of them were paid for and are paid again" if lost else ""
        out.append(
            f"  pipeline run {manifest} --retry-failed    # after fixing the inputs or "
            f"params: sends the {n} permanent failure(s) again{note}"
        )
    if not out:
        out.append(
            f"  nothing to do: every item succeeded; `pipeline run {manifest}` picks up new inputs"
        )
    return out


def status_lines(output_dir: Path) -> Iterator[str]:
    """The lines ``pipeline status OUTPUT_DIR`` prints."""
    st = read_status(output_dir)
    yield f"output folder: {st.output_dir}"
    yield _run_line(st)
    yield _items_line(st)
    yield f"spent to date (all runs): {format_spend(st.spend())}"
    if st.counts.paid_lost:
        yield f"paid for but lost: {st.counts.paid_lost} (see failures below)"
    if st.counts.possibly_billed:
        yield (
            f"possibly billed twice: {st.counts.possibly_billed} item(s) had a send whose "
            "outcome was unknown"
        )
    if st.failures:
        yield "failures by code:"
        for g in st.failures:
            help_ = explain_code(g.code, g.vendor)
            ops = ", ".join(g.operations)
            yield f"  {g.code} ({g.kind}, {ops}): {g.count} item(s), e.g. {', '.join(g.examples)}"
            if g.message:
                yield _wrap(f"last said: {_one_line(g.message)}", "    ")
            yield _wrap(f"what it means: {help_.meaning}", "    ")
            yield _wrap(f"what to do: {help_.todo}", "    ")
    yield "next:"
    yield from _next_lines(st)


def _one_line(text: str, limit: int = 240) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _wrap(text: str, indent: str, hang: str | None = None) -> str:
    return textwrap.fill(
        text, _WIDTH, initial_indent=indent,
        subsequent_indent=indent + "  " if hang is None else hang,
        break_on_hyphens=False, break_long_words=False,
    )  # fmt: skip


# -- pipeline ops ------------------------------------------------------------------------


def _names(spec: ParamSpec) -> list[str]:
    """``name (code)`` per enum value; aliases of the same code folded in."""
    by_code: dict[int | str, list[str]] = {}
    for name, code in spec.choices.items():
        by_code.setdefault(code, []).append(name)
    out = []
    for code, names in by_code.items():
        first, *aliases = names
        bits = [str(code)] if isinstance(code, int) else []
        if aliases:
            bits.append("also " + ", ".join(aliases))
        out.append(f"{first} ({'; '.join(bits)})" if bits else first)
    return out


def _param_lines(spec: ParamSpec) -> list[str]:
    head = spec.name + (" (required)" if spec.required else "")
    if spec.kind == "int":
        what = f"integer {spec.minimum}..{spec.maximum}"
    elif spec.kind == "path":
        what = "path to an image file, relative to the manifest"
    elif spec.kind == "choice":
        what = "one of " + " | ".join(str(c) for c in dict.fromkeys(spec.choices.values()))
    else:
        codes = set(spec.choices.values())
        numeric = all(isinstance(c, int) for c in codes)
        what = f"one of {len(codes)} names" + (" (or their codes)" if numeric else "")
    if spec.default is not None:
        what += f", default {spec.default}"
    lines = [_wrap(f"{head}: {what}" + (f": {spec.help}" if spec.help else ""), "  ", "      ")]
    if spec.kind == "enum":
        # No break inside "name (code)": wrap on the spaces between the items only.
        items = ", ".join(n.replace(" ", "\u00a0") for n in _names(spec))
        lines.append(_wrap(items, "      ").replace("\u00a0", " "))
    if spec.legacy_codes:
        legacy = ", ".join(str(c) for c in sorted(spec.legacy_codes, key=str))
        lines.append(f"      codes {legacy} (the vendor's older table) are refused")
    return lines


def _op_lines(op: OperationSpec) -> list[str]:
    mode = "async task (task id journaled)" if op.is_async else "sync call"
    unit = op.price_unit if op.price != 1 else op.price_unit.rstrip("s")
    pool = f", from the {op.credit_pool} pool (or common credits)" if op.credit_pool else ""
    lines = [
        _wrap(
            f"{op.name}: {op.vendor}, {mode}; {format_amount(op.price)} {unit} per success"
            f" (failures are not billed){pool}",
            "",
        ),
        f"  input: {op.limits.describe()}",
    ]
    for spec in op.params:
        lines.extend(_param_lines(spec))
    return lines


def ops_lines() -> Iterator[str]:
    """The lines ``pipeline ops`` prints: every operation, param, enum name and price."""
    for i, op in enumerate(OPERATIONS.values()):
        if i:
            yield ""
        yield from _op_lines(op)
    yield ""
    yield (
        "Params use the vendor's field names; enum params take a name or its code. A list "
        "value makes one variant per element (several lists: their cross product)."
    )
