"""AILabProvider against a real HTTP server on loopback: what goes on the wire."""

from __future__ import annotations

import base64
import math
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest

from pipeline.errors import (
    FatalError,
    PermanentError,
    RateLimitedError,
    TransportError,
    VendorError,
)
from pipeline.providers.ailab import AILabProvider
from pipeline.providers.base import ImagePayload, Provider

from ._server import (
    JPEG,
    KEY,
    PNG,
    Kit,
    Reply,
    Vendor,
    ailab_fail,
    ailab_ok,
    jpeg_payload,
    make_kit,
    start_vendor,
)

EMOTION = "/api/portrait/effects/emotion-editor"
SWAP = "/api/portrait/editing/ai-face-swap"
BEAUTY = "/api/portrait/effects/face-beauty-pro"
POLL = "/api/common/query-async-task-result"
CREDITS = "/api/common/query-credits"


@pytest.fixture
async def vendor() -> AsyncIterator[Vendor]:
    async for v in start_vendor():
        yield v


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def provider(kit: Kit) -> AILabProvider:
    return AILabProvider(kit.session, kit.config, KEY, kit.timeouts, kit.stats, kit.budget)


def assert_no_key(err: BaseException) -> None:
    for text in (str(err), repr(err), *map(str, err.args)):
        assert KEY not in text


async def test_emotion_editor_wire(vendor: Vendor, session: aiohttp.ClientSession) -> None:
    vendor.route(
        "POST",
        EMOTION,
        Reply(
            body=ailab_ok(
                data={"image": "data:image/jpeg;base64," + base64.b64encode(JPEG).decode()}
            )
        ),
    )
    kit = make_kit(session, vendor.url())
    p: Provider = provider(kit)  # mypy checks the structural contract here
    assert p.vendor == "ailab"
    out = await p.submit("ailab/emotion-editor", jpeg_payload(), {"service_choice": 12}, {})
    assert out.image == JPEG and out.task_id is None and out.request_id == "req-1"

    (seen,) = vendor.seen
    assert seen.method == "POST"
    assert seen.header("ailabapi-api-key") == KEY
    assert seen.header("Authorization") is None
    assert seen.header("Accept") == "application/json"
    assert (seen.header("Content-Type") or "").startswith("multipart/form-data; boundary=")
    target, choice = seen.parts
    assert (target.name, target.filename, target.content_type, target.data) == (
        "image_target",
        "portrait.jpg",
        "image/jpeg",
        JPEG,
    )
    assert (choice.name, choice.filename, choice.data) == ("service_choice", None, b"12")
    assert kit.budget.taken == 1
    assert kit.stats.by_vendor() == {"ailab": {"submit": 1}}


async def test_face_swap_poll_download(vendor: Vendor, session: aiohttp.ClientSession) -> None:
    result_url = vendor.url("/outputs/r.jpg?Expires=9&Signature=abc%2Fdef")
    vendor.route("POST", SWAP, Reply(body=ailab_ok(task_type="async", task_id="t/1&x=y")))
    vendor.route(
        "GET",
        POLL,
        Reply(body=ailab_ok(task_status=0)),
        Reply(body=ailab_ok(task_status=1)),
        Reply(body=ailab_ok(task_status=2, data={"image": result_url})),
    )
    vendor.route("GET", "/outputs/r.jpg", Reply(body=JPEG, headers={"Content-Type": "image/jpeg"}))
    kit = make_kit(session, vendor.url())
    p = provider(kit)
    template = ImagePayload(data=PNG, filename="face.png", content_type="image/png")
    out = await p.submit("ailab/face-swap", jpeg_payload(), {}, {"image_template": template})
    assert out.task_id == "t/1&x=y"
    swap = vendor.seen[0]
    assert [(x.name, x.filename, x.content_type) for x in swap.parts] == [
        ("image_target", "portrait.jpg", "image/jpeg"),
        ("image_template", "face.png", "image/png"),
    ]

    states = [await p.poll("ailab/face-swap", "t/1&x=y") for _ in range(3)]
    assert [s.state for s in states] == ["running", "running", "succeeded"]
    assert states[-1].result_url == result_url
    for poll in vendor.requests_to(POLL):
        assert poll.raw_path == f"{POLL}?task_id=t%2F1%26x%3Dy"
        assert poll.header("ailabapi-api-key") == KEY

    assert await p.download(result_url) == JPEG
    dl = vendor.requests_to("/outputs/r.jpg")[0]
    assert dl.raw_path == "/outputs/r.jpg?Expires=9&Signature=abc%2Fdef"  # not re-quoted
    assert dl.header("ailabapi-api-key") is None
    assert all(KEY not in v for _, v in dl.raw_headers)

    assert kit.budget.taken == 4  # submit + 3 polls; the download takes no slot
    assert kit.stats.by_vendor() == {"ailab": {"download": 1, "poll": 3, "submit": 1}}


