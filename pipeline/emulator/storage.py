"""The emulated object stores: presigned PUTs and expiring result downloads.

The real result and upload URLs live on storage hosts, not on the API host
(AILab: an Aliyun OSS bucket; Perfect Corp: S3; docs/vendors.md, "AILab: downloads",
"Perfect Corp: upload" and "Perfect Corp: result URLs"). They need no API key, do not count
against the API rate budget, expire, and answer errors the S3 way
(XML ``<Error><Code>…``). Here they share the emulator's port under ``/_storage``::

    PUT {base}/_storage/perfectcorp/upload/{token}?X-Amz-Algorithm=…&X-Amz-Expires=…&X-Amz-Signature=…
    GET {base}/_storage/perfectcorp/result/{token}.jpg?X-Amz-Algorithm=…&X-Amz-Expires=…&X-Amz-Signature=…
    GET {base}/_storage/ailab/result/{token}.jpg?Expires=…&OSSAccessKeyId=…&Signature=…

The token alone identifies the object and its expiry; the query string is decoration
that looks like the real thing. Bytes are kept in a private temporary folder rather
than in memory, so long emulated runs stay small.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from xml.sax.saxutils import escape

from aiohttp import web

from pipeline.emulator.stats import VendorStats

if TYPE_CHECKING:
    from pipeline.emulator.gate import Shared

__all__ = ["BlobStore", "Link", "Links", "StorageRoutes", "UploadSlot", "s3_error"]

Vendor = Literal["ailab", "perfectcorp"]


class BlobStore:
    """Bytes on disk under a private temporary folder, created on first use."""

    def __init__(self) -> None:
        self._dir: Path | None = None

    def _path(self, blob_id: str) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="pipeline-emulator-"))
        return self._dir / blob_id

    async def put(self, data: bytes) -> str:
        blob_id = secrets.token_hex(16)
        await asyncio.to_thread(self._path(blob_id).write_bytes, data)
        return blob_id

    async def get(self, blob_id: str) -> bytes:
        return await asyncio.to_thread(self._path(blob_id).read_bytes)

    def delete(self, blob_id: str) -> None:
        self._path(blob_id).unlink(missing_ok=True)

    def close(self) -> None:
        """Remove every blob (the folder goes; a later ``put`` makes a new one)."""
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


@dataclass
class UploadSlot:
    """A Perfect Corp file record's PUT target: what was declared, and what arrived."""

    content_type: str
    size: int
    blob_id: str | None = None
    digest: str | None = None  # sha256 hex of the bytes PUT


@dataclass
class Link:
    """One presigned URL: what it points at and until when (monotonic clock)."""

    token: str
    vendor: Vendor
    kind: Literal["upload", "result"]
    expires_at: float
    ttl: float
    blob_id: str | None = None
    slot: UploadSlot | None = None


