"""The providers against a hostile vendor impostor (``impostor.py``) on loopback.

Each case names one hostile answer and the exact outcome the provider must produce:
the error class and code (and ``maybe_sent`` for billable sends), or success with
the right bytes. After every test, no request outside the API paths carried the key,
no error text carried the key or a signature, and no connection was attempted to
anything but loopback (a tripwire on ``socket.connect``: a refused URL must be
refused before any packet leaves).
"""

from __future__ import annotations

import math
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import aiohttp
import pytest

from pipeline.config import NetworkConfig, ProviderConfig, TimeoutConfig
from pipeline.errors import (
    FatalError,
    PermanentError,
    RateLimitedError,
    ResultNotImageError,
    RetryableError,
    TransportError,
    VendorError,
)
from pipeline.netguard import UrlGuard
from pipeline.providers.ailab import AILabProvider
from pipeline.providers.base import ImagePayload, RequestStats
from pipeline.providers.perfectcorp import PerfectCorpProvider

from . import impostor as imp_mod
from .impostor import KEY, Impostor, big_jpeg, jpeg, png, start_impostor, webp

SECRETS = (KEY, quote(KEY, safe=""), quote_plus(KEY), "SIGSECRET")


# ----------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Refuse (and record) any connect to a non-loopback address."""
    attempts: list[Any] = []
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def allowed(address: Any) -> bool:
        host = address[0] if isinstance(address, tuple) else ""
        return isinstance(host, str) and (host.startswith("127.") or host in ("::1", "localhost"))

    def connect(self: socket.socket, address: Any) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6) and not allowed(address):
            attempts.append(address)
            raise ConnectionRefusedError(f"test tripwire: connect to {address!r}")
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        if self.family in (socket.AF_INET, socket.AF_INET6) and not allowed(address):
            attempts.append(address)
            return 111
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    yield attempts
    assert attempts == [], f"connections attempted outside loopback: {attempts}"


@pytest.fixture
async def imp() -> AsyncIterator[Impostor]:
    async for i in start_impostor():
        yield i
        assert i.key_seen_outside_api() == []
        assert i.other is not None
        assert [s for s in i.other.seen if any(KEY in v for _, v in s.raw_headers)] == []


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def _no_budget(kind: str) -> None:
    return None


TIMEOUTS = TimeoutConfig(connect_seconds=2, request_seconds=1.5, download_seconds=2)


def ailab(
    imp: Impostor, session: aiohttp.ClientSession, kind: str, **network: Any
) -> AILabProvider:
    return AILabProvider(
        session,
        ProviderConfig(base_url=imp.base_url(kind), api_key_env="UNUSED"),
        KEY,
        TIMEOUTS,
        RequestStats(),
        _no_budget,
        network=NetworkConfig(**network),
    )


def perfectcorp(
    imp: Impostor, session: aiohttp.ClientSession, kind: str, **network: Any
) -> PerfectCorpProvider:
    return PerfectCorpProvider(
        session,
        ProviderConfig(base_url=imp.base_url(kind), api_key_env="UNUSED"),
        KEY,
        TIMEOUTS,
        RequestStats(),
        _no_budget,
        network=NetworkConfig(**network),
    )


def portrait() -> ImagePayload:
    return ImagePayload(data=jpeg(), filename="p.jpg", content_type="image/jpeg")


def assert_clean(err: VendorError) -> None:
    """No secret in anything an error can print or store."""
    texts = [str(err), repr(err), err.message, err.code, err.request_id or "", *map(str, err.args)]
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, (secret, text)
    assert "\n" not in err.message
    assert len(err.message) <= 300 and len(err.code) <= 80


@dataclass(frozen=True)
class Expect:
    error: type[VendorError] | None = None
    code: str | None = None
    maybe_sent: bool | None = None
    retry_after: float | None = None
    contains: str | None = None  # in the message


OK = Expect()


def check(exc_info: pytest.ExceptionInfo[VendorError], want: Expect) -> VendorError:
    err = exc_info.value
    assert want.error is not None
    assert type(err) is want.error, (type(err), err)
    if want.code is not None:
        assert err.code == want.code, err
    if want.maybe_sent is not None:
        assert isinstance(err, TransportError)
        assert err.maybe_sent is want.maybe_sent, err
    if want.contains is not None:
        assert want.contains in err.message, err
    assert_clean(err)
    return err


# ------------------------------------------------------------------ sync submits

