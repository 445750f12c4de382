"""PerfectCorpProvider against a real HTTP server on loopback: what goes on the wire."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from pipeline.errors import (
    FatalError,
    PermanentError,
    RateLimitedError,
    RetryableError,
    TransportError,
)
from pipeline.providers.base import Provider
from pipeline.providers.perfectcorp import PerfectCorpProvider

from ._server import JPEG, KEY, Kit, Reply, Seen, Vendor, jpeg_payload, make_kit, start_vendor

FEATURE = "/s2s/v2.0/file/ai-smile"
UNIVERSAL = "/s2s/v2.0/file"
TASK = "/s2s/v2.0/task/ai-smile"
CREDIT = "/s2s/v1.0/client/credit"
BUCKET = "/bucket/demo/ttl30/obj"
SIGNED_QUERY = "?X-Amz-Signature=a%2Fb%2B%3D&X-Amz-Expires=30"
SMILE = {"expression_type": "closed_mouth_smile"}
BIG_ID = 13105541279084536123  # > 2^53


@pytest.fixture
async def vendor() -> AsyncIterator[Vendor]:
    async for v in start_vendor():
        yield v


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def provider(kit: Kit) -> PerfectCorpProvider:
    return PerfectCorpProvider(kit.session, kit.config, KEY, kit.timeouts, kit.stats, kit.budget)


def upload_reply(vendor: Vendor, headers: dict[str, Any] | None = None) -> Reply:
    if headers is None:
        headers = {"Content-Type": "image/jpeg", "Content-Length": len(JPEG)}
    return Reply(
        body={
            "status": 200,
            "data": {
                "files": [
                    {
                        "content_type": "image/jpeg",
                        "file_name": "portrait.jpg",
                        "file_id": "SaGa/u/Ff+hR=",
                        "requests": [
                            {
                                "method": "PUT",
                                "url": vendor.url(BUCKET + SIGNED_QUERY),
                                "headers": headers,
                            }
                        ],
                    }
                ]
            },
        }
    )


def script_submit(vendor: Vendor, upload_path: str = FEATURE, **kw: Any) -> None:
    vendor.route("POST", upload_path, upload_reply(vendor, **kw))
    vendor.route("PUT", BUCKET, Reply(200, b""))
    # A raw JSON number id above 2^53 (docs/vendors.md, "Perfect Corp: transport and
    # authentication").
    vendor.route(
        "POST",
        TASK,
        Reply(
            body=f'{{"status":200,"data":{{"task_id":{BIG_ID}}}}}',
            headers={"x-request-id": "rq-create"},
        ),
    )


async def test_submit_wire(vendor: Vendor, session: aiohttp.ClientSession) -> None:
    script_submit(vendor)
    kit = make_kit(session, vendor.url())
    p: Provider = provider(kit)  # mypy checks the structural contract here
    out = await p.submit("perfectcorp/ai-smile", jpeg_payload(), SMILE, {})
    assert out.task_id == str(BIG_ID)
    assert out.request_id == "rq-create"

    upload, put, create = vendor.seen
    assert (upload.method, upload.path) == ("POST", FEATURE)
    assert upload.header("Authorization") == f"Bearer {KEY}"
    assert upload.header("Content-Type") == "application/json"
    assert json.loads(upload.body) == {
        "files": [
            {"content_type": "image/jpeg", "file_name": "portrait.jpg", "file_size": len(JPEG)}
        ]
    }

    # Step 2 of (docs/vendors.md, "Perfect Corp: upload"): exactly the signed headers
    # (plus Host), the URL as issued, the bytes.
    assert (put.method, put.raw_path) == ("PUT", BUCKET + SIGNED_QUERY)
    assert put.header_names() == {"host", "content-type", "content-length"}
    assert put.header("Content-Type") == "image/jpeg"
    assert put.header("Content-Length") == str(len(JPEG))
    assert put.body == JPEG
    assert all(KEY not in v for _, v in put.raw_headers)

    assert (create.method, create.path) == ("POST", TASK)
    assert create.header("Authorization") == f"Bearer {KEY}"
    assert json.loads(create.body) == {
        "src_file_id": "SaGa/u/Ff+hR=",
        "expression_type": "closed_mouth_smile",
    }
    assert kit.budget.taken == 2  # upload + create; the PUT takes no slot
    assert kit.stats.by_vendor() == {"perfectcorp": {"put": 1, "submit": 1, "upload": 1}}


async def test_put_sends_no_content_type_unless_signed(
    vendor: Vendor, session: aiohttp.ClientSession
) -> None:
    script_submit(vendor, headers={"Content-Length": str(len(JPEG)), "x-amz-acl": "private"})
    await provider(make_kit(session, vendor.url())).submit(
        "perfectcorp/ai-smile", jpeg_payload(), SMILE, {}
    )
    put = vendor.requests_to(BUCKET)[0]
    assert put.header_names() == {"host", "content-length", "x-amz-acl"}
    assert put.header("x-amz-acl") == "private"


async def test_put_failure_is_retryable(vendor: Vendor, session: aiohttp.ClientSession) -> None:
    script_submit(vendor)
    vendor.route("PUT", BUCKET, Reply(403, "<Error><Code>SignatureDoesNotMatch</Code></Error>"))
    with pytest.raises(RetryableError) as info:
        await provider(make_kit(session, vendor.url())).submit(
            "perfectcorp/ai-smile", jpeg_payload(), SMILE, {}
        )
    assert info.value.code == "UPLOAD_PUT_FAILED"
    assert vendor.requests_to(TASK) == []  # no task created from an unuploaded file


async def test_put_dropped_is_retryable(vendor: Vendor, session: aiohttp.ClientSession) -> None:
    script_submit(vendor)
    vendor.route("PUT", BUCKET, Reply(drop=True))
    with pytest.raises(TransportError) as info:
        await provider(make_kit(session, vendor.url())).submit(
            "perfectcorp/ai-smile", jpeg_payload(), SMILE, {}
        )
    assert info.value.code == "UPLOAD_PUT_FAILED"
    assert info.value.kind == "retryable"


async def test_upload_path_falls_back_on_404(
    vendor: Vendor, session: aiohttp.ClientSession
) -> None:
    script_submit(vendor, upload_path=UNIVERSAL)  # the feature path answers 404
    kit = make_kit(session, vendor.url())
    p = provider(kit)
    await p.submit("perfectcorp/ai-smile", jpeg_payload(), SMILE, {})
    assert p.upload_path == UNIVERSAL
    await p.submit("perfectcorp/ai-smile", jpeg_payload(), SMILE, {})  # remembered
    uploads = [s.path for s in vendor.seen if s.method == "POST" and s.path != TASK]
    assert uploads == [FEATURE, UNIVERSAL, UNIVERSAL]
    assert kit.stats.by_vendor()["perfectcorp"]["upload"] == 3
    assert kit.budget.taken == 5


async def test_configured_universal_path_has_no_fallback(
    vendor: Vendor, session: aiohttp.ClientSession
) -> None:
    kit = make_kit(session, vendor.url(), upload_path=UNIVERSAL)
    with pytest.raises(PermanentError) as info:
        await provider(kit).submit("perfectcorp/ai-smile", jpeg_payload(), SMILE, {})
    assert info.value.code == "HTTP_404"
    assert [s.path for s in vendor.seen] == [UNIVERSAL]


async def test_create_errors(vendor: Vendor, session: aiohttp.ClientSession) -> None:
    script_submit(vendor)
    vendor.route(
        "POST",
        TASK,
        Reply(
            400,
            {
                "status": 400,
                "error": "Insufficient unit to run",
                "error_code": "CreditInsufficiency",
            },
            headers={"x-request-id": "rq-9"},
        ),
        Reply(429, {"status": 429, "error": "Too many requests"}),
    )
    p = provider(make_kit(session, vendor.url()))
    with pytest.raises(FatalError) as info:
        await p.submit("perfectcorp/ai-smile", jpeg_payload(), SMILE, {})
    assert info.value.code == "CreditInsufficiency"
    assert info.value.request_id == "rq-9"
    with pytest.raises(RateLimitedError):
        await p.submit("perfectcorp/ai-smile", jpeg_payload(), SMILE, {})


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({}, "CLIENT_MISSING_PARAMETER"),
        ({"expression_type": "closed_mouth_smile", "strength": 3}, "CLIENT_UNKNOWN_PARAMETER"),
    ],
)
async def test_bad_params_send_nothing(
    vendor: Vendor, session: aiohttp.ClientSession, params: dict[str, Any], code: str
) -> None:
    kit = make_kit(session, vendor.url())
    with pytest.raises(PermanentError) as info:
        await provider(kit).submit("perfectcorp/ai-smile", jpeg_payload(), params, {})
    assert info.value.code == code
    assert vendor.seen == [] and kit.budget.taken == 0


async def test_unknown_operation_is_fatal(vendor: Vendor, session: aiohttp.ClientSession) -> None:
    with pytest.raises(FatalError):
        await provider(make_kit(session, vendor.url())).submit(
            "ailab/face-swap", jpeg_payload(), SMILE, {}
        )


async def test_poll_and_download(vendor: Vendor, session: aiohttp.ClientSession) -> None:
    result = vendor.url("/bucket/result.jpg?X-Amz-Signature=zz%2F")
    path = TASK + "/a/b+c="  # aiohttp's decoded view of the quoted id

    def answer(seen: Seen) -> Reply:
        n = len(vendor.requests_to(path))
        if n == 1:
            return Reply(
                body={
                    "status": 200,
                    "data": {"task_status": "running", "error": None, "polling_interval": 1500},
                }
            )
        return Reply(
            body={
                "status": 200,
                "data": {"task_status": "success", "error": None, "results": {"url": result}},
            }
        )

    vendor.route("GET", path, answer)
    vendor.route(
        "GET", "/bucket/result.jpg", Reply(body=JPEG, headers={"Content-Type": "image/jpeg"})
    )
    kit = make_kit(session, vendor.url())
    p = provider(kit)
    first = await p.poll("perfectcorp/ai-smile", "a/b+c=")
    assert (first.state, first.poll_after) == ("running", 1.5)
    done = await p.poll("perfectcorp/ai-smile", "a/b+c=")
    assert (done.state, done.result_url) == ("succeeded", result)
    for seen in vendor.requests_to(path):
        # The id URL-encoded (docs/vendors.md, "Perfect Corp: polling and task states").
        assert seen.raw_path == TASK + "/a%2Fb%2Bc%3D"
        assert seen.header("Authorization") == f"Bearer {KEY}"
    assert await p.download(result) == JPEG
    dl = vendor.requests_to("/bucket/result.jpg")[0]
    assert dl.header("Authorization") is None
    assert dl.raw_path == "/bucket/result.jpg?X-Amz-Signature=zz%2F"
    assert kit.budget.taken == 2
    assert kit.stats.by_vendor() == {"perfectcorp": {"download": 1, "poll": 2}}


async def test_poll_outcomes(vendor: Vendor, session: aiohttp.ClientSession) -> None:
    vendor.route(
        "GET",
        TASK + "/t1",
        Reply(
            body={
                "status": 200,
                "data": {
                    "task_status": "error",
                    "error": "ERROR_NO_FACE",
                    "error_message": "no face",
                },
            }
        ),
        Reply(400, {"status": 400, "error": "Invalid task ID", "error_code": "InvalidTaskId"}),
        Reply(
            500, {"status": 500, "error": "Task execution timed out", "error_code": "TaskTimeout"}
        ),
        Reply(429, {"status": 429, "error": "Too many requests"}),
        Reply(
            401,
            {
                "status": 401,
                "error": "This API key is not recognized.",
                "error_code": "InvalidApiKey",
            },
        ),
    )
    p = provider(make_kit(session, vendor.url()))
    s = await p.poll("perfectcorp/ai-smile", "t1")
    assert s.state == "failed" and isinstance(s.error, PermanentError)
    assert s.error.code == "error_no_face"
    s = await p.poll("perfectcorp/ai-smile", "t1")
    assert s.state == "failed" and isinstance(s.error, PermanentError)
    assert s.error.code == "InvalidTaskId"
    s = await p.poll("perfectcorp/ai-smile", "t1")
    assert s.state == "failed" and type(s.error) is RetryableError
    assert s.error.code == "TaskTimeout"
    with pytest.raises(RateLimitedError):
        await p.poll("perfectcorp/ai-smile", "t1")
    with pytest.raises(FatalError):
        await p.poll("perfectcorp/ai-smile", "t1")


async def test_credits_wire(vendor: Vendor, session: aiohttp.ClientSession) -> None:
    vendor.route(
        "GET",
        CREDIT,
        Reply(
            body={
                "status": 200,
                "results": [
                    {
                        "id": 13105541279084536,
                        "type": "ApiSubsToken",
                        "amount": 10,
                        "amount_dec": 10.04,
                        "expiry": 1704789135000,
                    }
                ],
            }
        ),
    )
    kit = make_kit(session, vendor.url())
    bal = await provider(kit).credits()
    assert bal.balance == pytest.approx(10.04) and bal.unit == "units"
    assert vendor.seen[0].header("Authorization") == f"Bearer {KEY}"
    assert kit.budget.taken == 1
    assert kit.stats.by_vendor() == {"perfectcorp": {"credits": 1}}


async def test_key_never_in_errors(vendor: Vendor, session: aiohttp.ClientSession) -> None:
    vendor.route(
        "POST",
        FEATURE,
        Reply(
            401,
            {
                "status": 401,
                "error": f"API key {KEY} is not recognized.",
                "error_code": "InvalidApiKey",
            },
        ),
    )
    vendor.route(
        "GET",
        TASK + "/t1",
        Reply(
            body={
                "status": 200,
                "data": {
                    "task_status": "error",
                    "error": "error_no_face",
                    "error_message": f"key={KEY}",
                },
            }
        ),
    )
    p = provider(make_kit(session, vendor.url()))
    with pytest.raises(FatalError) as info:
        await p.submit("perfectcorp/ai-smile", jpeg_payload(), SMILE, {})
    for text in (str(info.value), repr(info.value), *map(str, info.value.args)):
        assert KEY not in text
    state = await p.poll("perfectcorp/ai-smile", "t1")
    assert state.error is not None and KEY not in str(state.error)
    assert KEY not in repr(p)
