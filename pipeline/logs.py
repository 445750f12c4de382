"""How the pipeline talks: log lines for people and for machines, all on stderr.

Two loggers, one handler (on ``pipeline``), set up once by :func:`configure`:

``pipeline``
    Everything the code logs. WARNING by default (item failures, take-overs), INFO
    with ``-v`` (every retry, task id and duplicate), DEBUG with ``-vv``, ERROR with
    ``--quiet``.
``pipeline.events``
    The run's own account, shown by default: ``start``, ``progress``, ``end`` (INFO),
    ``stopped`` and ``error`` (ERROR). ``--quiet`` keeps only the errors.

Text lines (the default) start with an ISO 8601 timestamp with the local UTC offset::

    2026-11-03T02:15:01+01:00 pipeline: start: job nightly (jobs/nightly.yaml) ...
    2026-11-03T02:15:11+01:00 pipeline: progress: 340 of 1204 finished ...
    2026-11-03T02:15:12+01:00 pipeline: warning: a/p1.jpg [ailab/face-swap ...]: ...

``--log-json`` prints one JSON object per line instead, with ``ts`` (ISO 8601),
``level`` (``debug`` | ``info`` | ``warning`` | ``error``), ``event`` (``start`` |
``progress`` | ``item`` | ``end`` | ``stopped`` | ``error`` | ``log`` for any other
line), ``message`` (the text line's words) and the event's fields.

An error that ends a command before a run has started (a bad manifest, a missing key
variable found while loading) is the single line ``pipeline: error: MESSAGE``, with no
timestamp, as every command has always printed it; inside a started run it is
timestamped like the lines around it. Tracebacks are never printed, except the one
of an internal error with ``-v``.

Code that logs an item's outcome passes its fields so ``--log-json`` can carry them::

    log.warning("%s: %s", rel, message, extra=logs.fields("item", input=rel, code=code))
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.manifest import Manifest

__all__ = [
    "EVENTS",
    "EXIT_MEANINGS",
    "LogSettings",
    "configure",
    "emit",
    "error",
    "fields",
    "format_amount",
    "format_duration",
    "format_spend",
    "run_ended",
    "run_started",
    "set_progress_interval",
    "settings",
    "summary_line",
]

ROOT = "pipeline"
EVENTS = "pipeline.events"

# Events whose text line names the event first ("start: ..."); others are bare.
_NAMED_EVENTS = frozenset({"start", "progress", "end", "stopped"})
_FIXED_KEYS = ("ts", "level", "event", "message")

EXIT_MEANINGS: Mapping[int, str] = {
    0: "nothing failed in this run",
    1: "items failed in this run",
    2: "usage, config or manifest error: nothing was sent",
    3: "aborted",
    130: "interrupted: rerun to resume",
}


@dataclass(frozen=True)
class LogSettings:
    """What :func:`configure` decided; :class:`pipeline.progress.Progress` reads it."""

    json: bool = False
    verbosity: int = 0
    quiet: bool = False
    # Seconds between progress lines when no bar is drawn (the config's
    # reporting.progress_interval_seconds, once loaded).
    progress_interval: float = 10.0
    # Set once a run's start line was printed: later errors are timestamped log lines.
    run_started: bool = False


_settings = LogSettings()


def settings() -> LogSettings:
    return _settings


def fields(event: str, **values: Any) -> dict[str, Any]:
    """``extra=`` for a stdlib logging call: the event name and its JSON fields."""
    return {"event": event, "fields": values}


def _timestamp(created: float, timespec: str) -> str:
    return datetime.fromtimestamp(created).astimezone().isoformat(timespec=timespec)


class TextFormatter(logging.Formatter):
    """``TIMESTAMP pipeline: [level: ][event: ]message``; never a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        event = getattr(record, "event", None)
        named = f"{event}: " if event in _NAMED_EVENTS else ""
        ts = _timestamp(record.created, "seconds")
        return f"{ts} pipeline: {level}{named}{record.getMessage()}"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts``, ``level``, ``event``, ``message``, fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _timestamp(record.created, "milliseconds"),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", None) or "log",
            "message": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, Mapping):
            for key, value in extra.items():
                if key not in _FIXED_KEYS:
                    doc[key] = _jsonable(value)
        if record.exc_info and record.exc_info[0] is not None:
            doc["exception"] = record.exc_info[0].__name__  # the type, never a traceback
        return json.dumps(doc, ensure_ascii=False, default=str, allow_nan=False)


def _jsonable(value: Any) -> Any:
    # allow_nan=False above: a NaN or infinity (an ETA not known yet) becomes null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of each record (a library
    caller, or a test runner, may replace it after the CLI configured logging)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure(
    *,
    verbosity: int = 0,
    quiet: bool = False,
    json_lines: bool = False,
    stream: IO[str] | None = None,
) -> LogSettings:
    """Set up the ``pipeline`` loggers (replacing any earlier set-up) and return the
    settings. ``stream`` defaults to the current ``sys.stderr``."""
    global _settings
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger(ROOT)
    root.handlers[:] = [handler]
    root.propagate = False
    if verbosity >= 2:
        level = logging.DEBUG
    elif verbosity == 1:
        level = logging.INFO
    else:
        level = logging.ERROR if quiet else logging.WARNING
    root.setLevel(level)
    events = logging.getLogger(EVENTS)
    events.setLevel(logging.ERROR if quiet and not verbosity else logging.INFO)
    _settings = LogSettings(json=json_lines, verbosity=verbosity, quiet=quiet)
    return _settings


