"""One item's life as a pure state machine: states, events, ``next()``, ``resume()``.

This module is the one place where the rules that protect money live. It does no
I/O and imports nothing that does (a test checks): the driver in
:mod:`pipeline.driver` performs each state's I/O, turns what happened into an
:data:`Event` and asks :func:`next` for the following state. The model follows
h11's ``_state.py`` (every rule comes from one table; an illegal move raises) and
hishel's ``_core/_spec.py`` (states whose successor is computed from an event).

The rules:

1. A task id or a billed result, once durable, is never submitted again: no edge
   leads from a state that holds one (``Poll``, ``Fetch``, ``Store``) back to
   ``Send``, except a task the *vendor* says failed (not billed) before any poll
   said it succeeded.
2. Every item ends in exactly one terminal state (``Succeeded``, ``Failed``,
   ``Skipped``, ``CarriedOver``, ``Unsent``) within a bounded number of steps:
   attempts, unknown-outcome sends, rate-limit retries, poll errors, download tries
   and URL re-fetches are all counted against :class:`Policy`, and polling is bounded
   by the task deadline.
3. Each state's journal checkpoint (:func:`checkpoint`) is durable before that
   state's I/O starts: ``submitting`` before a send, the task id before the first
   poll, ``ready`` before any download.
4. A billable send whose outcome is unknown (timeout, connection lost after the body
   went out, a crash mid-send) is sent again at most once, across runs too
   (``Policy.max_unknown_sends``); such items count as ``possibly_billed``.

Transitions (``E`` = event; ``*`` = any of the counted limits reached)::

    Prepare ──InputReady──> Send ──SyncResult──> Store ──Stored──> Succeeded
       │                    │  │                   └─StoreFailed─> Failed(ready, spool)
       └─InputRejected─>    │  ├─TaskCreated──> Poll ──Running──> Poll (next due)
          Failed            │  │                 │  ├─TaskSucceeded(url)──> Fetch
                            │  │                 │  ├─TaskSucceeded(image)─> Store
                            │  │                 │  ├─TaskFailed, unbilled──> Retry | Failed
                            │  │                 │  ├─TaskFailed, billed───> Failed(RESULT_LOST)
                            │  │                 │  ├─TaskTaken (id held by another)──> Failed
                            │  │                 │  ├─PollError──> Poll (backoff) | Failed(task kept)*
                            │  │                 │  └─deadline──> Failed(TASK_DEADLINE, task kept)
                            │  ├─SendFailed(retryable)──> Retry ──Timer──> Send | Failed*
                            │  ├─SendFailed(maybe sent)─> Retry | Failed(OUTCOME_UNKNOWN)*
                            │  ├─SendFailed(permanent | fatal)──> Failed
                            │  └─Stopping──> Unsent
                            Fetch ──Downloaded──> Store
                              ├─DownloadFailed(retryable)──> Fetch (later) | Failed(ready)*
                              ├─DownloadFailed(url refused/expired)──> Poll (fresh URL) | Failed(RESULT_LOST)*
                              └─DownloadFailed(not an image)──> Failed(RESULT_NOT_IMAGE)

    Any non-terminal state ──Crashed──> Failed (task id / billed result kept)

The journal's own statuses (:class:`Status`) and the moves between them
(:data:`STATUS_MOVES`) are checked by :func:`check_move`; the journal calls it on
every write.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Literal

__all__ = [
    "STATUS_MOVES",
    "Checkpoint",
    "ErrorInfo",
    "Event",
    "Failed",
    "Fetch",
    "IllegalMove",
    "Policy",
    "Poll",
    "PollPolicy",
    "Prepare",
    "Retry",
    "Send",
    "Snapshot",
    "State",
    "Status",
    "Store",
    "Succeeded",
    "check_move",
    "checkpoint",
    "collectable",
    "is_terminal",
    "next",
    "resume",
]


# -- journal statuses and the moves between them ----------------------------------------


class Status(StrEnum):
    """Where an item is in its life, as the journal records it."""

    PENDING = "pending"  # known, nothing at the vendor
    SUBMITTING = "submitting"  # a billable send may be on the wire
    SUBMITTED = "submitted"  # a task id is durable; not yet known to have succeeded
    READY = "ready"  # billed: the vendor said it succeeded (or a sync result is spooled)
    SUCCEEDED = "succeeded"  # the result file is stored
    FAILED = "failed"  # ended without a result (error recorded)


S = Status
STATUS_MOVES: Mapping[Status, frozenset[Status]] = {
    S.PENDING: frozenset({S.PENDING, S.SUBMITTING, S.FAILED}),
    S.SUBMITTING: frozenset({S.SUBMITTING, S.PENDING, S.SUBMITTED, S.READY, S.SUCCEEDED, S.FAILED}),
    # -> PENDING only when the vendor says the task failed (unbilled) and it is retried.
    S.SUBMITTED: frozenset({S.SUBMITTED, S.PENDING, S.READY, S.SUCCEEDED, S.FAILED}),
    # Billed: never back to PENDING or SUBMITTING.
    S.READY: frozenset({S.READY, S.SUCCEEDED, S.FAILED}),
    # The output vanished: fetch again by task id (READY) or report it lost (FAILED).
    S.SUCCEEDED: frozenset({S.SUCCEEDED, S.READY, S.FAILED}),
    # A rerun retries (PENDING), or resumes a kept task (SUBMITTED / READY).
    S.FAILED: frozenset({S.FAILED, S.PENDING, S.SUBMITTING, S.SUBMITTED, S.READY}),
}
del S


class IllegalMove(RuntimeError):
    """A status change that is not in :data:`STATUS_MOVES` (a bug, never user error)."""


def check_move(old: Status | None, new: Status) -> None:
    """Raise :class:`IllegalMove` unless ``old -> new`` is in the table."""
    if old is None:
        if new is not Status.PENDING:
            raise IllegalMove(f"a new item must start as pending, not {new}")
        return
    if new not in STATUS_MOVES[old]:
        raise IllegalMove(f"illegal journal move {old} -> {new}")


# Tasks at the vendor that a run will still collect: the one rule, used by the journal
# (SQL, via these constants) and by resume().
COLLECTABLE_STATUSES = frozenset({Status.SUBMITTED, Status.READY})


def collectable(status: Status, task_id: str | None, error_kind: str | None) -> bool:
    """Whether a run will still collect this item's task at the vendor.

    Journals of the previous release recorded a kept task as ``failed`` with a
    non-permanent error; those count too.
    """
    if task_id is None:
        return False
    if status in COLLECTABLE_STATUSES:
        return True
    return status is Status.FAILED and error_kind not in (None, "permanent")


# -- the policy ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PollPolicy:
    """When to poll one vendor's tasks (see the README, "Polling").

    Priorities, in order: the vendor's polling window (a task not polled within it
    expires and is still charged, docs/vendors.md "Perfect Corp: polling window"),
    then the rate budget (the driver caps tasks in flight so the budget can keep
    them all polled), then latency (poll at the expected finish, then every
    interval).
    """

    interval: float
    window: float | None = None
    deadline: float = 900.0

    @property
    def max_gap(self) -> float:
        """Longest wait between two polls of a running task: never past the task's
        deadline (a vendor's ``polling_interval`` of 10^12 ms kept a task unpolled
        for good when no window was set)."""
        if self.window is None:
            return self.deadline
        # Keep a margin for the budget wait and the network: a quarter of the window.
        return min(self.deadline, max(0.05, self.window * 0.75))

    def first_delay(self, expected: float | None) -> float:
        """Seconds from the submit to the first poll.

        ``expected`` is the task duration measured so far for the operation (a
        quantity that can never grow past the durations actually seen). Without a
        measurement, poll after one interval.
        """
        delay = self.interval if expected is None else max(0.0, expected)
        return min(delay, self.max_gap)

    def next_delay(self, vendor_hint: float | None) -> float:
        """Seconds to the next poll of a running task. A ``polling_interval`` the
        vendor sends replaces the configured interval for that task."""
        delay = vendor_hint if vendor_hint is not None and vendor_hint > 0 else self.interval
        return min(delay, self.max_gap)


@dataclass(frozen=True)
class Policy:
    """Every limit of one item's life, built once from the config and manifest."""

    max_attempts: int = 5
    # One send with an unknown outcome may be followed by one more, never a third.
    max_unknown_sends: int = 2
    max_rate_limited: int = 100
    max_poll_errors: int = 5
    download_tries: int = 3
    url_refetches: int = 2
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    retry_after_max: float = 300.0
    poll: PollPolicy = field(default_factory=lambda: PollPolicy(interval=5.0))
    jitter: Callable[[], float] = field(default=random.random, compare=False)

    def backoff(self, failures: int, hint: float | None = None) -> float:
        """Exponential backoff with equal jitter; a vendor hint (``Retry-After``) is
        a floor, capped at ``retry_after_max`` so no answer can stall a run."""
        if failures < 1:
            base = 0.0
        else:
            base = min(self.backoff_max, self.backoff_initial * 2.0 ** min(failures - 1, 30))
        delay = base / 2 + self.jitter() * base / 2
        if hint is not None and math.isfinite(hint) and hint > delay:
            delay = hint
        return min(delay, self.retry_after_max) if hint is not None else delay

    def for_vendor(self, poll: PollPolicy) -> Policy:
        return replace(self, poll=poll)


