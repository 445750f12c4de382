"""The ``pipeline`` command: argument parsing, log set-up and exit codes; no logic.

Exit codes (README "Exit codes"):

- ``0``: nothing failed in this run. Permanent failures carried over from earlier runs
  are reported, not counted, unless ``--strict``. Also ``run --skip-if-locked`` when
  another run holds the output folder.
- ``1``: the run finished and items failed in it (with ``--strict``: or carried-over
  failures remain).
- ``2``: usage, config, manifest or journal error, or no input matched (nothing sent).
- ``3``: aborted by a fatal condition (bad key, no credits, retired endpoint, vendor
  unreachable, ``max_credits``, another run holds the lock, an OS error during a run),
  or an internal error (a bug: the line says so; ``-v`` adds the traceback).
- ``130``: interrupted; the journal has every finished step and a rerun resumes.

Every error is one line on stderr (``pipeline: error: ...``, or a JSON line with
``--log-json``), never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import anyio

from pipeline import __version__, logs
from pipeline._collector import collection_paused
from pipeline.errors import LockHeldError, PipelineError, UsageError

if TYPE_CHECKING:
    from pipeline.manifest import Manifest

__all__ = ["main"]

EXIT_INTERNAL = 3


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit 2) like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"pipeline: error: {message} (see `{self.prog} --help`)\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give at least 1")
    return value


def _common() -> _Parser:
    """Options every command takes, before or after its name (``pipeline -v run`` and
    ``pipeline run -v``). SUPPRESS: a subcommand that doesn't see one keeps the top
    level's value."""
    common = _Parser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS,
        help="log every retry, task id and poll (-vv: debug)",
    )  # fmt: skip
    common.add_argument(
        "--log-json", action="store_true", default=argparse.SUPPRESS,
        help="log lines as JSON objects (ts, level, event, message, fields)",
    )  # fmt: skip
    return common


def _parser() -> _Parser:
    common = _common()
    parser = _Parser(
        prog="pipeline",
        description="Push folders of portraits through AILabTools and Perfect Corp APIs in bulk.",
        epilog="Exit codes: 0 nothing failed in this run; 1 items failed in this run; "
        "2 usage, config or manifest error (nothing sent); 3 aborted (fatal vendor error, "
        "lock held, internal error); 130 interrupted (rerun to resume).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log every retry and poll"
    )
    parser.add_argument("--log-json", action="store_true", default=False, help="JSON log lines")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run_parser(sub, common)
    _add_other_parsers(sub, common)
    _add_export_parser(sub, common)
    return parser


def _add_run_parser(sub: argparse._SubParsersAction[_Parser], common: _Parser) -> None:
    run = sub.add_parser(
        "run", parents=[common], help="run a job (resumes from the journal in the output folder)"
    )
    run.add_argument("manifest", type=Path, metavar="MANIFEST")
    run.add_argument(
        "--config", type=Path, metavar="PATH", help="config file (default ./config.yaml)"
    )
    run.add_argument(
        "--emulate", action="store_true", help="use the built-in emulator of both vendors"
    )
    run.add_argument("--dry-run", action="store_true", help="print the plan; send nothing billable")
    run.add_argument(
        "--retry-failed", action="store_true", help="retry items that failed permanently"
    )
    run.add_argument(
        "--quiet", action="store_true", help="only the summary line and errors; no bar"
    )
    run.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 also when permanent failures carried over from earlier runs remain",
    )
    run.add_argument(
        "--skip-if-locked",
        action="store_true",
        help="exit 0 with one line when another run holds the output folder (cron overlap)",
    )
    run.add_argument(
        "--limit",
        type=_positive,
        metavar="N",
        help="process at most N new items (a trial run); a rerun continues",
    )


