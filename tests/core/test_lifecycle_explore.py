"""Property-based exploration of one item's life (issue 10 point 5).

A small model vendor and a model journal drive :mod:`pipeline.lifecycle` through
random sequences of vendor answers, faults and rate limits, crashes at any
checkpoint (before or after a state's I/O), and reruns with and without
``--retry-failed``. At every step the money rules are checked:

- no submit from a state that holds a task id or a billed result;
- billable submits per item are bounded by the policy;
- every item reaches exactly one terminal outcome within a bounded number of steps;
- a crash and a resume never add a payment beyond the documented unknown-outcome
  window, and never submit once a task id or a billed result is durable;
- ``ready`` is durable before any download;
- a run after retryable failures, against a vendor that has recovered, retries and
  succeeds (the rerun-after-outage crash of the previous release).

The last test runs the same explorer against the previous release's resume rule and
expects a counter-example: proof the explorer finds this class of bug.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import lifecycle as lc

POLICY = lc.Policy(
    max_attempts=3,
    max_rate_limited=5,
    max_poll_errors=3,
    download_tries=2,
    url_refetches=1,
    backoff_initial=0.1,
    backoff_max=1.0,
    retry_after_max=5.0,
    poll=lc.PollPolicy(interval=1.0, window=None, deadline=30.0),
    jitter=lambda: 0.5,
)
MAX_STEPS_PER_RUN = 5_000
Resume = Callable[..., lc.State]


class Violation(AssertionError):
    pass


@dataclass
class ModelJournal:
    status: lc.Status | None = None
    task_id: str | None = None
    attempts: int = 0
    unknown_sends: int = 0
    error: lc.ErrorInfo | None = None
    output: str | None = None
    spool: bool = False
    unknown_total: int = 0

    def snapshot(self) -> lc.Snapshot | None:
        if self.status is None:
            return None
        return lc.Snapshot(
            self.status, self.task_id, self.attempts, self.unknown_sends, self.error,
            self.output, self.spool, self.unknown_total,
        )  # fmt: skip

    def move(self, status: lc.Status) -> None:
        lc.check_move(self.status, status)
        self.status = status


@dataclass
class ModelVendor:
    sync: bool
    submits: int = 0  # billable sends that reached it
    billed: int = 0
    tasks: dict[str, str] = field(default_factory=dict)  # id -> running|succeeded|failed|gone
    next_id: int = 0

    def create(self) -> str:
        self.next_id += 1
        task_id = f"T{self.next_id}"
        self.tasks[task_id] = "running"
        return task_id


@dataclass
class World:
    vendor: ModelVendor
    journal: ModelJournal = field(default_factory=ModelJournal)
    script: list[int] = field(default_factory=list)
    now: float = 0.0
    steps: int = 0
    unknown_window: int = 0  # sends whose outcome the client could not know
    consented: int = 0  # payments made before the user's last --retry-failed
    written: bool = False  # a result file is on disk
    outcomes: list[str] = field(default_factory=list)

    def choice(self) -> int | None:
        return self.script.pop(0) if self.script else None


def _apply_checkpoint(world: World, cp: lc.Checkpoint) -> None:
    j = world.journal
    j.move(cp.status)
    if cp.status is lc.Status.SUBMITTING:
        j.task_id = None
    elif cp.task_id is not None:
        j.task_id = cp.task_id
    if cp.attempts is not None:
        j.attempts = cp.attempts
    if cp.unknown_sends is not None:
        j.unknown_sends = cp.unknown_sends
    if cp.unknown_total is not None:
        j.unknown_total = cp.unknown_total
    j.spool = j.spool or cp.spool


def _apply_terminal(world: World, state: lc.State) -> None:
    j = world.journal
    if isinstance(state, lc.Succeeded):
        j.move(lc.Status.SUCCEEDED)
        j.output, j.error, j.spool = state.output, None, False
    elif isinstance(state, lc.Failed):
        j.move(state.status)
        if state.task_id is not None or state.status is lc.Status.FAILED:
            j.task_id = state.task_id
        j.error, j.unknown_sends = state.error, state.tally.unknown_sends
        j.unknown_total = state.tally.unknown_total
        j.spool = j.spool or state.spool
        if state.tally.attempts:
            j.attempts = state.tally.attempts
    world.outcomes.append(type(state).__name__)


def _err(code: str, kind: lc.Kind) -> lc.ErrorInfo:
    return lc.ErrorInfo(code, code.lower(), kind)


def _perform(world: World, state: lc.State) -> lc.Event:
    """The model vendor's answer to the state's I/O, driven by the script."""
    vendor, journal = world.vendor, world.journal
    c = world.choice()
    if isinstance(state, lc.Prepare):
        return lc.InputRejected(_err("PREFLIGHT", "permanent")) if c == 9 else lc.InputReady()
    if isinstance(state, lc.Send):
        # Rule 1: never a submit while a task id or a billed result is durable.
        if journal.status in (lc.Status.SUBMITTED, lc.Status.READY, lc.Status.SUCCEEDED):
            raise Violation(f"submit from journal status {journal.status}")
        if journal.task_id is not None and vendor.tasks.get(journal.task_id) in (
            "running",
            "succeeded",
        ):
            raise Violation("submit while a live task id is durable")
        return _send(world, c)
    if isinstance(state, lc.Retry):
        world.now = max(world.now, state.until)
        return lc.Timer()
    if isinstance(state, lc.Poll):
        world.now = max(world.now, state.due)
        return _poll(world, state, c)
    if isinstance(state, lc.Fetch):
        world.now = max(world.now, state.due)
        # Rule 5: ready is durable before any download.
        if journal.status is not lc.Status.READY:
            raise Violation(f"download while the journal says {journal.status}")
        if c in (1, 2, 3):
            reason = {1: "transient", 2: "url", 3: "not_image"}[c]
            kind: lc.Kind = "retryable" if c == 1 else "permanent"
            return lc.DownloadFailed(_err("DOWNLOAD", kind), reason)  # type: ignore[arg-type]
        return lc.Downloaded()
    if isinstance(state, lc.Store):
        if c == 1:
            return lc.StoreFailed(_err("STORE_FAILED", "retryable"))
        if c == 2:
            return lc.StoreFailed(_err("DISK_FULL", "fatal"), disk_full=True)
        world.written = True
        return lc.Stored("out.jpg")
    raise AssertionError(state)


def _send(world: World, c: int | None) -> lc.Event:
    vendor = world.vendor
    if c == 1:
        return lc.SendFailed(_err("RATE", "retryable"), rate_limited=True, retry_after=0.5)
    if c == 2:
        vendor.submits += 1  # answered with an error: reached, not billed
        return lc.SendFailed(_err("VENDOR_5XX", "retryable"))
    if c == 3:
        # Timeout after the body went out: the vendor may have done the work.
        # (An async task created this way runs unseen and is billed when it ends.)
        vendor.submits += 1
        vendor.billed += 1
        world.unknown_window += 1
        return lc.SendFailed(_err("TIMEOUT", "retryable"), maybe_sent=True)
    if c == 4:
        vendor.submits += 1
        return lc.SendFailed(_err("NO_FACE", "permanent"))
    if c == 5:
        return lc.SendFailed(_err("CONNECT_FAILED", "retryable"), maybe_sent=False)
    if c == 6:
        vendor.submits += 1
        vendor.billed += 1
        return lc.SendFailed(_err("RESULT_NOT_IMAGE", "permanent"), billed=True)
    vendor.submits += 1
    if vendor.sync:
        vendor.billed += 1
        return lc.SyncResult()
    return lc.TaskCreated(vendor.create(), expected=None if c is None else 2.0)


def _poll(world: World, state: lc.Poll, c: int | None) -> lc.Event:
    vendor = world.vendor
    task = vendor.tasks.get(state.task_id, "gone")
    # An earlier poll told the client it succeeded, and the client made that durable.
    seen_done = task == "succeeded" and world.journal.status is lc.Status.READY
    if c == 4:
        return lc.PollError(_err("RATE", "retryable"), rate_limited=True, retry_after=1.0)
    if c == 3:
        return lc.PollError(_err("POLL_5XX", "retryable"))
    if c == 8:  # the key refused mid-run: the run stops, the task lives on
        return lc.PollError(_err("BAD_KEY", "fatal"))
    if task == "running":
        if c == 0:
            return lc.TaskRunning()
        if c == 7:  # expired unpolled: gone, and the vendor may still charge it
            vendor.tasks[state.task_id] = "gone"
            vendor.billed += 1
            return lc.TaskFailed(_err("InvalidTaskId", "permanent"), maybe_billed=True)
        if c == 2:
            vendor.tasks[state.task_id] = "failed"
            return lc.TaskFailed(_err("TASK_FAILED", "retryable"))
        vendor.tasks[state.task_id] = "succeeded"
        vendor.billed += 1
        task = "succeeded"
    if task == "succeeded":
        if c == 6 and seen_done:  # a vendor that flip-flops: "succeeded", then "failed"
            return lc.TaskFailed(_err("TASK_FAILED", "retryable"))
        if c == 5 and seen_done:
            vendor.tasks[state.task_id] = "gone"
            return lc.TaskFailed(_err("RECLAIMED", "permanent"))
        return lc.TaskSucceeded(url="https://cdn/x.jpg")
    if task == "failed":
        return lc.TaskFailed(_err("TASK_FAILED", "retryable"))
    return lc.TaskFailed(_err("RECLAIMED", "permanent"))


def j_sub(world: World) -> bool:
    """The journal still says the send is in flight (its answer is not journaled)."""
    return world.journal.status is lc.Status.SUBMITTING


def run_once(
    world: World, resume: Resume, *, retry_failed: bool, crash_at: frozenset[tuple[int, str]]
) -> str:
    """One run of the item: resume, then drive to a terminal state or a crash."""
    snap = world.journal.snapshot()
    found = "out.jpg" if world.written and world.journal.status is lc.Status.SUBMITTING else None
    if retry_failed and world.journal.status is lc.Status.FAILED:
        # The user agreed to pay again: for what the vendor billed so far, and for the
        # tasks still running unnamed, which it bills when they end (a kill between
        # a task's creation and its journal write: found by this explorer, a model
        # that counted only what was billed by then).
        world.consented = world.vendor.billed + _orphans(world)
    output_exists = world.journal.output is not None
    state = resume(
        snap, POLICY, world.now, retry_failed=retry_failed, output_exists=output_exists,
        unjournaled_output=found,
    )  # fmt: skip
    if world.journal.status is None:
        world.journal.move(lc.Status.PENDING)  # the run's "see" inserts the item
    attempts_this_run = fetches = 0
    for _ in range(MAX_STEPS_PER_RUN):
        if lc.is_terminal(state):
            _apply_terminal(world, state)
            return type(state).__name__
        world.steps += 1
        cp = lc.checkpoint(state)
        if cp is not None:
            _apply_checkpoint(world, cp)
        if (world.steps, "before") in crash_at:
            if isinstance(state, lc.Store) and state.source == "memory" and j_sub(world):
                world.unknown_window += 1  # killed holding a sync answer not yet stored
            return "crash"
        if isinstance(state, lc.Send):
            attempts_this_run += 1
            if attempts_this_run > POLICY.max_attempts + POLICY.max_rate_limited + 1:
                raise Violation(f"{attempts_this_run} sends in one run")
        if isinstance(state, lc.Fetch):
            fetches += 1
            # Each URL is tried download_tries times; each refetch brings a new URL.
            if fetches > POLICY.download_tries * (POLICY.url_refetches + 2):
                raise Violation(f"{fetches} downloads in one run")
        billed, tasks = world.vendor.billed, len(world.vendor.tasks)
        event = _perform(world, state)
        if (world.steps, "after") in crash_at:
            created = (world.vendor.billed, len(world.vendor.tasks)) != (billed, tasks)
            if isinstance(state, lc.Send) and created:
                world.unknown_window += 1  # killed between the answer and the journal
            if isinstance(state, lc.Store) and state.source == "memory" and j_sub(world):
                world.unknown_window += 1  # killed holding a sync answer not yet journaled
            return "crash"
        state = lc.next(state, event, world.now, POLICY)
        world.now += 0.01
    raise Violation(f"no terminal state within {MAX_STEPS_PER_RUN} steps")


def explore(
    resume: Resume,
    sync: bool,
    script: list[int],
    crashes: frozenset[tuple[int, str]],
    reruns: list[bool],
) -> World:
    """A first run with faults, crashes and reruns, then a run against a healthy vendor."""
    world = World(ModelVendor(sync=sync), script=list(script))
    outcome = run_once(world, resume, retry_failed=False, crash_at=crashes)
    _check_payments(world)
    for retry_failed in reruns:
        before = (world.vendor.billed, world.journal.status)
        outcome = run_once(world, resume, retry_failed=retry_failed, crash_at=crashes)
        _check_payments(world)
        if before[1] is lc.Status.SUCCEEDED and world.vendor.billed != before[0]:
            raise Violation("a succeeded item was paid for again on a rerun")
    # Resume until the item ends (every crash is followed by a resume).
    for _ in range(10):
        if outcome != "crash":
            break
        outcome = run_once(world, resume, retry_failed=False, crash_at=frozenset())
        _check_payments(world)
    _check_recovery(world, resume)
    return world


def _orphans(world: World) -> int:
    """Tasks left running at the vendor that the journal does not name: each will
    finish and be billed, collected or not."""
    tasks, named = world.vendor.tasks, world.journal.task_id
    return sum(state == "running" and tid != named for tid, state in tasks.items())


def _check_payments(world: World) -> None:
    """Billing is bounded: one payment when every send's outcome was known; at most
    ``max_unknown_sends`` when some were not (a timeout, a kill mid-send). Payments
    the user consented to with --retry-failed don't count."""
    billed = world.vendor.billed + _orphans(world) - world.consented
    allowed = POLICY.max_unknown_sends if world.unknown_window else 1
    if billed > allowed:
        raise Violation(f"billed {billed} times (bound {allowed})")
    if world.journal.unknown_sends > POLICY.max_unknown_sends:
        raise Violation(f"{world.journal.unknown_sends} unknown-outcome sends recorded")


