"""A scripted vendor on loopback: real HTTP, every request recorded as it arrived.

Tests script replies per ``(method, path)``; the last reply of a route repeats. The
recorder keeps raw header pairs, so tests can assert exactly which headers were sent.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from PIL import Image

from pipeline.config import ProviderConfig, TimeoutConfig
from pipeline.providers.base import ImagePayload, RequestStats

KEY = "sk-live-SECRET-0123456789abcdef"


def _image(fmt: str, size: tuple[int, int] = (48, 40)) -> bytes:
    # Real, decodable images: results are decode-checked before they count.
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 120, 90)).save(buf, format=fmt)
    return buf.getvalue()


JPEG = _image("JPEG")
PNG = _image("PNG")
WEBP = _image("WEBP")


def jpeg_payload(data: bytes = JPEG, name: str = "portrait.jpg") -> ImagePayload:
    return ImagePayload(data=data, filename=name, content_type="image/jpeg")


@dataclass
class Reply:
    status: int = 200
    body: bytes | str | dict[str, Any] | list[Any] = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering (timeouts)
    drop: bool = False  # close the connection without answering


@dataclass
class Part:
    name: str | None
    filename: str | None
    content_type: str | None
    data: bytes


@dataclass
class Seen:
    method: str
    path: str  # decoded
    raw_path: str  # as sent, with the query
    raw_headers: list[tuple[str, str]]
    body: bytes
    parts: list[Part]

    def header(self, name: str) -> str | None:
        for key, value in self.raw_headers:
            if key.lower() == name.lower():
                return value
        return None

    def header_names(self) -> set[str]:
        return {key.lower() for key, _ in self.raw_headers}


class Vendor:
    """The scripted server. ``url(path)`` is an absolute URL on it."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.routes: dict[tuple[str, str], list[Reply | Callable[[Seen], Reply]]] = {}
        self.server: TestServer | None = None

    def route(self, method: str, path: str, *replies: Reply | Callable[[Seen], Reply]) -> None:
        self.routes[(method, path)] = list(replies)

    def url(self, path: str = "") -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/") + path

    def requests_to(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        parts: list[Part] = []
        body = b""
        if request.content_type == "multipart/form-data":
            reader = await request.multipart()
            while True:
                part = await reader.next()
                if part is None:
                    break
                assert isinstance(part, aiohttp.BodyPartReader)
                parts.append(
                    Part(
                        part.name,
                        part.filename,
                        part.headers.get("Content-Type"),
                        await part.read(),
                    )
                )
        else:
            body = await request.read()
        seen = Seen(
            request.method,
            request.path,
            request.raw_path,
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers],
            body,
            parts,
        )
        self.seen.append(seen)
        replies = self.routes.get((request.method, request.path))
        if not replies:
            return web.Response(
                status=404, text="<html>404 Not Found</html>", content_type="text/html"
            )
        item = replies.pop(0) if len(replies) > 1 else replies[0]
        reply = item(seen) if callable(item) else item
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.drop:
            assert request.transport is not None
            request.transport.close()
            raise asyncio.CancelledError  # never answered
        payload = reply.body
        headers = dict(reply.headers)
        if isinstance(payload, dict | list):
            payload = json.dumps(payload).encode()
            headers.setdefault("Content-Type", "application/json")
        elif isinstance(payload, str):
            payload = payload.encode()
        return web.Response(status=reply.status, body=payload, headers=headers)


async def start_vendor() -> AsyncIterator[Vendor]:
    vendor = Vendor()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", vendor.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    vendor.server = server
    try:
        yield vendor
    finally:
        await server.close()


class Budget:
    """A stand-in for the engine's rate budget: counts the slots taken."""

    def __init__(self) -> None:
        self.taken = 0
        self.kinds: list[str] = []

    async def __call__(self, kind: str) -> None:
        self.taken += 1
        self.kinds.append(kind)


@dataclass
class Kit:
    session: aiohttp.ClientSession
    config: ProviderConfig
    timeouts: TimeoutConfig
    stats: RequestStats
    budget: Budget


def make_kit(session: aiohttp.ClientSession, base_url: str, **config: Any) -> Kit:
    return Kit(
        session=session,
        config=ProviderConfig(base_url=base_url, api_key_env="UNUSED", **config),
        timeouts=TimeoutConfig(connect_seconds=2, request_seconds=2, download_seconds=2),
        stats=RequestStats(),
        budget=Budget(),
    )


def ailab_ok(**fields: Any) -> dict[str, Any]:
    """The superset success envelope (docs/vendors.md, "AILab: response envelope") plus
    ``fields``."""
    return {
        "request_id": "req-1",
        "log_id": "log-1",
        "error_code": 0,
        "error_code_str": "",
        "error_msg": "",
        "error_detail": {"status_code": 200, "code": "", "code_message": "", "message": ""},
        **fields,
    }


def ailab_fail(status: int, code: str, message: str = "nope") -> dict[str, Any]:
    return {
        "request_id": "req-err",
        "log_id": "log-err",
        "error_code": status,
        "error_code_str": code,
        "error_msg": message,
        "error_detail": {
            "status_code": status,
            "code": code,
            "code_message": message,
            "message": message,
        },
    }
