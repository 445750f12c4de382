"""One exception tree for the whole pipeline.

Every error knows what it means for the run::

    PipelineError                      base; ``kind`` says what the engine does with it
    ├── UsageError                     exit 2: nothing was sent
    │   ├── ConfigError                bad config file or missing key variable
    │   ├── ManifestError              bad manifest (names file, line and field)
    │   └── JournalError               damaged / foreign journal file
    ├── LockHeldError                  exit 3: another run holds the output folder
    └── VendorError                    a vendor (or the network to it) said no
        ├── RetryableError             kind="retryable": back off and try again
        │   ├── RateLimitedError       429 / flow restriction; does not use up an attempt
        │   ├── TransportError         connection reset, timeout, non-JSON 5xx
        │   │                          (``maybe_sent``: the request may have reached the vendor)
        │   └── StoreError             a paid result could not be written locally
        ├── PermanentError             kind="permanent": this item fails, the run goes on
        │   ├── ResultLostError        paid for, but the result can no longer be fetched
        │   ├── ResultNotImageError    paid for, but what came back is not an acceptable image
        │   └── InputProblem           the input itself can't be used (not a file, unreadable)
        └── FatalError                 kind="fatal": stop the run cleanly (exit 3)
            └── DiskFullError          ENOSPC: nothing more can be stored (DISK_FULL)

``VendorError`` carries the vendor, the vendor's code string, the HTTP status and
the request id so reports can group by code. Messages never contain API keys:
providers build them from response bodies and URLs, never from request headers.
"""

from __future__ import annotations

from typing import Literal

ErrorKind = Literal["retryable", "permanent", "fatal"]

__all__ = [
    "ConfigError",
    "DiskFullError",
    "ErrorKind",
    "FatalError",
    "InputProblem",
    "JournalError",
    "LockHeldError",
    "ManifestError",
    "PermanentError",
    "PipelineError",
    "RateLimitedError",
    "ResultLostError",
    "ResultNotImageError",
    "RetryableError",
    "StoreError",
    "TransportError",
    "UsageError",
    "VendorError",
    "error_for_kind",
]


class PipelineError(Exception):
    """Base of every error the pipeline raises on purpose."""

    kind: ErrorKind = "fatal"
    exit_code: int = 3


class UsageError(PipelineError):
    """Usage, config or manifest problem found before anything was sent (exit 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """The config file is invalid, or a key variable it names is not set."""


class ManifestError(UsageError):
    """The manifest is invalid. The message names the file, line and field."""


class JournalError(UsageError):
    """The journal in the output folder is damaged or belongs to another tool."""


class LockHeldError(PipelineError):
    """Another live ``pipeline run`` holds the output folder's lock (exit 3)."""

    exit_code = 3


class VendorError(PipelineError):
    """A vendor call failed. ``code`` is the vendor's code string (or ``HTTP_<n>``)."""

    kind: ErrorKind = "permanent"

    def __init__(
        self,
        message: str,
        *,
        code: str = "",
        vendor: str = "",
        http_status: int | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or (f"HTTP_{http_status}" if http_status else "UNKNOWN")
        self.vendor = vendor
        self.http_status = http_status
        self.request_id = request_id

    def __str__(self) -> str:
        where = f"{self.vendor} " if self.vendor else ""
        return f"{where}{self.code}: {self.message}"

    def as_record(self) -> dict[str, str]:
        """The ``error`` object of ``results.jsonl``: ``{code, message, kind}``."""
        return {"code": self.code, "message": self.message, "kind": self.kind}


class RetryableError(VendorError):
    """Transient: try again after a backoff."""

    kind: ErrorKind = "retryable"


class RateLimitedError(RetryableError):
    """The vendor asked us to slow down. ``retry_after`` is its hint in seconds."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after = retry_after


class TransportError(RetryableError, ConnectionError):
    """The network failed: connection dropped, timeout, unreadable 5xx body.

    ``maybe_sent`` is true when the request body may have reached the vendor (a read
    timeout, a connection lost after sending): a billable submit with that outcome
    may have been charged, so the lifecycle resends it at most once. It is false when
    the request certainly never left (connection refused, DNS, TLS, connect timeout).
    """

    def __init__(self, message: str, *, maybe_sent: bool = True, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.maybe_sent = maybe_sent


class StoreError(RetryableError):
    """A paid result could not be written to the output folder (our side, not the
    vendor's): the journal keeps it as paid so a rerun stores it, never resubmits."""


class PermanentError(VendorError):
    """This input (or these params) will never succeed; fail the item, go on."""

    kind: ErrorKind = "permanent"


class ResultLostError(PermanentError):
    """The task succeeded (and was billed) but its result can no longer be fetched."""


class ResultNotImageError(PermanentError):
    """The vendor billed a result that is not an acceptable image (HTML, text, empty,
    truncated, a decompression bomb, too large). Never resubmitted on its own."""

    def __init__(self, message: str, **kw: object) -> None:
        kw.setdefault("code", "RESULT_NOT_IMAGE")
        super().__init__(message, **kw)  # type: ignore[arg-type]


class InputProblem(PermanentError):
    """The input can't be used as given (a FIFO, a broken symlink, unreadable...)."""


class FatalError(VendorError):
    """Nothing more can succeed in this run: bad key, no credits, retired API."""

    kind: ErrorKind = "fatal"
    exit_code = 3


class DiskFullError(FatalError):
    """The disk is full (ENOSPC): the run stops; what was paid stays in the journal."""

    def __init__(self, message: str, **kw: object) -> None:
        kw.setdefault("code", "DISK_FULL")
        super().__init__(message, **kw)  # type: ignore[arg-type]


def error_for_kind(kind: ErrorKind) -> type[VendorError]:
    """The VendorError subclass for a classification result."""
    return {"retryable": RetryableError, "permanent": PermanentError, "fatal": FatalError}[kind]