SYNC: dict[str, Expect] = {
    "legit": OK,
    "legit_png": OK,
    "legit_webp": OK,
    "legit_data_url": OK,
    "key_in_request_id": OK,
    # An unreadable 2xx answer to a billable send: outcome unknown, resend at most once.
    "html_200": Expect(TransportError, "MALFORMED_RESPONSE", maybe_sent=True),
    "json_nesting_bomb": Expect(TransportError, "MALFORMED_RESPONSE", maybe_sent=True),
    # A success envelope: billed; what it carries is not an acceptable image.
    "b64_text": Expect(ResultNotImageError, "RESULT_NOT_IMAGE", contains="plain text"),
    "b64_html": Expect(ResultNotImageError, "RESULT_NOT_IMAGE", contains="HTML page"),
    "b64_script": Expect(ResultNotImageError, "RESULT_NOT_IMAGE", contains="script"),
    "b64_gif": Expect(ResultNotImageError, "RESULT_NOT_IMAGE", contains="GIF"),
    "empty_image": Expect(ResultNotImageError, "RESULT_NOT_IMAGE", contains="not base64"),
    "no_image": Expect(ResultNotImageError, "RESULT_NOT_IMAGE", contains="missing"),
    "truncated_jpeg": Expect(ResultNotImageError, "RESULT_NOT_IMAGE", contains="JPEG"),
    "png_bomb": Expect(ResultNotImageError, "RESULT_NOT_IMAGE", contains="20000x20000"),
    "huge_body": Expect(ResultNotImageError, "RESULT_NOT_IMAGE", contains="more than"),
    "gzip_bomb": Expect(ResultNotImageError, "RESULT_NOT_IMAGE", contains="more than"),
    # Errors that echo secrets: classified as usual, scrubbed.
    "key_in_message": Expect(PermanentError, "ERROR_INVALID_PARAMETER"),
    "key_urlencoded_in_message": Expect(PermanentError, "ERROR_INVALID_PARAMETER"),
    "key_in_code": Expect(PermanentError, "BAD_***"),
    "html_500_with_key": Expect(TransportError, "HTTP_502"),
    "query_in_message": Expect(PermanentError, "ERROR_NO_FACE_IN_FILE"),
    "huge_error_body": Expect(TransportError, "HTTP_503", contains="larger than"),
    # The network: maybe sent (the body went out), so at most one resend.
    "content_length_lie": Expect(TransportError, "NETWORK_ERROR", maybe_sent=True),
    "disconnect": Expect(TransportError, "NETWORK_ERROR", maybe_sent=True),
    "slow": Expect(TransportError, "TIMEOUT", maybe_sent=True),
    # An API host never redirects us: the key would follow.
    "redirect_api": Expect(FatalError, "HTTP_307"),
    # Retry-After is returned raw (the engine caps it); absurd values never raise.
    "retry_after_huge": Expect(RateLimitedError, retry_after=999999999.0),
    "retry_after_nan": Expect(RateLimitedError, retry_after=None),
    "retry_after_date_far": Expect(RateLimitedError, retry_after=math.inf),
    "retry_after_negative": Expect(RateLimitedError, retry_after=0.0),
    "retry_after_garbage": Expect(RateLimitedError, retry_after=None),
    # As large as the cap allows and legit: taken.
    "near_cap_valid": OK,
}


def test_every_sync_kind_has_a_case() -> None:
    assert set(SYNC) == set(imp_mod.SYNC_KINDS)
    hostile = [k for k, v in SYNC.items() if v.error is not None] + ["key_in_request_id"]
    assert len(hostile) >= 25


@pytest.mark.parametrize("kind", sorted(SYNC))
async def test_sync_submit(imp: Impostor, session: aiohttp.ClientSession, kind: str) -> None:
    want = SYNC[kind]
    p = ailab(imp, session, kind)
    params = {"service_choice": 10}
    if want.error is None:
        out = await p.submit("ailab/emotion-editor", portrait(), params, {})
        expected = {"legit_png": png(), "legit_webp": webp(), "near_cap_valid": big_jpeg()}.get(
            kind, jpeg()
        )
        assert out.image == expected
        if kind == "key_in_request_id":
            assert out.request_id == "rid-***"
        return
    with pytest.raises(VendorError) as info:
        await p.submit("ailab/emotion-editor", portrait(), params, {})
    err = check(info, want)
    if want.error is RateLimitedError:
        assert isinstance(err, RateLimitedError)
        if want.retry_after is None:
            assert err.retry_after is None
        elif want.retry_after == math.inf:
            assert err.retry_after is not None and err.retry_after > 2e11  # year 9999
        else:
            assert err.retry_after == want.retry_after
    if kind == "redirect_api":
        assert imp.other is not None and imp.other.seen == []  # never followed


