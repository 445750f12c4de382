"""``pipeline validate`` and ``pipeline run --dry-run``: look, count, send nothing billable."""

from __future__ import annotations

import math
import os
import sqlite3
from collections import Counter, defaultdict
from pathlib import Path

import anyio

from pipeline.config import Config
from pipeline.errors import PermanentError, VendorError
from pipeline.identity import hash_file, item_key
from pipeline.images import check_limits_fixable, inspect_image, max_input_bytes
from pipeline.inputs import NoInputsMatched, display_path, iter_input_entries, iter_inputs
from pipeline.journal import JOURNAL_NAME, Journal, mean_polls_per_task, succeeded_output
from pipeline.manifest import Manifest
from pipeline.operations import OperationSpec
from pipeline.providers.base import CreditBalance
from pipeline.runner import RunOptions, vendors_of
from pipeline.vendors import VENDORS

__all__ = ["print_plan", "validate_job"]

# Without observations from an earlier run: lean polling settles near one poll a
# task; allow for the first tasks of a run, polled before durations are learned.
_EXPECTED_POLLS = 1.5


def _problems_for(path: Path, ops: list[OperationSpec], auto_fix: bool) -> list[str]:
    try:
        # Nothing larger than the most any of the operations would read is opened.
        info = inspect_image(
            path, max_bytes=max((max_input_bytes(op.limits) for op in ops), default=None)
        )
    except PermanentError as exc:
        return [exc.message]
    out = []
    for op in ops:
        for problem, fixable in check_limits_fixable(info, op.limits):
            fix = " (auto_fix will try to fix it)" if auto_fix and fixable else ""
            out.append(f"{display_path(path)}: {op.name}: {problem}{fix}")
    return out


def validate_job(manifest: Manifest, config: Config) -> int:
    """Check every input against every operation's limits; print each problem.

    One line per problem: ``PATH: OPERATION: problem`` for an image an operation
    would refuse, the entry's own message (``PATH: is a FIFO ...``) for a matched
    entry that is not a usable file (FIFO, socket, device, broken or looping
    symlink, unreadable). Returns 0 when every input is fine, 1 when some are not;
    raises :class:`~pipeline.inputs.NoInputsMatched` (exit 2) when the patterns
    match nothing at all, after the other checks have printed their lines.
    """
    ops = list({v.operation.name: v.operation for v in manifest.variants}.values())
    total = 0
    bad = 0
    nothing: NoInputsMatched | None = None
    try:
        for entry in iter_input_entries(manifest.base_dir, manifest.inputs, manifest.output):
            total += 1
            if entry.problem is not None:
                bad += 1
                print(entry.problem.message)
                continue
            problems = _problems_for(entry.path, ops, manifest.auto_fix)
            if problems:
                bad += 1
                for line in problems:
                    print(line)
    except NoInputsMatched as exc:
        nothing = exc
    for variant in manifest.variants:
        for name, path in variant.files.items():
            for line in _problems_for(path, [variant.operation], manifest.auto_fix):
                print(f"{line} ({name})")
    if not manifest.emulator:
        for vendor in vendors_of(manifest):
            var = config.provider(vendor).api_key_env
            if not os.environ.get(var, "").strip():
                print(
                    f"note: {var} is not set: `pipeline run` needs it for {vendor} (or --emulate)"
                )
    if nothing is not None:
        raise nothing
    print(
        f"{manifest.path}: {total} input(s), {len(manifest.variants)} variant(s), "
        f"{total * len(manifest.variants)} work item(s); {bad} input(s) with problems"
    )
    return 1 if bad else 0


class _JournalView:
    """What earlier runs of this output folder did, read-only (a dry run writes nothing).

    ``done(key)`` is true for an item that succeeded and whose output file is still
    there: exactly what ``run`` would skip, since items are keyed by content, not path.
    ``mean_polls`` is the polls per task observed per operation. No journal: nothing
    done. A damaged journal raises :class:`JournalError`, exactly as ``run`` would.
    """

    def __init__(self, manifest: Manifest) -> None:
        self.output = manifest.output
        self.mean_polls: dict[str, float] = {}
        self._conn: sqlite3.Connection | None = None
        path = manifest.output / JOURNAL_NAME
        if path.exists():
            self._conn = Journal.open_sync(path, create=False)
            self.mean_polls = mean_polls_per_task(self._conn)

    def done(self, key: str) -> bool:
        if self._conn is None:
            return False
        output = succeeded_output(self._conn, key)
        return output is not None and (self.output / output).is_file()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