async def test_face_beauty_pro_fields(vendor: Vendor, session: aiohttp.ClientSession) -> None:
    vendor.route("POST", BEAUTY, Reply(body=ailab_ok(task_type="async", task_id="fb-9")))
    kit = make_kit(session, vendor.url())
    out = await provider(kit).submit(
        "ailab/face-beauty-pro",
        jpeg_payload(),
        {"smoothing": 70, "whitening": 0, "filter_type": 10},
        {},
    )
    assert out.task_id == "fb-9"
    fields = {p.name: p.data for p in vendor.seen[0].parts}
    assert fields == {
        "task_type": b"async",
        "image": JPEG,
        "whitening": b"0",
        "smoothing": b"70",
        "filter_type": b"10",
    }


async def test_credits_wire(vendor: Vendor, session: aiohttp.ClientSession) -> None:
    vendor.route(
        "GET",
        CREDITS,
        Reply(
            body=ailab_ok(
                data=[
                    {"unique_sign": "common", "balance": 100.5},
                    {"unique_sign": "portrait_expression_editing", "balance": 24.0},
                ]
            )
        ),
    )
    kit = make_kit(session, vendor.url())
    bal = await provider(kit).credits()
    assert bal.balance == 124.5
    assert vendor.seen[0].header("ailabapi-api-key") == KEY
    assert kit.budget.taken == 1
    assert kit.stats.by_vendor() == {"ailab": {"credits": 1}}


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity", "1e999"])
async def test_credits_keep_a_non_finite_balance_as_read(
    vendor: Vendor, session: aiohttp.ClientSession, raw: str
) -> None:
    # JSON parsers accept these; parse_credits keeps them (the pool named) for
    # pipeline.plan to call the balance unknown (tests/unit/test_plan_credits_nonfinite.py).
    body = (
        '{"request_id":"r","log_id":"l","error_detail":{"code":""},"data":['
        '{"unique_sign":"common","balance":3.0},'
        f'{{"unique_sign":"portrait_ai_face_swap","balance":{raw}}}]}}'
    )
    vendor.route("GET", CREDITS, Reply(body=body, headers={"Content-Type": "application/json"}))
    bal = await provider(make_kit(session, vendor.url())).credits()
    assert bal.pools["common"] == 3.0
    assert not math.isfinite(bal.pools["portrait_ai_face_swap"])
    assert not math.isfinite(bal.balance)


async def test_poll_2_without_a_result_is_succeeded_then_asked_again(
    vendor: Vendor, session: aiohttp.ClientSession
) -> None:
    # A succeeded task is billed (docs/vendors.md, "Both vendors: billing"): status 2
    # without a result is succeeded without one, and the same task is polled again.
    result_url = vendor.url("/outputs/late.jpg")
    vendor.route(
        "GET",
        POLL,
        Reply(body=ailab_ok(task_status=2)),
        Reply(body=ailab_ok(task_status=2, data={})),
        Reply(body=ailab_ok(task_status=2, data={"image": result_url})),
    )
    kit = make_kit(session, vendor.url())
    p = provider(kit)
    states = [await p.poll("ailab/face-swap", "t-1") for _ in range(3)]
    assert [(s.state, s.result_url, s.image, s.error) for s in states] == [
        ("succeeded", None, None, None),
        ("succeeded", None, None, None),
        ("succeeded", result_url, None, None),
    ]
    assert [s.raw_path for s in vendor.seen] == [f"{POLL}?task_id=t-1"] * 3


async def test_key_never_in_errors(vendor: Vendor, session: aiohttp.ClientSession) -> None:
    echo = f"API key {KEY} does not exist"
    vendor.route("POST", EMOTION, Reply(401, ailab_fail(401, "ERROR_USER_NOT_EXISTS", echo)))
    vendor.route("GET", POLL, Reply(422, ailab_fail(422, "ERROR_NO_FACE_IN_FILE", echo)))
    vendor.route("GET", CREDITS, Reply(500, f"<html>{KEY}</html>"))
    p = provider(make_kit(session, vendor.url()))
    with pytest.raises(FatalError) as info:
        await p.submit("ailab/emotion-editor", jpeg_payload(), {"service_choice": 10}, {})
    assert_no_key(info.value)
    assert "***" in info.value.message
    state = await p.poll("ailab/face-swap", "t1")
    assert state.state == "failed" and isinstance(state.error, PermanentError)
    assert_no_key(state.error)
    with pytest.raises(TransportError) as tinfo:
        await p.credits()
    assert_no_key(tinfo.value)
    assert KEY not in repr(p)