# --------------------------------------------------------------- result URLs

REFUSED = Expect(PermanentError, "RESULT_URL_REFUSED")

POLL_URLS: dict[str, Expect] = {
    "legit": OK,
    "signed_query": OK,
    "redirect_relative": OK,
    "ftp_url": Expect(PermanentError, "RESULT_URL_REFUSED", contains="'ftp'"),
    "file_url": Expect(PermanentError, "RESULT_URL_REFUSED", contains="'file'"),
    "data_url": Expect(PermanentError, "RESULT_URL_REFUSED", contains="'data'"),
    "javascript_url": Expect(PermanentError, "RESULT_URL_REFUSED", contains="'javascript'"),
    "private_10": Expect(PermanentError, "RESULT_URL_REFUSED", contains="10.20.30.40"),
    "metadata_literal": Expect(PermanentError, "RESULT_URL_REFUSED", contains="always refused"),
    "userinfo_url": Expect(PermanentError, "RESULT_URL_REFUSED", contains="credentials"),
    "localhost_alias": Expect(PermanentError, "RESULT_URL_REFUSED", contains="loopback"),
    "decimal_ip": Expect(PermanentError, "RESULT_URL_REFUSED", contains="loopback"),
    "mapped_ipv6": Expect(PermanentError, "RESULT_URL_REFUSED", contains="loopback"),
    "redirect_other_port": Expect(PermanentError, "RESULT_URL_REFUSED", contains="loopback"),
    "redirect_chain_metadata": Expect(
        PermanentError, "RESULT_URL_REFUSED", contains="169.254.169.254"
    ),
    "redirect_loop": Expect(PermanentError, "RESULT_URL_REFUSED", contains="redirects"),
    "redirect_https_other_host": Expect(PermanentError, "RESULT_URL_REFUSED", contains="localhost"),
    "redirect_allowed_host": REFUSED,  # not on the allow list here
    "redirect_no_location": Expect(PermanentError, "RESULT_URL_REFUSED", contains="Location"),
}


def test_every_url_kind_has_a_case() -> None:
    assert set(POLL_URLS) == set(imp_mod.POLL_URL_KINDS)


@pytest.mark.parametrize("kind", sorted(POLL_URLS))
async def test_ailab_result_url(imp: Impostor, session: aiohttp.ClientSession, kind: str) -> None:
    """The poll hands over whatever URL a succeeded task has (it was billed: never a
    reason to resubmit); the download takes it only if it is safe."""
    want = POLL_URLS[kind]
    p = ailab(imp, session, kind)
    state = await p.poll("ailab/face-swap", "task-1")
    assert state.state == "succeeded" and state.result_url == imp.poll_url(kind)
    if want.error is None:
        assert await p.download(state.result_url) == jpeg()
        return
    with pytest.raises(VendorError) as info:
        await p.download(state.result_url)
    check(info, want)


@pytest.mark.parametrize(
    "kind", ["legit", "ftp_url", "javascript_url", "private_10", "redirect_chain_metadata"]
)
async def test_perfectcorp_result_url(
    imp: Impostor, session: aiohttp.ClientSession, kind: str
) -> None:
    want = POLL_URLS[kind]
    p = perfectcorp(imp, session, kind)
    state = await p.poll("perfectcorp/ai-smile", "pc-1")
    assert state.state == "succeeded" and state.result_url == imp.poll_url(kind)
    if want.error is None:
        assert await p.download(state.result_url) == jpeg()
        return
    with pytest.raises(VendorError) as info:
        await p.download(state.result_url)
    check(info, want)


@pytest.mark.parametrize("kind", ["redirect_allowed_host", "redirect_other_port"])
async def test_allowed_host_is_followed_without_the_key(
    imp: Impostor, session: aiohttp.ClientSession, kind: str
) -> None:
    assert imp.other is not None
    allow = (f"127.0.0.1:{imp.other.port}",)
    p = ailab(imp, session, kind, allow_result_hosts=allow)
    state = await p.poll("ailab/face-swap", "task-1")
    assert state.result_url is not None
    assert await p.download(state.result_url) == jpeg()
    (fetched,) = imp.other.seen
    assert fetched.path == "/r/legit/result.jpg"
    assert fetched.header("ailabapi-api-key") is None and fetched.header("Authorization") is None
    assert fetched.header("Cookie") is None