async def fetch_balances(
    manifest: Manifest, config: Config, emulate: bool
) -> dict[str, CreditBalance | str]:
    """Each used vendor's balance from its credit endpoint (not billable), or why not.

    Only vendors whose key variable is set are asked (or all, against the emulator).
    """
    import aiohttp

    from pipeline.budget import RateBudget
    from pipeline.providers.base import RequestStats
    from pipeline.runner import EMULATOR_KEY, build_provider, point_at

    out: dict[str, CreditBalance | str] = {}
    keys: dict[str, str] = {}
    for vendor in vendors_of(manifest):
        var = config.provider(vendor).api_key_env
        key = os.environ.get(var, "").strip()
        if emulate:
            keys[vendor] = key or EMULATOR_KEY
        elif key:
            keys[vendor] = key
        else:
            out[vendor] = f"not asked: {var} is not set"
    if not keys:
        return out
    emulator = None
    try:
        if emulate:
            from pipeline.emulator import start_emulator

            emulator = await start_emulator()
            config = point_at(config, emulator.base_url)
        timeout = aiohttp.ClientTimeout(
            total=config.timeouts.request_seconds, connect=config.timeouts.connect_seconds
        )
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for vendor, key in keys.items():
                budget = RateBudget(config.provider(vendor).rate_limit)
                provider = build_provider(
                    vendor, session, config.provider(vendor), key, config, RequestStats(), budget
                )
                try:
                    out[vendor] = await provider.credits()
                except VendorError as exc:
                    out[vendor] = f"could not ask: {exc}"
    finally:
        if emulator is not None:
            await emulator.close()
    return out


def print_plan(manifest: Manifest, config: Config, options: RunOptions) -> int:
    """Print what a run would do and cost; send nothing billable.

    Items, variants, what the journal says is already done, requests per vendor,
    credits/units from the documented prices, the time the rate budget needs, and
    (when keys are set, or against the emulator) the balances from the vendors'
    credit endpoints. A balance that is not a finite number (``NaN``, ``Infinity``) is
    reported as unknown, naming the field, and never called enough.
    """
    inputs = list(iter_inputs(manifest.base_dir, manifest.inputs, manifest.output))
    print(f"plan for {manifest.path} -> {manifest.output} (dry run: nothing billable is sent)")
    print(f"  inputs: {len(inputs)}; variants: {len(manifest.variants)}")
    requests, spend, units = _print_variants(manifest, inputs)
    _print_pace(requests, config)
    for vendor in sorted(spend):
        cap = manifest.max_credits.get(vendor)
        capped = f" (max_credits caps it at {cap:g})" if cap is not None else ""
        print(
            f"  {vendor}: expected spend if every item succeeds: {_amount(spend[vendor])} "
            f"{units[vendor]}{capped}"
        )
    emulate = options.emulate or manifest.emulator
    balances = anyio.run(fetch_balances, manifest, config, emulate)
    for vendor, balance in sorted(balances.items()):
        if isinstance(balance, str):
            print(f"  {vendor} balance: {balance}")
            continue
        where = " (emulator)" if emulate else ""
        need = spend.get(vendor, 0.0)
        unreadable = _unreadable_balance(balance)
        if unreadable is not None:
            # Unknown is neither enough nor short: never compared with the price.
            print(
                f"  {vendor} balance{where}: unknown: {unreadable}, not a finite number, so "
                f"the balance is unknown; not compared with the {_amount(need)} "
                f"{balance.unit} needed"
            )
            continue
        verdict = "enough" if balance.balance >= need else f"NOT enough: {_amount(need)} needed"
        print(f"  {vendor} balance{where}: {_amount(balance.balance)} {balance.unit}; {verdict}")
    print("  nothing was sent (dry run)")
    return 0


