"""AILab request builders and response parsers (the AILab sections of docs/vendors.md),
no network."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from pipeline.errors import (
    FatalError,
    PermanentError,
    RateLimitedError,
    ResultNotImageError,
    RetryableError,
    TransportError,
    VendorError,
)
from pipeline.providers import ailab
from pipeline.providers.http import FilePart, TextPart

from ._server import JPEG, PNG, ailab_fail, ailab_ok, jpeg_payload

B64 = base64.b64encode(JPEG).decode()
TEMPLATE = jpeg_payload(PNG, "face.png")


def body(doc: Any) -> bytes:
    return json.dumps(doc).encode()


# ------------------------------------------------------------------------- builders


def test_auth_header() -> None:
    assert ailab.auth_headers("k") == {"ailabapi-api-key": "k"}


def test_build_emotion_editor() -> None:
    req = ailab.build_submit("ailab/emotion-editor", jpeg_payload(), {"service_choice": 12}, {})
    assert req.method == "POST"
    assert req.target == "/api/portrait/effects/emotion-editor"
    assert req.form == (
        FilePart("image_target", jpeg_payload()),
        TextPart("service_choice", "12"),  # decimal text: "AILab: transport and authentication"
    )
    assert req.json is None
    assert "ailabapi-api-key" not in req.headers  # keys never enter request values


def test_build_face_swap_uses_the_template_file() -> None:
    req = ailab.build_submit(
        "ailab/face-swap",
        jpeg_payload(),
        {"image_template": "samples/t.png"},
        {"image_template": TEMPLATE},
    )
    assert req.target == "/api/portrait/editing/ai-face-swap"
    assert req.form == (
        FilePart("image_target", jpeg_payload()),
        FilePart("image_template", TEMPLATE),
    )


def test_build_face_swap_needs_the_template() -> None:
    with pytest.raises(PermanentError) as info:
        ailab.build_submit("ailab/face-swap", jpeg_payload(), {}, {})
    assert info.value.code == "CLIENT_MISSING_PARAMETER"


def test_build_face_beauty_pro_defaults_to_async() -> None:
    req = ailab.build_submit(
        "ailab/face-beauty-pro",
        jpeg_payload(),
        {"smoothing": 70, "whitening": 40, "filter_type": 10},
        {},
    )
    assert req.target == "/api/portrait/effects/face-beauty-pro"
    assert req.form == (
        TextPart("task_type", "async"),
        FilePart("image", jpeg_payload()),  # the field is `image`: "AILab: face beauty pro"
        TextPart("whitening", "40"),
        TextPart("smoothing", "70"),
        TextPart("filter_type", "10"),
    )


def test_build_face_beauty_pro_sync() -> None:
    req = ailab.build_submit("ailab/face-beauty-pro", jpeg_payload(), {"task_type": "sync"}, {})
    assert req.form is not None
    assert req.form[0] == TextPart("task_type", "sync")


@pytest.mark.parametrize(
    ("operation", "params", "code"),
    [
        ("ailab/emotion-editor", {}, "CLIENT_MISSING_PARAMETER"),
        (
            "ailab/emotion-editor",
            {"service_choice": 12, "expression": 3},
            "CLIENT_UNKNOWN_PARAMETER",
        ),
        ("ailab/face-beauty-pro", {"task_type": "later"}, "CLIENT_INVALID_PARAMETER"),
    ],
)
def test_build_rejects_bad_params(operation: str, params: dict[str, Any], code: str) -> None:
    with pytest.raises(PermanentError) as info:
        ailab.build_submit(operation, jpeg_payload(), params, {})
    assert info.value.code == code


def test_build_unknown_operation_is_fatal() -> None:
    with pytest.raises(FatalError):
        ailab.build_submit("perfectcorp/ai-smile", jpeg_payload(), {}, {})


def test_build_poll_encodes_the_id() -> None:
    assert ailab.build_poll("abc").target == "/api/common/query-async-task-result?task_id=abc"
    assert ailab.build_poll("a/b&c=d e").target.endswith("?task_id=a%2Fb%26c%3Dd%20e")
    assert ailab.build_poll("abc").method == "GET"


def test_build_credits() -> None:
    req = ailab.build_credits()
    assert (req.method, req.target) == ("GET", "/api/common/query-credits")


# --------------------------------------------------------------- envelope generations

CURRENT_OK = {
    "request_id": "r1",
    "log_id": "l1",
    "error_detail": {"code": "", "code_message": "", "message": ""},
}
OLDER_OK = {
    "request_id": "r1",
    "log_id": "l1",
    "error_code": 0,
    "error_detail": {"status_code": 200, "code": "", "code_message": "", "message": ""},
}
OLDEST_OK = {"request_id": "r1", "error_code": 0, "error_code_str": "", "error_msg": ""}
SUPERSET_OK = ailab_ok(request_id="r1")


@pytest.mark.parametrize("envelope", [CURRENT_OK, OLDER_OK, OLDEST_OK, SUPERSET_OK, {}])
def test_success_in_every_generation(envelope: dict[str, Any]) -> None:
    doc = {**envelope, "data": {"image": B64}}
    out = ailab.parse_submit("ailab/emotion-editor", 200, {}, body(doc))
    assert out.image == JPEG
    assert out.task_id is None


FAIL_CURRENT = {
    "request_id": "r9",
    "log_id": "l9",
    "error_detail": {
        "code": "ERROR_NO_FACE_IN_FILE",
        "code_message": "No face detected in the file.",
        "message": "pic not has face",
    },
}
FAIL_OLDER = {
    "request_id": "r9",
    "error_code": 422,
    "error_detail": {
        "status_code": 422,
        "code": "ERROR_NO_FACE_IN_FILE",
        "code_message": "No face detected in the file.",
        "message": "",
    },
}
FAIL_OLDEST = {
    "request_id": "r9",
    "error_code": 422,
    "error_code_str": "ERROR_NO_FACE_IN_FILE",
    "error_msg": "AI service error - 222202 - pic not has face",
}


@pytest.mark.parametrize("envelope", [FAIL_CURRENT, FAIL_OLDER, FAIL_OLDEST])
def test_failure_in_every_generation(envelope: dict[str, Any]) -> None:
    with pytest.raises(PermanentError) as info:
        ailab.parse_submit("ailab/emotion-editor", 422, {}, body(envelope))
    err = info.value
    assert err.code == "ERROR_NO_FACE_IN_FILE"
    assert err.vendor == "ailab"
    assert err.http_status == 422
    assert err.request_id == "r9"
    assert err.kind == "permanent"


def test_failure_message_combines_the_texts() -> None:
    err, _ = ailab.envelope_error(422, {}, body(FAIL_CURRENT))
    assert err is not None
    assert err.message == "No face detected in the file. / pic not has face"
    assert (
        str(err) == "ailab ERROR_NO_FACE_IN_FILE: No face detected in the file. / pic not has face"
    )


def test_detail_code_beats_error_code_str() -> None:
    doc = {**FAIL_CURRENT, "error_code_str": "ERROR_PARAMETERS"}
    err, _ = ailab.envelope_error(422, {}, body(doc))
    assert err is not None and err.code == "ERROR_NO_FACE_IN_FILE"


def test_http_200_with_nonzero_error_code_is_a_failure() -> None:
    # docs/vendors.md, "AILab: response envelope": success needs error_code absent or 0
    # as well as HTTP 200.
    doc = {
        "request_id": "r",
        "error_code": 429,
        "error_detail": {"status_code": 429, "code": "EXCEEDING_LIMITS"},
    }
    with pytest.raises(RateLimitedError) as info:
        ailab.parse_submit("ailab/face-swap", 200, {}, body(doc))
    assert info.value.code == "EXCEEDING_LIMITS"


def test_http_200_with_only_an_error_code_uses_it_as_the_status() -> None:
    err, _ = ailab.envelope_error(200, {}, body({"error_code": 401}))
    assert isinstance(err, FatalError)
    assert err.code == "HTTP_401"


def test_http_200_with_detail_code_is_a_failure() -> None:
    doc = {"error_detail": {"code": "ERROR_NOT_ENOUGH_CREDITS"}}
    with pytest.raises(FatalError):
        ailab.parse_submit("ailab/face-swap", 200, {}, body(doc))


def test_non_200_with_empty_codes_is_a_failure() -> None:
    with pytest.raises(RetryableError) as info:
        ailab.parse_submit("ailab/face-swap", 500, {}, body(ailab_ok()))
    assert info.value.code == "HTTP_500"


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, "MISSING_PARAMETERS", PermanentError),
        (401, "ERROR_USER_NOT_EXISTS", FatalError),
        (403, "ERROR_USER_LOCKED", FatalError),
        (404, "ERROR_AI_NOT_EXISTS", FatalError),
        (413, "FILE_SIZE_EXCEEDS_LIMIT", PermanentError),
        (415, "UNSUPPORTED_FILE_TYPES", PermanentError),
        (422, "ERROR_FACE_COUNT_INVALID", PermanentError),  # "AILab: face swap"
        (429, "ERROR_NOT_ENOUGH_CREDITS", FatalError),
        (429, "EXCEEDING_LIMITS", RateLimitedError),
        (429, "ERROR_BATCH_TASK_LIMIT_EXCEEDED", RateLimitedError),
        (503, "AI_SERVICE_FLOW_RESTRICTION", RateLimitedError),
        (500, "PROCESSING_FAILURE", RetryableError),
        (500, "ERROR_RESPONSE_BODY_TOO_LARGE", PermanentError),
        (502, "AI_SERVICE_INTERNAL_ERROR", RetryableError),
        (503, "ERROR_INSUFFICIENT_RESOURCES", RetryableError),
        (504, "AI_SERVICE_TIMEOUT", RetryableError),
        (418, "BRAND_NEW_CODE", PermanentError),
        (429, "BRAND_NEW_CODE", RateLimitedError),
        (403, "BRAND_NEW_CODE", FatalError),
        (507, "BRAND_NEW_CODE", RetryableError),
    ],
)
def test_submit_errors_are_classified(status: int, code: str, cls: type[VendorError]) -> None:
    with pytest.raises(VendorError) as info:
        ailab.parse_submit("ailab/face-swap", status, {}, body(ailab_fail(status, code)))
    assert type(info.value) is cls
    assert info.value.code == code
    assert info.value.request_id == "req-err"


def test_rate_limit_honours_retry_after() -> None:
    with pytest.raises(RateLimitedError) as info:
        ailab.parse_submit(
            "ailab/face-swap", 429, {"Retry-After": "12"}, body(ailab_fail(429, "EXCEEDING_LIMITS"))
        )
    assert info.value.retry_after == 12.0


def test_rate_limit_without_retry_after() -> None:
    with pytest.raises(RateLimitedError) as info:
        ailab.parse_submit("ailab/face-swap", 429, {}, body(ailab_fail(429, "EXCEEDING_LIMITS")))
    assert info.value.retry_after is None


# ------------------------------------------------------------------ malformed replies

HTML_502 = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"


@pytest.mark.parametrize(
    ("status", "raw", "cls", "code"),
    [
        (502, HTML_502, TransportError, "HTTP_502"),
        (500, b"", TransportError, "HTTP_500"),
        (200, HTML_502, RetryableError, "MALFORMED_RESPONSE"),
        (200, b'{"request_id":"r","data":{"image":"/9j/', RetryableError, "MALFORMED_RESPONSE"),
        (200, b"[]", RetryableError, "MALFORMED_RESPONSE"),
        (200, b"", RetryableError, "MALFORMED_RESPONSE"),
        (401, b"Unauthorized", FatalError, "HTTP_401"),
        (404, HTML_502, PermanentError, "HTTP_404"),
        (429, b"slow down", RateLimitedError, "HTTP_429"),
    ],
)
def test_non_json_bodies(status: int, raw: bytes, cls: type[VendorError], code: str) -> None:
    with pytest.raises(VendorError) as info:
        ailab.parse_submit("ailab/emotion-editor", status, {}, raw)
    assert type(info.value) is cls
    assert info.value.code == code
    assert info.value.http_status == status


def test_html_page_excerpt_in_message() -> None:
    with pytest.raises(TransportError) as info:
        ailab.parse_submit("ailab/emotion-editor", 502, {}, HTML_502)
    assert "502 Bad Gateway" in info.value.message


def test_redirect_is_fatal() -> None:
    with pytest.raises(FatalError) as info:
        ailab.parse_submit(
            "ailab/face-swap", 301, {"Location": "https://elsewhere.example/x?token=1"}, b""
        )
    assert "elsewhere.example/x" in info.value.message
    assert "token" not in info.value.message


@pytest.mark.parametrize(
    "data",
    [{}, {"image": ""}, {"image": None}, {"image": "@@not base64@@"}, {"image": 42}],
)
def test_emotion_editor_without_an_image(data: dict[str, Any]) -> None:
    # A success envelope: the job ran and was billed, so a missing image is not
    # retried (that would pay again) but fails as RESULT_NOT_IMAGE.
    with pytest.raises(ResultNotImageError) as info:
        ailab.parse_submit("ailab/emotion-editor", 200, {}, body(ailab_ok(data=data)))
    assert info.value.code == "RESULT_NOT_IMAGE"
    assert info.value.kind == "permanent"
    assert info.value.request_id == "req-1"


def test_emotion_editor_data_url_prefix() -> None:
    doc = ailab_ok(data={"image": "data:image/png;base64," + base64.b64encode(PNG).decode()})
    out = ailab.parse_submit("ailab/emotion-editor", 200, {}, body(doc))
    assert out.image == PNG
    assert out.request_id == "req-1"


# ------------------------------------------------------------------------ submit ids


def test_face_swap_task_id() -> None:
    doc = ailab_ok(task_type="async", task_id="T-123")
    out = ailab.parse_submit("ailab/face-swap", 200, {}, body(doc))
    assert (out.task_id, out.image, out.request_id) == ("T-123", None, "req-1")


def test_numeric_task_id_is_kept_exact() -> None:
    raw = b'{"error_code":0,"task_id":123456789012345678901}'
    assert ailab.parse_submit("ailab/face-swap", 200, {}, raw).task_id == "123456789012345678901"


@pytest.mark.parametrize("task_id", [None, "", "  "])
def test_face_swap_without_task_id(task_id: str | None) -> None:
    with pytest.raises(RetryableError) as info:
        ailab.parse_submit("ailab/face-swap", 200, {}, body(ailab_ok(task_id=task_id)))
    assert info.value.code == "MALFORMED_RESPONSE"


def test_face_beauty_pro_async_and_sync() -> None:
    out = ailab.parse_submit(
        "ailab/face-beauty-pro", 200, {}, body(ailab_ok(task_type="async", task_id="fb-1"))
    )
    assert out.task_id == "fb-1"
    out = ailab.parse_submit(
        "ailab/face-beauty-pro", 200, {}, body(ailab_ok(task_type="sync", result=B64))
    )
    assert out.image == JPEG and out.task_id is None


def test_face_beauty_pro_sync_bad_result() -> None:
    with pytest.raises(ResultNotImageError):
        ailab.parse_submit(
            "ailab/face-beauty-pro", 200, {}, body(ailab_ok(task_type="sync", result=""))
        )


# ----------------------------------------------------------------------------- polls

URL = "https://ailab-outputs.oss-accelerate.aliyuncs.com/x.jpg"


@pytest.mark.parametrize("status", [0, 1, "1"])
def test_poll_running(status: object) -> None:
    state = ailab.parse_poll(200, {}, body({**CURRENT_OK, "task_status": status}))
    assert state.state == "running"
    assert state.error is None


@pytest.mark.parametrize(
    "fields",
    [
        {"result_url": URL},  # face-beauty-pro async page
        {"data": {"result_url": URL}},
        {"data": {"image": URL}},  # face swap
        {"data": {"result_urls": [URL, "https://other"]}},
        {"data": {"images": [URL]}},
        {"result_url": "", "data": {"image": URL}},
    ],
)
def test_poll_succeeded_url_locations(fields: dict[str, Any]) -> None:
    state = ailab.parse_poll(200, {}, body(ailab_ok(task_status=2, **fields)))
    assert state.state == "succeeded"
    assert state.result_url == URL
    assert state.image is None


def test_poll_result_precedence_follows_q5() -> None:
    doc = ailab_ok(
        task_status=2,
        result_url=URL + "?first",
        data={"result_url": "https://second", "image": "https://third"},
    )
    assert ailab.parse_poll(200, {}, body(doc)).result_url == URL + "?first"
    doc = ailab_ok(
        task_status=2, data={"images": ["https://fifth"], "result_urls": ["https://fourth"]}
    )
    assert ailab.parse_poll(200, {}, body(doc)).result_url == "https://fourth"


def test_poll_succeeded_with_base64() -> None:
    state = ailab.parse_poll(200, {}, body(ailab_ok(task_status=2, data={"image": B64})))
    assert state.state == "succeeded"
    assert state.image == JPEG
    assert state.result_url is None


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"data": {}},
        {"data": {"image": ""}},
        {"data": {"images": []}},
        {"data": None},
        {"result_url": None},
        {"data": {"image": "!!!"}},
    ],
)
def test_poll_2_without_result_is_succeeded_without_a_result(fields: dict[str, Any]) -> None:
    # The task succeeded and is billed (docs/vendors.md, "Both vendors: billing"): a
    # failure would be resubmitted and paid twice. Succeeded with neither a URL nor an
    # image sends the lifecycle to re-poll, then RESULT_LOST ("AILab: task failures at
    # poll").
    state = ailab.parse_poll(200, {}, body(ailab_ok(task_status=2, **fields)))
    assert state.state == "succeeded"
    assert state.result_url is None
    assert state.image is None
    assert state.error is None


def test_poll_status_3_is_retryable_failure() -> None:
    doc = ailab_ok(task_status=3)
    doc["error_detail"]["message"] = "model crashed"
    state = ailab.parse_poll(200, {}, body(doc))
    assert state.state == "failed"
    assert isinstance(state.error, RetryableError)
    assert state.error.code == "TASK_FAILED"
    assert "model crashed" in state.error.message


@pytest.mark.parametrize("status", [4, -1, 99])
def test_poll_status_outside_range_is_retryable_failure(status: int) -> None:
    state = ailab.parse_poll(200, {}, body(ailab_ok(task_status=status)))
    assert state.state == "failed"
    assert isinstance(state.error, RetryableError)
    assert state.error.code == "UNKNOWN_TASK_STATUS"


@pytest.mark.parametrize("status", [None, "queued", True, 1.5])
def test_poll_without_integer_status_raises_to_repoll(status: object) -> None:
    with pytest.raises(RetryableError) as info:
        ailab.parse_poll(200, {}, body(ailab_ok(task_status=status)))
    assert info.value.code == "MALFORMED_RESPONSE"


def test_poll_no_face_at_first_poll_is_permanent_failure() -> None:
    # docs/vendors.md, "AILab: task failures at poll" (a third-party report): an accepted
    # task refused at its first poll with 422.
    doc = {
        "request_id": "r",
        "error_code": 422,
        "error_detail": {
            "status_code": 422,
            "code": "ERROR_NO_FACE_IN_FILE",
            "code_message": "No face detected.",
            "message": "",
        },
    }
    state = ailab.parse_poll(422, {}, body(doc))
    assert state.state == "failed"
    assert isinstance(state.error, PermanentError)
    assert state.error.code == "ERROR_NO_FACE_IN_FILE"
    assert state.error.request_id == "r"


@pytest.mark.parametrize(
    ("status", "code"), [(404, "ERROR_RESOURCE_NOT_FOUND"), (410, "ERROR_RESOURCE_RECLAIMED")]
)
def test_poll_lost_task(status: int, code: str) -> None:
    state = ailab.parse_poll(status, {}, body(ailab_fail(status, code)))
    assert state.state == "failed"
    # Lost: the engine may resubmit (docs/vendors.md, "AILab: task failures at poll").
    assert type(state.error) is RetryableError
    assert state.error.code == code
    assert state.error.http_status == status


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (429, "EXCEEDING_LIMITS", RateLimitedError),
        (429, "ERROR_BATCH_TASK_LIMIT_EXCEEDED", RateLimitedError),
        (503, "AI_SERVICE_FLOW_RESTRICTION", RateLimitedError),
        (429, "UNKNOWN_429", RateLimitedError),
        (500, "PROCESSING_FAILURE", RetryableError),
        (502, "AI_SERVICE_ERROR", RetryableError),
        (504, "AI_SERVICE_TIMEOUT", RetryableError),
        (401, "ERROR_USER_NOT_EXISTS", FatalError),
        (403, "ERROR_USER_LOCKED", FatalError),
        (404, "ERROR_AI_NOT_EXISTS", FatalError),
        (429, "ERROR_NOT_ENOUGH_CREDITS", FatalError),
    ],
)
def test_poll_request_level_failures_raise(status: int, code: str, cls: type[VendorError]) -> None:
    with pytest.raises(VendorError) as info:
        ailab.parse_poll(status, {}, body(ailab_fail(status, code)))
    assert type(info.value) is cls
    assert info.value.code == code


def test_poll_rate_limit_retry_after() -> None:
    with pytest.raises(RateLimitedError) as info:
        ailab.parse_poll(
            503, {"retry-after": "9"}, body(ailab_fail(503, "AI_SERVICE_FLOW_RESTRICTION"))
        )
    assert info.value.retry_after == 9.0


@pytest.mark.parametrize(
    ("status", "raw", "cls"),
    [
        (502, HTML_502, TransportError),
        (200, b"", RetryableError),
        (200, b'{"task_status": 2, "result_u', RetryableError),
    ],
)
def test_poll_malformed_raises(status: int, raw: bytes, cls: type[VendorError]) -> None:
    with pytest.raises(VendorError) as info:
        ailab.parse_poll(status, {}, raw)
    assert type(info.value) is cls


def test_poll_non_json_404_is_permanent_failure() -> None:
    state = ailab.parse_poll(404, {}, b"not found")
    assert state.state == "failed"
    assert isinstance(state.error, PermanentError)
    assert state.error.code == "HTTP_404"


# --------------------------------------------------------------------------- credits


def test_credits_sum_of_pools() -> None:
    doc = ailab_ok(
        data=[
            {
                "unique_sign": "common",
                "name": "Universal",
                "balance": 1730.0,
                "total": 2000.0,
                "last_recharge_balance": 2000.0,
                "balance_warning": 100.0,
                "first_buy_time": 1735689600,
                "last_update_time": 1758240000,
            },
            {
                "unique_sign": "portrait_ai_face_swap",
                "name": "Face swap",
                "balance": 20,
                "total": 50.0,
                "last_recharge_balance": 50.0,
                "balance_warning": 0.0,
                "first_buy_time": 1735689600,
                "last_update_time": 1758240000,
            },
        ]
    )
    bal = ailab.parse_credits(200, {}, body(doc))
    assert bal.vendor == "ailab"
    assert bal.unit == "credits"
    assert bal.balance == 1750.0
    assert dict(bal.pools) == {"common": 1730.0, "portrait_ai_face_swap": 20.0}


def test_credits_empty_account() -> None:
    bal = ailab.parse_credits(200, {}, body(ailab_ok(data=[])))
    assert bal.balance == 0.0 and dict(bal.pools) == {}


@pytest.mark.parametrize(
    "data",
    [
        None,
        {"common": 1},
        [{"unique_sign": "common"}],
        [{"unique_sign": "c", "balance": "x"}],
        ["common"],
    ],
)
def test_credits_malformed(data: object) -> None:
    with pytest.raises(RetryableError) as info:
        ailab.parse_credits(200, {}, body(ailab_ok(data=data)))
    assert info.value.code == "MALFORMED_RESPONSE"


def test_credits_bad_key_is_fatal() -> None:
    with pytest.raises(FatalError):
        ailab.parse_credits(401, {}, body(ailab_fail(401, "ERROR_USER_NOT_EXISTS")))
