"""Error classification for both vendors, as data plus four small functions.

Every vendor failure ends up as one of three kinds (``pipeline.errors.ErrorKind``):

- ``retryable`` (R): back off and try again;
- ``permanent`` (S): this item will never succeed, skip it;
- ``fatal`` (F): nothing more can succeed in this run, stop.

The tables are transcribed row by row from ``docs/vendors.md``: "AILab: error codes"
for AILabTools (codes from ``error_detail.code``), and "Perfect Corp: error codes"
(request-level ``error_code``) and "Perfect Corp: engine error codes" (``data.error``)
for Perfect Corp. The rule for both vendors is to decide on the *code*, never on the
HTTP status alone: AILab moved many codes to new statuses on 2026-01-08
(docs/vendors.md, "AILab: decide by code, not by status"), and 429 carries both "slow
down" and "out of credits" (docs/vendors.md, "AILab: rate limits"). Statuses only
decide for codes the tables do not know.
"""

from __future__ import annotations

from pipeline.errors import ErrorKind, RateLimitedError, VendorError, error_for_kind

__all__ = [
    "AILAB_FATAL_CODES",
    "AILAB_LOST_TASK_CODES",
    "AILAB_PERMANENT_CODES",
    "AILAB_RATE_LIMIT_CODES",
    "AILAB_RETRYABLE_CODES",
    "PERFECTCORP_ENGINE_PERMANENT_CODES",
    "PERFECTCORP_ENGINE_RETRYABLE_CODES",
    "PERFECTCORP_FATAL_CODES",
    "PERFECTCORP_PERMANENT_CODES",
    "PERFECTCORP_RETRYABLE_CODES",
    "classify_ailab",
    "classify_perfectcorp",
    "classify_perfectcorp_engine",
    "classify_status",
    "is_ailab_rate_limit",
    "is_perfectcorp_rate_limit",
    "is_rate_limit_code",
    "make_error",
]

# --------------------------------------------------------------------------------------
# AILabTools: one frozenset per row of the table in (docs/vendors.md, "AILab: error codes")
# --------------------------------------------------------------------------------------

