"""Wire plumbing shared by both vendors: request/response values and one ``send``.

Sans-I/O helpers (plain functions, tested without a network):

- :class:`HttpRequest` / :class:`HttpResponse`: what the vendor modules' ``build_*``
  functions return and their ``parse_*`` functions take;
- :func:`parse_json_object`, :func:`header`, :func:`parse_retry_after`;
- :func:`decode_base64_image`, :func:`sniff_image_type` (vendor-protocols.md Q6);
- :func:`parse_download`: a result download's status → bytes or a classified error;
- :func:`redact`, :func:`redact_error`, :func:`safe_url`: keep secrets out of messages;
- :func:`redirect_error`: API hosts never redirect us (the key must stay on one host).

The only coroutines are :func:`send` (one HTTP exchange, network failures mapped to
:class:`~pipeline.errors.TransportError`) and :func:`download` (a result URL, no key).
API keys never enter an :class:`HttpRequest`: the vendor classes add their auth header
at the moment they send to their own base URL, so a request value can be logged.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import io
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from pipeline.config import TimeoutConfig
from pipeline.errors import (
    FatalError,
    PermanentError,
    RateLimitedError,
    RetryableError,
    TransportError,
    VendorError,
)
from pipeline.providers.base import ImagePayload, RequestStats

__all__ = [
    "FilePart",
    "FormPart",
    "HttpRequest",
    "HttpResponse",
    "TextPart",
    "api_timeout",
    "as_float",
    "body_excerpt",
    "clip",
    "decode_base64_image",
    "download",
    "download_timeout",
    "header",
    "join_url",
    "parse_download",
    "parse_json_object",
    "parse_retry_after",
    "redact",
    "redact_error",
    "redirect_error",
    "safe_url",
    "send",
    "sniff_image_type",
]

# Longest slice of a vendor-supplied text we copy into an error message.
_MAX_MESSAGE = 300
# Request headers aiohttp would add on its own; storage PUTs must carry exactly the
# headers the vendor signed (vendor-protocols.md §2.2 step 2), so these are skipped.
_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


@dataclass(frozen=True)
class TextPart:
    """A scalar multipart field, already rendered as text (AILab: decimal, §1.1)."""

    name: str
    value: str


@dataclass(frozen=True)
class FilePart:
    """A file multipart field: real filename and matching Content-Type (§1.1)."""

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
    """The body as a JSON object, or ``None`` if it is not one (HTML, truncated, a list)."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def as_float(value: object) -> float | None:
    """A JSON number or numeric string as a float; ``None`` for anything else
    (booleans included: ``true`` is not a balance)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP-date), else ``None``.

    Neither vendor documents the header (§1.7, §2.6); Q3 says honour it if present.
    """
    raw = header(headers, "Retry-After")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds or seconds in (float("inf"), float("-inf")):  # NaN / inf
        return None
    return max(0.0, seconds)


_DATA_URL_PREFIX = re.compile(r"^data:[^,]*?;base64,", re.IGNORECASE)


def decode_base64_image(text: str) -> bytes | None:
    """Decode a base64 image, tolerating a ``data:…;base64,`` prefix (Q6), line breaks,
    missing padding and the URL-safe alphabet. ``None`` if it is not base64 at all."""
    cleaned = _DATA_URL_PREFIX.sub("", text.strip(), count=1)
    cleaned = "".join(cleaned.split())
    if not cleaned:
        return None
    if "-" in cleaned or "_" in cleaned:
        cleaned = cleaned.replace("-", "+").replace("_", "/")
    cleaned += "=" * (-len(cleaned) % 4)
    try:
        data = base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError):
        return None
    return data or None