async def test_allow_list_never_opens_metadata(
    imp: Impostor, session: aiohttp.ClientSession
) -> None:
    # The config already refuses such an entry; the guard refuses it regardless.
    p = ailab(imp, session, "metadata_literal")
    p._network = NetworkConfig.model_construct(allow_result_hosts=("169.254.169.254:80",))
    p._guard = UrlGuard(imp.base_url("x"), p._network.allow_result_hosts, vendor="ailab")
    state = await p.poll("ailab/face-swap", "task-1")
    assert state.result_url is not None
    with pytest.raises(PermanentError) as info:
        await p.download(state.result_url)
    assert info.value.code == "RESULT_URL_REFUSED"
    assert "always refused" in info.value.message


async def test_allow_list_opens_a_named_loopback_host(
    imp: Impostor, session: aiohttp.ClientSession
) -> None:
    p = ailab(imp, session, "localhost_alias", allow_result_hosts=(f"localhost:{imp.port}",))
    state = await p.poll("ailab/face-swap", "task-1")
    assert state.result_url is not None
    assert await p.download(state.result_url) == jpeg()


# ------------------------------------------------------------------- downloads

DOWNLOADS: dict[str, Expect] = {
    "legit": OK,
    "legit_png": OK,
    "legit_webp": OK,
    "wrong_content_type": OK,  # the bytes decide, not the label
    "html_200": Expect(ResultNotImageError, "RESULT_NOT_IMAGE", contains="HTML page"),
    "text_200": Expect(ResultNotImageError, "RESULT_NOT_IMAGE", contains="plain text"),
    "script_200": Expect(ResultNotImageError, "RESULT_NOT_IMAGE", contains="script"),
    "json_200": Expect(ResultNotImageError, "RESULT_NOT_IMAGE", contains="JSON"),
    "empty_200": Expect(ResultNotImageError, "RESULT_NOT_IMAGE", contains="empty"),
    "truncated_jpeg": Expect(ResultNotImageError, "RESULT_NOT_IMAGE", contains="JPEG"),
    "png_bomb": Expect(ResultNotImageError, "RESULT_NOT_IMAGE", contains="20000x20000"),
    "gif": Expect(ResultNotImageError, "RESULT_NOT_IMAGE", contains="GIF"),
    "b64_of_image": Expect(ResultNotImageError, "RESULT_NOT_IMAGE", contains="plain text"),
    "huge_body": Expect(ResultNotImageError, "RESULT_NOT_IMAGE", contains="larger than"),
    "gzip_bomb": Expect(ResultNotImageError, "RESULT_NOT_IMAGE", contains="larger than"),
    "announced_huge": Expect(ResultNotImageError, "RESULT_NOT_IMAGE", contains="larger than"),
    "content_length_lie": Expect(TransportError, "NETWORK_ERROR"),
    "expired_403": Expect(PermanentError, "RESULT_URL_EXPIRED"),
    "signed_403": Expect(PermanentError, "RESULT_URL_EXPIRED"),
    "server_500": Expect(RetryableError, "HTTP_500"),
    "rate_limited": Expect(RateLimitedError, "HTTP_429"),
}


def test_every_download_kind_has_a_case() -> None:
    assert set(DOWNLOADS) == set(imp_mod.DOWNLOAD_KINDS)


def _expected_bytes(kind: str) -> bytes:
    return {"legit_png": png(), "legit_webp": webp()}.get(kind, jpeg())


@pytest.mark.parametrize("kind", sorted(DOWNLOADS))
async def test_download(imp: Impostor, session: aiohttp.ClientSession, kind: str) -> None:
    want = DOWNLOADS[kind]
    p = ailab(imp, session, "legit")
    url = imp.result_url(kind)
    if want.error is None:
        assert await p.download(url) == _expected_bytes(kind)
        return
    with pytest.raises(VendorError) as info:
        await p.download(url)
    err = check(info, want)
    if kind == "rate_limited":
        assert isinstance(err, RateLimitedError) and err.retry_after == 999999999.0


class FileSink:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.fh = path.open("wb")
        self.flushed = 0

    def write(self, data: bytes) -> int:
        return self.fh.write(data)

    def flush(self) -> None:
        self.flushed += 1
        self.fh.flush()


class MemorySink:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    async def write(self, data: bytes) -> None:
        self.chunks.append(data)