def _check_recovery(world: World, resume: Resume) -> None:
    """After retryable failures, a run against a recovered vendor succeeds, and a
    rerun after that pays nothing more."""
    j = world.journal
    if j.status is lc.Status.SUBMITTED and world.vendor.tasks.get(j.task_id or "") == "running":
        # A kept task (a deadline, a refused key, a crash): collected, not paid again.
        world.script = []
        submits = world.vendor.submits
        outcome = run_once(world, resume, retry_failed=False, crash_at=frozenset())
        if outcome != "Succeeded" or world.vendor.submits != submits:
            raise Violation(
                f"a kept task ended {outcome} after {world.vendor.submits - submits} submits"
            )
    if j.status is lc.Status.READY:
        # A paid result the journal kept (spooled, or a task id the vendor still has):
        # a healthy rerun stores it without paying again.
        world.script = []
        submits, billed = world.vendor.submits, world.vendor.billed
        alive = j.spool or world.vendor.tasks.get(j.task_id or "") == "succeeded"
        outcome = run_once(world, resume, retry_failed=False, crash_at=frozenset())
        if world.vendor.submits != submits or world.vendor.billed != billed:
            raise Violation("a kept paid result was paid for again")
        if alive and outcome != "Succeeded":
            raise Violation(f"a kept paid result ended {outcome}, not stored")
    if j.status is lc.Status.FAILED and j.error is not None and j.error.kind != "permanent":
        world.script = []
        submits = world.vendor.submits
        outcome = run_once(world, resume, retry_failed=False, crash_at=frozenset())
        if outcome != "Succeeded":
            raise Violation(f"a rerun after retryable failures ended {outcome}, not Succeeded")
        if world.vendor.submits == submits and j.task_id is None:
            raise Violation("a rerun after retryable failures did not retry")
    if j.status is lc.Status.SUCCEEDED:
        billed = world.vendor.billed
        outcome = run_once(world, resume, retry_failed=True, crash_at=frozenset())
        if outcome != "Skipped" or world.vendor.billed != billed:
            raise Violation(f"a rerun of a done item ended {outcome}")