def _print_variants(
    manifest: Manifest, inputs: list[Path]
) -> tuple[Counter[str], dict[str, float], dict[str, str]]:
    """One line per variant (items, already done, to send, requests, price); returns
    the requests, the spend and the price unit per vendor."""
    requests: Counter[str] = Counter()
    spend: dict[str, float] = defaultdict(float)
    units: dict[str, str] = {}
    view = _JournalView(manifest)
    try:
        # Items are keyed by content, as the run keys them: hash each input once.
        hashes = [_content_hash(path) for path in inputs]
        file_hashes = [
            {name: _content_hash(path) for name, path in variant.files.items()}
            for variant in manifest.variants
        ]
        total_items = total_todo = 0
        for variant, extra in zip(manifest.variants, file_hashes, strict=True):
            op = variant.operation
            todo = sum(
                1
                for content in hashes
                if not view.done(item_key(content, op.name, variant.params, extra))
            )
            polls = view.mean_polls.get(op.name, _EXPECTED_POLLS) if op.is_async else 0.0
            # Requests besides polls: the vendor's (pipeline.vendors, requests_per_item).
            per_item = VENDORS[op.vendor].requests_per_item + polls
            n_requests = math.ceil(todo * per_item)
            requests[op.vendor] += n_requests
            spend[op.vendor] += todo * op.price
            units[op.vendor] = op.price_unit
            total_items += len(inputs)
            total_todo += todo
            print(
                f"  {op.name} [{variant.label}]: {len(inputs)} item(s), {len(inputs) - todo} "
                f"already done, {todo} to send: ~{n_requests} request(s), "
                f"{todo * op.price:g} {op.price_unit}"
            )
    finally:
        view.close()
    print(f"  work items: {total_items}; to send: {total_todo}")
    return requests, spend, units


def _print_pace(requests: Counter[str], config: Config) -> None:
    """The least time each vendor's rate budget needs for its requests."""
    for vendor in sorted(requests):
        n = requests[vendor]
        limit = config.provider(vendor).rate_limit
        if limit is None or not (limit.qps or (limit.requests and limit.per_seconds)):
            print(f"  {vendor}: ~{n} API requests; no published rate limit (429s set the pace)")
            continue
        seconds = n / limit.qps if limit.qps else 0.0
        parts = [f"{limit.qps:g}/s"] if limit.qps else []
        if limit.requests and limit.per_seconds:
            # The first window's worth goes at once; the rest at the sustained rate.
            sustained = max(0, n - limit.requests) * limit.per_seconds / limit.requests
            seconds = max(seconds, sustained)
            parts.insert(0, f"{limit.requests} per {limit.per_seconds:g} s")
        print(
            f"  {vendor}: ~{n} API requests; at least {_duration(seconds)} under its budget "
            f"of {' and '.join(parts)}"
        )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _unreadable_balance(balance: CreditBalance) -> str | None:
    """What makes ``balance`` unreadable, or ``None`` when it is a finite number.

    JSON parsers accept ``NaN``, ``Infinity``, ``-Infinity`` and overflowing numbers
    (``1e999``), and the vendors' parsers keep them as read. Such a balance is
    unknown: not huge (enough), not below any price (short)."""
    spec = VENDORS.get(balance.vendor)
    field = spec.balance_field if spec is not None else "balance"
    bad = [(name, value) for name, value in balance.pools.items() if not math.isfinite(value)]
    if bad:
        pools = ", ".join(f"{_number(value)} (pool {name})" for name, value in bad)
        return f"the vendor's credit answer has {field} = {pools}"
    if not math.isfinite(balance.balance):
        # Finite pools whose sum overflows (two of 1e308).
        return f"the vendor's credit answer has {field} adding up to {_number(balance.balance)}"
    return None


def _number(value: float) -> str:
    """A float as JSON would spell a non-finite one."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return f"{value:g}"


def _amount(value: float) -> str:
    if not math.isfinite(value):  # int() of NaN or Infinity raises
        return _number(value)
    return f"{value:,.0f}" if value == int(value) else f"{value:,.2f}"


def _content_hash(path: Path) -> str:
    try:
        return hash_file(path)
    except OSError:
        return "unreadable:" + str(path)  # as the run keys an unreadable input