# -- errors, as plain values ----------------------------------------------------------------

Kind = Literal["retryable", "permanent", "fatal"]


@dataclass(frozen=True)
class ErrorInfo:
    """A classified error: the ``error`` object of ``results.jsonl``."""

    code: str
    message: str
    kind: Kind


def _error(code: str, message: str, kind: Kind = "permanent") -> ErrorInfo:
    return ErrorInfo(code, message, kind)


# -- states ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tally:
    """What this item has used up: counted against :class:`Policy`."""

    attempts: int = 0  # billable sends with a definite or unknown outcome, this run
    unknown_sends: int = 0  # sends of unknown outcome since the user last consented
    unknown_total: int = 0  # all sends of unknown outcome, ever (possibly billed)
    rate_limited: int = 0  # rate-limit answers, this run
    last_error: ErrorInfo | None = None


@dataclass(frozen=True)
class Prepare:
    """Read and preflight the input (and extra files). I/O: local files."""

    tally: Tally = Tally()


@dataclass(frozen=True)
class Send:
    """Wait for the rate budget, then the billable send. Checkpoint: ``submitting``."""

    tally: Tally = Tally()


@dataclass(frozen=True)
class Retry:
    """Back off until ``until``, then send again (``prepare``: read the input first).
    Checkpoint: ``pending``."""

    tally: Tally
    until: float
    # A task resumed from the journal was never read in this run: its failure sends a
    # new one, which needs the input read and checked first.
    prepare: bool = False