def set_progress_interval(seconds: float) -> None:
    global _settings
    _settings = replace(_settings, progress_interval=float(seconds))


def emit(event: str, message: str, *, level: int = logging.INFO, **values: Any) -> None:
    """Log one event line (``message`` is printed as given, never %-formatted)."""
    logging.getLogger(EVENTS).log(level, "%s", message, extra=fields(event, **values))


def error(message: str, **values: Any) -> None:
    """The line of an error that ends the command (see the module docstring)."""
    if _settings.json or _settings.run_started:
        emit("error", message, level=logging.ERROR, **values)
    else:
        print(f"pipeline: error: {message}", file=sys.stderr, flush=True)


# -- numbers for people ---------------------------------------------------------------------


def format_amount(amount: float) -> str:
    return f"{amount:g}" if amount != int(amount) else str(int(amount))


def format_duration(seconds: float) -> str:
    """``42s``, ``6m52s``, ``3h05m``, ``2d04h``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_spend(spend: Mapping[str, Mapping[str, Any]]) -> str:
    """``ailab 60 credits, perfectcorp 2 units`` from ``{vendor: {amount, unit}}``."""
    parts = [
        f"{vendor} {format_amount(float(entry.get('amount', 0)))} {entry.get('unit', 'credits')}"
        for vendor, entry in sorted(spend.items())
    ]
    return ", ".join(parts) if parts else "nothing"


# -- a run's start and end ------------------------------------------------------------------


def run_started(manifest: Manifest, config: Config, *, emulate: bool, **options: Any) -> None:
    """The start line: the job, the config file in use, the vendors and where they are."""
    global _settings
    from pipeline.runner import vendors_of

    vendors = vendors_of(manifest)
    where = {v: "built-in emulator" if emulate else config.provider(v).base_url for v in vendors}
    shown = (
        ", ".join(vendors) + " (built-in emulator)"
        if emulate
        else ", ".join(f"{v} at {where[v]}" for v in vendors)
    )
    set_options = {k: v for k, v in options.items() if v not in (None, False)}
    flags = "".join(
        f"; --{k.replace('_', '-')}" + ("" if v is True else f" {v}")
        for k, v in set_options.items()
    )
    emit(
        "start",
        f"job {manifest.name} ({manifest.path}) -> {manifest.output}; config {config.source}; "
        f"vendors {shown}{flags}; pid {os.getpid()}",
        manifest=str(manifest.path),
        job=manifest.name,
        output=str(manifest.output),
        config=config.source,
        vendors=where,
        emulator=emulate,
        options=set_options,
        pid=os.getpid(),
    )
    if logging.getLogger(EVENTS).isEnabledFor(logging.INFO) or _settings.json:
        _settings = replace(_settings, run_started=True)


def _counts_text(counts: Mapping[str, Any]) -> str:
    parts = [f"{counts.get('succeeded', 0)} succeeded", f"{counts.get('failed', 0)} failed"]
    if counts.get("failed_earlier"):
        parts.append(f"{counts['failed_earlier']} failed earlier (not retried)")
    if counts.get("interrupted"):
        parts.append(f"{counts['interrupted']} not finished: rerun to resume")
    parts.append(f"{counts.get('skipped', 0)} skipped")
    return ", ".join(parts)


def summary_line(
    name: str, report: Mapping[str, Any], exit_code: int, output_dir: os.PathLike[str] | str
) -> str:
    """The one line on stdout at the end of a run."""
    counts = report.get("counts", {})
    spend = format_spend(report.get("credits_spent", {}))
    html = os.path.join(os.fspath(output_dir), "report.html")
    return (
        f"{name}: {_counts_text(counts)} of {counts.get('total', 0)} (exit {exit_code}); "
        f"spent {spend}; report: {html}"
    )


def run_ended(
    manifest: Manifest,
    report: Mapping[str, Any] | None,
    exit_code: int,
    elapsed: float,
    reason: str = "",
) -> None:
    """The end line: counts, spend, exit code (and why, when the run stopped early)."""
    meaning = EXIT_MEANINGS.get(exit_code, "")
    words = [f"exit {exit_code}" + (f" ({meaning})" if meaning else "")]
    values: dict[str, Any] = {"exit_code": exit_code, "wall_time_seconds": round(elapsed, 3)}
    if report:
        words.append(f"{_counts_text(report.get('counts', {}))} of "
                     f"{report.get('counts', {}).get('total', 0)}")  # fmt: skip
        words.append(f"spent {format_spend(report.get('credits_spent', {}))}")
        values.update(
            counts=dict(report.get("counts", {})),
            credits_spent=dict(report.get("credits_spent", {})),
            paid_lost=report.get("paid_lost", 0),
            report=os.path.join(str(manifest.output), "report.html"),
        )
    if reason:
        words.append(reason)
        values["reason"] = reason
    words.append(f"in {format_duration(elapsed)}")
    emit("end", "; ".join(words), job=manifest.name, **values)
