"""Wire plumbing shared by both vendors: request/response values and one ``send``.

Sans-I/O helpers (plain functions, tested without a network):

- :class:`HttpRequest` / :class:`HttpResponse`: what the vendor modules' ``build_*``
  functions return and their ``parse_*`` functions take;
- :func:`parse_json_object`, :func:`header`, :func:`parse_retry_after`;
- :func:`decode_base64_image`, :func:`sniff_image_type` (docs/vendors.md, "AILab:
  emotion editor output format");
- :func:`parse_download`: a result download's status → go on, or a classified error;
- :func:`redact`, :func:`redact_error`, :func:`scrub`, :func:`safe_url`: keep secrets
  (the API key, signed URL queries) out of messages, logs and reports;
- :func:`redirect_error`: API hosts never redirect us (the key must stay on one host).

The coroutines: :func:`send` (one HTTP exchange, its body read with a cap, network
failures mapped to :class:`~pipeline.errors.TransportError`), :func:`download` and
:func:`download_to` (a result URL through :mod:`pipeline.netguard`, no key).

Memory: no body is read unbounded. An API answer may weigh ``max_response_bytes``, a
download ``max_download_bytes``; bytes are counted after decompression (aiohttp
inflates ``gzip``/``deflate``/``br`` in bounded steps), so a gzip bomb stops at the
cap. A reader keeps :data:`FREE_BODY_BYTES` in memory; the rest of a body goes to an
anonymous temporary file (:class:`Spool`) while it arrives, and a large body is
brought into memory only once complete and within its cap, holding one of
:data:`LARGE_BODY_SLOTS` process-wide slots (:class:`BodyScope`) until the caller is
done with it. So at any concurrency at most that many large bodies are in memory at
once, and a hostile body (200 MB, a gzip bomb) never is. Downloads given a sink
(:func:`download_to`) stream to it and never hold more than a chunk.

API keys never enter an :class:`HttpRequest`: the vendor classes add their auth header
at the moment they send to their own base URL, so a request value can be logged.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import errno
import inspect
import json
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from types import TracebackType
from typing import IO, Any, Final
from urllib.parse import urlsplit, urlunsplit
from urllib.request import getproxies, proxy_bypass

import aiohttp
import anyio
from multidict import CIMultiDict
from yarl import URL

from pipeline.config import TimeoutConfig
from pipeline.errors import (
    DiskFullError,
    FatalError,
    PermanentError,
    RateLimitedError,
    ResultNotImageError,
    RetryableError,
    StoreError,
    TransportError,
    VendorError,
)
from pipeline.netguard import AddressRefused, ResolveError, UrlGuard, guarded_get
from pipeline.perloop import PerLoop
from pipeline.providers.base import ImagePayload, RequestStats, ResultSink
from pipeline.redaction import contains_secret, redact_secret

__all__ = [
    "CHUNK_BYTES",
    "CONNECT_FAILED",
    "FREE_BODY_BYTES",
    "LARGE_BODY_SLOTS",
    "RESPONSE_TOO_LARGE",
    "BodyScope",
    "FilePart",
    "FormPart",
    "HttpRequest",
    "HttpResponse",
    "ResponseTooLarge",
    "Spool",
    "TextPart",
    "api_timeout",
    "as_float",
    "body_excerpt",
    "clip",
    "contains_secret",
    "decode_base64_image",
    "download",
    "download_timeout",
    "download_to",
    "header",
    "join_url",
    "parse_download",
    "parse_json_object",
    "parse_retry_after",
    "read_capped",
    "redact",
    "redact_error",
    "redirect_error",
    "safe_url",
    "scrub",
    "send",
    "sniff_image_type",
    "spool_error",
    "transport_error",
]

# Longest slice of a vendor-supplied text we copy into an error message.
_MAX_MESSAGE = 300
# Longest vendor code / request id we keep (they are short by design; a longer one is
# a vendor echoing something back).
_MAX_CODE = 80
_MAX_REQUEST_ID = 128
# Request headers aiohttp would add on its own; storage PUTs must carry exactly the
# headers the vendor signed (docs/vendors.md, "Perfect Corp: upload"), so these are
# skipped.
_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")

CONNECT_FAILED: Final = "CONNECT_FAILED"
RESPONSE_TOO_LARGE: Final = "RESPONSE_TOO_LARGE"

# Body memory bounds (module doc). A JSON answer without an inline image is a few
# KiB; sync results (base64 images) are the bodies that need a slot.
FREE_BODY_BYTES: Final = 64 * 1024
LARGE_BODY_SLOTS: Final = 2
CHUNK_BYTES: Final = 64 * 1024
# What we read of a non-2xx download body for the error message.
_ERROR_EXCERPT_BYTES = 4096


@dataclass(frozen=True)
class TextPart:
    """A scalar multipart field, already rendered as text (AILab: decimal)."""

    name: str
    value: str


@dataclass(frozen=True)
class FilePart:
    """A file multipart field: real filename and matching Content-Type."""

    name: str
    payload: ImagePayload


FormPart = TextPart | FilePart


@dataclass(frozen=True)
class HttpRequest:
    """One request, as data. Never holds an API key.

    ``target`` is the path plus already-encoded query, relative to the vendor's base
    URL, or an absolute URL for storage hosts. At most one of ``json``, ``form`` and
    ``data`` is set. ``headers`` are the request's own headers (not auth).
    """

    method: str
    target: str
    json: Mapping[str, Any] | None = None
    form: tuple[FormPart, ...] | None = None
    data: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class HttpResponse:
    """What came back: status, headers (look them up with :func:`header`) and body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class ResponseTooLarge(RetryableError):
    """An answer whose body is over its cap; it was not read. The caller turns it
    into what it means for its step (see ``VendorClient``)."""

    def __init__(
        self, message: str, *, status: int, headers: Mapping[str, str], limit: int, vendor: str
    ) -> None:
        super().__init__(message, code=RESPONSE_TOO_LARGE, vendor=vendor, http_status=status)
        self.status = status
        self.headers = headers
        self.limit = limit