@dataclass(frozen=True)
class Poll:
    """Ask about ``task_id`` at ``due``. Checkpoint: the task id (``submitted``), or
    ``ready`` once a poll has said the task succeeded (``billed``)."""

    tally: Tally
    task_id: str
    due: float
    deadline: float
    billed: bool = False
    started: float | None = None  # when the task was created (None: resumed)
    last_running: float | None = None  # last time a poll saw it running
    polls: int = 0
    poll_errors: int = 0
    refetches: int = 0
    vendor_interval: float | None = None

    def checkpoint_status(self) -> Status:
        return Status.READY if self.billed else Status.SUBMITTED


@dataclass(frozen=True)
class Fetch:
    """Download the result at ``due``. Checkpoint: ``ready`` (billed, task kept)."""

    tally: Tally
    task_id: str
    url: str
    due: float
    deadline: float
    tries: int = 0
    refetches: int = 0


@dataclass(frozen=True)
class Store:
    """Check and write the result under its final name. ``source`` says where the
    bytes are: held in memory (a sync answer, or an image inside a poll answer:
    ``memory``), in the journal's spool (``spool``), or in a temporary file
    (``file``, a download)."""

    tally: Tally
    source: Literal["memory", "spool", "file"]
    task_id: str | None = None


@dataclass(frozen=True)
class Succeeded:
    output: str
    tally: Tally = Tally()