# Row 400: S (parameter errors; a repeat across items means a client bug).
_AILAB_400_S = frozenset({
    "ERROR_PARAMETERS", "MISSING_PARAMETERS", "ERROR_INVALID_PARAMETER",
    "PARAMETERS_CANNOT_EMPTY", "ERROR_MISSING_LIMIT_PARAMETER",
    "ERROR_MISSING_TASKS_PARAMETER", "ERROR_MISSING_ASSURE_DIRECTION_PARAMETER",
    "ERROR_MISSING_MIN_HEIGHT_PARAMETER", "ERROR_INVALID_SIDE_PARAMETER", "ERROR_INVALID_URL",
    "ERROR_UNSUPPORTED_RESPONSE_FORMAT", "ERROR_INVALID_OUTPUT_FORMAT",
    "ERROR_MISSING_OUTPUT_FORMAT", "UNSUPPORTED_PARAMETER_VALUES",
    "ERROR_INVALID_PARAMETER_FORMAT", "ERROR_PARAMETER_CONVERSION_FAILED",
    "ERROR_MASK_IMAGE_RESOLUTION_MISMATCH", "ERROR_QUALITY_CONTROL_ERROR",
    "ERROR_LIVENESS_CONTROL_ERROR", "ERROR_TOO_MANY_GROUPS_IN_GROUP_LIST",
    "ERROR_TOO_MANY_UIDS_IN_UID_LIST", "ERROR_TOO_MANY_APPS_IN_APP_LIST",
    "ERROR_INVALID_FACE_BOX_PARAMETER", "ERROR_INVALID_BIG_EYES_PARAMETER",
    "ERROR_INVALID_FACE_SLIMMING_PARAMETER", "ERROR_INVALID_SMOOTHING_PARAMETER",
    "ERROR_INVALID_SKIN_WHITENING_PARAMETER",
})  # fmt: skip
# Row 401: F (bad key).
_AILAB_401_F = frozenset({"ERROR_USER_NOT_EXISTS", "ERROR_APPLICATIONS_NOT_EXISTS"})
# Row 403: F (ERROR_ILLEGAL_OPERATION is [unsure]).
_AILAB_403_F = frozenset({"ERROR_USER_LOCKED", "ERROR_ILLEGAL_OPERATION"})
# Row 404: ERROR_AI_NOT_EXISTS = F (API retired or deactivated), the rest S.
_AILAB_404_F = frozenset({"ERROR_AI_NOT_EXISTS"})
_AILAB_404_S = frozenset({
    "ERROR_FILE_NOT_FOUND", "ERROR_FACE_NOT_FOUND", "ERROR_USER_GROUP_NOT_FOUND",
    "ERROR_USER_NOT_FOUND", "ERROR_FACE_TOKEN_NOT_FOUND", "ERROR_CONTENT_NOT_FOUND",
    "ERROR_RESOURCE_NOT_FOUND",
})  # fmt: skip
# Row 406: F (our Accept header is wrong for every request).
_AILAB_406_F = frozenset({"ERROR_INVALID_RESPONSE_FORMAT"})
# Row 409: S.
_AILAB_409_S = frozenset({
    "ERROR_FACE_ALREADY_EXISTS", "ERROR_DATA_ALREADY_EXISTS", "ERROR_USER_GROUP_ALREADY_EXISTS",
    "ERROR_USER_ALREADY_EXISTS", "ERROR_DUPLICATE_GROUP_NAME", "ERROR_RESOURCE_IN_USE",
    "ERROR_TASK_CONFLICT", "ERROR_TASK_STOPPED_PROCESSING", "ERROR_TASK_REVOCATION_FAILED",
})  # fmt: skip
# Row 410: S.
_AILAB_410_S = frozenset({"ERROR_TASK_REVOKED", "ERROR_RESOURCE_RECLAIMED"})
# Row 413: S.
_AILAB_413_S = frozenset({
    "ERROR_TOO_MANY_FILES", "FILE_SIZE_EXCEEDS_LIMIT", "FILE_RESOLUTION_EXCEEDS_LIMITS",
    "ERROR_HIGH_RESOLUTION", "ERROR_REQUEST_BODY_TOO_LARGE",
})  # fmt: skip
# Row 415: S.
_AILAB_415_S = frozenset({"UNSUPPORTED_FILE_TYPES", "ERROR_UNSUPPORTED_GRAYSCALE_IMAGE"})
# Row 422: S (content and face-quality problems of this input).
_AILAB_422_S = frozenset({
    "FILE_DECODING_FAILURE", "ERROR_ILLEGAL_FILE", "ERROR_INVALID_FILE", "ERROR_LOW_RESOLUTION",
    "FILE_CONTENT_NON_COMPLIANCE", "ERROR_CONTENT_NON_COMPLIANCE", "ERROR_CONTENT_TOO_LONG",
    "ERROR_VIDEO_DURATION_EXCEEDED", "ERROR_INCORRECT_FILE_COUNT", "ERROR_NO_FACE_IN_FILE",
    "ERROR_FACE_SIZE_NOT_MEET_REQUIREMENTS", "ERROR_FACE_SIZE_RATIO_NOT_MET",
    "ERROR_SMALL_FACE_SIZE", "ERROR_FACE_COPY_SCENE_MISMATCH", "ERROR_FACE_UNRECOGNIZABLE",
    "ERROR_POOR_FACE_QUALITY", "ERROR_BLURRY_FACE", "ERROR_OBSTRUCTED_FACE",
    "ERROR_POOR_FACE_LIGHTING", "ERROR_INCOMPLETE_FACE", "ERROR_FACE_NOT_FACING_FORWARD",
    "ERROR_QUALITY_SCORE_NOT_MEET_REQUIREMENTS", "ERROR_SCENE_TYPE_MISMATCH",
    "ERROR_CARTOON_FACE_NOT_SUPPORTED", "ERROR_TEMPLATE_IMAGE_QUALITY_TOO_LOW",
    "ERROR_ACTION_VERIFICATION_FAILED", "ERROR_LEFT_EYE_OCCLUSION_TOO_HIGH",
    "ERROR_RIGHT_EYE_OCCLUSION_TOO_HIGH", "ERROR_LEFT_FACE_OCCLUSION_TOO_HIGH",
    "ERROR_RIGHT_FACE_OCCLUSION_TOO_HIGH", "ERROR_CHIN_OCCLUSION_TOO_HIGH",
    "ERROR_NOSE_OCCLUSION_TOO_HIGH", "ERROR_MOUTH_OCCLUSION_TOO_HIGH",
    "ERROR_SYNTHESIS_DETECTION_FAILED", "ERROR_LIVENESS_DETECTION_FAILED",
    "ERROR_NO_RECOGNITION_TARGET_DETECTED", "ERROR_IMAGE_RECOGNITION_FAILED",
    "ERROR_POSE_NOT_ENOUGH_KEYPOINTS", "ERROR_FACE_COUNT_INVALID",
})  # fmt: skip
# Row 429: R for the two limit codes; F for credits and the two quota codes [unsure].
_AILAB_429_R = frozenset({"EXCEEDING_LIMITS", "ERROR_BATCH_TASK_LIMIT_EXCEEDED"})
_AILAB_429_F = frozenset({
    "ERROR_NOT_ENOUGH_CREDITS", "ERROR_FACE_TRACE_LIMIT_EXCEEDED", "ERROR_DATABASE_LIMIT_EXCEEDED",
})  # fmt: skip
# Row 500: R, except ERROR_RESPONSE_BODY_TOO_LARGE = S (the result itself is too big).
_AILAB_500_R = frozenset({"PROCESSING_FAILURE", "UNKNOWN_ERROR", "SERVICE_INTERNAL_ERROR"})
_AILAB_500_S = frozenset({"ERROR_RESPONSE_BODY_TOO_LARGE"})
# Row 501: S.
_AILAB_501_S = frozenset({"ERROR_IMAGE_STORAGE_NOT_SUPPORTED"})
# Row 502: R.
_AILAB_502_R = frozenset({
    "ERROR_FILE_DOWNLOAD_FAILED", "ERROR_FILE_UPLOAD_FAILED", "ERROR_DATA_TRANSFER_FAILED",
    "ERROR_GET_FACE_IMAGE_FAILED", "ERROR_FACE_IMAGE_ADDITION_FAILED",
    "ERROR_FACE_BLENDING_FAILED", "FILE_SERVICE_ERROR", "AI_SERVICE_ERROR",
    "AI_SERVICE_INTERNAL_ERROR", "AI_SERVICE_UNAUTHORIZED", "AI_SERVICE_NOT_FOUND",
    "ERROR_GATEWAY",
})  # fmt: skip
# Row 503: R (AI_SERVICE_FLOW_RESTRICTION is a rate-limit signal: "AILab: rate limits").
_AILAB_503_R = frozenset({
    "ERROR_CLEANING_USER_GROUP_DATA", "ERROR_INSUFFICIENT_RESOURCES", "ERROR_RESOURCE_IN_TRANSIT",
    "ERROR_RESOURCE_UNAVAILABLE", "AI_SERVICE_FLOW_RESTRICTION",
})  # fmt: skip
# Row 504: R.
_AILAB_504_R = frozenset({"ERROR_FILE_DOWNLOAD_TIMEOUT", "AI_SERVICE_TIMEOUT"})