async def test_rate_limit_on_poll(vendor: Vendor, session: aiohttp.ClientSession) -> None:
    vendor.route(
        "GET", POLL, Reply(429, ailab_fail(429, "EXCEEDING_LIMITS"), headers={"Retry-After": "2"})
    )
    with pytest.raises(RateLimitedError) as info:
        await provider(make_kit(session, vendor.url())).poll("ailab/face-swap", "t1")
    assert info.value.retry_after == 2.0


async def test_redirects_are_not_followed(vendor: Vendor, session: aiohttp.ClientSession) -> None:
    vendor.route("POST", SWAP, Reply(307, b"", headers={"Location": vendor.url("/elsewhere")}))
    vendor.route("POST", "/elsewhere", Reply(body=ailab_ok(task_id="x")))
    with pytest.raises(FatalError) as info:
        await provider(make_kit(session, vendor.url())).submit(
            "ailab/face-swap", jpeg_payload(), {}, {"image_template": jpeg_payload()}
        )
    assert info.value.code == "HTTP_307"
    assert vendor.requests_to("/elsewhere") == []  # the key never travelled there


async def test_html_502_is_transport(vendor: Vendor, session: aiohttp.ClientSession) -> None:
    vendor.route(
        "GET",
        POLL,
        Reply(502, "<html><h1>502 Bad Gateway</h1></html>", headers={"Content-Type": "text/html"}),
    )
    with pytest.raises(TransportError) as info:
        await provider(make_kit(session, vendor.url())).poll("ailab/face-swap", "t1")
    assert info.value.code == "HTTP_502"


async def test_timeout_is_transport(vendor: Vendor, session: aiohttp.ClientSession) -> None:
    vendor.route("POST", EMOTION, Reply(body=ailab_ok(), delay=1.0))
    kit = make_kit(session, vendor.url())
    kit.timeouts = kit.timeouts.model_copy(update={"request_seconds": 0.1})
    with pytest.raises(TransportError) as info:
        await provider(kit).submit(
            "ailab/emotion-editor", jpeg_payload(), {"service_choice": 10}, {}
        )
    assert info.value.code == "TIMEOUT"
    assert info.value.kind == "retryable"
    assert kit.stats.by_vendor() == {"ailab": {"submit": 1}}


async def test_dropped_connection_is_transport(
    vendor: Vendor, session: aiohttp.ClientSession
) -> None:
    vendor.route("GET", POLL, Reply(drop=True))
    with pytest.raises(TransportError) as info:
        await provider(make_kit(session, vendor.url())).poll("ailab/face-swap", "t1")
    assert info.value.code == "NETWORK_ERROR"


async def test_connection_refused_is_transport(session: aiohttp.ClientSession) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    kit = make_kit(session, f"http://127.0.0.1:{port}")
    with pytest.raises(TransportError) as info:
        await provider(kit).credits()
    # Nothing left: the engine counts CONNECT_FAILED towards VENDOR_UNREACHABLE.
    assert info.value.code == "CONNECT_FAILED"
    assert info.value.maybe_sent is False
    assert_no_key(info.value)


async def test_download_errors(vendor: Vendor, session: aiohttp.ClientSession) -> None:
    vendor.route("GET", "/gone.jpg", Reply(403, "<Error><Code>AccessDenied</Code></Error>"))
    vendor.route("GET", "/busy.jpg", Reply(503, "busy"))
    vendor.route("GET", "/slow.jpg", Reply(body=JPEG, delay=1.0))
    kit = make_kit(session, vendor.url())
    kit.timeouts = kit.timeouts.model_copy(update={"download_seconds": 0.1})
    p = provider(kit)
    with pytest.raises(PermanentError) as info:
        await p.download(vendor.url("/gone.jpg?sig=1"))
    assert info.value.code == "RESULT_URL_EXPIRED"
    with pytest.raises(VendorError) as vinfo:
        await p.download(vendor.url("/busy.jpg"))
    assert vinfo.value.kind == "retryable"
    with pytest.raises(TransportError):
        await p.download(vendor.url("/slow.jpg"))
    with pytest.raises(PermanentError) as pinfo:
        await p.download("ftp://example.com/x.jpg")
    assert pinfo.value.code == "RESULT_URL_REFUSED"
    assert kit.budget.taken == 0
    assert kit.stats.by_vendor() == {"ailab": {"download": 3}}


async def test_client_errors_send_nothing(vendor: Vendor, session: aiohttp.ClientSession) -> None:
    kit = make_kit(session, vendor.url())
    with pytest.raises(PermanentError):
        await provider(kit).submit("ailab/emotion-editor", jpeg_payload(), {}, {})
    assert vendor.seen == [] and kit.budget.taken == 0 and kit.stats.by_vendor() == {}