@dataclass(frozen=True)
class Failed:
    """The item ends without a result. ``status`` is what the journal keeps:
    ``failed``, or ``submitted``/``ready`` when the task (or a billed result) is kept
    so that a rerun collects it. ``spool``: keep the sync result for a rerun."""

    error: ErrorInfo
    status: Status = Status.FAILED
    task_id: str | None = None
    billed: bool = False
    spool: bool = False
    tally: Tally = Tally()


@dataclass(frozen=True)
class Skipped:
    """Already done in an earlier run; the output is on disk."""


@dataclass(frozen=True)
class CarriedOver:
    """Failed for good in an earlier run; reported, not retried (``--retry-failed``)."""

    error: ErrorInfo


@dataclass(frozen=True)
class Unsent:
    """Not started: the run is stopping. A rerun sends it."""

    reason: ErrorInfo


State = (
    Prepare
    | Send
    | Retry
    | Poll
    | Fetch
    | Store
    | Succeeded
    | Failed
    | Skipped
    | CarriedOver
    | Unsent
)
TERMINAL = (Succeeded, Failed, Skipped, CarriedOver, Unsent)


def is_terminal(state: State) -> bool:
    return isinstance(state, TERMINAL)


# -- events ------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputReady:
    pass


@dataclass(frozen=True)
class InputRejected:
    error: ErrorInfo


@dataclass(frozen=True)
class Stopping:
    """The run stops starting items (a fatal error elsewhere, max_credits)."""

    reason: ErrorInfo


@dataclass(frozen=True)
class TaskCreated:
    task_id: str
    expected: float | None = None  # measured task duration for this operation


@dataclass(frozen=True)
class SyncResult:
    pass


@dataclass(frozen=True)
class SendFailed:
    error: ErrorInfo
    maybe_sent: bool = False  # the body may have reached the vendor: possibly billed
    rate_limited: bool = False
    retry_after: float | None = None
    billed: bool = False  # answered, billed, but unusable (RESULT_NOT_IMAGE)


@dataclass(frozen=True)
class TaskRunning:
    vendor_interval: float | None = None


@dataclass(frozen=True)
class TaskSucceeded:
    url: str | None = None
    has_image: bool = False


@dataclass(frozen=True)
class TaskFailed:
    error: ErrorInfo
    maybe_billed: bool = False  # the vendor may charge this failure (an expired task)


@dataclass(frozen=True)
class TaskTaken:
    """A task resumed from the journal whose id another item holds (two rows with
    one id): not polled for this item."""

    error: ErrorInfo


@dataclass(frozen=True)
class PollError:
    error: ErrorInfo
    rate_limited: bool = False
    retry_after: float | None = None


@dataclass(frozen=True)
class Downloaded:
    to_file: bool = True  # streamed to a temporary file (else held in memory)


@dataclass(frozen=True)
class DownloadFailed:
    error: ErrorInfo
    reason: Literal["transient", "url", "not_image"]


@dataclass(frozen=True)
class Stored:
    output: str


@dataclass(frozen=True)
class StoreFailed:
    error: ErrorInfo
    disk_full: bool = False


@dataclass(frozen=True)
class Timer:
    """The wait of a ``Retry`` ended."""


@dataclass(frozen=True)
class Crashed:
    """The I/O for this state raised something unexpected (a bug)."""

    message: str


Event = (
    InputReady | InputRejected | Stopping | TaskCreated | SyncResult | SendFailed
    | TaskRunning | TaskSucceeded | TaskFailed | TaskTaken | PollError | Downloaded
    | DownloadFailed | Stored | StoreFailed | Timer | Crashed
)  # fmt: skip


# -- checkpoints ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A journal write that must be durable before a state's I/O starts."""

    status: Status
    task_id: str | None = None
    attempts: int | None = None
    unknown_sends: int | None = None
    unknown_total: int | None = None
    spool: bool = False  # keep the result bytes held in memory in the journal