# -------------------------------------------------------------------------- sans-I/O


def header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive header lookup that works for plain dicts too."""
    value = headers.get(name)
    if value is not None:
        return value
    lower = name.lower()
    for key, val in headers.items():
        if key.lower() == lower:
            return val
    return None


def parse_json_object(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or ``None`` if it is not one (HTML, truncated, a
    list, nested deeper than the parser's recursion limit, a 5000-digit number)."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def as_float(value: object) -> float | None:
    """A JSON number or numeric string as a float; ``None`` for anything else
    (booleans included: ``true`` is not a balance)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        try:
            return float(value)
        except OverflowError:  # an int of 400 digits
            return None
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP-date), else ``None``.

    The raw value is returned (negative clamped to 0): the engine caps it with
    ``retry.retry_after_max_seconds``. Never raises, whatever the header holds
    (999999999, NaN, a date in year 9999 or 1900, garbage). Neither vendor documents
    the header (docs/vendors.md, "Both vendors: Retry-After"): honour it when present.
    """
    raw = header(headers, "Retry-After")
    if raw is None:
        return None
    raw = raw.strip()
    if not raw or len(raw) > 64:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
            seconds = when.timestamp() - (time.time() if now is None else now)
        except (TypeError, ValueError, IndexError, OverflowError, OSError):
            return None
    if seconds != seconds or seconds in (float("inf"), float("-inf")):  # NaN / inf
        return None
    return max(0.0, seconds)


_DATA_URL_PREFIX = re.compile(r"^\s*data:[^,]*?;base64,", re.IGNORECASE)
_WHITESPACE = b" \t\r\n\v\f"
_URLSAFE = bytes.maketrans(b"-_", b"+/")


def decode_base64_image(text: str) -> bytes | None:
    """Decode a base64 image, tolerating a ``data:…;base64,`` prefix, line breaks,
    missing padding and the URL-safe alphabet. ``None`` if it is not base64 at all.

    Results can be tens of MB and every copy counts against the memory bound: plain
    standard base64 (what vendors send) is decoded straight from the ``str``, without
    an intermediate copy; only the tolerant path makes one ASCII copy to clean.
    """
    stripped = text.strip()
    if _DATA_URL_PREFIX.match(stripped) is None:
        try:
            return binascii.a2b_base64(stripped, strict_mode=True) or None
        except (binascii.Error, ValueError):
            pass  # not plain strict base64: try the tolerant path
    prefix = _DATA_URL_PREFIX.match(stripped)
    try:
        raw = stripped.encode("ascii")
    except UnicodeEncodeError:
        return None
    if prefix is not None:
        raw = raw[prefix.end() :]
    if any(c in raw for c in _WHITESPACE):
        raw = raw.translate(None, _WHITESPACE)
    if not raw:
        return None
    if b"-" in raw or b"_" in raw:
        raw = raw.translate(_URLSAFE)
    if len(raw) % 4:
        raw += b"=" * (-len(raw) % 4)
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        return None
    return data or None


def sniff_image_type(data: bytes) -> str | None:
    """The image type from its magic bytes (``FFD8FF`` JPEG, ``89504E47`` PNG, ...)."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"heim"):
        return "image/heic"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    return None