AILAB_RETRYABLE_CODES: frozenset[str] = (
    _AILAB_429_R | _AILAB_500_R | _AILAB_502_R | _AILAB_503_R | _AILAB_504_R
)
AILAB_PERMANENT_CODES: frozenset[str] = (
    _AILAB_400_S | _AILAB_404_S | _AILAB_409_S | _AILAB_410_S | _AILAB_413_S | _AILAB_415_S
    | _AILAB_422_S | _AILAB_500_S | _AILAB_501_S
)  # fmt: skip
AILAB_FATAL_CODES: frozenset[str] = (
    _AILAB_401_F | _AILAB_403_F | _AILAB_404_F | _AILAB_406_F | _AILAB_429_F
)
# Rate-limit signals (docs/vendors.md, "AILab: rate limits"): back off and cut
# concurrency; they do not use up an attempt.
AILAB_RATE_LIMIT_CODES: frozenset[str] = frozenset({
    "EXCEEDING_LIMITS", "ERROR_BATCH_TASK_LIMIT_EXCEEDED", "AI_SERVICE_FLOW_RESTRICTION",
})  # fmt: skip
# The nearest codes to "unknown or expired task id" (docs/vendors.md, "AILab: task
# failures at poll"). On a poll they mean the task is lost (not that the input is bad),
# so the engine may resubmit: failures are free (docs/vendors.md, "Both vendors: billing").
AILAB_LOST_TASK_CODES: frozenset[str] = frozenset({
    "ERROR_RESOURCE_NOT_FOUND", "ERROR_RESOURCE_RECLAIMED",
})  # fmt: skip


