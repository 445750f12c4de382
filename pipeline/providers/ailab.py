"""AILabTools provider: emotion-editor (sync), face-swap (async), face-beauty-pro (both).

The wire format is described in the AILab sections of ``docs/vendors.md``; every quirk
below cites its section.

- Auth: header ``ailabapi-api-key`` on every call, polls and credit queries included
  (docs/vendors.md, "AILab: transport and authentication"). It is added only when
  sending to the configured base URL.
- Requests: ``multipart/form-data``, scalars as decimal text, files with a real
  extension and matching Content-Type (docs/vendors.md, "AILab: transport and
  authentication").
- Envelope: success is HTTP 200 with ``error_code`` absent or 0 and
  ``error_detail.code`` absent or ``""``; the code comes from ``error_detail.code``,
  then ``error_code_str``, else ``HTTP_<status>``. Three generations of fields are
  accepted; none is required (docs/vendors.md, "AILab: response envelope").
- Classification: by code, per the table in (docs/vendors.md, "AILab: error codes")
  (:mod:`pipeline.providers.classify`).

Pure functions build requests (:func:`build_submit`, :func:`build_poll`,
:func:`build_credits`) and parse responses (:func:`parse_submit`, :func:`parse_poll`,
:func:`parse_credits`, :func:`parse_envelope`); :class:`AILabProvider` moves the bytes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from typing import Any, Final
from urllib.parse import quote

from pipeline.errors import (
    FatalError,
    PermanentError,
    ResultNotImageError,
    RetryableError,
    VendorError,
)
from pipeline.providers.base import (
    CreditBalance,
    ExtraFiles,
    ImagePayload,
    Submitted,
    TaskState,
    VendorParams,
)
from pipeline.providers.classify import AILAB_LOST_TASK_CODES, classify_ailab
from pipeline.providers.client import VendorClient, VendorWire
from pipeline.providers.envelope import Answer, as_int, as_text, unwrap, vendor_id
from pipeline.providers.http import (
    FilePart,
    FormPart,
    HttpRequest,
    TextPart,
    as_float,
    clip,
    decode_base64_image,
    parse_json_object,
    parse_retry_after,
    redirect_error,
)

__all__ = [
    "AUTH_HEADER",
    "OPERATIONS",
    "VENDOR",
    "AILabProvider",
    "auth_headers",
    "build_credits",
    "build_poll",
    "build_submit",
    "envelope_error",
    "parse_credits",
    "parse_envelope",
    "parse_poll",
    "parse_submit",
]

_log = logging.getLogger(__name__)

VENDOR: Final = "ailab"
AUTH_HEADER: Final = "ailabapi-api-key"

EMOTION_EDITOR: Final = "ailab/emotion-editor"
FACE_SWAP: Final = "ailab/face-swap"
FACE_BEAUTY_PRO: Final = "ailab/face-beauty-pro"

# Operation → endpoint (docs/vendors.md, "The four operations").
OPERATIONS: Final[Mapping[str, str]] = {
    EMOTION_EDITOR: "/api/portrait/effects/emotion-editor",
    FACE_SWAP: "/api/portrait/editing/ai-face-swap",
    FACE_BEAUTY_PRO: "/api/portrait/effects/face-beauty-pro",
}
POLL_PATH: Final = "/api/common/query-async-task-result"  # "AILab: polling and task states"
CREDITS_PATH: Final = "/api/common/query-credits"  # "AILab: credits and prices"

# Scalar form fields each operation accepts, in the order they are sent; the first
# tuple is required (docs/vendors.md, "AILab: emotion editor", "AILab: face swap" and
# "AILab: face beauty pro"): service_choice is required since V1.0.1; face swap has no
# scalar (and no task_type); face beauty pro takes task_type plus six sliders and
# filter_type.
_SLIDERS = ("whitening", "smoothing", "thinface", "shrink_face", "enlarge_eye", "remove_eyebrow")
_FIELDS: Final[Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    EMOTION_EDITOR: (("service_choice",), ()),
    FACE_SWAP: ((), ()),
    FACE_BEAUTY_PRO: ((), ("task_type", *_SLIDERS, "filter_type")),
}
# The vendor's default is sync, but we default to async so the task id is journaled
# before anything can be billed (docs/vendors.md, "AILab: face beauty pro";
# operations.py: task_type default "async").
_DEFAULT_TASK_TYPE: Final = "async"

# task_status values (docs/vendors.md, "AILab: polling and task states").
_QUEUED, _PROCESSING, _SUCCEEDED = 0, 1, 2
# [unsure] the SDK treats 3 as failure (docs/vendors.md, "AILab: task failures at poll").
_SDK_FAILED = 3

# A value with a URL scheme ("ftp:", "file:", "javascript:", "data:text/html,…") is a
# result URL, if a bad one: it is handed over so the download refuses it
# (RESULT_URL_REFUSED) instead of the task looking result-less and being resubmitted.
_SCHEME = re.compile(r"^[a-z][a-z0-9+.\-]*:", re.IGNORECASE)


def auth_headers(api_key: str) -> dict[str, str]:
    """The auth header (docs/vendors.md, "AILab: transport and authentication").

    Only ever sent to the configured base URL."""
    return {AUTH_HEADER: api_key}


# ------------------------------------------------------------------------- builders


def _scalar(value: int | str) -> str:
    # Scalars are sent as decimal text (service_choice and filter_type are typed integer
    # in the tables and string in openapi; text satisfies both): docs/vendors.md,
    # "AILab: transport and authentication".
    if isinstance(value, bool):  # not a documented value type; never send "True"
        return str(int(value))
    return str(value)


def _client_error(code: str, message: str) -> PermanentError:
    return PermanentError(message, code=code, vendor=VENDOR)


def build_submit(
    operation: str, image: ImagePayload, params: VendorParams, files: ExtraFiles
) -> HttpRequest:
    """The multipart POST that submits one item.

    Raises :class:`FatalError` for an operation this module does not serve and
    :class:`PermanentError` (``CLIENT_*`` codes, nothing sent) for missing or unknown
    parameters. Keys of ``params`` that name a file in ``files`` are not scalars and
    are skipped (face swap's ``image_template`` path).
    """
    path = OPERATIONS.get(operation)
    if path is None:
        raise FatalError(
            f"operation {operation!r} is not an AILab operation",
            code="UNSUPPORTED_OPERATION",
            vendor=VENDOR,
        )
    required, optional = _FIELDS[operation]
    scalars = {k: v for k, v in params.items() if k not in files}
    unknown = sorted(set(scalars) - set(required) - set(optional))
    if unknown:
        raise _client_error(
            "CLIENT_UNKNOWN_PARAMETER", f"{operation} does not take {', '.join(unknown)}"
        )
    for name in required:
        if name not in scalars:
            raise _client_error("CLIENT_MISSING_PARAMETER", f"{operation} needs {name}")

    parts: list[FormPart] = []
    if operation == EMOTION_EDITOR:
        # "AILab: emotion editor": image_target (file) + service_choice.
        parts.append(FilePart("image_target", image))
        parts.append(TextPart("service_choice", _scalar(scalars["service_choice"])))
    elif operation == FACE_SWAP:
        # "AILab: face swap": image_target is replaced, image_template provides the face.
        template = files.get("image_template")
        if template is None:
            raise _client_error("CLIENT_MISSING_PARAMETER", f"{operation} needs image_template")
        parts.append(FilePart("image_target", image))
        parts.append(FilePart("image_template", template))
    else:
        # "AILab: face beauty pro": `image` (not image_target), task_type, optional
        # sliders and filter_type.
        task_type = str(scalars.get("task_type", _DEFAULT_TASK_TYPE))
        if task_type not in ("sync", "async"):
            raise _client_error(
                "CLIENT_INVALID_PARAMETER", f"{operation}: task_type must be sync or async"
            )
        parts.append(TextPart("task_type", task_type))
        parts.append(FilePart("image", image))
        for name in optional[1:]:
            if name in scalars:
                parts.append(TextPart(name, _scalar(scalars[name])))
    return HttpRequest("POST", path, form=tuple(parts))


def build_poll(task_id: str) -> HttpRequest:
    """``GET /api/common/query-async-task-result?task_id=…``, id percent-encoded
    (docs/vendors.md, "AILab: polling and task states")."""
    return HttpRequest("GET", f"{POLL_PATH}?task_id={quote(task_id, safe='')}")


def build_credits() -> HttpRequest:
    """``GET /api/common/query-credits``: no parameters (docs/vendors.md, "AILab: credits
    and prices")."""
    return HttpRequest("GET", CREDITS_PATH)


# -------------------------------------------------------------------------- parsers


def _as_int(value: object) -> int | None:
    """An int from a JSON int, an integral float or a numeric string; never from a bool."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return as_int(value)


def _request_id(doc: Mapping[str, Any] | None) -> str | None:
    if doc is None:
        return None
    rid = doc.get("request_id")
    if isinstance(rid, str | int) and not isinstance(rid, bool) and str(rid):
        return str(rid)
    return None


def _message(doc: Mapping[str, Any], detail: Mapping[str, Any], status: int) -> str:
    # docs/vendors.md, "AILab: response envelope": code_message is the summary, message
    # the detail (may embed an upstream number, "… - 222202 - pic not has face");
    # error_msg is the oldest free text.
    pieces: list[str] = []
    for value in (detail.get("code_message"), detail.get("message"), doc.get("error_msg")):
        text = as_text(value)
        if text and text not in pieces:
            pieces.append(text)
    return clip(" / ".join(pieces)) if pieces else f"HTTP {status}"


def _malformed(what: str, status: int, request_id: str | None) -> RetryableError:
    return Answer(VENDOR, status, request_id).malformed(what)


def envelope_error(
    status: int, headers: Mapping[str, str], body: bytes
) -> tuple[VendorError | None, dict[str, Any] | None]:
    """Apply the success rule of (docs/vendors.md, "AILab: response envelope").

    Returns ``(error, doc)``; ``error`` is ``None``
    on success, else the classified error (not raised, so :func:`parse_poll` can turn
    some of them into task outcomes)."""
    doc = parse_json_object(body)
    request_id = _request_id(doc)
    if 300 <= status < 400:
        return redirect_error(status, headers, vendor=VENDOR, request_id=request_id), doc
    answer = Answer(VENDOR, status, request_id, parse_retry_after(headers))
    if doc is None:
        # A non-JSON 2xx is retryable, a non-JSON 5xx (an HTML 502 page from a proxy)
        # a transport fault (docs/vendors.md, "AILab: response envelope").
        code = f"HTTP_{status}"
        return answer.not_json(body, classify_ailab(status, code), code), None

    detail_raw = doc.get("error_detail")
    detail: Mapping[str, Any] = detail_raw if isinstance(detail_raw, dict) else {}
    # Current docs: error_detail.code. Oldest docs: error_code_str ("gradually deprecated").
    code = as_text(detail.get("code")) or as_text(doc.get("error_code_str"))
    error_code = _as_int(doc.get("error_code"))  # older docs: 0 or the HTTP status
    if status == 200 and not error_code and not as_text(detail.get("code")):
        return None, doc

    # Unknown codes are classified by status (docs/vendors.md, "AILab: error codes").
    # An HTTP 200 that still carries an
    # error reports its real status in error_code (older docs) or error_detail.status_code.
    effective = status
    if status == 200:
        for candidate in (error_code, _as_int(detail.get("status_code"))):
            if candidate is not None and 100 <= candidate <= 599 and candidate != 200:
                effective = candidate
                break
    code = code or f"HTTP_{effective}"
    kind = classify_ailab(effective, code)
    message = _message(doc, detail, status)
    return answer.error(kind, message, code=code, rate_status=effective, rate_code=code), doc


def parse_envelope(status: int, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
    """The response document on success (docs/vendors.md, "AILab: response envelope");
    raises the classified error otherwise."""
    return unwrap(envelope_error(status, headers, body))


def _decode_image(value: object, status: int, request_id: str | None, where: str) -> bytes:
    # docs/vendors.md, "AILab: emotion editor output format": public clients decode
    # bare base64; strip any
    # data:…;base64, prefix anyway. This is a success envelope: the job ran and was
    # billed, so a missing or undecodable image is RESULT_NOT_IMAGE, never a resubmit.
    image = decode_base64_image(value) if isinstance(value, str) else None
    if image is None:
        raise ResultNotImageError(
            f"the result is not an acceptable image: {where} is missing or not base64",
            vendor=VENDOR,
            http_status=status,
            request_id=request_id,
        )
    return image


def parse_submit(operation: str, status: int, headers: Mapping[str, str], body: bytes) -> Submitted:
    """A submit response → ``Submitted`` (task id or image); raises classified errors.

    - emotion-editor ("AILab: emotion editor"): ``data.image`` base64 → image bytes;
    - face-swap ("AILab: face swap"): top-level ``task_id``;
    - face-beauty-pro ("AILab: face beauty pro"): ``task_id`` (async) or top-level
      ``result`` base64 (sync).
    A success envelope without a task id is ``RetryableError(MALFORMED_RESPONSE)`` (the
    provider turns it into an unknown outcome); a sync success whose image is missing
    or not base64 is ``ResultNotImageError`` (billed). The image bytes themselves are
    checked by the provider (:mod:`pipeline.resultcheck`).
    """
    doc = parse_envelope(status, headers, body)
    rid = _request_id(doc)
    data_raw = doc.get("data")
    data: Mapping[str, Any] = data_raw if isinstance(data_raw, dict) else {}
    if operation == EMOTION_EDITOR:
        return Submitted(
            image=_decode_image(data.get("image"), status, rid, "data.image"), request_id=rid
        )
    # Ids stay strings; a JSON number (never documented) is rendered exactly.
    task_id = vendor_id(doc.get("task_id"))
    if task_id is not None:
        return Submitted(task_id=task_id, request_id=rid)
    if operation == FACE_BEAUTY_PRO and "result" in doc:
        return Submitted(
            image=_decode_image(doc.get("result"), status, rid, "result"), request_id=rid
        )
    raise _malformed(f"{operation}: success response has no task_id", status, rid)


def _result_candidates(doc: Mapping[str, Any]) -> Iterator[object]:
    # docs/vendors.md, "AILab: face beauty pro result field", in this order: result_url
    # (face-beauty-pro async page), data.result_url,
    # data.image (face swap, generic schema), data.result_urls[0], data.images[0].
    yield doc.get("result_url")
    data = doc.get("data")
    if isinstance(data, dict):
        yield data.get("result_url")
        yield data.get("image")
        for key in ("result_urls", "images"):
            seq = data.get(key)
            if isinstance(seq, list) and seq:
                yield seq[0]


def parse_poll(status: int, headers: Mapping[str, str], body: bytes) -> TaskState:
    """A poll response → ``TaskState``, or raises when the poll itself failed.

    Raised (the engine re-polls the same id later): rate-limit codes
    (``RateLimitedError``), other R codes / 5xx / non-JSON / malformed 200s
    (``RetryableError``, ``TransportError``) and F codes (``FatalError``).

    Returned as ``failed`` (docs/vendors.md, "AILab: task failures at poll"): an S code
    such as ``422 ERROR_NO_FACE_IN_FILE`` at the first poll (a third-party report) →
    ``PermanentError``; ``404
    ERROR_RESOURCE_NOT_FOUND`` / ``410 ERROR_RESOURCE_RECLAIMED`` → ``RetryableError``
    with the code kept (the task is lost; the engine decides about resubmitting);
    ``task_status`` 3 or any status outside 0-2 → ``RetryableError``.

    ``task_status`` 2 without a usable result is ``succeeded`` with neither
    ``result_url`` nor ``image``: the task was billed, so it is asked again for its
    result, never resubmitted (docs/vendors.md, "AILab: task failures at poll").
    """
    err, doc = envelope_error(status, headers, body)
    if err is not None:
        return _poll_failure(err)
    assert doc is not None
    rid = _request_id(doc)
    task_status = _as_int(doc.get("task_status"))
    if task_status is None:
        # task_status is required ("AILab: polling and task states"); without it we
        # learned nothing: poll again.
        raise _malformed("poll response has no integer task_status", status, rid)
    if task_status in (_QUEUED, _PROCESSING):
        return TaskState(state="running")
    if task_status == _SUCCEEDED:
        return _succeeded(doc)
    return _task_failed(doc, task_status, status, rid)


def _poll_failure(err: VendorError) -> TaskState:
    """A poll whose envelope is an error: S codes are task outcomes (a lost id is
    retryable, code kept); anything else is raised (docs/vendors.md, "AILab: task
    failures at poll")."""
    if err.code.upper() in AILAB_LOST_TASK_CODES and err.kind == "permanent":
        lost = RetryableError(
            f"task lost (unknown or expired id): {err.message}",
            code=err.code,
            vendor=VENDOR,
            http_status=err.http_status,
            request_id=err.request_id,
        )
        return TaskState(state="failed", error=lost)
    if err.kind == "permanent":
        return TaskState(state="failed", error=err)
    raise err


def _succeeded(doc: Mapping[str, Any]) -> TaskState:
    """``task_status`` 2: the first usable result among the candidates.

    Without one, the task still succeeded, and a succeeded task is charged
    (docs/vendors.md, "Both vendors: billing"): it is ``succeeded`` with neither a URL
    nor an image, never a failure, which would create and pay for a second task. The
    lifecycle polls the same task again for its result a bounded number of times,
    then reports it as paid but lost (``RESULT_LOST``) without resubmitting it
    (docs/vendors.md, "AILab: task failures at poll").
    """
    for value in _result_candidates(doc):
        if not isinstance(value, str) or not value.strip():
            continue
        text = value.strip()
        if text.lower().startswith(("http://", "https://")):
            return TaskState(state="succeeded", result_url=text)
        image = decode_base64_image(text)
        if image is not None:
            return TaskState(state="succeeded", image=image)
        if _SCHEME.match(text):
            return TaskState(state="succeeded", result_url=text)
    return TaskState(state="succeeded")


def _task_failed(
    doc: Mapping[str, Any], task_status: int, status: int, rid: str | None
) -> TaskState:
    """A ``task_status`` of 3 (the SDK's failure value) or outside 0-2: an R failure
    (docs/vendors.md, "AILab: task failures at poll")."""
    detail_raw = doc.get("error_detail")
    detail: Mapping[str, Any] = detail_raw if isinstance(detail_raw, dict) else {}
    code = "TASK_FAILED" if task_status == _SDK_FAILED else "UNKNOWN_TASK_STATUS"
    message = f"task_status {task_status}"
    extra = _message(doc, detail, status)
    if extra != f"HTTP {status}":
        message += f": {extra}"
    return TaskState(
        state="failed",
        error=RetryableError(message, code=code, vendor=VENDOR, http_status=status, request_id=rid),
    )


def parse_credits(status: int, headers: Mapping[str, str], body: bytes) -> CreditBalance:
    """``data`` (an array of pools) → balance = sum of pools, pools by unique_sign.

    docs/vendors.md, "AILab: credits and prices": third-party code sums all pools; the
    usable balance of one API is [unsure] ``common``
    plus its own pool, which callers can compute from ``pools``.

    A pool's ``balance`` is kept as read even when it is not a finite number (``NaN``,
    ``Infinity``, ``1e999``; JSON parsers accept them): it is what the vendor said, and
    the pool it came from stays named in ``pools``. Such a balance is unknown, never a
    large one: :mod:`pipeline.plan` says so instead of comparing it with a price.
    """
    doc = parse_envelope(status, headers, body)
    rid = _request_id(doc)
    data = doc.get("data")
    if not isinstance(data, list):
        raise _malformed("credits response: data is not an array of pools", status, rid)
    pools: dict[str, float] = {}
    for i, pool in enumerate(data):
        balance = as_float(pool.get("balance")) if isinstance(pool, dict) else None
        if balance is None:
            raise _malformed(f"credits response: pool {i} has no numeric balance", status, rid)
        assert isinstance(pool, dict)
        sign = as_text(pool.get("unique_sign")) or f"pool_{i}"
        pools[sign] = pools.get(sign, 0.0) + balance
    return CreditBalance(vendor=VENDOR, balance=sum(pools.values()), unit="credits", pools=pools)


# ------------------------------------------------------------------------ the class


class AILabProvider(VendorClient):
    """The :class:`~pipeline.providers.base.Provider` for AILabTools.

    One attempt per call; never sleeps, never loops. ``acquire`` (the shared rate
    budget) is awaited before every call to the API host; result downloads skip it.
    The session must carry no default headers: downloads go to storage hosts.
    """

    vendor = VENDOR
    wire = VendorWire(
        auth_headers, build_poll, parse_poll, build_credits, parse_credits, envelope_error
    )

    async def submit(
        self, operation: str, image: ImagePayload, params: VendorParams, files: ExtraFiles
    ) -> Submitted:
        with self._scrubbed():
            request = build_submit(operation, image, params, files)
        # Emotion editor is always sync; face-beauty-pro when asked ("AILab: emotion
        # editor", "AILab: face beauty pro").
        sync = operation == EMOTION_EDITOR or (
            operation == FACE_BEAUTY_PRO and str(params.get("task_type", "")) == "sync"
        )
        out = await self._billable(
            request,
            lambda resp: parse_submit(operation, resp.status, resp.headers, resp.body),
            sync=sync,
        )
        if out.task_id is not None:
            # Log every task id: a create retried after a timeout may duplicate
            # (docs/vendors.md, "Both vendors: no idempotency key").
            # Both ids are scrubbed by _billable (no key, no URL query, clipped).
            _log.info("ailab %s: task_id=%s request_id=%s", operation, out.task_id, out.request_id)
        return out