class Links:
    """Presigned URLs by token."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._links: dict[str, Link] = {}

    def clear(self) -> None:
        self._links.clear()

    def get(self, token: str) -> Link | None:
        return self._links.get(token)

    def result(
        self, vendor: Vendor, blob_id: str, ttl: float, *, expires_at: float | None = None
    ) -> Link:
        """A download URL for ``blob_id`` that expires ``ttl`` s from now (or at ``expires_at``)."""
        when = self._clock() + ttl if expires_at is None else expires_at
        return self._add(
            Link(secrets.token_urlsafe(24), vendor, "result", when, ttl, blob_id=blob_id)
        )

    def upload(self, vendor: Vendor, slot: UploadSlot, ttl: float) -> Link:
        return self._add(
            Link(secrets.token_urlsafe(24), vendor, "upload", self._clock() + ttl, ttl, slot=slot)
        )

    def _add(self, link: Link) -> Link:
        self._links[link.token] = link
        return link

    def url(self, base: str, link: Link) -> str:
        """The absolute URL of ``link`` on the server reachable at ``base``."""
        expires_epoch = int(time.time() + (link.expires_at - self._clock()))
        signature = hashlib.sha256(f"{link.token}:{expires_epoch}".encode()).hexdigest()
        if link.vendor == "ailab":  # Aliyun OSS signed-URL style
            query = f"Expires={expires_epoch}&OSSAccessKeyId=EMULATOR&Signature={signature[:28]}"
            return f"{base}/_storage/ailab/result/{link.token}.jpg?{query}"
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        query = (
            "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=EMULATOR%2Fus-west-2%2Fs3%2Faws4_request"
            f"&X-Amz-Date={stamp}&X-Amz-Expires={int(link.ttl)}&X-Amz-SignedHeaders="
            + ("content-length%3Bcontent-type%3Bhost" if link.kind == "upload" else "host")
            + f"&X-Amz-Signature={signature}"
        )
        name = link.token if link.kind == "upload" else f"{link.token}.jpg"
        return f"{base}/_storage/perfectcorp/{link.kind}/{name}?{query}"


def s3_error(status: int, code: str, message: str, **extra: str) -> web.Response:
    """An S3/OSS-style XML error body."""
    fields = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in extra.items())
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{escape(message)}</Message>{fields}"
        f"<RequestId>{secrets.token_hex(8).upper()}</RequestId></Error>"
    )
    return web.Response(status=status, text=body, content_type="application/xml")


class StorageRoutes:
    """``GET`` result downloads and ``PUT`` uploads under ``/_storage``."""

    def __init__(self, shared: Shared, stats_of: Callable[[str], VendorStats]) -> None:
        self._scenario = shared.scenario
        self._links = shared.links
        self._blobs = shared.blobs
        self._faults = shared.faults
        self._clock = shared.clock
        self._stats_of = stats_of

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/_storage/{vendor}/result/{name}", self.download),
            web.put("/_storage/{vendor}/upload/{name}", self.upload),
        ]

    def _find(self, request: web.Request, kind: str) -> Link | web.Response:
        name = request.match_info["name"]
        token = name.removesuffix(".jpg") if kind == "result" else name
        link = self._links.get(token)
        if link is None or link.kind != kind or link.vendor != request.match_info["vendor"]:
            return s3_error(404, "NoSuchKey", "The specified key does not exist.", Key=name)
        if self._clock() > link.expires_at:
            # S3's answer to an expired presigned URL: Perfect Corp's are valid for 2 h, AILab's
            # 24 h (docs/vendors.md, "Perfect Corp: result URLs" and "AILab: task lifetimes").
            return s3_error(
                403,
                "AccessDenied",
                "Request has expired",
                **{"X-Amz-Expires": str(int(link.ttl)), "ServerTime": formatdate(usegmt=True)},
            )
        return link

    async def download(self, request: web.Request) -> web.StreamResponse:
        """Serve result bytes; no key needed; optionally stall first.

        AILab's storage "sometimes stalls" (docs/vendors.md, "AILab: downloads").
        """
        found = self._find(request, "result")
        if isinstance(found, web.Response):
            return found
        if self._faults.chance(self._scenario.download_stall_rate):
            await asyncio.sleep(self._scenario.download_stall_seconds)
        assert found.blob_id is not None
        try:
            data = await self._blobs.get(found.blob_id)
        except FileNotFoundError:
            return s3_error(404, "NoSuchKey", "The specified key does not exist.")
        self._stats_of(found.vendor).downloads += 1
        return web.Response(body=data, content_type="image/jpeg", headers={"ETag": _etag(data)})

    async def upload(self, request: web.Request) -> web.StreamResponse:
        """The presigned PUT of upload step 2, enforcing the signed headers exactly.

        S3 refuses a second auth mechanism (an ``Authorization`` header next to a
        presigned query), and the signature covers ``Content-Type`` and
        ``Content-Length``, so any difference from what the file record declared is a
        ``SignatureDoesNotMatch`` (docs/vendors.md, "Perfect Corp: upload").
        """
        if "Authorization" in request.headers:
            return s3_error(
                400,
                "InvalidArgument",
                "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, "
                "Signature query string parameter or the Authorization header should be specified",
                ArgumentName="Authorization",
            )
        found = self._find(request, "upload")
        if isinstance(found, web.Response):
            return found
        slot = found.slot
        assert slot is not None
        if request.content_length is None:
            return s3_error(
                411, "MissingContentLength", "You must provide the Content-Length HTTP header."
            )
        sent_type = request.headers.get("Content-Type", "")
        if sent_type != slot.content_type or request.content_length != slot.size:
            return s3_error(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided. "
                f"Signed Content-Type {slot.content_type!r} and Content-Length {slot.size}; "
                f"got {sent_type!r} and {request.content_length}.",
            )
        data = await request.read()
        if len(data) != slot.size:  # a client that lied about Content-Length
            return s3_error(
                400,
                "IncompleteBody",
                "You did not provide the number of bytes specified by the Content-Length HTTP header.",
            )
        if slot.blob_id is not None:
            self._blobs.delete(slot.blob_id)
        slot.blob_id = await self._blobs.put(data)
        slot.digest = hashlib.sha256(data).hexdigest()
        self._stats_of(found.vendor).puts += 1
        return web.Response(status=200, headers={"ETag": _etag(data)})


def _etag(data: bytes) -> str:
    return f'"{hashlib.md5(data, usedforsecurity=False).hexdigest()}"'