def classify_status(http_status: int) -> ErrorKind:
    """The kind of a failure whose code no table knows (docs/vendors.md, "AILab: error
    codes", the rule below the table).

    429 → R; 401/403 → F; any other 4xx → S; ≥ 500 → R. Anything else (a 1xx/2xx/3xx
    that still failed, e.g. HTTP 200 carrying an unknown code) is treated as R: retries
    are free because failures are not billed (docs/vendors.md, "Both vendors: billing"),
    and attempts are bounded.
    """
    if http_status == 429:
        return "retryable"
    if http_status in (401, 403):
        return "fatal"
    if 400 <= http_status < 500:
        return "permanent"
    return "retryable"


def classify_ailab(http_status: int, code: str) -> ErrorKind:
    """Classify an AILab failure by its code (docs/vendors.md, "AILab: error codes"),
    falling back to the status.

    ``code`` is ``error_detail.code`` (else ``error_code_str``, else ``HTTP_<status>``:
    docs/vendors.md, "AILab: response envelope"); matching ignores case and surrounding
    blanks.
    """
    norm = code.strip().upper()
    if norm in AILAB_FATAL_CODES:
        return "fatal"
    if norm in AILAB_PERMANENT_CODES:
        return "permanent"
    if norm in AILAB_RETRYABLE_CODES:
        return "retryable"
    return classify_status(http_status)


# --------------------------------------------------------------------------------------
# Perfect Corp: request-level ``error_code`` (docs/vendors.md, "Perfect Corp: error
# codes"), compared case-insensitively, so the sets hold lower-case spellings
# --------------------------------------------------------------------------------------

# Rows 400: InvalidParameters/BadRequest (S; stop if repeated), InvalidStyleGroup/
# InvalidStyle (S), InvalidTaskId (S; resubmitting may double-charge), and the
# delete-only OperationNotSupport/OperationInvalid ("ignore": we never delete, so if they
# ever arrive they fail the item rather than loop).
PERFECTCORP_PERMANENT_CODES: frozenset[str] = frozenset({
    "invalidparameters", "badrequest", "invalidstylegroup", "invalidstyle", "invalidtaskid",
    "operationnotsupport", "operationinvalid",
})  # fmt: skip
# Rows 400 CreditInsufficiency and 401 (InvalidApiKey, InactiveApiKey, ExpiredApiKey,
# InvalidAccessToken, or no code at all: handled by status in classify_perfectcorp).
PERFECTCORP_FATAL_CODES: frozenset[str] = frozenset({
    "creditinsufficiency", "invalidapikey", "inactiveapikey", "expiredapikey",
    "invalidaccesstoken",
})  # fmt: skip
# Rows 500 TaskTimeout (resubmit, bounded) and 404/500 unknown_internal_error (the
# bytes were never PUT: one retry with a fresh upload, docs/vendors.md, "Perfect Corp:
# upload").
PERFECTCORP_RETRYABLE_CODES: frozenset[str] = frozenset({"tasktimeout", "unknown_internal_error"})

# Engine codes (``data.error`` on HTTP 200; docs/vendors.md, "Perfect Corp: engine error
# codes"): the AI Smile OpenAPI enum plus the other platform codes listed below the
# table. Upper-case spellings on the AI Smile page are the same codes.
PERFECTCORP_ENGINE_RETRYABLE_CODES: frozenset[str] = frozenset({
    "error_download_image", "error_download_mask", "error_inference", "error_upload",
    "unknown_internal_error",
    "error_download_video",  # other platform code, R
})  # fmt: skip
PERFECTCORP_ENGINE_PERMANENT_CODES: frozenset[str] = frozenset({
    "error_exceed_max_image_size", "exceed_max_filesize", "invalid_parameter",
    "error_decode_image", "error_decode_mask", "error_nsfw_content_detected",
    "exceed_nsfw_retry_limits", "error_no_face", "error_pose", "error_face_parsing",
    # other platform codes, S
    "error_decode_video", "error_multiple_people", "error_large_face_angle",
    "error_no_shoulder", "error_hair_too_short", "error_bald_image", "error_unsupport_ratio",
    "error_unexpected_video_duration",
})  # fmt: skip