def checkpoint(state: State) -> Checkpoint | None:
    """The journal checkpoint of ``state`` (None: nothing new must be durable)."""
    if isinstance(state, Send):
        # Counted before the send: a crash mid-send leaves ``submitting`` with the
        # number of earlier unknown outcomes, and resume() adds this one.
        return Checkpoint(
            Status.SUBMITTING,
            attempts=state.tally.attempts + 1,
            unknown_sends=state.tally.unknown_sends,
            unknown_total=state.tally.unknown_total,
        )
    if isinstance(state, Retry):
        # Unknown-outcome sends are counted across runs: durable before the wait.
        return Checkpoint(
            Status.PENDING,
            attempts=state.tally.attempts,
            unknown_sends=state.tally.unknown_sends,
            unknown_total=state.tally.unknown_total,
        )
    if isinstance(state, Poll):
        status = Status.READY if state.billed else Status.SUBMITTED
        return Checkpoint(status, task_id=state.task_id)
    if isinstance(state, Fetch):
        return Checkpoint(Status.READY, task_id=state.task_id)
    # A paid result held in memory (a sync answer) is written out first and journaled
    # with it: spooling it into the journal before would write every result twice and
    # shorten no window (either write takes as long). It is spooled only when it
    # cannot be stored (see _on_store). A kill in those milliseconds is the one window
    # of a sync send whose outcome the rerun does not know.
    return None


# -- next() ----------------------------------------------------------------------------------


class UnexpectedEvent(RuntimeError):
    """An event that cannot happen in this state (a driver bug)."""


def next(state: State, event: Event, now: float, policy: Policy) -> State:
    """The state after ``event`` happened in ``state`` at monotonic time ``now``."""
    if is_terminal(state):
        raise UnexpectedEvent(f"{type(state).__name__} is terminal; got {event!r}")
    if isinstance(event, Crashed):
        return _crashed(state, event)
    handler = _HANDLERS.get(type(state))
    assert handler is not None
    return handler(state, event, now, policy)


def _unexpected(state: State, event: Event) -> UnexpectedEvent:
    return UnexpectedEvent(f"{type(event).__name__} cannot happen in {type(state).__name__}")


def _crashed(state: State, event: Crashed) -> State:
    error = _error("INTERNAL_ERROR", f"unexpected error: {event.message}", "retryable")
    if isinstance(state, Poll):
        return Failed(
            error, state.checkpoint_status(), state.task_id, state.billed, tally=state.tally
        )
    if isinstance(state, Fetch):
        return Failed(error, Status.READY, state.task_id, True, tally=state.tally)
    if isinstance(state, Store):
        status = Status.READY
        return Failed(
            error, status, state.task_id, True, spool=state.source != "file", tally=state.tally
        )
    if isinstance(state, Send):
        # The send may or may not have gone out: journal ``submitting`` stays the truth
        # for resume() (an unknown outcome), and this run does not send it again.
        return Failed(error, Status.SUBMITTING, tally=state.tally)
    tally = state.tally if isinstance(state, Prepare | Retry) else Tally()
    return Failed(error, tally=tally)


def _on_prepare(state: Prepare, event: Event, now: float, policy: Policy) -> State:
    if isinstance(event, InputReady):
        return _send_or_give_up(state.tally, policy)
    if isinstance(event, InputRejected):
        return Failed(event.error, tally=state.tally)
    if isinstance(event, Stopping):
        return Unsent(event.reason)
    raise _unexpected(state, event)


def _send_or_give_up(tally: Tally, policy: Policy) -> State:
    if tally.unknown_sends >= policy.max_unknown_sends:
        return Failed(
            _error(
                "OUTCOME_UNKNOWN",
                f"{tally.unknown_sends} sends got no answer (timeout or lost connection) and "
                "may each have been billed; not sent again on its own. Check the vendor "
                "console, then rerun with --retry-failed to send it once more",
            ),
            tally=tally,
        )
    if tally.attempts >= policy.max_attempts:
        error = tally.last_error or _error(
            "ATTEMPTS_EXHAUSTED", f"{tally.attempts} attempts used up", "retryable"
        )
        return Failed(error, tally=tally)
    return Send(tally)