def safe_url(url: str) -> str:
    """``scheme://host/path`` without userinfo, query or fragment: presigned URLs
    carry their signature in the query, so this is the only form that may be logged."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid url>"
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


_QUERY = re.compile(r"\?[^\s'\"<>]*")


def redact(text: str, secret: str | None) -> str:
    """``text`` with the key (whole, in part or encoded: :mod:`pipeline.redaction`)
    and every URL query string replaced."""
    return _QUERY.sub("?…", redact_secret(text, secret))


def scrub(text: str, secret: str | None, limit: int = _MAX_MESSAGE) -> str:
    """A vendor-supplied string made safe to log: key forms and URL queries replaced,
    whitespace (newlines: log injection) collapsed, clipped to ``limit``."""
    return _cut(redact(" ".join(text.split()), secret), limit)


def redact_error(err: VendorError, secret: str) -> VendorError:
    """Scrub an error in place (message, code, request id); returns ``err``.

    Parsers build messages from response bodies, and a vendor could echo the key back
    ("This API key … is not recognized") or a signed URL; this is the last line of
    defence before an error reaches a log, the journal or a report. Every field is
    also clipped: a vendor string is never copied at unbounded length.
    """
    err.message = scrub(err.message, secret)
    err.code = scrub(err.code, secret, _MAX_CODE)
    if err.request_id is not None:
        err.request_id = scrub(err.request_id, secret, _MAX_REQUEST_ID)
    err.args = (err.message,)
    return err


def clip(text: str) -> str:
    """A vendor-supplied text, shortened for an error message."""
    return _cut(" ".join(text.split()), _MAX_MESSAGE)


def _cut(text: str, limit: int) -> str:
    """``text`` (whitespace collapsed) in at most ``limit`` characters, "…" ending a
    cut one. A cut falls after the last word that fits, where one ends in the second
    half: a word cut in two could be a key cut in two, and its first part would not
    be recognised (:mod:`pipeline.redaction` finds runs of 12 characters or more)."""
    if len(text) <= limit:
        return text
    head = text[: limit - 1]
    if text[limit - 1] != " ":
        space = head.rfind(" ")
        if space >= limit // 2:
            head = head[:space]
    return head.rstrip() + "…"


def body_excerpt(body: bytes) -> str:
    """A short printable excerpt of a body that is not JSON (an HTML 502 page, say)."""
    return clip(body[: _MAX_MESSAGE * 2].decode("utf-8", errors="replace")) or "<empty body>"


def parse_download(
    status: int, headers: Mapping[str, str], body: bytes, *, url: str, vendor: str
) -> None:
    """Classify a result download's status; return for 2xx (the content is checked
    separately by :func:`pipeline.resultcheck.check_result_image`).

    - 403/404/410 → ``PermanentError(code="RESULT_URL_EXPIRED")``: result URLs expire
      (docs/vendors.md, "Perfect Corp: result URLs" and "AILab: task lifetimes"); the
      engine decides whether a re-poll can get a fresh URL (Perfect Corp: yes) or the
      paid result is lost;
    - 429 → ``RateLimitedError``; 408 and 5xx → ``RetryableError`` (storage sometimes
      stalls); other 4xx → ``PermanentError``; anything else (1xx, a redirect that
      survived) → ``RetryableError``.

    ``body`` is only an excerpt, for the message.
    """
    if 200 <= status < 300:
        return
    text = f"download {safe_url(url)}: HTTP {status}: {body_excerpt(body)}"
    if status in (403, 404, 410):
        raise PermanentError(text, code="RESULT_URL_EXPIRED", vendor=vendor, http_status=status)
    if status == 429:
        raise RateLimitedError(
            text,
            retry_after=parse_retry_after(headers),
            vendor=vendor,
            http_status=status,
            code=f"HTTP_{status}",
        )
    if status == 408 or status >= 500:
        raise RetryableError(text, vendor=vendor, http_status=status)
    if 400 <= status < 500:
        raise PermanentError(text, vendor=vendor, http_status=status)
    raise RetryableError(text, vendor=vendor, http_status=status)


def redirect_error(
    status: int, headers: Mapping[str, str], *, vendor: str, request_id: str | None = None
) -> FatalError:
    """A 3xx from an API host. API calls never follow redirects, because the auth header
    must reach the configured base URL's host only; every call would fail the same way,
    so this is fatal for the run and names the fix."""
    location = safe_url(header(headers, "Location") or "") or "?"
    return FatalError(
        f"the API answered HTTP {status} redirecting to {location}; set base_url to the "
        "final address (API calls do not follow redirects, so the key stays on one host)",
        code=f"HTTP_{status}",
        vendor=vendor,
        http_status=status,
        request_id=request_id,
    )


def join_url(base_url: str, target: str) -> str:
    """The vendor base URL joined with a request target (already encoded)."""
    return base_url.rstrip("/") + "/" + target.lstrip("/")


def api_timeout(timeouts: TimeoutConfig) -> aiohttp.ClientTimeout:
    """Timeout of one API call (and of a storage PUT)."""
    return aiohttp.ClientTimeout(total=timeouts.request_seconds, connect=timeouts.connect_seconds)


def download_timeout(timeouts: TimeoutConfig) -> aiohttp.ClientTimeout:
    """Timeout of one result download hop (storage sometimes stalls: docs/vendors.md,
    "AILab: downloads"; the engine retries)."""
    return aiohttp.ClientTimeout(
        total=timeouts.download_seconds,
        connect=min(timeouts.connect_seconds, timeouts.download_seconds),
    )


def transport_error(exc: BaseException, what: str, vendor: str) -> TransportError:
    """A network failure as :class:`TransportError`, with ``maybe_sent`` and code:

    - the request certainly never left: connection refused, DNS failure, TLS failure,
      connect timeout, a refused pinned address → ``CONNECT_FAILED``,
      ``maybe_sent=False`` (what the engine counts towards ``VENDOR_UNREACHABLE``);
    - it may have reached the vendor (read timeout, total timeout, disconnected or
      reset after connecting, truncated or undecodable body) → ``TIMEOUT`` /
      ``NETWORK_ERROR``, ``maybe_sent=True``.

    The message names the exception and the URL without its query, never a header.
    """
    name = type(exc).__name__
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return TransportError(
            f"{what}: connect timed out", code=CONNECT_FAILED, vendor=vendor, maybe_sent=False
        )
    if isinstance(exc, aiohttp.ClientConnectorError | AddressRefused | ResolveError):
        detail = clip(redact(str(exc), None)) or name
        return TransportError(
            f"{what}: could not connect: {name}: {detail}",
            code=CONNECT_FAILED,
            vendor=vendor,
            maybe_sent=False,
        )
    if isinstance(exc, TimeoutError):
        return TransportError(f"{what}: timed out", code="TIMEOUT", vendor=vendor, maybe_sent=True)
    detail = clip(redact(str(exc), None)) or name
    return TransportError(
        f"{what}: {name}: {detail}", code="NETWORK_ERROR", vendor=vendor, maybe_sent=True
    )


# ------------------------------------------------------------------- body memory


_SLOTS: PerLoop[anyio.Semaphore] = PerLoop(lambda: anyio.Semaphore(LARGE_BODY_SLOTS))


class BodyScope:
    """Holds at most one large-body slot, from the moment a large body is brought into
    memory until the scope exits.

    Wrap a call *and* what is done with its body (parse, base64 decode, image check)
    in one scope, so the memory a large body costs is counted until it is gone::

        async with BodyScope() as scope:
            resp = await send(..., scope=scope)
            ...
    """

    def __init__(self) -> None:
        self._held = False

    async def hold(self) -> None:
        if not self._held:
            await _SLOTS.get().acquire()
            self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            _SLOTS.get().release()

    async def __aenter__(self) -> BodyScope:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def spool_error(exc: OSError, what: str, vendor: str) -> VendorError:
    """A local write failure while spooling a body: a full disk stops the run
    (``DISK_FULL``); anything else is our side, retryable (``StoreError``)."""
    if exc.errno == errno.ENOSPC:
        return DiskFullError(
            f"{what}: the disk is full (temporary file for the answer): free space and rerun",
            vendor=vendor,
        )
    return StoreError(
        f"{what}: could not write a temporary file: {exc.strerror or type(exc).__name__}",
        code="LOCAL_WRITE_FAILED",
        vendor=vendor,
    )


class Spool:
    """A body being received: the first :data:`FREE_BODY_BYTES` in memory, the rest
    in an anonymous temporary file (``tempfile.TemporaryFile``: gone when closed, or
    when the process dies). So a body the caps will refuse, or one not yet complete,
    costs no memory past the free part, however many arrive at once.

    Writes are plain blocking writes of one chunk (64 KiB into the page cache); the
    read-back of a whole body runs in a worker thread. A local write failure raises
    :func:`spool_error`'s error (``DISK_FULL`` or ``StoreError``), naming ``what``.
    """

    def __init__(self, what: str = "answer", vendor: str = "") -> None:
        self._mem: list[bytes] = []
        self._file: IO[bytes] | None = None
        self.size = 0
        self._what = what
        self._vendor = vendor

    @property
    def spilled(self) -> bool:
        return self._file is not None

    def _spill(self) -> IO[bytes]:
        fh = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        for part in self._mem:
            fh.write(part)
        self._mem.clear()
        return fh

    def write(self, chunk: bytes) -> int:
        try:
            if self._file is None and self.size + len(chunk) > FREE_BODY_BYTES:
                self._file = self._spill()
            if self._file is None:
                self._mem.append(chunk)
            else:
                self._file.write(chunk)
        except OSError as exc:
            raise spool_error(exc, self._what, self._vendor) from None
        self.size += len(chunk)
        return len(chunk)

    def file(self) -> IO[bytes]:
        """The whole body as a readable file (spilling a small one first)."""
        try:
            if self._file is None:
                self._file = self._spill()
            self._file.flush()
        except OSError as exc:
            raise spool_error(exc, self._what, self._vendor) from None
        self._file.seek(0)
        return self._file

    async def getvalue(self) -> bytes:
        if self._file is None:
            return b"".join(self._mem)
        fh = self.file()
        return await anyio.to_thread.run_sync(fh.read)

    def close(self) -> None:
        self._mem.clear()
        if self._file is not None:
            self._file.close()
            self._file = None


async def read_capped(
    resp: aiohttp.ClientResponse, *, limit: int, scope: BodyScope, what: str, vendor: str
) -> bytes:
    """The whole (decompressed) body, or :class:`ResponseTooLarge` past ``limit``
    bytes (also when ``Content-Length`` announces more: nothing is read then).

    A body over :data:`FREE_BODY_BYTES` is received into a :class:`Spool` and brought
    into memory only once complete and within the cap, holding ``scope``'s slot.
    """
    headers = CIMultiDict(resp.headers)

    def too_large() -> ResponseTooLarge:
        return ResponseTooLarge(
            f"{what}: answer larger than {limit} bytes; not read",
            status=resp.status,
            headers=headers,
            limit=limit,
            vendor=vendor,
        )

    announced = resp.content_length
    if announced is not None and announced > limit:
        raise too_large()
    spool = Spool(what, vendor)
    try:
        async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
            if spool.size + len(chunk) > limit:
                raise too_large()
            spool.write(chunk)
        if spool.spilled:
            await scope.hold()
        return await spool.getvalue()
    finally:
        spool.close()


# ------------------------------------------------------------------------------- I/O


_OCTETS = "application/octet-stream"  # aiohttp's default for a body of bytes


class _Upload(aiohttp.payload.BytesPayload):
    """An upload's bytes, sent as they are, without a copy.

    Given an ``io.BytesIO`` (as it was), aiohttp measures it with ``getbuffer()``,
    which copies a buffer shared with the caller's bytes, and the input is held for
    a resend: a second copy of every photo in flight (tracemalloc at the peak of a run
    of 3 MB photos at concurrency 64: 197 MB of the 504 MB traced). Given bytes,
    aiohttp's ``BytesPayload`` warns that one write of a body over 1 MB may block the
    event loop; it does not: the transport keeps what the socket cannot take yet and
    the request waits for it to drain. So the warning, and only it, is skipped.
    """

    def __init__(self, value: bytes, *, content_type: str) -> None:
        aiohttp.payload.Payload.__init__(self, value, content_type=content_type)
        self._size = len(value)


def _form_data(parts: tuple[FormPart, ...]) -> aiohttp.FormData:
    form = aiohttp.FormData(default_to_multipart=True)
    for part in parts:
        if isinstance(part, FilePart):
            form.add_field(
                part.name,
                _Upload(part.payload.data, content_type=part.payload.content_type),
                filename=part.payload.filename,
                content_type=part.payload.content_type,
            )
        else:
            form.add_field(part.name, part.value)
    return form


def _request_body(request: HttpRequest, headers: CIMultiDict[str]) -> Any:
    """What aiohttp sends as the body of ``request`` (``None`` for none); a JSON body
    sets its Content-Type in ``headers`` unless the request has one."""
    if request.form is not None:
        return _form_data(request.form)
    if request.json is not None:
        headers.setdefault("Content-Type", "application/json")
        return json.dumps(request.json, separators=(",", ":")).encode()
    if request.data is not None:
        return _Upload(request.data, content_type=headers.get("Content-Type", _OCTETS))
    return None


@lru_cache(maxsize=64)
def proxy_for(scheme: str, host: str) -> str | None:
    """The proxy ``HTTPS_PROXY``/``HTTP_PROXY`` name for ``scheme://host``, unless
    ``NO_PROXY`` exempts the host; read once per host and run.

    The session runs with ``trust_env=False``: with it on, aiohttp re-reads the
    environment and ``~/.netrc`` for every request, a profiled tenth of a fast run's
    client CPU (README "Performance"). This keeps the same proxy rules, read once.
    """
    proxies = getproxies()  # on Linux: the environment only
    if not proxies or proxy_bypass(host):
        return None
    return proxies.get(scheme)


async def send(
    session: aiohttp.ClientSession,
    request: HttpRequest,
    url: str,
    *,
    vendor: str,
    client_timeout: aiohttp.ClientTimeout,
    extra_headers: Mapping[str, str] | None = None,
    allow_redirects: bool = False,
    exact_headers: bool = False,
    max_bytes: int = 32 * 1024 * 1024,
    scope: BodyScope | None = None,
) -> HttpResponse:
    """Send ``request`` to ``url`` once and read its body, at most ``max_bytes``.

    ``url`` is used as given (``encoded=True``): vendor task ids are quoted by the
    builders and presigned storage URLs must not be re-quoted, or their signature
    breaks. ``extra_headers`` carries the auth header for API calls only.
    ``exact_headers`` suppresses aiohttp's own headers (storage PUTs). ``scope``
    holds the large-body slot past the return (see :class:`BodyScope`); without one,
    the slot is released once the body is read.

    Raises :class:`TransportError` for network failures (:func:`transport_error`) and
    :class:`ResponseTooLarge` for a body over the cap.
    """
    headers = CIMultiDict(request.headers)
    if extra_headers:
        headers.update(extra_headers)
    body = _request_body(request, headers)
    skip = [h for h in _AUTO_HEADERS if h not in headers] if exact_headers else None
    what = f"{request.method} {safe_url(url)}"
    own_scope = scope is None
    body_scope = scope or BodyScope()
    try:
        target = URL(url, encoded=True)
        async with session.request(
            request.method,
            target,
            data=body,
            proxy=proxy_for(target.scheme, target.host or ""),
            headers=headers,
            timeout=client_timeout,
            allow_redirects=allow_redirects,
            skip_auto_headers=skip,
        ) as resp:
            payload = await read_capped(
                resp, limit=max_bytes, scope=body_scope, what=what, vendor=vendor
            )
            return HttpResponse(resp.status, CIMultiDict(resp.headers), payload)
    except (TimeoutError, aiohttp.ClientError, AddressRefused) as exc:
        raise transport_error(exc, what, vendor) from exc
    except ValueError as exc:
        # yarl/aiohttp refuse a URL they cannot parse: the request never left.
        raise TransportError(
            f"{what}: invalid URL", code=CONNECT_FAILED, vendor=vendor, maybe_sent=False
        ) from exc
    finally:
        if own_scope:
            body_scope.release()


# --------------------------------------------------------------------- downloads


async def _write(sink: ResultSink, chunk: bytes) -> None:
    result = sink.write(chunk)
    if inspect.isawaitable(result):
        await result


async def download_to(
    url: str,
    sink: ResultSink,
    *,
    vendor: str,
    timeouts: TimeoutConfig,
    stats: RequestStats,
    guard: UrlGuard,
    max_bytes: int,
) -> int:
    """GET a result URL from the vendor's storage into ``sink`` (``write(bytes)``,
    sync or async); returns the byte count. No API key, no rate budget.

    Goes through ``guard`` (:mod:`pipeline.netguard`: http(s) only, every redirect
    hop checked, connections pinned to checked addresses). Memory stays at one chunk;
    more than ``max_bytes`` (announced or received, after decompression) →
    ``ResultNotImageError`` ("result larger than N bytes"). The content is not
    checked here. A failure of ``sink.write`` propagates unchanged.
    """
    where = f"download {safe_url(url)}"

    def count(hop: int) -> None:
        if hop == 0:  # one download, however many redirects it takes
            stats.count(vendor, "download")

    def too_large() -> ResultNotImageError:
        return ResultNotImageError(
            f"{where}: the result is not an acceptable image: result larger than {max_bytes} bytes",
            vendor=vendor,
        )

    try:
        async with guarded_get(
            guard, url, client_timeout=download_timeout(timeouts), on_send=count
        ) as resp:
            where = f"download {safe_url(str(resp.url))}"
            if not 200 <= resp.status < 300:
                excerpt = await resp.content.read(_ERROR_EXCERPT_BYTES)
                parse_download(resp.status, resp.headers, excerpt, url=str(resp.url), vendor=vendor)
            announced = resp.content_length
            if announced is not None and announced > max_bytes:
                raise too_large()
            size = 0
            async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
                size += len(chunk)
                if size > max_bytes:
                    raise too_large()
                await _write(sink, chunk)
            return size
    except (TimeoutError, aiohttp.ClientError, AddressRefused, ResolveError) as exc:
        # Only network errors: a sink's own failure (ENOSPC...) propagates unchanged.
        raise transport_error(exc, where, vendor) from exc


async def download(
    session: aiohttp.ClientSession | None,
    url: str,
    *,
    vendor: str,
    timeouts: TimeoutConfig,
    stats: RequestStats,
    guard: UrlGuard | None = None,
    max_bytes: int = 64 * 1024 * 1024,
) -> bytes:
    """:func:`download_to` into a :class:`Spool`, then the bytes (a large-body slot
    held while they are read back). ``session`` is unused (kept for callers): each
    download uses a private, pinned session; without ``guard`` only public hosts
    are allowed. The content is not checked here (see ``VendorClient.download``)."""
    del session
    spool = Spool(f"download {safe_url(url)}", vendor)
    try:
        await download_to(
            url,
            spool,
            vendor=vendor,
            timeouts=timeouts,
            stats=stats,
            guard=guard or UrlGuard("", vendor=vendor, connect_seconds=timeouts.connect_seconds),
            max_bytes=max_bytes,
        )
        async with BodyScope() as scope:
            if spool.spilled:
                await scope.hold()
            return await spool.getvalue()
    finally:
        spool.close()
