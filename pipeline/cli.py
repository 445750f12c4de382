"""The ``pipeline`` command: argument parsing and exit codes, no logic.

Exit codes: 0 every item succeeded or was already done; 1 the run finished and some
items failed; 2 usage, config or manifest error (nothing was sent); 3 aborted by a
fatal condition (bad key, no credits, retired endpoint, lock held); 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio

from pipeline import __version__
from pipeline.errors import PipelineError, UsageError

__all__ = ["main"]

log = logging.getLogger("pipeline")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline",
        description="Push folders of portraits through AILabTools and Perfect Corp APIs in bulk.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every retry and poll")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a job (resumes from the journal in the output folder)")
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
    run.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")

    validate = sub.add_parser("validate", help="check manifest, config and inputs; sends nothing")
    validate.add_argument("manifest", type=Path, metavar="MANIFEST")
    validate.add_argument("--config", type=Path, metavar="PATH")

    emulate = sub.add_parser("emulate", help="serve both vendors' APIs until SIGINT/SIGTERM")
    emulate.add_argument("--host", default="127.0.0.1")
    emulate.add_argument("--port", type=int, default=8765)
    emulate.add_argument(
        "--scenario", type=Path, metavar="PATH", help="scenario YAML (faults, limits)"
    )

    report = sub.add_parser("report", help="rebuild report.json and results.jsonl from the journal")
    report.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR")
    _add_export_parser(sub)
    return parser


def _add_export_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    export = sub.add_parser(
        "export",
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


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.INFO if verbose else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("pipeline: %(message)s"))
    root = logging.getLogger("pipeline")
    root.handlers[:] = [handler]
    root.setLevel(logging.ERROR if quiet and not verbose else level)
    root.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose, getattr(args, "quiet", False))
    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "validate":
            return _cmd_validate(args)
        if args.command == "emulate":
            return _cmd_emulate(args)
        if args.command == "export":
            return _cmd_export(args)
        return _cmd_report(args)
    except PipelineError as exc:
        print(f"pipeline: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("pipeline: interrupted", file=sys.stderr)
        return 130


def _cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.engine import RunOptions, run_job
    from pipeline.manifest import load_manifest

    manifest = load_manifest(args.manifest)
    config = load_config(args.config)
    options = RunOptions(retry_failed=args.retry_failed, quiet=args.quiet, emulate=args.emulate)
    if args.dry_run:
        from pipeline.plan import print_plan

        return print_plan(manifest, config, options)
    result = anyio.run(run_job, manifest, config, options)
    report = result.report
    counts = report.get("counts", {})
    if result.message:
        print(f"pipeline: {result.message}", file=sys.stderr)
    if not args.quiet or result.exit_code:
        print(
            f"{manifest.name}: {counts.get('succeeded', 0)} succeeded, {counts.get('failed', 0)} failed, "
            f"{counts.get('skipped', 0)} skipped of {counts.get('total', 0)} "
            f"(exit {result.exit_code}); report: {manifest.output / 'report.json'}"
        )
    return result.exit_code


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
    from pipeline.report import build_reports

    output_dir: Path = args.output_dir
    if not output_dir.is_dir():
        raise UsageError(f"{output_dir}: no such output folder")
    report = build_reports(output_dir)
    counts = report["counts"]
    print(
        f"{output_dir}: {counts['succeeded']} succeeded, {counts['failed']} failed, "
        f"{counts['skipped']} skipped of {counts['total']}; wrote report.json and results.jsonl"
    )
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