def _add_other_parsers(sub: argparse._SubParsersAction[_Parser], common: _Parser) -> None:
    """validate, emulate, report, status and ops."""
    validate = sub.add_parser(
        "validate", parents=[common], help="check manifest, config and inputs; sends nothing"
    )
    validate.add_argument("manifest", type=Path, metavar="MANIFEST")
    validate.add_argument("--config", type=Path, metavar="PATH")

    emulate = sub.add_parser(
        "emulate", parents=[common], help="serve both vendors' APIs until SIGINT/SIGTERM"
    )
    emulate.add_argument("--host", default="127.0.0.1")
    emulate.add_argument("--port", type=int, default=8765)
    emulate.add_argument(
        "--scenario", type=Path, metavar="PATH", help="scenario YAML (faults, limits)"
    )

    report = sub.add_parser(
        "report",
        parents=[common],
        help="rebuild report.json, results.jsonl and report.html from the journal",
    )
    report.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR")
    report.add_argument("--config", type=Path, metavar="PATH", help="for reporting.reports_keep")

    status = sub.add_parser(
        "status",
        parents=[common],
        help="counts, spend to date, failures by code with examples, what to run next",
    )
    status.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR")

    sub.add_parser(
        "ops", parents=[common], help="every operation, its params, ranges, enum names and price"
    )


