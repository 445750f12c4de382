"""Perfect Corp request builders and response parsers (the Perfect Corp sections of
docs/vendors.md)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pipeline.errors import (
    FatalError,
    PermanentError,
    RateLimitedError,
    RetryableError,
    TransportError,
    VendorError,
)
from pipeline.providers import perfectcorp as pc

from ._server import JPEG, jpeg_payload

RID = {"x-request-id": "rq-77"}
S3 = "https://yce-us.s3-accelerate.amazonaws.com/demo/ttl30/abc?X-Amz-Signature=a%2Fb"


def body(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def upload_ok(**overrides: Any) -> dict[str, Any]:
    request = {
        "method": "PUT",
        "url": S3,
        "headers": {"Content-Type": "image/jpeg", "Content-Length": str(len(JPEG))},
    }
    request.update(overrides)
    return {
        "status": 200,
        "data": {
            "files": [
                {
                    "content_type": "image/jpeg",
                    "file_name": "portrait.jpg",
                    "file_id": "SaGaqpDg/u/FfjK3xgCQ+hRt9MJXBFaud",
                    "requests": [request],
                }
            ]
        },
    }


# ------------------------------------------------------------------------- builders


def test_auth_header_has_one_space() -> None:
    assert pc.auth_headers("k") == {"Authorization": "Bearer k"}


def test_build_upload() -> None:
    req = pc.build_upload(jpeg_payload())
    assert (req.method, req.target) == ("POST", "/s2s/v2.0/file/ai-smile")
    assert req.json == {
        "files": [
            {"content_type": "image/jpeg", "file_name": "portrait.jpg", "file_size": len(JPEG)}
        ]
    }
    assert pc.build_upload(jpeg_payload(), pc.UNIVERSAL_UPLOAD_PATH).target == "/s2s/v2.0/file"


def test_build_put_uses_exactly_the_signed_headers() -> None:
    target = pc.parse_upload(200, {}, body(upload_ok()))
    req = pc.build_put(target, jpeg_payload())
    assert (req.method, req.target, req.data) == ("PUT", S3, JPEG)
    assert dict(req.headers) == {"Content-Type": "image/jpeg", "Content-Length": str(len(JPEG))}


def test_build_put_size_mismatch() -> None:
    target = pc.parse_upload(200, {}, body(upload_ok(headers={"Content-Length": "1"})))
    with pytest.raises(RetryableError) as info:
        pc.build_put(target, jpeg_payload())
    assert info.value.code == "UPLOAD_SIZE_MISMATCH"


def test_build_create_task() -> None:
    req = pc.build_create_task("fid/+x", "closed_mouth_smile")
    assert (req.method, req.target) == ("POST", "/s2s/v2.0/task/ai-smile")
    assert req.json == {"src_file_id": "fid/+x", "expression_type": "closed_mouth_smile"}


def test_build_poll_encodes_the_id() -> None:
    assert pc.build_poll("grH0_-x").target == "/s2s/v2.0/task/ai-smile/grH0_-x"
    assert pc.build_poll("a/b+c=").target == "/s2s/v2.0/task/ai-smile/a%2Fb%2Bc%3D"


def test_build_credits() -> None:
    assert pc.build_credits().target == "/s2s/v1.0/client/credit"


# --------------------------------------------------------------------------- upload


def test_parse_upload() -> None:
    target = pc.parse_upload(200, RID, body(upload_ok()))
    assert target.file_id == "SaGaqpDg/u/FfjK3xgCQ+hRt9MJXBFaud"
    assert target.url == S3
    assert target.method == "PUT"


def test_parse_upload_numeric_header_values_become_text() -> None:
    target = pc.parse_upload(200, {}, body(upload_ok(headers={"Content-Length": 547541})))
    assert dict(target.headers) == {"Content-Length": "547541"}


def test_parse_upload_without_headers_or_method() -> None:
    doc = upload_ok()
    req = doc["data"]["files"][0]["requests"][0]
    del req["headers"], req["method"]
    target = pc.parse_upload(200, {}, body(doc))
    assert dict(target.headers) == {}
    assert target.method == "PUT"


@pytest.mark.parametrize(
    "doc",
    [
        {"status": 200},
        {"status": 200, "data": {"files": []}},
        {"status": 200, "data": {"files": [{"file_id": "x", "requests": []}]}},
        {"status": 200, "data": {"files": [{"requests": [{"url": S3}]}]}},
        {"status": 200, "data": {"files": [{"file_id": "x", "requests": [{"url": "ftp://x"}]}]}},
    ],
)
def test_parse_upload_malformed(doc: dict[str, Any]) -> None:
    with pytest.raises(RetryableError) as info:
        pc.parse_upload(200, RID, body(doc))
    assert info.value.code == "MALFORMED_RESPONSE"
    assert info.value.request_id == "rq-77"


@pytest.mark.parametrize(
    ("status", "doc", "cls", "code"),
    [
        (
            400,
            {"status": 400, "error": "Invalid parameter value", "error_code": "InvalidParameters"},
            PermanentError,
            "InvalidParameters",
        ),
        (401, {"status": 401, "error": "Invalid API key"}, FatalError, "HTTP_401"),
        (
            401,
            {
                "status": 401,
                "error": "This API key is not recognized.",
                "error_code": "InvalidApiKey",
            },
            FatalError,
            "InvalidApiKey",
        ),
        (429, {"status": 429, "error": "Too many requests"}, RateLimitedError, "HTTP_429"),
    ],
)
def test_parse_upload_errors(
    status: int, doc: dict[str, Any], cls: type[VendorError], code: str
) -> None:
    with pytest.raises(VendorError) as info:
        pc.parse_upload(status, RID, body(doc))
    assert type(info.value) is cls
    assert info.value.code == code
    assert info.value.request_id == "rq-77"
    assert info.value.message == doc["error"]


def test_parse_put() -> None:
    pc.parse_put(200, {}, b"", url=S3)
    with pytest.raises(RetryableError) as info:
        pc.parse_put(403, {}, b"<Error><Code>SignatureDoesNotMatch</Code></Error>", url=S3)
    assert info.value.code == "UPLOAD_PUT_FAILED"
    assert "X-Amz-Signature" not in info.value.message


# ---------------------------------------------------------------------- create task


def test_parse_create_task() -> None:
    doc = {"status": 200, "data": {"task_id": "grH0CvsgXuAIHLUzD0V1Ol34hoet3R1tvdbtiVHrDb6_Uq"}}
    out = pc.parse_create_task(200, RID, body(doc))
    assert out.task_id == "grH0CvsgXuAIHLUzD0V1Ol34hoet3R1tvdbtiVHrDb6_Uq"
    assert out.request_id == "rq-77"


def test_parse_create_task_big_numeric_id_stays_exact() -> None:
    # Ids may exceed 2^53 (docs/vendors.md, "Perfect Corp: transport and
    # authentication"); a float would round this one.
    raw = b'{"status":200,"data":{"task_id":13105541279084536123}}'
    assert pc.parse_create_task(200, {}, raw).task_id == "13105541279084536123"


@pytest.mark.parametrize(
    ("status", "doc", "cls", "code"),
    [
        (
            400,
            {
                "status": 400,
                "error": "The operation could not be completed",
                "error_code": "CreditInsufficiency",
            },
            FatalError,
            "CreditInsufficiency",
        ),
        (
            400,
            {"status": 400, "error": "x", "error_code": "InvalidParameters"},
            PermanentError,
            "InvalidParameters",
        ),
        (
            400,
            {"status": 400, "error": "Unexpected request parameter", "error_code": "BadRequest"},
            PermanentError,
            "BadRequest",
        ),
        (
            404,
            {"status": 404, "error": "x", "error_code": "unknown_internal_error"},
            RetryableError,
            "unknown_internal_error",
        ),
        (
            500,
            {"status": 500, "error": "x", "error_code": "unknown_internal_error"},
            RetryableError,
            "unknown_internal_error",
        ),
        (500, {"status": 500, "error": "boom"}, RetryableError, "HTTP_500"),
        (
            401,
            {"status": 401, "error": "expired", "error_code": "ExpiredApiKey"},
            FatalError,
            "ExpiredApiKey",
        ),
        (429, {"status": 429, "error": "Too many requests"}, RateLimitedError, "HTTP_429"),
    ],
)
def test_parse_create_task_errors(
    status: int, doc: dict[str, Any], cls: type[VendorError], code: str
) -> None:
    with pytest.raises(VendorError) as info:
        pc.parse_create_task(status, RID, body(doc))
    assert type(info.value) is cls
    assert info.value.code == code
    assert info.value.vendor == "perfectcorp"
    assert info.value.request_id == "rq-77"


def test_rate_limit_retry_after() -> None:
    with pytest.raises(RateLimitedError) as info:
        pc.parse_create_task(429, {"Retry-After": "3"}, body({"status": 429, "error": "x"}))
    assert info.value.retry_after == 3.0


def test_http_200_whose_body_says_error() -> None:
    doc = {"status": 400, "error": "x", "error_code": "CreditInsufficiency"}
    with pytest.raises(FatalError):
        pc.parse_create_task(200, {}, body(doc))
    with pytest.raises(PermanentError) as info:
        pc.parse_create_task(200, {}, body({"status": 404, "error": "gone"}))
    assert info.value.code == "HTTP_404"


@pytest.mark.parametrize(
    ("status", "raw", "cls", "code"),
    [
        (502, b"<html><body><h1>502 Bad Gateway</h1></body></html>", TransportError, "HTTP_502"),
        (504, b"", TransportError, "HTTP_504"),
        (200, b"<html>maintenance</html>", RetryableError, "MALFORMED_RESPONSE"),
        (200, b'{"status":200,"data":{"task_id":"abc', RetryableError, "MALFORMED_RESPONSE"),
        (200, b'{"status":200}', RetryableError, "MALFORMED_RESPONSE"),
        (200, b'{"status":200,"data":{"task_id":""}}', RetryableError, "MALFORMED_RESPONSE"),
        (401, b"Unauthorized", FatalError, "HTTP_401"),
        (429, b"Too many requests", RateLimitedError, "HTTP_429"),
        (404, b"<html>Not Found</html>", PermanentError, "HTTP_404"),
        (307, b"", FatalError, "HTTP_307"),
    ],
)
def test_create_task_malformed(status: int, raw: bytes, cls: type[VendorError], code: str) -> None:
    with pytest.raises(VendorError) as info:
        pc.parse_create_task(status, RID, raw)
    assert type(info.value) is cls
    assert info.value.code == code
    assert info.value.request_id == "rq-77"


# ----------------------------------------------------------------------------- polls

RESULT = "https://yce-us.s3-accelerate.amazonaws.com/demo/ttl30/result.jpg?sig=1"


def poll_doc(**data: Any) -> bytes:
    return body({"status": 200, "data": data})


def test_poll_running() -> None:
    state = pc.parse_poll(200, {}, poll_doc(task_status="running", error=None))
    assert state.state == "running"
    assert state.poll_after is None


def test_poll_polling_interval_is_milliseconds() -> None:
    state = pc.parse_poll(200, {}, poll_doc(task_status="running", polling_interval=2500))
    assert state.poll_after == 2.5


@pytest.mark.parametrize("value", [0, -5, "soon", None, True])
def test_poll_ignores_bad_polling_interval(value: object) -> None:
    state = pc.parse_poll(200, {}, poll_doc(task_status="running", polling_interval=value))
    assert state.poll_after is None


@pytest.mark.parametrize("word", ["queued", "pending", "processing"])
def test_poll_unknown_state_word_keeps_polling(word: str) -> None:
    assert pc.parse_poll(200, {}, poll_doc(task_status=word)).state == "running"


@pytest.mark.parametrize("word", ["success", "SUCCESS", "Success"])
def test_poll_success(word: str) -> None:
    state = pc.parse_poll(200, {}, poll_doc(task_status=word, error=None, results={"url": RESULT}))
    assert state.state == "succeeded"
    assert state.result_url == RESULT


def test_poll_success_tolerates_a_results_list() -> None:
    state = pc.parse_poll(200, {}, poll_doc(task_status="success", results=[{"url": RESULT}]))
    assert state.result_url == RESULT


@pytest.mark.parametrize("results", [None, {}, {"url": ""}, {"url": "not-a-url"}, []])
def test_poll_success_without_url_is_succeeded_without_a_result(results: object) -> None:
    # Billed: the lifecycle asks again (a re-poll gives a fresh URL, docs/vendors.md
    # "Perfect Corp: result URLs"), then reports it paid and lost; a resubmit would
    # pay twice.
    state = pc.parse_poll(200, RID, poll_doc(task_status="success", results=results))
    assert (state.state, state.result_url, state.image, state.error) == (
        "succeeded",
        None,
        None,
        None,
    )


@pytest.mark.parametrize(
    ("code", "cls", "expected_code"),
    [
        ("error_no_face", PermanentError, "error_no_face"),
        ("ERROR_NO_FACE", PermanentError, "error_no_face"),  # "Perfect Corp: engine error codes"
        ("error_multiple_people", PermanentError, "error_multiple_people"),
        ("exceed_max_filesize", PermanentError, "exceed_max_filesize"),
        ("error_inference", RetryableError, "error_inference"),
        ("UNKNOWN_INTERNAL_ERROR", RetryableError, "unknown_internal_error"),
        ("error_never_seen_before", RetryableError, "error_never_seen_before"),
        ("", RetryableError, "unknown_engine_error"),
        (None, RetryableError, "unknown_engine_error"),
    ],
)
def test_poll_engine_error(code: str | None, cls: type[VendorError], expected_code: str) -> None:
    raw = poll_doc(task_status="error", error=code, error_message="No face detected")
    state = pc.parse_poll(200, RID, raw)
    assert state.state == "failed"
    assert type(state.error) is cls
    assert state.error.code == expected_code
    assert state.error.request_id == "rq-77"


def test_poll_engine_error_message() -> None:
    state = pc.parse_poll(
        200, {}, poll_doc(task_status="error", error="error_pose", error_message="Yaw too large")
    )
    assert state.error is not None and state.error.message == "Yaw too large"


def test_poll_invalid_task_id_is_permanent_failure() -> None:
    doc = {"status": 400, "error": "Invalid task ID", "error_code": "InvalidTaskId"}
    state = pc.parse_poll(400, RID, body(doc))
    assert state.state == "failed"
    assert type(state.error) is PermanentError
    assert state.error.code == "InvalidTaskId"


@pytest.mark.parametrize(
    ("status", "doc"),
    [
        (500, {"status": 500, "error": "Task execution timed out", "error_code": "TaskTimeout"}),
        (404, {"status": 404, "error": "x", "error_code": "unknown_internal_error"}),
        (500, {"status": 500, "error": "x", "error_code": "unknown_internal_error"}),
    ],
)
def test_poll_resubmit_codes_are_retryable_failures(status: int, doc: dict[str, Any]) -> None:
    state = pc.parse_poll(status, {}, body(doc))
    assert state.state == "failed"
    assert type(state.error) is RetryableError
    assert state.error.code == doc["error_code"]


@pytest.mark.parametrize(
    ("status", "raw", "cls"),
    [
        (429, body({"status": 429, "error": "Too many requests"}), RateLimitedError),
        (401, body({"status": 401, "error": "Invalid API key"}), FatalError),
        (401, body({"status": 401, "error": "x", "error_code": "InactiveApiKey"}), FatalError),
        (500, body({"status": 500, "error": "boom"}), RetryableError),
        (503, b"<html>Service Unavailable</html>", TransportError),
        (200, b"", RetryableError),
        (200, b'{"status":200,"data":{"task_st', RetryableError),
        (200, poll_doc(error=None), RetryableError),  # no task_status
    ],
)
def test_poll_request_failures_raise(status: int, raw: bytes, cls: type[VendorError]) -> None:
    with pytest.raises(VendorError) as info:
        pc.parse_poll(status, RID, raw)
    assert type(info.value) is cls
    assert info.value.request_id == "rq-77"


def test_poll_other_permanent_codes_fail_the_task() -> None:
    doc = {"status": 400, "error": "bad", "error_code": "InvalidParameters"}
    state = pc.parse_poll(400, {}, body(doc))
    assert state.state == "failed" and isinstance(state.error, PermanentError)


# --------------------------------------------------------------------------- credits


def test_credits_sum_api_entries() -> None:
    doc = {
        "status": 200,
        "results": [
            {
                "id": 13105541279084536,
                "type": "ApiSubsToken",
                "amount": 10,
                "amount_dec": 10.04,
                "expiry": 1704789135000,
            },
            {
                "id": 13105541279084537,
                "type": "ApiPaygToken",
                "amount": 5,
                "amount_dec": 5.5,
                "expiry": 1704789135000,
            },
            {"id": 3, "type": "ApiPaygToken", "amount": 1},  # amount_dec missing: amount
            {"id": 4, "type": "WebToken", "amount_dec": 1000},  # not an API entry
            "garbage",
        ],
    }
    bal = pc.parse_credits(200, {}, body(doc))
    assert bal.vendor == "perfectcorp" and bal.unit == "units"
    assert bal.balance == pytest.approx(16.54)
    assert dict(bal.pools) == pytest.approx({"ApiSubsToken": 10.04, "ApiPaygToken": 6.5})


@pytest.mark.parametrize(
    "doc",
    [
        {"status": 200, "data": []},
        {"status": 200, "results": {}},
        {"status": 200, "results": [{"type": "ApiSubsToken"}]},
    ],
)
def test_credits_malformed(doc: dict[str, Any]) -> None:
    with pytest.raises(RetryableError):
        pc.parse_credits(200, {}, body(doc))


def test_credits_bad_key() -> None:
    with pytest.raises(FatalError):
        pc.parse_credits(401, {}, body({"status": 401, "error": "Invalid API key"}))