# Answers come in runs (an outage is many retryable answers in a row), so a script
# is a list of (answer, repeat) pairs.
scripts = st.lists(st.tuples(st.integers(0, 9), st.integers(1, 8)), max_size=12).map(
    lambda pairs: [c for c, n in pairs for _ in range(n)]
)
crash_points = st.frozensets(
    st.tuples(st.integers(1, 60), st.sampled_from(["before", "after"])), max_size=3
)
reruns = st.lists(st.booleans(), max_size=3)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sync=st.booleans(), script=scripts, crashes=crash_points, reruns=reruns)
def test_the_money_rules_hold_on_every_path(
    sync: bool, script: list[int], crashes: frozenset[tuple[int, str]], reruns: list[bool]
) -> None:
    explore(lc.resume, sync, script, crashes, reruns)


def legacy_resume(snap: lc.Snapshot | None, policy: lc.Policy, now: float, **kw: Any) -> lc.State:
    """The previous release's rule: a failed item resumed with the attempts it had used.

    After an outage used up ``max_attempts``, every later run met the item with no
    attempt left and no error in hand, and crashed (``assert last_error is not None``).
    """
    state = lc.resume(snap, policy, now, **kw)
    if snap is not None and snap.status is lc.Status.FAILED and isinstance(state, lc.Prepare):
        return replace(state, tally=replace(state.tally, attempts=snap.attempts))
    return state