def _add_export_parser(sub: argparse._SubParsersAction[_Parser], common: _Parser) -> None:
    export = sub.add_parser(
        "export",
        parents=[common],
        help="the results, with their inputs and readable labels, as a dataset",
        description="Export the done items of OUTPUT_DIR (read from its results.jsonl) as "
        "a dataset: 'imagefolder' loads with datasets.load_dataset('imagefolder', "
        "data_dir=DIR) as before/after pairs with label columns; 'webdataset' writes tar "
        "shards. Failed and duplicate items are left out and counted.",
    )
    export.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR")
    export.add_argument(
        "--format", required=True, choices=["imagefolder", "webdataset"], dest="export_format"
    )
    export.add_argument("--to", required=True, type=Path, metavar="DIR", help="an empty folder")
    export.add_argument(
        "--force", action="store_true", help="write into a non-empty DIR, replacing same names"
    )
    export.add_argument(
        "--link",
        action="store_true",
        help="imagefolder: hard-link files instead of copying them (fast, no extra space). "
        "A linked file IS the paid result: editing it in DIR edits it in OUTPUT_DIR too. "
        "Copies (and says so) when DIR is on another filesystem",
    )
    export.add_argument(
        "--shard-size", type=int, default=1000, metavar="N", help="webdataset: samples per shard"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.configure(
        verbosity=args.verbose, quiet=getattr(args, "quiet", False), json_lines=args.log_json
    )
    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "validate":
            return _cmd_validate(args)
        if args.command == "emulate":
            return _cmd_emulate(args)
        if args.command == "export":
            return _cmd_export(args)
        if args.command == "status":
            return _cmd_status(args)
        if args.command == "ops":
            return _cmd_ops()
        return _cmd_report(args)
    except BaseException as exc:
        return _fail(exc, args)


def _fail(exc: BaseException, args: argparse.Namespace) -> int:
    """Print the one line an error ends a command with; return its exit code."""
    if isinstance(exc, SystemExit | GeneratorExit):
        raise exc
    if isinstance(exc, KeyboardInterrupt):
        logs.error("interrupted; every finished step is journaled: rerun to resume")
        return 130
    if isinstance(exc, PipelineError):
        logs.error(str(exc), exit_code=exc.exit_code)
        return exc.exit_code
    if isinstance(exc, BrokenPipeError) and args.command != "run":
        # `pipeline ops | head`: the reader has gone; not an error. Point stdout at
        # /dev/null so the interpreter's final flush does not complain either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        what = exc.strerror or str(exc) or type(exc).__name__
        # A run stopped by the OS is aborted (its journal keeps what was done); any
        # other command could not read or write what it was given.
        code = 3 if args.command == "run" else 2
        logs.error(f"{where}{what}; check the path, its permissions and free space", exit_code=code)
        return code
    if not isinstance(exc, Exception):
        raise exc
    text = " ".join(str(exc).split())[:300]
    logs.error(
        f"internal error ({type(exc).__name__}: {text}); this is a bug, please report it "
        "with the output of the same command run with -v",
        exit_code=EXIT_INTERNAL,
    )
    if args.verbose:
        traceback.print_exception(exc, file=sys.stderr)
    return EXIT_INTERNAL


def _lock_holder(output: Path) -> LockHeldError | None:
    """Whether another run holds ``output`` now (for ``--skip-if-locked``: checked before
    the start line, so a skipped run prints its one line and nothing else)."""
    from pipeline.lock import OutputLock

    if not output.is_dir():
        return None
    try:
        with OutputLock(output):
            return None
    except LockHeldError as exc:
        return exc


def _cmd_run(args: argparse.Namespace) -> int:
    # The modules, pydantic's schemas and the manifest made here live as long as the
    # process: no collection while they are made, and then out of the collector's
    # sight, so a full collection during the run costs a fraction of a millisecond,
    # not 10-20 ms (README "Performance"). The CLI owns its process; run_job leaves a
    # caller's collector alone.
    with collection_paused(freeze=True):
        from pipeline.config import load_config
        from pipeline.engine import RunOptions, run_job
        from pipeline.manifest import load_manifest

        manifest = load_manifest(args.manifest)
        config = load_config(args.config)
    logs.set_progress_interval(config.reporting.progress_interval_seconds)
    options = RunOptions(
        retry_failed=args.retry_failed, quiet=args.quiet, emulate=args.emulate,
        strict=args.strict, limit=args.limit,
    )  # fmt: skip
    if args.dry_run:
        from pipeline.plan import print_plan

        return print_plan(manifest, config, options)
    if args.skip_if_locked:
        held = _lock_holder(manifest.output)
        if held is not None:
            return _skipped(manifest, held)
    logs.run_started(
        manifest, config, emulate=args.emulate or manifest.emulator,
        retry_failed=args.retry_failed, strict=args.strict, limit=args.limit,
    )  # fmt: skip
    started = time.monotonic()
    try:
        result = anyio.run(run_job, manifest, config, options)
    except LockHeldError as exc:
        if args.skip_if_locked:  # taken between the check and the run
            return _skipped(manifest, exc)
        code = _fail(exc, args)
        logs.run_ended(manifest, None, code, time.monotonic() - started, str(exc))
        return code
    except BaseException as exc:
        code = _fail(exc, args)
        logs.run_ended(manifest, None, code, time.monotonic() - started)
        return code
    if result.message:
        logs.emit("stopped", result.message, level=logging.ERROR, exit_code=result.exit_code)
    print(
        logs.summary_line(manifest.name, result.report, result.exit_code, manifest.output),
        flush=True,  # before the end line when both go to one log file
    )
    logs.run_ended(
        manifest, result.report, result.exit_code, time.monotonic() - started, result.message
    )
    return result.exit_code


def _skipped(manifest: Manifest, held: LockHeldError) -> int:
    print(f"{manifest.name}: not run (--skip-if-locked): {held}", flush=True)
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.manifest import load_manifest
    from pipeline.plan import validate_job

    manifest = load_manifest(args.manifest)
    config = load_config(args.config)
    return validate_job(manifest, config)


def _cmd_emulate(args: argparse.Namespace) -> int:
    from pipeline.emulator import load_scenario, serve

    scenario = load_scenario(args.scenario)
    try:
        serve(args.host, args.port, scenario)
    except OSError as exc:
        raise UsageError(
            f"cannot listen on {args.host}:{args.port} ({exc.strerror}); choose another --port"
        ) from None
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.htmlreport import build_html_for
    from pipeline.report import build_reports

    output_dir: Path = args.output_dir
    if not output_dir.is_dir():
        raise UsageError(f"{output_dir}: no such output folder")
    config = load_config(args.config)
    report = build_reports(output_dir)
    html = build_html_for(output_dir, reports_keep=config.reporting.reports_keep)
    counts = report["counts"]
    print(
        f"{output_dir}: {counts['succeeded']} succeeded, {counts['failed']} failed, "
        f"{counts['skipped']} skipped of {counts['total']}; wrote report.json, results.jsonl "
        f"and {html}"
    )
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from pipeline.status import status_lines

    for line in status_lines(args.output_dir):
        print(line)
    return 0


def _cmd_ops() -> int:
    from pipeline.status import ops_lines

    for line in ops_lines():
        print(line)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from pipeline.export import export_dataset

    summary = export_dataset(
        args.output_dir,
        args.export_format,
        args.to,
        force=args.force,
        link=args.link,
        shard_size=args.shard_size,
    )
    print(summary.line())
    return 0
