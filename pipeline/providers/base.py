"""The contract between the engine and a vendor.

A provider does exactly one attempt of one step and either returns a value or raises
a classified :class:`pipeline.errors.VendorError`. It never sleeps for retries, never
loops on polls and never touches the journal: the engine owns all of that. The wire
format lives in pure ``build_*`` / ``parse_*`` functions in each vendor module; the
async methods here only move bytes.

Steps of an item::

    submit(...)  -> Submitted(task_id=...)      async op: engine journals task_id, then polls
                 -> Submitted(image=b"...")     sync op: the result is already here
    poll(...)    -> TaskState(running | succeeded(result_url | image) | failed(error))
    download(url)-> bytes                       result URL -> image bytes (no API key sent)
    download_to(url, sink) -> "jpg"|"png"|"webp"  the same, streamed into a sink (no RAM copy)

Everything a vendor returns is checked before it is handed over: a sync result, an
inline poll result and every download decode as a JPEG, PNG or WebP within
``network.max_result_pixels`` (else ``ResultNotImageError``, code
``RESULT_NOT_IMAGE``: billed, never resubmitted on its own), and result URLs are
fetched only through :mod:`pipeline.netguard`.

``poll`` raises for request-level failures (the poll itself failed: re-poll the same
id later); it *returns* ``TaskState(state="failed")`` when the vendor says the task
itself failed, with ``error.kind`` telling the engine to resubmit or give up.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Literal, Protocol

from pipeline.errors import VendorError

__all__ = [
    "BEFORE_BILLABLE_SEND",
    "CreditBalance",
    "ExtraFiles",
    "ImagePayload",
    "Provider",
    "RequestStats",
    "ResultSink",
    "Submitted",
    "TaskState",
    "VendorParams",
]


@dataclass(frozen=True)
class ImagePayload:
    """Bytes to send for one image field, with a real extension and type
    (docs/vendors.md, "AILab: transport and authentication")."""

    data: bytes
    filename: str  # e.g. "portrait.jpg"; the extension matches content_type
    content_type: str  # "image/jpeg" | "image/png" | "image/heic"


# A submit's parameters, already vendor codes (``service_choice: 12``), and its extra
# image fields by form name (face swap's ``image_template``).
VendorParams = Mapping[str, int | str]
ExtraFiles = Mapping[str, ImagePayload]


@dataclass(frozen=True)
class Submitted:
    """Outcome of a successful submit: a task id (async) or the result (sync)."""

    task_id: str | None = None
    image: bytes | None = None
    request_id: str | None = None


@dataclass(frozen=True)
class TaskState:
    """What one poll learned about a task."""

    state: Literal["running", "succeeded", "failed"]
    result_url: str | None = None
    image: bytes | None = None
    error: VendorError | None = None
    # Vendor-advised seconds until the next poll, when the response carries one
    # (Perfect Corp V1 ``polling_interval`` in ms: docs/vendors.md, "Perfect Corp:
    # polling interval").
    poll_after: float | None = None
    # The vendor may have billed this failure: a Perfect Corp task that expired
    # unpolled answers InvalidTaskId and "the consumed units may still be charged"
    # (docs/vendors.md "Perfect Corp: polling window"). Never resubmitted on its own.
    maybe_billed: bool = False


@dataclass(frozen=True)
class CreditBalance:
    """A vendor account's balance as its credit endpoint reports it."""

    vendor: str
    balance: float
    unit: Literal["credits", "units"]
    pools: Mapping[str, float] = field(default_factory=dict)


class RequestStats:
    """Counts requests actually sent, by vendor and kind (submit, poll, upload, ...)."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()

    def count(self, vendor: str, kind: str) -> None:
        self.counts[(vendor, kind)] += 1

    def by_vendor(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (vendor, kind), n in sorted(self.counts.items()):
            out.setdefault(vendor, {})[kind] = n
        return out


class ResultSink(Protocol):
    """Where :meth:`Provider.download_to` streams a result: anything with ``write``
    (a binary file, ``pipeline.outputs.AtomicFile``); an async ``write`` is awaited."""

    def write(self, data: bytes, /) -> object: ...


# Awaited by a provider right before it sends a billable request (after the rate
# budget let it go): the engine's driver sets it per item to make the lifecycle's
# "submitting" checkpoint durable as late as possible, so an item stopped while it
# waits for the budget is not counted as a send with an unknown outcome.
BEFORE_BILLABLE_SEND: ContextVar[Callable[[], Awaitable[None]] | None] = ContextVar(
    "before_billable_send", default=None
)

# A rate-budget gate, awaited with the request kind ("submit", "poll", "upload", ...)
# before every call to the vendor's API host.
AcquireSlot = Callable[[str], Awaitable[None]]


class Provider(Protocol):
    """What the engine needs from a vendor. One instance per vendor per run."""

    vendor: str

    async def submit(
        self, operation: str, image: ImagePayload, params: VendorParams, files: ExtraFiles
    ) -> Submitted:
        """Send one item. ``params`` are vendor codes; ``files`` extra image fields."""
        ...

    async def poll(self, operation: str, task_id: str) -> TaskState:
        """Ask once about ``task_id``. Raises for request-level failures."""
        ...

    async def download(self, url: str) -> bytes:
        """Fetch a result URL (storage host: no API key, no rate budget)."""
        ...

    async def download_to(
        self, url: str, sink: ResultSink, *, check_path: str | None = None
    ) -> str:
        """Stream a result URL into ``sink`` and check it; returns its format.

        ``check_path``: the file ``sink`` writes to (flushed first if the sink has
        ``flush``), read back for the check; without it the stream is also spooled
        to a private temporary file for the check. On ``ResultNotImageError`` (or any
        error) the caller discards what the sink holds.
        """
        ...

    async def credits(self) -> CreditBalance:
        """The account's current balance."""
        ...