def _on_send(state: Send, event: Event, now: float, policy: Policy) -> State:
    tally = replace(state.tally, attempts=state.tally.attempts + 1)
    if isinstance(event, Stopping):
        return Unsent(event.reason)
    if isinstance(event, TaskCreated):
        delay = policy.poll.first_delay(event.expected)
        return Poll(
            tally, event.task_id, due=now + delay, deadline=now + policy.poll.deadline, started=now
        )
    if isinstance(event, SyncResult):
        return Store(tally, "memory")
    if isinstance(event, SendFailed):
        return _send_failed(state, tally, event, now, policy)
    raise _unexpected(state, event)


def _send_failed(state: Send, tally: Tally, event: SendFailed, now: float, policy: Policy) -> State:
    error = event.error
    if event.billed:
        return Failed(error, billed=True, tally=tally)
    if event.rate_limited:
        # Rate limits don't use up attempts, but are bounded too.
        tally = replace(state.tally, rate_limited=state.tally.rate_limited + 1, last_error=error)
        if tally.rate_limited > policy.max_rate_limited:
            return Failed(error, tally=tally)
        # No wait here: the driver pauses the vendor's whole rate budget (at least
        # Retry-After, capped), so the retry simply queues there again.
        return Retry(tally, until=now)
    if event.maybe_sent:  # whatever the error: the body may have been billed
        tally = _one_more_unknown(tally)
    if error.kind != "retryable":
        return Failed(error, tally=tally)
    tally = replace(tally, last_error=error)
    after = _send_or_give_up(tally, policy)
    if not isinstance(after, Send):
        return after
    return Retry(tally, until=now + policy.backoff(tally.attempts, hint=event.retry_after))


def _one_more_unknown(tally: Tally) -> Tally:
    return replace(
        tally, unknown_sends=tally.unknown_sends + 1, unknown_total=tally.unknown_total + 1
    )


def _on_retry(state: Retry, event: Event, now: float, policy: Policy) -> State:
    if isinstance(event, Timer):
        after = _send_or_give_up(state.tally, policy)
        return Prepare(state.tally) if state.prepare and isinstance(after, Send) else after
    if isinstance(event, Stopping):
        return Unsent(event.reason)
    raise _unexpected(state, event)


def _on_poll(state: Poll, event: Event, now: float, policy: Policy) -> State:
    if isinstance(event, TaskRunning):
        interval = event.vendor_interval or state.vendor_interval
        polled = replace(
            state, polls=state.polls + 1, poll_errors=0, last_running=now, vendor_interval=interval
        )
        if now >= state.deadline:
            return _deadline(polled, policy)
        # Polled at its deadline at the latest, where a task still running fails.
        return replace(polled, due=min(now + policy.poll.next_delay(interval), state.deadline))
    if isinstance(event, TaskSucceeded):
        polled = replace(state, polls=state.polls + 1, billed=True)
        if event.has_image:
            return Store(state.tally, "memory", state.task_id)
        if event.url:
            return Fetch(
                state.tally, state.task_id, event.url, due=now, deadline=state.deadline,
                refetches=state.refetches,
            )  # fmt: skip
        return _refetch_or_lost(
            polled, now, policy, "the vendor said it succeeded without a result"
        )
    if isinstance(event, TaskFailed):
        if event.maybe_billed:
            return _lost(
                state,
                f"the task expired at the vendor, which may still charge it "
                f"({event.error.code}: {event.error.message})",
            )
        return _task_failed(state, event.error, now, policy)
    if isinstance(event, PollError):
        return _poll_error(state, event, now, policy)
    if isinstance(event, TaskTaken):  # possibly billed: the vendor accepted its send
        return Failed(event.error, tally=_one_more_unknown(state.tally))
    raise _unexpected(state, event)


def _deadline(state: Poll, policy: Policy) -> State:
    error = _error(
        "TASK_DEADLINE",
        f"task {state.task_id} still running after {policy.poll.deadline:g} s; its id is "
        "kept: rerun to resume polling it",
        "retryable",
    )
    return Failed(error, state.checkpoint_status(), state.task_id, state.billed, tally=state.tally)


