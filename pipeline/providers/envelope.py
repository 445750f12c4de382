"""What both vendors' response envelopes share: field readers and the error an answer means.

Each vendor module keeps its own success rule (docs/vendors.md, "AILab: response
envelope" and "Perfect Corp: response envelope"); the pieces here are the ones whose
logic is the same for both: reading loosely typed JSON fields, the answer whose body
is not a JSON object, and turning a classified failure into a
:class:`~pipeline.errors.VendorError`. Pure functions, no I/O.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, TypeVar

from pipeline.errors import ErrorKind, RetryableError, TransportError, VendorError
from pipeline.providers.classify import is_rate_limit_code, make_error
from pipeline.providers.http import body_excerpt

__all__ = ["MALFORMED", "Answer", "as_int", "as_text", "unwrap", "vendor_id"]

MALFORMED = "MALFORMED_RESPONSE"
_E = TypeVar("_E", bound=VendorError)


def as_text(value: object) -> str:
    """A JSON string field, stripped; ``""`` for anything else."""
    return value.strip() if isinstance(value, str) else ""


def as_int(value: object) -> int | None:
    """An int from a JSON int or a decimal string; never from a bool (``true`` is not
    a status) nor from a float."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value.strip())
    return None


def vendor_id(value: object) -> str | None:
    """A vendor id (task id, file id) as a string: a string is kept verbatim (stripped),
    a JSON number is rendered exactly (``json`` keeps big ints exact, and ids may exceed
    2^53: docs/vendors.md, "Perfect Corp: transport and authentication")."""
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def unwrap(found: tuple[VendorError | None, dict[str, Any] | None]) -> dict[str, Any]:
    """The document of an envelope check's ``(error, doc)``; raises the error if any."""
    err, doc = found
    if err is not None:
        raise err
    assert doc is not None  # an envelope check returns a doc whenever it finds no error
    return doc


@dataclass(frozen=True)
class Answer:
    """One API answer being judged: who sent it and what, besides its body, the errors
    it turns into carry."""

    vendor: str
    status: int
    request_id: str | None = None
    retry_after: float | None = None

    def _raw(self, cls: type[_E], what: str, code: str) -> _E:
        """An error of class ``cls`` about this answer (a kind chosen, not classified)."""
        return cls(
            what, code=code, vendor=self.vendor, http_status=self.status, request_id=self.request_id
        )

    def malformed(self, what: str) -> RetryableError:
        """A success envelope we cannot read (no task id, no status): retryable."""
        return self._raw(RetryableError, what, MALFORMED)

    def error(
        self,
        kind: ErrorKind,
        message: str,
        *,
        code: str,
        rate_status: int | None = None,
        rate_code: str | None = None,
    ) -> VendorError:
        """The error for a failure classified as ``kind``; it is a rate limit when the
        vendor's rule says so for ``rate_status`` (default: the answer's status) and
        ``rate_code``."""
        rate_limited = is_rate_limit_code(
            self.vendor, self.status if rate_status is None else rate_status, rate_code
        )
        return make_error(
            kind,
            message,
            code=code,
            vendor=self.vendor,
            http_status=self.status,
            request_id=self.request_id,
            rate_limited=rate_limited,
            retry_after=self.retry_after,
        )

    def not_json(self, body: bytes, kind: ErrorKind, rate_code: str | None) -> VendorError:
        """The error an answer whose body is not a JSON object means.

        A 2xx is MALFORMED_RESPONSE (retryable); a 5xx (an HTML 502 page from a proxy)
        is a transport fault; anything else is a failure of ``kind``, the vendor's
        classification of its bare status, with the code ``HTTP_<status>``.
        """
        what = f"HTTP {self.status}, body is not a JSON object: {body_excerpt(body)}"
        code = f"HTTP_{self.status}"
        if 200 <= self.status < 300:
            return self.malformed(what)
        if self.status >= 500:
            return self._raw(TransportError, what, code)
        return self.error(kind, what, code=code, rate_code=rate_code)
