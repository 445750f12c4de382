"""The tables of docs/vendors.md "AILab: error codes", "Perfect Corp: error codes" and
"Perfect Corp: engine error codes", row by row, and the status fallbacks for unknown
codes."""

from __future__ import annotations

import pytest

from pipeline.errors import FatalError, PermanentError, RateLimitedError, RetryableError
from pipeline.providers import classify as c

# ----------------------------------------------------------------------------- AILab

# (status the code is documented with, code, expected class): one or more per row.
AILAB_ROWS = [
    *[(400, code, "permanent") for code in sorted(c._AILAB_400_S)],
    *[(401, code, "fatal") for code in sorted(c._AILAB_401_F)],
    *[(403, code, "fatal") for code in sorted(c._AILAB_403_F)],
    (404, "ERROR_AI_NOT_EXISTS", "fatal"),
    *[(404, code, "permanent") for code in sorted(c._AILAB_404_S)],
    (406, "ERROR_INVALID_RESPONSE_FORMAT", "fatal"),
    *[(409, code, "permanent") for code in sorted(c._AILAB_409_S)],
    *[(410, code, "permanent") for code in sorted(c._AILAB_410_S)],
    *[(413, code, "permanent") for code in sorted(c._AILAB_413_S)],
    *[(415, code, "permanent") for code in sorted(c._AILAB_415_S)],
    *[(422, code, "permanent") for code in sorted(c._AILAB_422_S)],
    (429, "EXCEEDING_LIMITS", "retryable"),
    (429, "ERROR_BATCH_TASK_LIMIT_EXCEEDED", "retryable"),
    (429, "ERROR_NOT_ENOUGH_CREDITS", "fatal"),
    (429, "ERROR_FACE_TRACE_LIMIT_EXCEEDED", "fatal"),
    (429, "ERROR_DATABASE_LIMIT_EXCEEDED", "fatal"),
    *[(500, code, "retryable") for code in sorted(c._AILAB_500_R)],
    (500, "ERROR_RESPONSE_BODY_TOO_LARGE", "permanent"),
    (501, "ERROR_IMAGE_STORAGE_NOT_SUPPORTED", "permanent"),
    *[(502, code, "retryable") for code in sorted(c._AILAB_502_R)],
    *[(503, code, "retryable") for code in sorted(c._AILAB_503_R)],
    *[(504, code, "retryable") for code in sorted(c._AILAB_504_R)],
]


@pytest.mark.parametrize(("status", "code", "expected"), AILAB_ROWS)
def test_ailab_table(status: int, code: str, expected: str) -> None:
    assert c.classify_ailab(status, code) == expected


def test_ailab_table_sizes_match_the_doc() -> None:
    # Counted from the table in (docs/vendors.md, "AILab: error codes"), so a dropped or
    # duplicated code shows up.
    assert len(c._AILAB_400_S) == 27
    assert len(c._AILAB_422_S) == 39
    assert len(c._AILAB_502_R) == 12
    sets = [c.AILAB_RETRYABLE_CODES, c.AILAB_PERMANENT_CODES, c.AILAB_FATAL_CODES]
    assert sum(len(s) for s in sets) == len(set().union(*sets)), "a code is in two classes"


@pytest.mark.parametrize(
    ("status", "code"),
    [
        # 2026-01-08 status moves (docs/vendors.md, "AILab: decide by code, not by
        # status"): the code decides, not the status.
        (422, "EXCEEDING_LIMITS"),
        (400, "PROCESSING_FAILURE"),
        (400, "ERROR_INSUFFICIENT_RESOURCES"),
        (200, "AI_SERVICE_ERROR"),
    ],
)
def test_ailab_code_beats_status(status: int, code: str) -> None:
    assert c.classify_ailab(status, code) == "retryable"


def test_ailab_code_match_ignores_case_and_blanks() -> None:
    assert c.classify_ailab(200, " error_not_enough_credits ") == "fatal"


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (429, "retryable"),
        (401, "fatal"),
        (403, "fatal"),
        (400, "permanent"),
        (404, "permanent"),
        (418, "permanent"),
        (499, "permanent"),
        (500, "retryable"),
        (502, "retryable"),
        (599, "retryable"),
        (200, "retryable"),
        (302, "retryable"),
    ],
)
def test_ailab_unknown_codes_fall_back_to_status(status: int, expected: str) -> None:
    assert c.classify_ailab(status, "SOMETHING_NEW") == expected
    assert c.classify_ailab(status, f"HTTP_{status}") == expected


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (429, "EXCEEDING_LIMITS", True),
        (422, "EXCEEDING_LIMITS", True),  # pre-2026-01-08 status
        (429, "ERROR_BATCH_TASK_LIMIT_EXCEEDED", True),
        (503, "AI_SERVICE_FLOW_RESTRICTION", True),
        (429, "SOMETHING_NEW", True),
        (429, "HTTP_429", True),
        # 429 also means "no credits" (docs/vendors.md, "AILab: rate limits").
        (429, "ERROR_NOT_ENOUGH_CREDITS", False),
        (429, "ERROR_DATABASE_LIMIT_EXCEEDED", False),
        (500, "PROCESSING_FAILURE", False),
        (503, "ERROR_INSUFFICIENT_RESOURCES", False),
        (422, "ERROR_NO_FACE_IN_FILE", False),
    ],
)
def test_ailab_rate_limit_codes(status: int, code: str, expected: bool) -> None:
    assert c.is_rate_limit_code("ailab", status, code) is expected