@pytest.mark.parametrize("kind", sorted(DOWNLOADS))
async def test_download_to_file(
    imp: Impostor, session: aiohttp.ClientSession, kind: str, tmp_path: Path
) -> None:
    want = DOWNLOADS[kind]
    p = ailab(imp, session, "legit")
    sink = FileSink(tmp_path / "result.part")
    url = imp.result_url(kind)
    try:
        if want.error is None:
            fmt = await p.download_to(url, sink, check_path=str(sink.path))
            sink.fh.close()
            assert sink.flushed == 1
            assert sink.path.read_bytes() == _expected_bytes(kind)
            assert fmt == {"legit_png": "png", "legit_webp": "webp"}.get(kind, "jpg")
            return
        with pytest.raises(VendorError) as info:
            await p.download_to(url, sink, check_path=str(sink.path))
        check(info, want)
        # Never more than the cap on disk either.
        assert sink.path.stat().st_size <= NetworkConfig().max_download_bytes
    finally:
        sink.fh.close()


@pytest.mark.parametrize("kind", ["legit", "legit_webp", "html_200", "truncated_jpeg", "gzip_bomb"])
async def test_download_to_async_sink_without_path(
    imp: Impostor, session: aiohttp.ClientSession, kind: str
) -> None:
    want = DOWNLOADS[kind]
    p = ailab(imp, session, "legit")
    sink = MemorySink()
    if want.error is None:
        fmt = await p.download_to(imp.result_url(kind), sink)
        assert b"".join(sink.chunks) == _expected_bytes(kind)
        assert fmt in ("jpg", "webp")
        return
    with pytest.raises(VendorError) as info:
        await p.download_to(imp.result_url(kind), sink)
    check(info, want)


async def test_small_download_cap(imp: Impostor, session: aiohttp.ClientSession) -> None:
    p = ailab(imp, session, "legit", max_download_bytes=1024)
    with pytest.raises(ResultNotImageError) as info:
        await p.download(imp.result_url("truncated_jpeg"))
    assert info.value.message.endswith("result larger than 1024 bytes")


# ------------------------------------------------------------- polls and tasks


async def test_inline_poll_result_that_is_text_fails_as_billed(
    imp: Impostor, session: aiohttp.ClientSession
) -> None:
    state = await ailab(imp, session, "inline_b64_text").poll("ailab/face-swap", "t")
    assert state.state == "failed"
    assert isinstance(state.error, ResultNotImageError)
    assert state.error.code == "RESULT_NOT_IMAGE" and state.error.kind == "permanent"
    assert "plain text" in state.error.message


async def test_inline_poll_result_legit(imp: Impostor, session: aiohttp.ClientSession) -> None:
    state = await ailab(imp, session, "inline_legit").poll("ailab/face-swap", "t")
    assert state.state == "succeeded" and state.image == jpeg()


async def test_poll_error_echoing_the_key(imp: Impostor, session: aiohttp.ClientSession) -> None:
    state = await ailab(imp, session, "poll_error_with_key").poll("ailab/face-swap", "t")
    assert state.state == "failed" and state.error is not None
    assert state.error.code == "ERROR_NO_FACE_IN_FILE"
    assert state.error.request_id == "***"
    assert_clean(state.error)


async def test_huge_poll_answer(imp: Impostor, session: aiohttp.ClientSession) -> None:
    with pytest.raises(RetryableError) as info:
        await ailab(imp, session, "huge_poll").poll("ailab/face-swap", "t")
    assert type(info.value) is RetryableError and info.value.code == "RESPONSE_TOO_LARGE"
    assert_clean(info.value)


async def test_task_id_echoing_the_key_is_refused(
    imp: Impostor, session: aiohttp.ClientSession
) -> None:
    template = ImagePayload(data=png(), filename="t.png", content_type="image/png")
    p = ailab(imp, session, "task_id_with_key")
    with pytest.raises(PermanentError) as info:
        await p.submit("ailab/face-swap", portrait(), {}, {"image_template": template})
    assert info.value.code == "UNSAFE_TASK_ID"
    assert_clean(info.value)


async def test_credit_pool_names_are_scrubbed(
    imp: Impostor, session: aiohttp.ClientSession
) -> None:
    balance = await ailab(imp, session, "pool_with_key").credits()
    assert balance.pools == {"***": 5.0} and balance.balance == 5.0


# ---------------------------------------------------------------- Perfect Corp