def _task_failed(state: Poll, error: ErrorInfo, now: float, policy: Policy) -> State:
    if state.billed:
        # An earlier poll said it succeeded (billed); now the vendor has dropped it
        # (AILab reclaims tasks 24 h after completion, docs/vendors.md "AILab: task
        # lifetimes"). Submitting again would pay twice.
        return _lost(state, f"the vendor no longer has it ({error.code}: {error.message})")
    tally = replace(state.tally, last_error=error)
    if error.kind != "retryable":
        return Failed(error, tally=tally)
    after = _send_or_give_up(tally, policy)
    if not isinstance(after, Send):
        return after
    # The vendor says the task failed: failures are not billed (docs/vendors.md
    # "Both vendors: billing"), so a new task may be created. A task resumed from
    # the journal (not started in this run) has no input read yet: Prepare first.
    return Retry(tally, until=now + policy.backoff(tally.attempts), prepare=state.started is None)


def _poll_error(state: Poll, event: PollError, now: float, policy: Policy) -> State:
    # The poll request failed, not the task: ask again about the same id.
    if event.error.kind == "fatal":  # the key refused, say: stop, keep the task id
        return Failed(
            event.error, state.checkpoint_status(), state.task_id, state.billed, tally=state.tally
        )
    if event.rate_limited:
        tally = replace(state.tally, rate_limited=state.tally.rate_limited + 1)
        if tally.rate_limited > policy.max_rate_limited:
            return Failed(
                event.error, state.checkpoint_status(), state.task_id, state.billed, tally=tally
            )
        # The vendor's budget is paused by the driver; the poll queues there.
        return replace(state, tally=tally, due=now)
    errors = state.poll_errors + 1
    if errors >= policy.max_poll_errors or now >= state.deadline:
        return Failed(
            event.error, state.checkpoint_status(), state.task_id, state.billed, tally=state.tally
        )
    wait = max(policy.poll.interval, policy.backoff(errors, hint=event.retry_after))
    return replace(state, poll_errors=errors, due=now + min(wait, policy.poll.max_gap))


def _refetch_or_lost(state: Poll, now: float, policy: Policy, detail: str) -> State:
    if state.refetches >= policy.url_refetches:
        return _lost(state, detail)
    return replace(
        state, billed=True, refetches=state.refetches + 1, due=now + policy.poll.interval
    )


def _lost(state: Poll | Fetch, detail: str) -> Failed:
    return Failed(
        _error(
            "RESULT_LOST",
            f"task {state.task_id} succeeded and was paid for, but its result could not be "
            f"fetched ({detail}). It is not submitted again on its own: rerun with "
            "--retry-failed to pay for it once more",
        ),
        Status.FAILED,
        state.task_id,
        billed=True,
        tally=state.tally,
    )


def _on_fetch(state: Fetch, event: Event, now: float, policy: Policy) -> State:
    if isinstance(event, StoreFailed):
        # The temporary file could not be written: billed and still at the vendor.
        return Failed(event.error, Status.READY, state.task_id, billed=True, tally=state.tally)
    if isinstance(event, Downloaded):
        return Store(state.tally, "file" if event.to_file else "memory", state.task_id)
    if not isinstance(event, DownloadFailed):
        raise _unexpected(state, event)
    if event.reason == "not_image":
        return Failed(event.error, Status.FAILED, state.task_id, billed=True, tally=state.tally)
    if event.reason == "url":
        # Ask the vendor again: a re-poll gives a fresh URL (docs/vendors.md "Perfect
        # Corp: result URLs").
        poll = Poll(
            state.tally, state.task_id, due=now, deadline=max(state.deadline, now + policy.poll.interval),
            billed=True, refetches=state.refetches,
        )  # fmt: skip
        return _refetch_or_lost(poll, now, policy, event.error.message)
    tries = state.tries + 1
    if tries >= policy.download_tries:
        # Billed and probably still there: keep it ``ready`` so a rerun fetches it.
        return Failed(event.error, Status.READY, state.task_id, billed=True, tally=state.tally)
    return replace(state, tries=tries, due=now + policy.backoff(tries))