# ----------------------------------------------------------------------- Perfect Corp

PERFECTCORP_ROWS = [
    (400, "InvalidParameters", "permanent"),
    (400, "BadRequest", "permanent"),
    (400, "InvalidStyleGroup", "permanent"),
    (400, "InvalidStyle", "permanent"),
    (400, "InvalidTaskId", "permanent"),
    (400, "OperationNotSupport", "permanent"),
    (400, "OperationInvalid", "permanent"),
    (400, "CreditInsufficiency", "fatal"),
    (401, "InvalidApiKey", "fatal"),
    (401, "InactiveApiKey", "fatal"),
    (401, "ExpiredApiKey", "fatal"),
    (401, "InvalidAccessToken", "fatal"),
    (401, None, "fatal"),
    (401, "", "fatal"),
    (401, "SomethingNew", "fatal"),
    (429, None, "retryable"),
    (500, "TaskTimeout", "retryable"),
    (404, "unknown_internal_error", "retryable"),
    (500, "unknown_internal_error", "retryable"),
    (500, None, "retryable"),
    (502, None, "retryable"),
    (503, "Whatever", "retryable"),
    (403, None, "fatal"),
    (404, None, "permanent"),
    (400, "SomethingNew", "permanent"),
]


@pytest.mark.parametrize(("status", "code", "expected"), PERFECTCORP_ROWS)
def test_perfectcorp_request_table(status: int, code: str | None, expected: str) -> None:
    assert c.classify_perfectcorp(status, code) == expected


def test_perfectcorp_request_codes_ignore_case() -> None:
    assert c.classify_perfectcorp(400, "CREDITINSUFFICIENCY") == "fatal"
    assert c.classify_perfectcorp(400, "invalidtaskid") == "permanent"
    assert c.classify_perfectcorp(500, "TASKTIMEOUT") == "retryable"


ENGINE_R = [
    "error_download_image",
    "error_download_mask",
    "error_inference",
    "error_upload",
    "unknown_internal_error",
    "error_download_video",
]
ENGINE_S = [
    "error_exceed_max_image_size",
    "exceed_max_filesize",
    "invalid_parameter",
    "error_decode_image",
    "error_decode_mask",
    "error_nsfw_content_detected",
    "exceed_nsfw_retry_limits",
    "error_no_face",
    "error_pose",
    "error_face_parsing",
    "error_decode_video",
    "error_multiple_people",
    "error_large_face_angle",
    "error_no_shoulder",
    "error_hair_too_short",
    "error_bald_image",
    "error_unsupport_ratio",
    "error_unexpected_video_duration",
]


@pytest.mark.parametrize("code", ENGINE_R)
def test_perfectcorp_engine_retryable(code: str) -> None:
    assert c.classify_perfectcorp_engine(code) == "retryable"


@pytest.mark.parametrize("code", ENGINE_S)
def test_perfectcorp_engine_permanent(code: str) -> None:
    assert c.classify_perfectcorp_engine(code) == "permanent"


@pytest.mark.parametrize(
    "code",
    # docs/vendors.md, "Perfect Corp: engine error codes": the AI Smile page prints six
    # of them in upper case.
    ["EXCEED_MAX_FILESIZE", "INVALID_PARAMETER", "ERROR_NO_FACE", "Error_No_Face"],
)
def test_perfectcorp_engine_upper_case(code: str) -> None:
    assert c.classify_perfectcorp_engine(code) == "permanent"


@pytest.mark.parametrize(
    "code",
    [
        "ERROR_DOWNLOAD_IMAGE",
        "ERROR_INFERENCE",
        "UNKNOWN_INTERNAL_ERROR",
        "error_brand_new",
        "",
        None,
    ],
)
def test_perfectcorp_engine_unknown_and_upper_retryable(code: str | None) -> None:
    assert c.classify_perfectcorp_engine(code) == "retryable"


def test_perfectcorp_rate_limit_is_429_only() -> None:
    assert c.is_rate_limit_code("perfectcorp", 429, None) is True
    assert c.is_rate_limit_code("perfectcorp", 429, "") is True
    assert c.is_rate_limit_code("perfectcorp", 500, "TaskTimeout") is False
    assert c.is_rate_limit_code("perfectcorp", 400, "CreditInsufficiency") is False


# ------------------------------------------------------------------------ make_error


def test_make_error_picks_the_class() -> None:
    kw = {"code": "X", "vendor": "ailab", "http_status": 400, "request_id": "r"}
    assert type(c.make_error("permanent", "m", **kw)) is PermanentError  # type: ignore[arg-type]
    assert type(c.make_error("fatal", "m", **kw)) is FatalError  # type: ignore[arg-type]
    assert type(c.make_error("retryable", "m", **kw)) is RetryableError  # type: ignore[arg-type]
    limited = c.make_error("retryable", "m", rate_limited=True, retry_after=3.0, **kw)  # type: ignore[arg-type]
    assert isinstance(limited, RateLimitedError)
    assert limited.retry_after == 3.0
    assert limited.request_id == "r"
    assert limited.code == "X"
    # rate_limited only matters for retryable errors
    assert type(c.make_error("fatal", "m", rate_limited=True, **kw)) is FatalError  # type: ignore[arg-type]