async def test_perfectcorp_legit_submit_keeps_the_key_on_the_api(
    imp: Impostor, session: aiohttp.ClientSession
) -> None:
    p = perfectcorp(imp, session, "legit")
    out = await p.submit(
        "perfectcorp/ai-smile", portrait(), {"expression_type": "closed_mouth_smile"}, {}
    )
    assert out.task_id == "pc-legit"
    put = [s for s in imp.seen if s.method == "PUT"]
    assert len(put) == 1 and put[0].header("Authorization") is None


@pytest.mark.parametrize("kind", ["upload_to_metadata", "upload_to_private"])
async def test_perfectcorp_upload_url_refused(
    imp: Impostor, session: aiohttp.ClientSession, kind: str
) -> None:
    p = perfectcorp(imp, session, kind)
    with pytest.raises(PermanentError) as info:
        await p.submit(
            "perfectcorp/ai-smile", portrait(), {"expression_type": "closed_mouth_smile"}, {}
        )
    assert info.value.code == "UPLOAD_URL_REFUSED"
    assert_clean(info.value)
    assert not any(s.path.endswith("/task/ai-smile") for s in imp.seen)  # nothing billable


@pytest.mark.parametrize(
    ("kind", "code"), [("create_huge", "RESPONSE_TOO_LARGE"), ("create_html", "MALFORMED_RESPONSE")]
)
async def test_perfectcorp_unreadable_create_is_unknown_outcome(
    imp: Impostor, session: aiohttp.ClientSession, kind: str, code: str
) -> None:
    p = perfectcorp(imp, session, kind)
    with pytest.raises(TransportError) as info:
        await p.submit(
            "perfectcorp/ai-smile", portrait(), {"expression_type": "closed_mouth_smile"}, {}
        )
    assert info.value.code == code and info.value.maybe_sent is True
    assert_clean(info.value)


async def test_perfectcorp_upload_unreachable_is_not_sent(session: aiohttp.ClientSession) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    p = PerfectCorpProvider(
        session,
        ProviderConfig(base_url=f"http://127.0.0.1:{port}", api_key_env="UNUSED"),
        KEY,
        TIMEOUTS,
        RequestStats(),
        _no_budget,
    )
    with pytest.raises(TransportError) as info:
        await p.submit(
            "perfectcorp/ai-smile", portrait(), {"expression_type": "closed_mouth_smile"}, {}
        )
    assert info.value.code == "CONNECT_FAILED" and info.value.maybe_sent is False


# ------------------------------------------------------------------- pinning


def _guard_with_dns(imp: Impostor, table: dict[str, list[str]], allow: tuple[str, ...]) -> UrlGuard:
    async def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "unknown")
        return table[host]

    return UrlGuard(imp.base_url("x"), allow, vendor="ailab", resolve=resolve)


async def test_connection_uses_the_checked_address(
    imp: Impostor, session: aiohttp.ClientSession
) -> None:
    # "rebind.test" exists only in the guard's resolver: the download can reach the
    # impostor only through the address the guard checked and pinned, never through
    # a second lookup (which is what DNS rebinding would exploit).
    p = ailab(imp, session, "legit")
    p._guard = _guard_with_dns(imp, {"rebind.test": ["127.0.0.1"]}, (f"rebind.test:{imp.port}",))
    url = f"http://rebind.test:{imp.port}/r/legit/result.jpg?X-Amz-Signature=SIGSECRET"
    assert await p.download(url) == jpeg()
    assert imp.seen[-1].header("Host") == f"rebind.test:{imp.port}"


async def test_a_name_resolving_to_loopback_is_refused_unless_allowed(
    imp: Impostor, session: aiohttp.ClientSession
) -> None:
    p = ailab(imp, session, "legit")
    p._guard = _guard_with_dns(imp, {"rebind.test": ["93.184.216.34", "127.0.0.1"]}, ())
    with pytest.raises(PermanentError) as info:
        await p.download(f"http://rebind.test:{imp.port}/r/legit/result.jpg")
    assert info.value.code == "RESULT_URL_REFUSED"
    assert "rebind.test" in info.value.message and "127.0.0.1" in info.value.message
    assert imp.seen == []


async def test_unresolvable_result_host_is_a_connect_failure(
    imp: Impostor, session: aiohttp.ClientSession
) -> None:
    p = ailab(imp, session, "legit")
    p._guard = _guard_with_dns(imp, {}, ())
    with pytest.raises(TransportError) as info:
        await p.download("https://nowhere.test/r.jpg?X-Amz-Signature=SIGSECRET")
    assert info.value.code == "CONNECT_FAILED" and info.value.maybe_sent is False
    assert_clean(info.value)