def sniff_image_type(data: bytes) -> str | None:
    """The image type from its magic bytes (Q6: ``FFD8FF`` JPEG, ``89504E47`` PNG)."""
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
    """``scheme://host/path`` without query or fragment: presigned URLs carry signatures."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid url>"
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


_QUERY = re.compile(r"\?[^\s'\"<>]*")


def redact(text: str, secret: str | None) -> str:
    """``text`` with ``secret`` and every URL query string replaced."""
    if secret:
        text = text.replace(secret, "***")
    return _QUERY.sub("?…", text)


def redact_error(err: VendorError, secret: str) -> VendorError:
    """Scrub ``secret`` from an error's message and code, in place; returns ``err``.

    Parsers build messages from response bodies, and a vendor could echo the key back
    ("This API key … is not recognized"); this is the last line of defence.
    """
    if secret and (secret in err.message or secret in err.code):
        err.message = err.message.replace(secret, "***")
        err.code = err.code.replace(secret, "***")
        err.args = (err.message,)
    return err


def clip(text: str) -> str:
    """A vendor-supplied text, shortened for an error message."""
    text = " ".join(text.split())
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 1] + "…"


def body_excerpt(body: bytes) -> str:
    """A short printable excerpt of a body that is not JSON (an HTML 502 page, say)."""
    return clip(body[: _MAX_MESSAGE * 2].decode("utf-8", errors="replace")) or "<empty body>"


def parse_download(
    status: int, headers: Mapping[str, str], body: bytes, *, url: str, vendor: str
) -> bytes:
    """A result download's response → image bytes, or a classified error.

    - 2xx with a body → the bytes (a text/JSON/HTML body is a storage error page: R);
    - 403/404/410 → ``PermanentError(code="RESULT_URL_EXPIRED")``: AILab URLs live 24 h
      (§1.3), Perfect Corp's 2 h (§2.4); the engine decides whether a re-poll can get a
      fresh URL (Perfect Corp: yes) or the paid result is lost;
    - 429 → ``RateLimitedError``; 408 and 5xx → ``RetryableError`` (§1.7: storage
      sometimes stalls); other 4xx → ``PermanentError``.
    """
    where = f"download {safe_url(url)}"
    if 200 <= status < 300:
        ctype = (header(headers, "Content-Type") or "").split(";")[0].strip().lower()
        if not body:
            raise RetryableError(
                f"{where}: empty body", code="EMPTY_RESULT", vendor=vendor, http_status=status
            )
        if ctype.startswith("text/") or ctype in ("application/json", "application/xml"):
            raise RetryableError(
                f"{where}: got {ctype}, not an image: {body_excerpt(body)}",
                code="RESULT_NOT_IMAGE",
                vendor=vendor,
                http_status=status,
            )
        return body
    text = f"{where}: HTTP {status}: {body_excerpt(body)}"
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
    # A 1xx/3xx that survived redirect handling.
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
    """Timeout of one result download (§1.7 [R]: 20 s per try; the engine retries)."""
    return aiohttp.ClientTimeout(
        total=timeouts.download_seconds,
        connect=min(timeouts.connect_seconds, timeouts.download_seconds),
    )


# ------------------------------------------------------------------------------- I/O


def _form_data(parts: tuple[FormPart, ...]) -> aiohttp.FormData:
    form = aiohttp.FormData(default_to_multipart=True)
    for part in parts:
        if isinstance(part, FilePart):
            form.add_field(
                part.name,
                # A file object, not raw bytes: aiohttp warns that bodies over 1 MB
                # given as bytes may block the event loop (typical photos are 2-5 MB).
                io.BytesIO(part.payload.data),
                filename=part.payload.filename,
                content_type=part.payload.content_type,
            )
        else:
            form.add_field(part.name, part.value)
    return form


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
) -> HttpResponse:
    """Send ``request`` to ``url`` once and read the whole body.

    ``url`` is used as given (``encoded=True``): vendor task ids are quoted by the
    builders and presigned storage URLs must not be re-quoted, or their signature
    breaks. ``extra_headers`` carries the auth header for API calls only.
    ``exact_headers`` suppresses aiohttp's own headers (storage PUTs, §2.2). Network
    failures, timeouts and truncated bodies raise :class:`TransportError`.
    """
    headers = CIMultiDict(request.headers)
    if extra_headers:
        headers.update(extra_headers)
    body: Any = None
    if request.form is not None:
        body = _form_data(request.form)
    elif request.json is not None:
        body = json.dumps(request.json, separators=(",", ":")).encode()
        headers.setdefault("Content-Type", "application/json")
    elif request.data is not None:
        body = io.BytesIO(request.data)  # see _form_data
    skip = [h for h in _AUTO_HEADERS if h not in headers] if exact_headers else None
    what = f"{request.method} {safe_url(url)}"
    try:
        async with session.request(
            request.method,
            URL(url, encoded=True),
            data=body,
            headers=headers,
            timeout=client_timeout,
            allow_redirects=allow_redirects,
            skip_auto_headers=skip,
        ) as resp:
            payload = await resp.read()
            return HttpResponse(resp.status, CIMultiDict(resp.headers), payload)
    except TimeoutError as exc:
        raise TransportError(f"{what}: timed out", code="TIMEOUT", vendor=vendor) from exc
    except aiohttp.ClientError as exc:
        detail = redact(str(exc), None) or type(exc).__name__
        raise TransportError(
            f"{what}: {type(exc).__name__}: {clip(detail)}", code="NETWORK_ERROR", vendor=vendor
        ) from exc


async def download(
    session: aiohttp.ClientSession,
    url: str,
    *,
    vendor: str,
    timeouts: TimeoutConfig,
    stats: RequestStats,
) -> bytes:
    """GET a result URL from the vendor's storage: no API key, no rate budget (§1.7)."""
    scheme = urlsplit(url).scheme.lower() if url else ""
    if scheme not in ("http", "https"):
        raise PermanentError(
            f"result URL is not http(s): {safe_url(url)!r}",
            code="INVALID_RESULT_URL",
            vendor=vendor,
        )
    stats.count(vendor, "download")
    resp = await send(
        session,
        HttpRequest("GET", url),
        url,
        vendor=vendor,
        client_timeout=download_timeout(timeouts),
        allow_redirects=True,  # storage may redirect; no key travels with this request
    )
    return parse_download(resp.status, resp.headers, resp.body, url=url, vendor=vendor)