def test_the_explorer_finds_the_old_rerun_after_outage_bug() -> None:
    from hypothesis import find

    def breaks(args: tuple[bool, list[int]]) -> bool:
        sync, script = args
        try:
            explore(legacy_resume, sync, script, frozenset(), [])
        except Violation:
            return True
        return False

    found = find(st.tuples(st.booleans(), scripts), breaks, settings=settings(max_examples=2000))
    sync, script = found
    # The counter-example is an outage that uses up every attempt: retryable answers only.
    world = World(ModelVendor(sync=sync), script=list(script))
    run_once(world, legacy_resume, retry_failed=False, crash_at=frozenset())
    assert world.journal.status is lc.Status.FAILED and world.journal.error is not None
    assert world.journal.error.kind == "retryable"


def test_next_never_raises_on_a_terminal_state_guard() -> None:
    with pytest.raises(lc.UnexpectedEvent):
        lc.next(lc.Skipped(), lc.Timer(), 0.0, POLICY)


def test_lifecycle_imports_no_io() -> None:
    source = Path(lc.__file__).read_text()
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    forbidden = {
        "anyio",
        "aiohttp",
        "asyncio",
        "sqlite3",
        "os",
        "pathlib",
        "shutil",
        "io",
        "socket",
    }
    assert not imported & forbidden, imported & forbidden
    assert imported <= {
        "__future__",
        "math",
        "random",
        "collections",
        "dataclasses",
        "enum",
        "typing",
    }