def classify_perfectcorp(http_status: int, error_code: str | None) -> ErrorKind:
    """Classify a Perfect Corp request-level failure (docs/vendors.md, "Perfect Corp:
    error codes").

    The code decides when the table knows it (case-insensitively); otherwise the status
    does: 401 with any or no code → F, 429 (no code) → R, other 5xx → R, and the AILab
    unknown-code rule for the rest (403 → F, other 4xx → S).
    """
    norm = (error_code or "").strip().lower()
    if norm in PERFECTCORP_FATAL_CODES:
        return "fatal"
    if norm in PERFECTCORP_RETRYABLE_CODES:
        return "retryable"
    if http_status == 401:
        return "fatal"  # "Perfect Corp: error codes": 401 with any code, or none, is fatal
    if norm in PERFECTCORP_PERMANENT_CODES:
        return "permanent"
    return classify_status(http_status)


def classify_perfectcorp_engine(code: str | None) -> ErrorKind:
    """Classify an engine failure (``data.error`` of a ``task_status: error`` poll).

    Compared case-insensitively; unknown or missing codes are R (docs/vendors.md,
    "Perfect Corp: engine error codes"): engine failures are not charged, so a bounded
    resubmit is free.
    """
    norm = (code or "").strip().lower()
    if norm in PERFECTCORP_ENGINE_PERMANENT_CODES:
        return "permanent"
    return "retryable"


def is_rate_limit_code(vendor: str, http_status: int, code: str | None) -> bool:
    """True when a failure means "slow down" rather than "this attempt failed".

    Such errors do not use up an attempt. Each vendor's rule is its registry hook
    (:mod:`pipeline.vendors`, ``rate_limit_rule``); an unknown vendor is a ``KeyError``.
    """
    from pipeline.vendors import get_vendor  # the registry points back here: no cycle

    return get_vendor(vendor).is_rate_limit(http_status, code)


def is_ailab_rate_limit(http_status: int, code: str | None) -> bool:
    """AILab's rule (docs/vendors.md, "AILab: rate limits"): ``EXCEEDING_LIMITS``,
    ``ERROR_BATCH_TASK_LIMIT_EXCEEDED``, ``AI_SERVICE_FLOW_RESTRICTION`` whatever their
    status, and any other 429 whose code is not fatal (``ERROR_NOT_ENOUGH_CREDITS`` also
    comes as 429)."""
    c = (code or "").strip()
    if c.upper() in AILAB_RATE_LIMIT_CODES:
        return True
    return http_status == 429 and classify_ailab(http_status, c) == "retryable"


def is_perfectcorp_rate_limit(http_status: int, code: str | None) -> bool:
    """Perfect Corp's rule (docs/vendors.md, "Perfect Corp: rate limits"): a 429, which
    carries no code, unless its code says otherwise (out of units)."""
    c = (code or "").strip()
    return http_status == 429 and classify_perfectcorp(http_status, c) == "retryable"


def make_error(
    kind: ErrorKind,
    message: str,
    *,
    code: str,
    vendor: str,
    http_status: int | None = None,
    request_id: str | None = None,
    rate_limited: bool = False,
    retry_after: float | None = None,
) -> VendorError:
    """The :class:`VendorError` subclass for ``kind``; ``rate_limited`` retryable errors
    become :class:`RateLimitedError` carrying the server's ``retry_after`` hint
    (docs/vendors.md, "Both vendors: Retry-After")."""
    if kind == "retryable" and rate_limited:
        return RateLimitedError(
            message,
            retry_after=retry_after,
            code=code,
            vendor=vendor,
            http_status=http_status,
            request_id=request_id,
        )
    cls = error_for_kind(kind)
    return cls(message, code=code, vendor=vendor, http_status=http_status, request_id=request_id)
