"""``pipeline validate`` and ``pipeline run --dry-run``: look, count, send nothing billable."""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict

from pipeline.config import Config
from pipeline.engine import RunOptions, vendors_of
from pipeline.errors import PermanentError
from pipeline.images import check_limits, inspect_image
from pipeline.inputs import iter_inputs
from pipeline.manifest import Manifest
from pipeline.operations import OperationSpec

__all__ = ["print_plan", "validate_job"]

# Requests an item needs besides polls, per operation (vendor-protocols.md §1-2):
# AILab one multipart POST; Perfect Corp file record + task create (the S3 PUT is
# not on the API host and is not counted against the budget).
_BASE_REQUESTS = {"ailab": 1, "perfectcorp": 2}
_EXPECTED_POLLS = 2  # without observed durations: one early, one after the task ends


def _problems_for(path_str: str, ops: list[OperationSpec], auto_fix: bool) -> list[str]:
    from pathlib import Path

    path = Path(path_str)
    try:
        info = inspect_image(path)
    except PermanentError as exc:
        return [exc.message]
    out = []
    for op in ops:
        for problem in check_limits(info, op.limits):
            fix = " (auto_fix will try to fix it)" if auto_fix else ""
            out.append(f"{path}: {op.name}: {problem}{fix}")
    return out


def validate_job(manifest: Manifest, config: Config) -> int:
    """Check every input against every operation's limits; print each problem."""
    ops = list({v.operation.name: v.operation for v in manifest.variants}.values())
    total = 0
    bad = 0
    for path in iter_inputs(manifest.base_dir, manifest.inputs, manifest.output):
        total += 1
        problems = _problems_for(str(path), ops, manifest.auto_fix)
        if problems:
            bad += 1
            for line in problems:
                print(line)
    for variant in manifest.variants:
        for name, path in variant.files.items():
            for line in _problems_for(str(path), [variant.operation], manifest.auto_fix):
                print(f"{line} ({name})")
    if not manifest.emulator:
        for vendor in vendors_of(manifest):
            var = config.provider(vendor).api_key_env
            if not os.environ.get(var, "").strip():
                print(
                    f"note: {var} is not set: `pipeline run` needs it for {vendor} (or --emulate)"
                )
    if total == 0:
        print(f"{manifest.path}: no input matched {list(manifest.inputs)}")
        return 1
    print(
        f"{manifest.path}: {total} input(s), {len(manifest.variants)} variant(s), "
        f"{total * len(manifest.variants)} work item(s); {bad} input(s) with problems"
    )
    return 1 if bad else 0


def print_plan(manifest: Manifest, config: Config, options: RunOptions) -> int:
    """Print items, requests, credits and duration expected; send nothing billable."""
    inputs = sum(1 for _ in iter_inputs(manifest.base_dir, manifest.inputs, manifest.output))
    requests: Counter[str] = Counter()
    credits: dict[str, float] = defaultdict(float)
    print(f"plan for {manifest.path} -> {manifest.output}")
    print(f"  inputs: {inputs}")
    for variant in manifest.variants:
        op = variant.operation
        n = inputs
        per_item = _BASE_REQUESTS[op.vendor] + (_EXPECTED_POLLS if op.is_async else 0)
        requests[op.vendor] += n * per_item
        credits[f"{op.vendor} {op.price_unit}"] += n * op.price
        print(
            f"  {op.name} [{variant.label}]: {n} item(s), ~{n * per_item} request(s), {n * op.price:g} {op.price_unit}"
        )
    for vendor, n in sorted(requests.items()):
        limit = config.provider(vendor).rate_limit
        if limit and limit.requests and limit.per_seconds:
            seconds = math.ceil(n / (limit.requests / limit.per_seconds))
            print(
                f"  {vendor}: ~{n} requests; at least {seconds} s under its budget of {limit.requests}/{limit.per_seconds:g} s"
            )
        else:
            print(f"  {vendor}: ~{n} requests; no published rate limit")
    for what, amount in sorted(credits.items()):
        print(f"  expected spend if every item succeeds: {amount:g} {what}")
    print("  nothing was sent (dry run)")
    return 0