@settings(max_examples=200, deadline=None)
@given(
    hint=st.one_of(st.none(), st.floats(0.5, 1e12, allow_nan=False)),
    window=st.one_of(st.none(), st.floats(1.0, 600.0)),
    deadline=st.floats(1.0, 60.0),
    now=st.floats(0.0, 1e6),
)
def test_a_running_task_is_polled_again_by_its_deadline_whatever_the_vendor_asks(
    hint: float | None, window: float | None, deadline: float, now: float
) -> None:
    # The defect: a vendor's polling_interval of 10^12 ms, with no polling window set,
    # put the next poll past the task's deadline: the run never ended.
    policy = lc.Policy(poll=lc.PollPolicy(interval=1.0, window=window, deadline=deadline))
    state: lc.State = lc.Poll(lc.Tally(), "t1", due=now, deadline=now + deadline, started=now)
    at = now
    for _ in range(2 * int(deadline) + 3):  # polls at least half a second apart
        assert isinstance(state, lc.Poll)
        after = lc.next(state, lc.TaskRunning(vendor_interval=hint), at, policy)
        if not isinstance(after, lc.Poll):
            state = after
            break
        assert at < after.due <= now + deadline
        if window is not None:
            assert after.due - at <= window
        state, at = after, after.due
    # Still running at its deadline: it fails there, never later.
    assert isinstance(state, lc.Failed) and state.error.code == "TASK_DEADLINE", state
    assert at <= now + deadline