def _on_store(state: Store, event: Event, now: float, policy: Policy) -> State:
    if isinstance(event, Stored):
        return Succeeded(event.output, state.tally)
    if isinstance(event, StoreFailed):
        # Paid for: keep it ``ready`` (with the sync bytes spooled in the journal) so
        # the next run stores it instead of paying again.
        return Failed(
            event.error, Status.READY, state.task_id, billed=True,
            spool=state.source in ("memory", "spool"), tally=state.tally,
        )  # fmt: skip
    if isinstance(event, DownloadFailed) and event.reason == "not_image":
        return Failed(event.error, Status.FAILED, state.task_id, billed=True, tally=state.tally)
    raise _unexpected(state, event)


_HANDLERS: dict[type, Callable[..., State]] = {
    Prepare: _on_prepare,
    Send: _on_send,
    Retry: _on_retry,
    Poll: _on_poll,
    Fetch: _on_fetch,
    Store: _on_store,
}


# -- resume() ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """What the journal knows of an item, as :func:`resume` needs it."""

    status: Status
    task_id: str | None = None
    attempts: int = 0
    unknown_sends: int = 0
    error: ErrorInfo | None = None
    output: str | None = None
    has_spool: bool = False
    unknown_total: int = 0

    def tally(self, *, extra_unknown: int = 0) -> Tally:
        """What a resumed item has used up that is counted across runs."""
        return Tally(
            unknown_sends=self.unknown_sends + extra_unknown,
            unknown_total=self.unknown_total + extra_unknown,
        )


def resume(
    snap: Snapshot | None,
    policy: Policy,
    now: float,
    *,
    retry_failed: bool = False,
    output_exists: bool = False,
    unjournaled_output: str | None = None,
) -> State:
    """The state a run starts an item in, from what the journal recorded.

    ``unjournaled_output``: a result file found at the item's path although the
    journal still says ``submitting`` (the last run was killed between writing a sync
    result, atomically, and journaling it): it is adopted, not paid for again.

    Attempts are counted per run: a rerun after retryable failures tries again with
    a full set. Unknown-outcome sends are counted across runs. A task id or a billed
    result is collected, never submitted again; ``--retry-failed`` is the user's
    consent to pay again for a result that was paid for and lost.
    """
    if snap is None or snap.status is Status.PENDING:
        return Prepare(snap.tally() if snap else Tally())
    status = snap.status
    if status is Status.SUCCEEDED and snap.output and output_exists:
        return Skipped()
    if status is Status.SUBMITTING:
        if unjournaled_output is not None:
            return Succeeded(unjournaled_output, snap.tally())
        # The last run stopped mid-send: that send's outcome is unknown.
        return Prepare(snap.tally(extra_unknown=1))
    if collectable(status, snap.task_id, snap.error.kind if snap.error else None) or (
        status is Status.SUCCEEDED and snap.task_id
    ):
        assert snap.task_id is not None
        billed = status in (Status.READY, Status.SUCCEEDED)
        return Poll(
            snap.tally(), snap.task_id, due=now,
            deadline=now + policy.poll.deadline, billed=billed,
        )  # fmt: skip
    if status in (Status.READY, Status.SUCCEEDED):
        return _paid_without_task(snap)
    # FAILED, without a task to collect.
    error = snap.error or _error("UNKNOWN", "failed in an earlier run")
    if retry_failed:
        # Consent to pay again; the count of unknown outcomes is history and stays.
        return Prepare(Tally(unknown_total=snap.unknown_total))
    if error.kind == "permanent":
        return CarriedOver(error)
    return Prepare(snap.tally())


def _paid_without_task(snap: Snapshot) -> State:
    """A billed result with no task to fetch it again: spooled, or lost."""
    if snap.status is Status.READY and snap.has_spool:
        return Store(snap.tally(), "spool")
    if snap.status is Status.READY:
        detail = "paid for in an earlier run, but the result was not kept"
    else:  # a sync result whose file was deleted
        detail = (
            f"the result {snap.output} was paid for but its file is gone; rerun with "
            "--retry-failed to pay for it once more"
        )
    return Failed(_error("RESULT_LOST", detail), billed=True)
